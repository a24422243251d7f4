"""MLflow tracking against a real SQLite store: concurrent writers, fail-fast URIs, run reopening."""
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines import tracking

pytestmark = pytest.mark.integration

WRITER = """
import sys, time
from pipelines import tracking
uri, run_id, key, go = sys.argv[1:5]
while not __import__("os").path.exists(go):
    time.sleep(0.01)
for step in range(200):
    tracking.log_metrics(uri, run_id, {key: float(step)}, step=step)
"""

STARTER = """
import sys, time
from pipelines import tracking
uri, name, go = sys.argv[1:4]
while not __import__("os").path.exists(go):
    time.sleep(0.001)
print(tracking.start_run(uri, "ebm", name, {"a": 1}, {}, "seed = 0\\n"))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _released_together(script: str, argvs: list[list[str]], go) -> list[subprocess.Popen]:
    """Start one process per argv; each waits on the same start line (``go``), then all go at once."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in argvs]
    time.sleep(3)           # all have imported mlflow and wait on the start line
    go.write_text("go")
    return procs


def test_two_concurrent_writers_of_200_metrics_each_lose_nothing(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    run_id = tracking.start_run(uri, "ebm", "shared", {"a": 1}, {}, "seed = 0\n")
    go = tmp_path / "go"
    procs = _released_together(WRITER, [[uri, run_id, key, str(go)] for key in ("from_a", "from_b")], go)
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    c = MlflowClient(uri)
    for key in ("from_a", "from_b"):
        hist = c.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in hist) == [(s, float(s)) for s in range(200)]


@pytest.mark.parametrize("cache", ["none", "template"])
def test_two_jobs_starting_together_on_a_new_store_both_get_their_run(tmp_path, monkeypatch, cache):
    """Both create the SQLite schema and the experiment at once; without the store lock one of them
    failed (alembic CircularDependencyError, or "duplicate column name") in every try. Both ways a new
    store is made: MLflow's migrations (no usable cache: $XDG_CACHE_HOME is a file) and the copy of
    the empty store (a cache folder that the first of them fills)."""
    from mlflow.tracking import MlflowClient
    if cache == "none":
        (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for attempt in range(2):
        d = tmp_path / str(attempt)
        d.mkdir()
        uri, go = f"sqlite:///{d}/mlruns.db", d / "go"
        procs = _released_together(STARTER, [[uri, name, str(go)] for name in ("job_a", "job_b")], go)
        ids = []
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-2000:]
            ids.append(out.strip())
        c = MlflowClient(uri)
        exps = [e for e in c.search_experiments() if e.name == "ebm"]
        assert len(exps) == 1
        runs = c.search_runs([exps[0].experiment_id])
        assert sorted(r.info.run_id for r in runs) == sorted(ids) and len(set(ids)) == 2
    assert (tmp_path / "cache").is_file() or len(list((tmp_path / "cache" / "ebm-proposals").glob("*.db"))) == 1


def _schema(db) -> tuple[set, list]:
    """The schema as sets of definition lines per object (alembic's table rebuilds write a table's
    constraints in varying order: two stores MLflow makes differ in that order) and the revision."""
    import sqlite3
    with sqlite3.connect(db) as con:
        sql = {(name, frozenset(ln.strip().rstrip(",") for ln in text.splitlines()))
               for name, text in con.execute("select name, sql from sqlite_master where sql is not null")}
        return sql, con.execute("select version_num from alembic_version").fetchall()


