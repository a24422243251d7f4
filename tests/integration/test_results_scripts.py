"""The results scripts of issue 16 on real runs: two seeds of a tiny toy run in a SQLite store, then
``results/diagnose_coverage.py`` (coverage per source of each run's predictive distribution) and
``results/extend_runs.py`` (the finished runs continued to more epochs, in the same MLflow runs)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "task.n_train=128", "--set", "task.n_val=64", "--set", "task.n_test=64", "--set", "eval.every=1",
         "--set", "eval.select=best_val", "--set", "sampler.M_eval=64"]


def _script(name, *args, cwd=ROOT):
    r = subprocess.run([sys.executable, str(ROOT / "results" / name), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert r.returncode == 0, f"{name} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _diagnosis_rows(out: str) -> list[list[str]]:
    """The body rows of diagnose_coverage.py's table, as cells."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| run ")]


def test_diagnose_and_extend_finished_runs(tmp_path, monkeypatch):
    import torch
    from mlflow.tracking import MlflowClient

    from pipelines.driver.results import collect
    torch.set_num_threads(1)
    monkeypatch.setenv("EBM_STORAGE_PATH", str(tmp_path / "runs"))       # the checkpoints extend_runs resumes
    uri = f"sqlite:///{tmp_path}/m.db"
    argv = ["train", "debug", "--local", "--seeds", "2", "--tracking-uri", uri, "--experiment", "e",
            "--group", "dbg/learned_K4", "--set", "optim.epochs=2", *SMALL]
    monkeypatch.setattr("sys.argv", ["ebm", *argv])
    assert cli.main(argv) == 0
    where = ["--tracking-uri", uri, "--experiment", "e", "--groups", "dbg/*"]

    out = _script("diagnose_coverage.py", *where, "--seeds", "1", "--M", "16", "256")
    rows = _diagnosis_rows(out)
    assert [(r[0], r[1], r[2]) for r in rows] == [("`dbg/learned_K4` seed 1 (selected epoch 1; 2 epochs)", "ebm_grid", ""),
                                                  ("", "prediction", "16"), ("", "prediction", "256"), ("", "proposal", "")]
    for r in rows:
        cov = [float(v) for v in r[4:]]
        assert len(cov) == 4 and all(0 <= a <= b <= 1 for a, b in zip(cov, cov[1:]))     # 50 ≤ 80 ≤ 90 ≤ 95 %
        assert (0 < float(r[3]) <= 1) if r[1] == "prediction" else r[3] == ""            # ESS / M
    # logged to the run: the page's {{diagnosis}} table, rebuilt from the store (or its export), is the same
    from pipelines.driver.results_page import directive
    (g,) = collect(uri, "e")
    assert directive("diagnosis", "dbg/*", [g]) == out
    assert "diag_epoch" not in next(r for r in g.runs if r.tags["seed"] == "0").metrics    # seed 0 was not diagnosed

    out = _script("extend_runs.py", *where, "--epochs", "3", "--logs", str(tmp_path / "logs"))
    assert out.startswith("2 runs to continue to 3 epochs (0 already there) in dbg/*")
    assert out.count("rc=0") == 2 and (tmp_path / "logs" / "extend.q1.log").exists()
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("e").experiment_id])
    assert len(runs) == 2                                              # the same runs went on
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["ebm.param.optim.epochs"] == "3"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_nll")] == [0, 1, 2]
    (g,) = collect(uri, "e")
    assert g.param("optim.epochs") == "3"                              # the tables read the new length
    # seed 1's diagnosis was of the epoch-1 model: if the continued run now selects another epoch, the
    # page says its diagnosis is stale instead of showing another model's figures
    one = next(r for r in g.runs if r.tags["seed"] == "1")
    page = directive("diagnosis", "dbg/*", [g])
    if one.metrics["selected_epoch"] != 1:
        assert "Diagnosed before their selected epoch changed" in page and "| ebm_grid |" not in page
    else:
        assert page == out.replace("2 epochs", "3 epochs")
    assert _script("extend_runs.py", *where, "--epochs", "3").startswith(
        "0 runs to continue to 3 epochs (2 already there)")
    # a batch run again counts the continued seeds as done (they were started at its length, 2 epochs):
    # only seed 2 of 0..2 is missing
    r = subprocess.run(["bash", str(ROOT / "results" / "run_cells.sh"), "debug", "2", "128", "learned_K4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DRY_RUN": "1", "TASK": "dbg", "SEEDS": "3", "STORE": str(tmp_path / "m.db"),
                            "EXPERIMENT": "e"})
    assert r.returncode == 0 and [ln.split(" ", 2)[2] for ln in r.stdout.splitlines()] == ["dbg/learned_K4 seeds 2..2"], \
        r.stdout + r.stderr

    # the images' step decay (DECAY): a run known only from the export (another machine's store, its
    # checkpoints gone with it) is done only when it already has the decay's length; this store's can still
    # be decayed
    from pipelines.driver.results import read_export
    export = tmp_path / "runs.jsonl"
    assert cli.main(["results", "e", "--tracking-uri", uri, "--export", str(export)]) == 0

    def cells(decay, store, dry=True, **env):
        r = subprocess.run(["bash", str(ROOT / "results" / "run_cells.sh"), "debug", "2", "128", "learned_K4"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, **({"DRY_RUN": "1"} if dry else {}), "TASK": "dbg", "SEEDS": "3",
                                "STORE": str(store), "EXPERIMENT": "e", "DECAY": decay, "EXPORT": str(export), **env})
        assert r.returncode == 0, r.stdout + r.stderr
        return [ln.split(" ", 2)[2] for ln in r.stdout.splitlines() if ln.startswith("=== ") and " seeds " in ln]
    assert cells("3 1e-4", tmp_path / "gone.db") == ["dbg/learned_K4 seeds 2..2"]     # at the decay's length: done
    assert cells("4 1e-4", tmp_path / "gone.db") == ["dbg/learned_K4 seeds 0..2"]     # short, no checkpoint: again
    assert cells("4 1e-4", tmp_path / "m.db") == ["dbg/learned_K4 seeds 2..2"]        # short, here: decayable
    # for real: seed 2 trained (2 epochs), decayed (to 3 at lr 1e-4) and in the export as soon as it ends
    assert cells("3 1e-4", tmp_path / "m.db", dry=False, SEED0="2", SEEDS="1", EXTRA=" ".join(SMALL),
                 LOGS=str(tmp_path / "decay-logs"), EBM_STORAGE_PATH=str(tmp_path / "runs")) == ["dbg/learned_K4 seeds 2..2"]
    (two,) = [r for r in read_export(export, "e") if r.params["seed"] == "2"]
    assert two.status == "FINISHED" and two.params["optim.epochs"] == "3" and two.started_epochs() == 2
    assert float(two.tags["ebm.param.optim.lr"]) == 1e-4 and len(read_export(export, "e")) == 3


