"""The console a user reads: one line per epoch from rank 0 and the results, no Ray/MLflow INFO or
warning lines nobody can act on; -q and -v; --version; each flag means one thing."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")
NOISE = ("Reporting training result", "TrainingReport(", "PreemptionWatcher", "Token authentication",
         "INFO mlflow", "Creating initial MLflow database", "Requesting resources", "Setting up process group",
         "Started training worker group", "Traceback")


def _ebm(args, cwd, rc=0, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "EBM_"))}
    r = subprocess.run([EBM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == rc, f"exit {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_a_ray_run_prints_one_line_per_epoch_and_its_results_and_no_noise(tmp_path):
    r = _ebm(["train", "debug", "--set", "optim.epochs=2", "--num-workers", "2", "--name", "quiet-run",
              "--storage", str(tmp_path / "runs")], tmp_path)
    out = r.stdout + r.stderr
    assert [ln for ln in out.splitlines() if any(n in ln for n in NOISE)] == []
    epochs = [ln for ln in out.splitlines() if "epoch " in ln and "/2 |" in ln]
    assert len(epochs) == 2                       # rank 0 only
    assert "test nll:" in r.stdout and "MLflow run" in r.stdout
    assert len(out.splitlines()) <= 20, out


def test_quiet_verbose_and_version(tmp_path):
    train = ["train", "debug", "--local", "--set", "optim.epochs=2", "--storage", str(tmp_path / "runs")]
    r = _ebm([*train, "-q", "--name", "q"], tmp_path)
    assert "epoch 1/2" not in r.stdout and "test nll:" in r.stdout
    r = _ebm(["-v", *train, "--name", "v", "--tracking-uri", f"sqlite:///{tmp_path}/new.db"], tmp_path)
    assert "epoch 1/2" in r.stdout and "INFO alembic.runtime.migration" in r.stderr      # MLflow's own INFO lines
    assert "give -v or -q, not both" in _ebm(["-v", *train, "-q"], tmp_path, rc=2).stderr
    r = _ebm(["--version"], tmp_path)
    assert r.stdout.startswith("ebm 0.") and "torch" in r.stdout and "ray" in r.stdout


def test_flags_mean_one_thing(tmp_path):
    # the Ray cluster of train/tune is --ray-address; --address is the job server of submit/jobs only
    assert "unrecognized arguments: --address" in _ebm(["train", "debug", "--address", "auto"], tmp_path, rc=2).stderr
    assert "--ray-address apply to Ray Train runs only" in _ebm(["train", "debug", "--local", "--ray-address", "auto"],
                                                               tmp_path, rc=2).stderr
    help_text = _ebm(["predict", "--help"], tmp_path).stdout
    for flag in ("--M", "--interval-level", "--refine-steps", "--return-samples", "--seed"):   # the pyfunc's names
        assert flag in help_text
