"""A real Ray head on 127.0.0.1 with its job server; jobs submitted through `ebm submit`."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A loopback-only Ray head with its job server (tests/clusterlab.py)."""
    import clusterlab
    with clusterlab.loopback_head(tmp_path_factory.mktemp("rayhead")) as head:
        yield head


def _ebm(args, env, timeout=600, cwd=ROOT):
    return subprocess.run([os.path.join(BIN, "ebm"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_a_training_job_and_follow_it_to_its_mlflow_run(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlruns.db"          # the job's driver runs on this (the head) node
    r = _ebm(["submit", "--address", ray_head["address"], "--", "ebm", "train", "debug", "--set", "optim.epochs=2",
              "--name", "submitted", "--tracking-uri", uri, "--storage", str(tmp_path / "runs")], ray_head["env"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test nll:" in r.stdout and "SUCCEEDED" in r.stdout
    # the job's console on a cluster is as quiet as a local run's: no Ray error line nobody can act on
    assert [ln for ln in (r.stdout + r.stderr).splitlines() if "PreemptionWatcher" in ln or " E " in ln[:40]] == []
    sid = r.stdout.split("submitted ", 1)[1].split()[0]
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("ebm").experiment_id], "tags.`ebm.run_name` = 'submitted'")
    assert run.info.status == "FINISHED" and run.info.run_id in r.stdout
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]
    assert "test_nll" in run.data.metrics
    assert any(a.path == "checkpoint" for a in c.list_artifacts(run.info.run_id))
    listed = _ebm(["jobs", "list", "--address", ray_head["address"]], ray_head["env"])
    assert sid in listed.stdout and "SUCCEEDED" in listed.stdout
    st = _ebm(["jobs", "status", sid, "--address", ray_head["address"]], ray_head["env"])
    assert "SUCCEEDED" in st.stdout


def test_a_failing_job_is_reported_with_its_logs(ray_head):
    r = _ebm(["submit", "--address", ray_head["address"], "--", "ebm", "train", "debug", "--set", "proposal.K=0"],
             ray_head["env"])
    assert r.returncode == 1
    assert "proposal.K must be an integer >= 1" in r.stdout and "FAILED" in r.stdout


def test_an_oversized_working_dir_is_refused_before_upload(ray_head, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(os.path.join(ROOT, "pipelines"), work / "pipelines")
    (work / "big.bin").write_bytes(os.urandom(3 * 2**20))
    r = _ebm(["submit", "--address", ray_head["address"], "--working-dir", str(work), "--max-upload-mb", "2",
              "--", "ebm", "train", "debug"], ray_head["env"])
    assert r.returncode == 2 and "over the 2 MiB limit" in r.stderr and "big.bin" in r.stderr
    listed = _ebm(["jobs", "list", "--address", ray_head["address"]], ray_head["env"])
    assert str(work) not in listed.stdout


def test_an_unreachable_job_server_is_one_clear_error(ray_head):
    r = _ebm(["jobs", "list", "--address", f"http://127.0.0.1:{_free_port()}"], ray_head["env"], timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray job server" in r.stderr
