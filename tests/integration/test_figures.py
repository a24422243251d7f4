"""The pictures and progress bars of issue 14, on real files, real models and a real MLflow store:
``ebm evaluate`` writes calibration.png / densities.png / calibration.json and logs them to the
model's run; ``ebm data inspect --sheet`` draws labelled examples; long commands show a tqdm bar with
a rate when forced or on a terminal, and none with -q."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EBM = [os.path.join(os.path.dirname(sys.executable), "ebm")]


def _png(path, min_side=300):
    """A real, non-blank PNG of a useful size -> its pixels."""
    im = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert min(im.shape) >= min_side and im.std() > 5, (path, im.shape, im.std())
    return im


def _train(uri, tmp, name, overrides):
    from ebm.config import Config
    from pipelines.driver.local import train_local
    from pipelines.serve import registry
    cfg = Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"), overrides)
    (res,) = train_local(cfg, name=name, tracking_uri=uri, experiment="figures", threads=1, storage=str(tmp / "runs"))
    registry.register(uri, name, run_id=res["mlflow_run_id"], alias="champion")
    return res["mlflow_run_id"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A star 16×16 dataset and a 2-target table dataset, each with a tiny registered model."""
    import torch

    from pipelines.data.ingest import ingest
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("figures")
    uri = f"sqlite:///{tmp}/mlflow.db"
    ingest("synthetic", "star", tmp / "star", size=16, n={"train": 96, "val": 16, "test": 40}, progress=False)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 400)
    rows = "\n".join(f"{a:.5f},{np.sin(3 * a) + 0.2 * rng.standard_normal():.5f},{np.degrees(2 * a) % 360:.3f}"
                     for a in x)
    (tmp / "two.csv").write_text("u,height,angle\n" + rows + "\n")
    ingest("table", tmp / "two.csv", tmp / "two", task="two", targets={"names": ["height", "angle"],
           "circular": {"angle": 360.0}, "units": {"height": "m"}}, progress=False)
    star = _train(uri, tmp, "star-fig", [f'task.data_dir="{tmp / "star"}"', 'task.name="star"', "task.image_size=16",
                                         'features.kind="resnet_slim"', "features.width=4", "optim.epochs=1",
                                         "eval.batch_size=16", "sampler.M_eval=32", "sampler.refine_steps=0"])
    two = _train(uri, tmp, "two-fig", [f'task.data_dir="{tmp / "two"}"', "optim.epochs=2", "sampler.refine_steps=0"])
    return {"uri": uri, "tmp": tmp, "runs": {"star-fig": star, "two-fig": two}}


@pytest.mark.parametrize("name,data,sources", [("star-fig", "star", {"prediction", "proposal", "ebm_grid"}),
                                               ("two-fig", "two", {"prediction", "proposal"})])
