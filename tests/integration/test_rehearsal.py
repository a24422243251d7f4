"""The multi-node rehearsal on one machine: what a user does on a real cluster, with every shared
service real and nothing shared through the local disk.

- an S3 API (moto's server) on 127.0.0.1 holds the dataset, the checkpoints and MLflow's artifacts;
- a Ray head and a second Ray node (own temp dir and TMPDIR, another node IP) form the cluster;
- an MLflow tracking server stores its artifacts in the bucket.

From the "laptop" (this test's process): the dataset is ingested straight into the bucket, the job
goes in through ``ebm submit`` with 2 workers spread over the 2 nodes, the second node's Train worker
is killed once mid-run (the job resumes from the S3 checkpoint and finishes), then the model is
registered and predicts from the bucket's dataset.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import clusterlab

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")
EPOCHS = 6


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rehearsal")
    with clusterlab.s3_server(tmp) as s3, clusterlab.mlflow_server(tmp, s3) as mlflow, \
            clusterlab.ray_nodes(tmp, s3["env"]) as cluster:
        yield {"s3": s3, "mlflow": mlflow, "cluster": cluster, "tmp": tmp}


def _snapshot_checkpoints(s3: dict, name: str) -> int:
    """How many checkpoints Ray Train has registered for the run (its manager's snapshot in the bucket)."""
    try:
        body = clusterlab.s3_client(s3).get_object(Bucket=s3["bucket"], Key=f"runs/{name}/checkpoint_manager_snapshot.json")
    except Exception:           # not written yet
        return 0
    return len(json.loads(body["Body"].read()).get("checkpoint_results", []))


def _leftovers(temp_dirs) -> list[str]:
    return [os.path.join(d, n) for top in temp_dirs for d, dirs, files in os.walk(top) for n in files + dirs
            if n == "checkpoint.pt" or n.startswith(("ebm-ckpt-", "checkpoint_tmp_"))]


def test_two_nodes_s3_and_an_mlflow_server_survive_a_killed_worker(services, tmp_path):
    s3, cluster, tracking_uri = services["s3"], services["cluster"], services["mlflow"]["tracking_uri"]
    bucket = s3["bucket"]
    t_start = time.monotonic()
    # the laptop: S3 credentials and endpoint the AWS way, the tracking server, nothing else
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(s3["env"], MLFLOW_TRACKING_URI=tracking_uri, RAY_USAGE_STATS_ENABLED="0")
    data, storage = f"s3://{bucket}/data/star16", f"s3://{bucket}/runs"
    r = subprocess.run([EBM, "data", "ingest", "synthetic", "star", "--size", "16", "--n-train", "256", "--n-val", "64",
                        "--n-test", "64", "--out", data, "--quiet"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fingerprint = r.stdout.split("; ")[1].split()[0]
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "README.txt").write_text("the job runs the installed ebm; nothing else is needed here\n")

    cmd = [EBM, "submit", "--address", cluster["dashboard"], "--working-dir", str(job_dir), "--storage", storage, "--",
           "ebm", "train", "demo", "--name", "rehearsal", "--num-workers", "2", "--placement", "STRICT_SPREAD",
           "--max-failures", "2", "--set", f"task.data_dir={data}", "--set", f"optim.epochs={EPOCHS}",
           "--set", "sampler.M_train=32", "--set", "sampler.M_eval=64", "--set", "eval.every=2"]
    log = open(tmp_path / "submit.log", "w")
    job = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    placed, killed = {}, None
    try:
        deadline = time.monotonic() + 420
        while job.poll() is None and time.monotonic() < deadline:     # where the workers run, until the job ends
            workers = clusterlab.train_workers(cluster)
            placed.update({w.pid: w.node_id for w in workers})
            if killed is None and len(workers) == 2 and _snapshot_checkpoints(s3, "rehearsal") >= 1:
                (victim,) = [w for w in workers if w.node_id == cluster["worker_node_id"]]
                os.kill(victim.pid, signal.SIGKILL)        # the second node's Train worker, once
                killed = victim.pid
            time.sleep(0.5)
        assert killed is not None, f"no checkpoint before the job ended:\n{(tmp_path / 'submit.log').read_text()[-4000:]}"
        assert job.wait(timeout=60) == 0, (tmp_path / "submit.log").read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    job_s = time.monotonic() - t_start
    # one worker per node, before and after the restart
    assert set(placed.values()) == {cluster["head_node_id"], cluster["worker_node_id"]}
    assert len(placed) >= 3, placed                    # the restart replaced the killed worker
    print(f"\nrehearsal: job {job_s:.0f} s; worker pid -> node: "
          + ", ".join(f"{pid} -> {'head' if n == cluster['head_node_id'] else 'second'} {n[:12]}"
                      for pid, n in placed.items()) + f"; killed {killed}")

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ebm").experiment_id],
                                filter_string="attributes.run_name = 'rehearsal'")
    assert run.info.status == "FINISHED"
    assert run.data.params["task.data_dir"] == data and run.data.tags["data_fingerprint"] == fingerprint
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")     # proxied by the server into the bucket
    first = [m.value for m in client.get_metric_history(run.info.run_id, "first_epoch")]
    assert max(first) >= 1, first                     # a second attempt resumed from an S3 checkpoint
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}) == list(range(EPOCHS))
    keys = clusterlab.s3_keys(s3)
    assert any(k.startswith("mlflow/") and k.endswith("/checkpoint/checkpoint.pt") for k in keys)
    assert any(k.startswith("mlflow/") and "/plots/density_epoch" in k for k in keys)
    # the newest 2 kept (also pruned: one uploaded by the killed attempt, which Ray never registered)
    assert len([k for k in keys if k.startswith("runs/rehearsal/checkpoint_") and k.endswith("/checkpoint.pt")]) == 2
    # no checkpoint copy left on either node (temporary reports, downloads for resume, the driver's)
    assert _leftovers(cluster["temp_dirs"]) == []

    r = subprocess.run([EBM, "register", "--run-name", "rehearsal", "--name", "rehearsal-model"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([EBM, "predict", "models:/rehearsal-model@champion", "--input", data, "--limit", "4",
                        "--out", "-"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    assert len(rows) == 4 and all(0 <= row["mean"] < 6.3 for row in rows)
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in clusterlab.s3_keys(s3))
    print(f"rehearsal: whole test {time.monotonic() - t_start:.0f} s")