def test_a_run_on_a_dataset_is_diagnosed_on_that_datasets_test_split(tmp_path, monkeypatch):
    """A run trained on a Parquet dataset (``task.data_dir``) is diagnosed on the test split it was
    evaluated on, not on data generated anew: the EBM-on-grid and proposal rows (no sampling in either)
    equal the coverage the run's own test evaluation logged, at every level. The dataset is toy 1
    ingested with another seed than the config's, so regenerating the task would give other examples."""
    import torch

    from mlflow.tracking import MlflowClient

    from pipelines.data.ingest import ingest
    from pipelines.driver.results_page import LEVELS
    torch.set_num_threads(1)
    monkeypatch.setenv("EBM_STORAGE_PATH", str(tmp_path / "runs"))
    ds = tmp_path / "toy1-seed7"
    ingest("synthetic", "toy1", ds, seed=7, n={"train": 128, "val": 64, "test": 200}, progress=False)
    uri = f"sqlite:///{tmp_path}/m.db"
    argv = ["train", "debug", "--local", "--seeds", "1", "--tracking-uri", uri, "--experiment", "e", "--group",
            "ds/learned_K4", "--set", "optim.epochs=2", "--set", f"task.data_dir={ds}", "--set", "eval.every=1",
            "--set", "eval.select=best_val", "--set", "sampler.M_eval=64"]
    monkeypatch.setattr("sys.argv", ["ebm", *argv])
    assert cli.main(argv) == 0
    out = _script("diagnose_coverage.py", "--tracking-uri", uri, "--experiment", "e", "--groups", "ds/*",
                  "--M", "64")
    rows = {r[1]: r for r in _diagnosis_rows(out)}
    assert set(rows) == {"ebm_grid", "prediction", "proposal"}, out
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("e").experiment_id])
    logged = run.data.metrics
    for source in ("ebm_grid", "proposal"):
        assert [float(v) for v in rows[source][4:]] == [
            round(logged[f"test_coverage_{source}_{lv}"], 3) for lv in LEVELS], (source, out, logged)