def test_evaluate_writes_the_figures_and_logs_them_to_the_models_run(store, name, data, sources, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ebm.calibration import LEVELS
    from pipelines.cli import main
    monkeypatch.setenv("EBM_PROGRESS", "1")          # stderr is not a terminal here: forced on
    out = store["tmp"] / f"ev-{name}"
    assert main(["evaluate", f"models:/{name}@champion", "--data", str(store["tmp"] / data), "--out", str(out),
                 "--M", "64", "--examples", "3", "--tracking-uri", store["uri"]]) == 0
    text, err = capsys.readouterr()
    assert "coverage of the 50/80/90/95% intervals, prediction:" in text and "logged to MLflow run" in text
    assert "evaluate test" in err and "ex/s" in err                # the bar, with a rate
    cal = json.loads((out / "calibration.json").read_text())
    assert set(cal["sources"]) == sources and cal["levels"] == list(LEVELS)
    # one pass: the calibration report holds the PITs the coverage figures of metrics.json came from
    metrics = json.loads((out / "metrics.json").read_text())
    for src, key in (("prediction", "coverage_90"), ("proposal", "coverage_proposal_90"), ("ebm_grid", "coverage_ebm_grid_90")):
        if src in sources:
            assert cal["sources"][src]["joint"][LEVELS.index(0.9)] == pytest.approx(metrics[key], abs=1e-6), src   # float32 mean vs float64
    for src in cal["sources"].values():
        cov = np.asarray(src["pooled"])
        assert len(cov) == len(LEVELS) and np.all(np.diff(cov) >= 0) and 0 <= cov[0] and cov[-1] <= 1
        assert np.asarray(src["coverage"]).shape == (len(LEVELS), 2 if data == "two" else 1)
    _png(out / "calibration.png")
    dens = _png(out / "densities.png")
    assert dens.shape[0] > dens.shape[1] * 0.8            # three rows of panels, one per example
    run = store["runs"][name]
    logged = {a.path.rsplit("/", 1)[-1] for a in MlflowClient(store["uri"]).list_artifacts(run, f"evaluate/{data}_test")}
    assert {"calibration.png", "densities.png", "calibration.json", "metrics.json"} <= logged


def test_evaluate_without_out_logs_only_and_no_log_keeps_the_run_untouched(store, capsys, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    monkeypatch.chdir(tmp_path)
    c = MlflowClient(store["uri"])
    run = store["runs"]["two-fig"]
    args = ["evaluate", "models:/two-fig@champion", "--data", str(store["tmp"] / "two"), "--split", "val",
            "--M", "32", "--tracking-uri", store["uri"]]
    assert main(args + ["--no-log"]) == 0
    assert not c.list_artifacts(run, "evaluate/two_val") and not list(tmp_path.iterdir())
    assert main(args) == 0
    assert "logged to MLflow run" in capsys.readouterr().out
    assert {a.path.rsplit("/", 1)[-1] for a in c.list_artifacts(run, "evaluate/two_val")} >= {"densities.png"}
    assert main(args + ["--examples", "0"]) == 2


def test_inspect_sheet_shows_labelled_images_and_vector_targets(store, tmp_path):
    from pipelines.cli import main
    assert main(["data", "inspect", str(store["tmp"] / "star"), "--sheet", str(tmp_path / "s.png"), "-n", "10"]) == 0
    _png(tmp_path / "s.png", min_side=250)
    assert main(["data", "inspect", str(store["tmp"] / "two"), "--sheet", str(tmp_path / "t.png")]) == 0
    t = _png(tmp_path / "t.png")
    assert t.shape[1] > 1.8 * t.shape[0]             # one panel per target dim, side by side
    assert main(["data", "inspect", str(store["tmp"] / "star"), "--sheet", str(tmp_path / "x.png"), "-n", "0"]) == 2


def _on_a_terminal(argv, env):
    """Run a command with stderr on a pseudo-terminal (as a user's console) -> what the terminal showed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))     # a terminal has a size
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL, env=env,
                            cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:         # EIO: the command closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(300) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_on_a_terminal_or_when_forced_and_never_with_q(store):
    env = {k: v for k, v in os.environ.items() if k not in ("EBM_PROGRESS", "EBM_QUIET")}
    data = str(store["tmp"] / "star")
    shown = _on_a_terminal([*EBM, "data", "inspect", data, "--verify"], env)
    assert "hashing rows" in shown and "rows/s" in shown
    assert "hashing rows" not in _on_a_terminal([*EBM, "-q", "data", "inspect", data, "--verify"], env)
    # not a terminal (a log file, CI): no bar unless forced
    quiet = subprocess.run([*EBM, "data", "inspect", data, "--verify"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert quiet.returncode == 0 and "hashing rows" not in quiet.stderr
    forced = subprocess.run([*EBM, "data", "ingest", "synthetic", "toy1", "--out", str(store["tmp"] / "t1"),
                             "--n-train", "300", "--n-val", "30", "--n-test", "30"], capture_output=True, text=True,
                            env={**env, "EBM_PROGRESS": "1"}, cwd=ROOT)
    assert forced.returncode == 0 and "ingest t1" in forced.stderr and "rows/s" in forced.stderr
    kept_quiet = subprocess.run([*EBM, "data", "ingest", "synthetic", "toy1", "--out", str(store["tmp"] / "t2"),
                                 "--n-train", "300", "--n-val", "30", "--n-test", "30", "--quiet"],
                                capture_output=True, text=True, env={**env, "EBM_PROGRESS": "1"}, cwd=ROOT)
    assert kept_quiet.returncode == 0 and "rows/s" not in kept_quiet.stderr     # ingest --quiet: no progress


def test_the_sweep_figure_has_a_line_per_setting_and_counts_the_trials_it_cannot_show(tmp_path):
    from pipelines.driver.tune_report import plot
    rows = [{"proposal.K": K, "sampler.M_train": M, "val_nll": 1.5 + 0.3 / K + 1 / M + 0.01 * s}
            for K in (1, 2, 4) for M in (16, 64) for s in range(2)]
    rows.append({"proposal.K": 8, "sampler.M_train": 64, "val_nll": float("nan")})       # an errored trial
    im = _png(plot(rows, tmp_path / "sweep.png"))
    assert im.shape[1] > 2 * im.shape[0] * 0.9             # two panels side by side
    assert plot([], tmp_path / "empty.png").stat().st_size > 1000     # a sweep where nothing validated still draws