def test_a_new_store_is_a_copy_of_mlflows_empty_store_and_works_like_one_mlflow_made(tmp_path, monkeypatch):
    """A new SQLite store starts as a copy of the empty store MLflow migrated once (5 s of MLflow's
    migrations saved per new store): the same tables and schema revision as a store MLflow creates
    itself, and MLflow gives it its Default experiment with this store's artifact root on opening."""
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "own").mkdir()
    (tmp_path / "ours").mkdir()
    MlflowClient(f"sqlite:///{tmp_path}/own/mlruns.db").search_experiments()       # MLflow makes it
    uri = f"sqlite:///{tmp_path}/ours/mlruns.db"
    run_id = tracking.start_run(uri, "ebm", "job", {"a": 1}, {}, "seed = 0\n")
    (template,) = (tmp_path / "cache" / "ebm-proposals").glob("mlflow-*-empty-store.db")
    assert _schema(tmp_path / "ours/mlruns.db") == _schema(tmp_path / "own/mlruns.db") == _schema(template)
    c = MlflowClient(uri)
    exps = {e.name: e for e in c.search_experiments()}
    assert set(exps) == {"Default", "ebm"} and exps["Default"].experiment_id == "0"
    assert exps["Default"].artifact_location == MlflowClient(f"sqlite:///{tmp_path}/own/mlruns.db").get_experiment(
        "0").artifact_location                                        # both: ./mlruns/0 of this folder
    assert exps["ebm"].artifact_location == (tmp_path / "ours" / "mlruns-artifacts").as_uri()
    tracking.end_run(uri, run_id, "FINISHED")
    assert c.get_run(run_id).info.status == "FINISHED"
    # the template is MLflow's empty store: nothing of the stores made from it went back into it
    import sqlite3
    with sqlite3.connect(template) as con:
        assert con.execute("select count(*) from experiments").fetchone() == (0,)
        assert con.execute("select count(*) from runs").fetchone() == (0,)
    # an existing store is never replaced
    before = (tmp_path / "ours/mlruns.db").stat().st_mtime_ns
    with tracking._store_lock(uri):
        pass
    assert (tmp_path / "ours/mlruns.db").stat().st_mtime_ns == before


def test_dead_server_and_unwritable_store_fail_fast():
    t = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        tracking.check_reachable(f"http://127.0.0.1:{_free_port()}", timeout=2)
    with pytest.raises(tracking.TrackingError, match="not writable"):
        tracking.check_reachable("sqlite:////nonexistent-dir/mlruns.db")
    assert time.monotonic() - t < 10


def test_relative_sqlite_uri_is_made_absolute_and_env_is_honoured(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri() == f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri() == "http://127.0.0.1:5000"
    assert tracking.resolve_uri("sqlite:///x.db") == f"sqlite:///{tmp_path}/x.db"


def test_a_resumed_run_reopens_its_run_and_records_status_and_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    tags = {"seed": "3", **tracking.package_versions()}
    first = tracking.start_run(uri, "ebm", "job", {"proposal.K": 4, "energy.y_embed": [10, 10]}, tags, "seed = 3\n")
    tracking.end_run(uri, first, "KILLED")
    again = tracking.start_run(uri, "ebm", "job", {"proposal.K": 4}, tags, "seed = 3\n", reopen=True)
    assert again == first                                   # a resumed job continues its run
    tracking.end_run(uri, again, "FINISHED")
    extended = tracking.start_run(uri, "ebm", "job", {"proposal.K": 4}, tags, "seed = 3\n", reopen=True)
    assert extended == first                                # a finished run given more epochs continues too
    tracking.end_run(uri, extended, "FINISHED")
    fresh = tracking.start_run(uri, "ebm", "job", {"proposal.K": 4}, tags, "seed = 3\n")
    assert fresh != first                                   # only a resume reopens (the driver refuses a reused name)
    c = MlflowClient(uri)
    run = c.get_run(first)
    assert run.info.status == "FINISHED" and run.data.params["energy.y_embed"] == "[10, 10]"
    assert run.data.tags["version.torch"] and run.data.tags["version.mlflow"]
    assert [a.path for a in c.list_artifacts(first)] == ["config.toml"]
    exp = c.get_experiment_by_name("ebm")
    assert exp.artifact_location == (tmp_path / "mlruns-artifacts").as_uri()
    assert os.path.isfile(tmp_path / "mlruns-artifacts" / first / "artifacts" / "config.toml")