def test_a_batch_continues_the_runs_an_interruption_stopped(tmp_path, monkeypatch):
    """A trainer killed mid-run (SIGKILL: the session ended) leaves its MLflow run RUNNING. While a trainer
    of the group lives, ``extend_runs.py --interrupted`` refuses; once none does, it marks the run KILLED
    and continues it from its latest checkpoint to its own length, in the same MLflow run."""
    import signal
    import time

    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/m.db"
    ebm = os.path.join(os.path.dirname(sys.executable), "ebm")
    env = {**os.environ, "EBM_STORAGE_PATH": str(tmp_path / "runs"), "RAY_USAGE_STATS_ENABLED": "0"}
    monkeypatch.setenv("EBM_STORAGE_PATH", str(tmp_path / "runs"))
    epochs = 4
    trainer = subprocess.Popen([ebm, "train", "debug", "--local", "--seeds", "1", "--tracking-uri", uri, "--experiment",
                                "e", "--group", "dbg/cut", "--set", f"optim.epochs={epochs}", *SMALL, "--threads", "1"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                               env=env)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs" / "dbg").glob("cut-seed0-*/checkpoint_*")):
            assert trainer.poll() is None and time.monotonic() < deadline, "no checkpoint from the trainer"
            time.sleep(0.02)
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait()
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("e").experiment_id])
    cut = len(c.get_metric_history(run.info.run_id, "train_loss"))
    # stopped mid-run (maybe before its first epoch reached MLflow: the checkpoint is written first), never ended
    assert run.info.status == "RUNNING" and cut < epochs
    where = ["--tracking-uri", uri, "--experiment", "e", "--groups", "dbg/*"]
    # a trainer of the group alive on this machine (another batch): nothing is touched
    other = subprocess.Popen([ebm, "train", "debug", "--local", "--tracking-uri", uri, "--experiment", "e", "--group",
                              "dbg/other", "--set", "optim.epochs=500", "--no-track"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        r = subprocess.run([sys.executable, str(ROOT / "results" / "extend_runs.py"), "--interrupted", *where],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"pid {other.pid}" in r.stdout and "nothing done" in r.stdout, r.stdout + r.stderr
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
    assert c.get_run(run.info.run_id).info.status == "RUNNING"
    out = _script("extend_runs.py", "--interrupted", *where, "--logs", str(tmp_path / "logs"))
    assert out.startswith("1 interrupted runs to continue in dbg/* (1 left RUNNING were marked KILLED)")
    (again,) = c.search_runs([c.get_experiment_by_name("e").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")][-1] == epochs - 1
    assert "ebm.stop_reason" not in again.data.tags and "test_nll" in again.data.metrics
    assert _script("extend_runs.py", "--interrupted", *where).startswith("0 interrupted runs")


def test_a_run_cut_before_its_first_checkpoint_is_left_for_its_batch_to_train_again(tmp_path, monkeypatch):
    """A trainer killed while it wrote its first checkpoint (seen: a batch stopped seconds into a seed) leaves
    a RUNNING run with nothing under the storage to resume. ``--interrupted`` must not fail on it — that
    failure stopped the whole batch — but mark it KILLED, name it, and continue the runs it can."""
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/m.db"
    storage = tmp_path / "runs"
    (storage / "dbg" / "cut-seed3-20261201-000000-abcd" / ".tmp_2026-12-01_00-00-01").mkdir(parents=True)
    monkeypatch.setenv("EBM_STORAGE_PATH", str(storage))
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("e"), tags={
        "ebm.group": "dbg/cut", "ebm.run_name": "dbg/cut-seed3-20261201-000000-abcd",
        "ebm.command": "ebm train debug --local --seeds 1 --tracking-uri x --experiment e --group dbg/cut "
                       "--set seed=3 --set optim.epochs=4"})
    c.log_param(run.info.run_id, "seed", "3")
    c.log_param(run.info.run_id, "optim.epochs", "4")
    out = _script("extend_runs.py", "--interrupted", "--tracking-uri", uri, "--experiment", "e", "--groups", "dbg/*",
                  "--logs", str(tmp_path / "logs"))
    assert out.startswith("0 interrupted runs to continue in dbg/* (1 left RUNNING were marked KILLED)"), out
    assert "dbg/cut seed 3 (dbg/cut-seed3-20261201-000000-abcd): stopped before its first checkpoint" in out, out
    assert c.get_run(run.info.run_id).info.status == "KILLED"
    assert "stopped before its first checkpoint" in c.get_run(run.info.run_id).data.tags["ebm.stop_reason"]
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())   # no trainer was started
