"""The main job on a real local Ray (num_cpus=2) with a real SQLite MLflow store."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from ebm.config import Config

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")


@pytest.fixture(scope="module")
def ray_local():
    import ray
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(**over):
    return Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"),
                            [f"{k}={v}" for k, v in over.items()])


def _run(tmp_path, name, cfg=None, **kw):
    from pipelines.train_job import run_job
    return run_job(cfg or _cfg(), name=name, num_workers=2, storage_path=str(tmp_path / "runs"),
                   tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", cpus_per_worker=0.5, **kw)


def _final_weights(tmp_path, name):
    from pipelines.distributed import load_checkpoint_dir
    ckpts = sorted(p for p in (tmp_path / "runs" / name).glob("checkpoint_*") if p.is_dir())
    return load_checkpoint_dir(ckpts[-1])


@pytest.fixture(scope="module")
def baseline(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    metrics = _run(tmp, "base")
    return tmp, metrics


def test_two_worker_ddp_run_learns_keeps_ranks_identical_and_tracks_everything(baseline):
    from mlflow.tracking import MlflowClient
    tmp, metrics = baseline
    assert metrics["param_spread_across_ranks"] == 0.0
    c = MlflowClient(f"sqlite:///{tmp}/mlruns.db")
    run = c.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["proposal.K"] == "2" and run.data.tags["git_sha"]
    loss = [m.value for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert len(loss) == 3 and loss[-1] < loss[0]
    spread = [m.value for m in c.get_metric_history(run.info.run_id, "param_spread_across_ranks")]
    assert spread == [0.0, 0.0, 0.0]
    assert c.get_metric_history(run.info.run_id, "test_nll")
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.toml", "plots", "checkpoint"} <= arts
    plots = [a.path for a in c.list_artifacts(run.info.run_id, "plots")]
    assert len(plots) == 3 and all(p.endswith(".png") for p in plots)
    state = _final_weights(tmp, "base")
    assert state["epoch"] == 2 and state["config"]["proposal"]["K"] == 2 and "torch" in state["versions"]


def test_a_worker_failure_is_retried_from_the_last_checkpoint_with_identical_result(baseline, tmp_path):
    base_tmp, _ = baseline
    hooks = {"fail_at_epoch": 1, "fail_marker": str(tmp_path / "fired")}
    _run(tmp_path, "retry", max_failures=1, test_hooks=hooks)
    assert (tmp_path / "fired").exists()
    a, b = _final_weights(base_tmp, "base")["model"], _final_weights(tmp_path, "retry")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_on_one_rank_is_skipped_on_all_ranks(ray_local, tmp_path):
    metrics = _run(tmp_path, "nan", cfg=_cfg(**{"optim.epochs": 1}), test_hooks={"nan_rank": 1})
    # every rank skipped exactly one step (the mean over ranks is 1) and their weights agree
    assert metrics["skipped_steps"] == 1.0 and metrics["param_spread_across_ranks"] == 0.0


def test_a_failing_job_marks_the_mlflow_run_failed(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient
    with pytest.raises(Exception):
        _run(tmp_path, "fails", cfg=_cfg(**{"optim.epochs": 1}), max_failures=0,
             test_hooks={"fail_at_epoch": 0})
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_experiment_by_name("ebm").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_invalid_config_and_dead_tracking_server_fail_fast_before_ray(tmp_path):
    t = time.monotonic()
    r = subprocess.run([EBM, "train", "debug", "--set", "proposal.K=0"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "proposal.K must be an integer >= 1" in r.stderr
    r = subprocess.run([EBM, "train", "debug", "--tracking-uri", f"http://127.0.0.1:{_free_port()}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "unreachable" in r.stderr
    assert time.monotonic() - t < 60
    assert not (tmp_path / "runs").exists()


def _kill_ray_under(tmpdir: str) -> None:
    """End the Ray processes a SIGKILLed driver left behind: only those whose command line names our
    own temp dir (never anything else's Ray)."""
    out = subprocess.run(["pgrep", "-f", tmpdir], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def test_a_killed_driver_resumes_from_its_latest_checkpoint(tmp_path):
    import tempfile
    ray_tmp = tempfile.mkdtemp(prefix="ebmr", dir="/tmp")     # short: Ray's socket paths have a length limit
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", EBM_RAY_TMPDIR=ray_tmp)
    args = [EBM, "train", "debug", "--set", "optim.epochs=5", "--set", "task.n_train=2048", "--storage",
            str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]
    p = subprocess.Popen(args + ["--name", "killme"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = tmp_path / "runs" / "killme"
    deadline = time.monotonic() + 240
    while len(list(run_dir.glob("checkpoint_*"))) < 2:
        assert p.poll() is None, "the job ended before its second checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(p.pid, 9)
    p.wait()
    _kill_ray_under(ray_tmp)
    r = subprocess.run(args + ["--resume", "killme"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=400)
    _kill_ray_under(ray_tmp)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "epoch 1/5" not in out and "epoch 5/5" in out
    import re
    first = int(re.search(r"epoch (\d)/5", out).group(1))
    # resumed after the last checkpoint Ray had registered: epoch index 1 or 2 (checkpoint 2 may have been
    # mid-upload at the kill, and a half-written one is never loaded), never from scratch
    assert first in (2, 3, 4)
