"""The main job on a real local Ray (num_cpus=2) with a real SQLite MLflow store."""
import json
import os
import signal
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
FAULT_DRIVER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fault_driver.py")


def _cfg(**over):
    return Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"),
                            [f"{k}={v}" for k, v in over.items()])


def _run(tmp_path, name, cfg=None, faults=None, monkeypatch=None, **kw):
    """A 2-worker job; ``faults`` (see tests/faults.py) go to its workers through the worker function
    Ray runs — production code has no hook for them."""
    from pipelines.driver.train_job import run_job
    if faults:
        import faults as f
        f.register_by_value()
        monkeypatch.setattr("pipelines.worker.loop.worker_loop", f.worker_with_faults(faults))
    return run_job(cfg or _cfg(), name=name, num_workers=2, storage_path=str(tmp_path / "runs"),
                   tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", cpus_per_worker=0.5, **kw)


def _final_weights(tmp_path, name):
    from ebm import checkpoint
    ckpts = sorted(p for p in (tmp_path / "runs" / name).glob("checkpoint_*") if p.is_dir())
    return checkpoint.load(ckpts[-1])


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
    assert run.data.tags["version.torch"] == torch.__version__ and run.data.tags["data_fingerprint"].startswith("synthetic:toy1")
    loss = [m.value for m in c.get_metric_history(run.info.run_id, "train_loss")]
    assert len(loss) == 3 and loss[-1] < loss[0]
    spread = [m.value for m in c.get_metric_history(run.info.run_id, "param_spread_across_ranks")]
    assert spread == [0.0, 0.0, 0.0]
    assert c.get_metric_history(run.info.run_id, "test_nll")
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.toml", "plots", "checkpoint"} <= arts
    plots = [a.path for a in c.list_artifacts(run.info.run_id, "plots")]
    assert plots == ["plots/density_epoch002.png"]          # one per validated epoch (eval.every = 3)
    state = _final_weights(tmp, "base")
    assert state["epoch"] == 2 and state["config"]["proposal"]["K"] == 2 and "torch" in state["versions"]


def test_a_worker_failure_is_retried_from_the_last_checkpoint_with_identical_result(baseline, tmp_path, monkeypatch):
    base_tmp, _ = baseline
    faults = {"fail_at_epoch": 1, "fail_marker": str(tmp_path / "fired")}
    _run(tmp_path, "retry", max_failures=1, faults=faults, monkeypatch=monkeypatch)
    assert (tmp_path / "fired").exists()
    a, b = _final_weights(base_tmp, "base")["model"], _final_weights(tmp_path, "retry")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_on_one_rank_is_skipped_on_all_and_k_in_a_row_stop_the_run(ray_local, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ebm.loop import TrainingFailed
    # rank 1: NaN targets in its first batch of epoch 0, then in every batch from epoch 1
    with pytest.raises(TrainingFailed, match=r"3 non-finite losses in a row \(at epoch 2\)"):
        _run(tmp_path, "nan", cfg=_cfg(**{"optim.epochs": 3}), max_failures=1, max_nonfinite_in_row=3,
             faults={"nan_rank": 1, "nan_from_epoch": 1}, monkeypatch=monkeypatch)
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    run = c.search_runs([c.get_experiment_by_name("ebm").experiment_id])[0]
    assert run.info.status == "FAILED" and "3 non-finite losses" in run.data.tags["ebm.stop_reason"]
    # epoch 0: each rank skipped exactly one step (the mean over ranks is 1) and their weights agree
    assert [m.value for m in c.get_metric_history(run.info.run_id, "skipped_steps")] == [1.0]
    assert [m.value for m in c.get_metric_history(run.info.run_id, "param_spread_across_ranks")] == [0.0]
    # the stop is not retried: epoch 1 was never reported, and no attempt resumed
    assert [m.value for m in c.get_metric_history(run.info.run_id, "first_epoch")] == [0.0]


@pytest.fixture(scope="module")
def parquet_toy1(tmp_path_factory):
    from pipelines.data.ingest import ingest
    root = tmp_path_factory.mktemp("data") / "toy1"
    ingest("synthetic", "toy1", root, n={"train": 512, "val": 128, "test": 128}, progress=False)
    return root


def test_ray_data_path_streams_the_parquet_train_split_through_get_dataset_shard(ray_local, tmp_path, parquet_toy1):
    cfg = _cfg(**{"optim.epochs": 2, "task.data_dir": f'"{parquet_toy1}"'})
    metrics = _run(tmp_path, "raydata", cfg=cfg, ray_data=True)
    # 512 rows over 2 ranks at batch 32: 8 steps per rank, every example seen once per epoch
    assert metrics["epoch"] == 1 and metrics["steps"] == 8.0 and metrics["param_spread_across_ranks"] == 0.0
    assert metrics["test_nll"] < 3.0


def test_failed_run_is_marked_and_resumes_past_a_half_written_checkpoint(ray_local, tmp_path, parquet_toy1,
                                                                         monkeypatch):
    from mlflow.tracking import MlflowClient

    from ebm import checkpoint
    cfg = _cfg(**{"optim.epochs": 3, "task.data_dir": f'"{parquet_toy1}"'})
    with pytest.raises(Exception, match="injected failure at epoch 1"):
        _run(tmp_path, "crash", cfg=cfg, max_failures=0, monkeypatch=monkeypatch,
             faults={"fail_at_epoch": 1, "fail_marker": str(tmp_path / "fired")})
    monkeypatch.undo()
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    exp = c.get_experiment_by_name("ebm").experiment_id
    (run,) = c.search_runs([exp])
    assert run.info.status == "FAILED"
    assert run.data.tags["data_fingerprint"].startswith("sha256:")
    # a newer checkpoint directory whose write was cut short: Ray never registered it, and it is unreadable
    good = sorted(p for p in (tmp_path / "runs" / "crash").glob("checkpoint_*") if p.is_dir())
    assert (tmp_path / "fired").exists() and len(good) == 1
    half = tmp_path / "runs" / "crash" / "checkpoint_2999-01-01_00-00-00.000000"
    half.mkdir()
    (half / "checkpoint.pt").write_bytes((good[0] / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="half-written"):
        checkpoint.load(half)
    with pytest.raises(Exception, match="already exists.*--resume crash"):      # never continued by accident
        _run(tmp_path, "crash", cfg=cfg)
    metrics = _run(tmp_path, "crash", cfg=cfg, resume=True)
    assert metrics["first_epoch"] == 1 and metrics["epoch"] == 2      # resumed from epoch 0's checkpoint
    (run,) = c.search_runs([exp])
    assert run.info.status == "FINISHED" and run.info.run_id == metrics["mlflow_run_id"]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2]


def _checkpoint_files_outside(roots_allowed: list[str], since: float, data_dir: str) -> list[str]:
    """This run's checkpoints (checkpoint.pt of a run on ``data_dir``, or an ebm-ckpt-* temporary
    holding one) written since ``since`` anywhere under the temp dir and ~/ray_results, except under
    ``roots_allowed``. (Other processes on the machine may write checkpoints of their own meanwhile.)"""
    import tempfile

    from ebm import checkpoint

    def ours(path: str) -> bool:
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                                                        if f == "checkpoint.pt"]
        for f in files:
            try:
                if checkpoint.load(f)["config"]["task"]["data_dir"] == data_dir:
                    return True
            except Exception:        # half-written, or not a checkpoint of this project
                continue
        return os.path.isdir(path) and not files       # an empty temporary checkpoint directory
    found = []
    for top in {tempfile.gettempdir(), "/tmp", os.path.expanduser("~/ray_results")}:
        for dirpath, dirnames, filenames in os.walk(top):
            if any(dirpath.startswith(r) for r in roots_allowed):
                dirnames[:] = []
                continue
            for n in filenames + dirnames:
                p = os.path.join(dirpath, n)
                try:
                    recent = os.lstat(p).st_mtime >= since
                except OSError:
                    continue
                if recent and (n == "checkpoint.pt" or n.startswith("ebm-ckpt-")) and ours(p):
                    found.append(p)
    return found


def test_a_ten_epoch_image_run_leaves_no_checkpoint_copy_outside_its_storage(ray_local, tmp_path):
    """Every epoch's checkpoint is written to a temporary directory that Ray copies to --storage and
    that is then removed; the driver's final checkpoint goes to MLflow's artifact store. Nothing else."""
    from mlflow.tracking import MlflowClient

    from pipelines.data.ingest import ingest
    ingest("synthetic", "star", tmp_path / "star16", size=16, n={"train": 128, "val": 32, "test": 32}, progress=False)
    cfg = Config.from_toml(os.path.join(ROOT, "pipelines/configs/demo.toml"),
                           [f"task.data_dir=\"{tmp_path / 'star16'}\"", "optim.epochs=10", "sampler.M_train=16",
                            "sampler.M_eval=32", "eval.grid_nll=false", "eval.every=5"])
    t0 = time.time() - 1
    metrics = _run(tmp_path, "img10", cfg=cfg)
    assert metrics["epoch"] == 9
    run = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(metrics["mlflow_run_id"])
    artifacts = run.info.artifact_uri.removeprefix("file://")
    stored = sorted((tmp_path / "runs" / "img10").glob("checkpoint_*/checkpoint.pt"))
    assert len(stored) == 2                                     # num_to_keep
    assert _checkpoint_files_outside([str(tmp_path / "runs"), artifacts], t0, str(tmp_path / "star16")) == []


def test_replacing_the_dataset_during_a_run_fails_it_naming_the_change(ray_local, tmp_path):
    import threading

    from mlflow.tracking import MlflowClient

    from ebm.loop import TrainingFailed
    from pipelines.data.ingest import ingest
    from pipelines.driver import runs
    root = tmp_path / "toy1"
    first = ingest("synthetic", "toy1", root, n={"train": 512, "val": 64, "test": 64}, progress=False)
    cfg = _cfg(**{"optim.epochs": 300, "task.data_dir": f'"{root}"', "eval.every": 300})
    replaced = {}

    def replace_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while not runs.checkpoint_dirs(str(tmp_path / "runs"), "swap") and time.monotonic() < deadline:
            time.sleep(0.1)
        replaced["meta"] = ingest("synthetic", "toy1", root, seed=7, n={"train": 512, "val": 64, "test": 64},
                                  overwrite=True, progress=False)

    t = threading.Thread(target=replace_after_first_checkpoint)
    t.start()
    try:
        with pytest.raises(TrainingFailed, match="changed during the run") as e:
            _run(tmp_path, "swap", cfg=cfg, max_failures=1)
    finally:
        t.join()
    assert first["fingerprint"] in str(e.value) and replaced["meta"]["fingerprint"] in str(e.value)
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    (run,) = c.search_runs([c.get_experiment_by_name("ebm").experiment_id])
    assert run.info.status == "FAILED" and "changed during the run" in run.data.tags[runs.STOP_REASON_TAG]
    assert run.data.tags["data_fingerprint"] == first["fingerprint"]
    assert run.data.tags["ebm.data_verified"] == "footers"
    assert len(c.get_metric_history(run.info.run_id, "train_loss")) < 300


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
    r = subprocess.run([EBM, "train", "debug", "--set", f"task.data_dir={tmp_path}/nothing-here"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "task.data_dir" in r.stderr
    assert time.monotonic() - t < 60
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns.db").exists()


def _kill_ray_under(tmpdir: str) -> None:
    """End the Ray processes a SIGKILLed driver left behind: only those whose command line names our
    own temp dir (never anything else's Ray)."""
    out = subprocess.run(["pgrep", "-f", tmpdir], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def _logged_epochs(uri: str) -> int:
    import sqlite3
    path = uri[len("sqlite:///"):]
    if not os.path.exists(path):
        return 0
    with sqlite3.connect(path, timeout=5) as db:
        try:
            return db.execute("select count(*) from metrics where key = 'train_loss'").fetchone()[0]
        except sqlite3.OperationalError:     # tables not created yet
            return 0


def _wait_for(cond, proc, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_killed_driver_resumes_at_epoch_3_and_sigterm_marks_the_run_killed(tmp_path):
    import re
    import tempfile

    from mlflow.tracking import MlflowClient
    ray_tmp = tempfile.mkdtemp(prefix="ebmr", dir="/tmp")     # short: Ray's socket paths have a length limit
    # every rank holds at the start of epoch index 2 (once), after epochs 0 and 1 were checkpointed
    faults = {"pause_at_epoch": 2, "pause_marker": str(tmp_path / "paused")}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", EBM_RAY_TMPDIR=ray_tmp)
    args = ["train", "debug", "--set", "optim.epochs=5", "--set", "task.n_train=2048", "--storage",
            str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"]
    try:
        p = subprocess.Popen([sys.executable, FAULT_DRIVER, json.dumps(faults)] + args + ["--name", "killme"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        uri = f"sqlite:///{tmp_path}/mlruns.db"
        # epoch 2 is in MLflow once Train has registered its checkpoint (the callback runs after that)
        _wait_for(lambda: _logged_epochs(uri) >= 2 and (tmp_path / "paused").exists(), p, "its second checkpoint")
        os.killpg(p.pid, 9)
        p.wait()
        _kill_ray_under(ray_tmp)
        log = tmp_path / "resume.log"
        with open(log, "w") as out:
            p = subprocess.Popen([EBM, *args, "--resume", "killme"], cwd=tmp_path, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            _wait_for(lambda: re.search(r"epoch \d/5", log.read_text()), p, "the resumed run's first epoch")
            p.send_signal(signal.SIGTERM)            # the driver only: it must end its MLflow run and Ray
            assert p.wait(timeout=120) == 130
    finally:
        _kill_ray_under(ray_tmp)
    text = log.read_text()
    # resumed after the last checkpoint Ray had registered (a third one, being written at the kill, is not)
    assert re.search(r"epoch (\d)/5", text).group(1) == "3", text[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    (run,) = c.search_runs([c.get_experiment_by_name("ebm").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")][:2] == [0, 1]


def test_local_and_a_one_worker_ray_run_give_the_same_test_nll(ray_local, tmp_path):
    """One loop: the same seed through ``--local`` and through a 1-worker Ray Train job gives the same
    numbers (one torch thread each, so the reductions run in the same order)."""
    from pipelines.driver.local import train_local
    from pipelines.driver.train_job import run_job
    cfg = _cfg(**{"optim.epochs": 2, "eval.every": 1, "eval.select": '"best_val"'})
    ray = run_job(cfg, name="one", num_workers=1, storage_path=str(tmp_path / "runs"), threads=1,
                  tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", cpus_per_worker=1.0)
    (local,) = train_local(cfg, name="one-local", storage=str(tmp_path / "runs"), threads=1,
                           tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    assert ray["test_nll"] == local["test_nll"] and ray["test_is_nll"] == local["test_is_nll"]
    assert ray["selected_epoch"] == local["selected_epoch"]
