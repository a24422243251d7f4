"""Datasets, checkpoints and predictions on object storage: a real S3 API (moto's server) on
127.0.0.1, the ``ebm`` command in subprocesses that get the endpoint and credentials the standard
AWS way (environment variables), as a user's shell would."""
import json
import os
import subprocess
import sys

import pytest

import clusterlab

pytestmark = pytest.mark.integration
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with clusterlab.s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def _ebm(args: list[str], env: dict, cwd, rc: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([EBM, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == rc, f"ebm {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_a_dataset_in_the_bucket_is_ingested_inspected_trained_on_resumed_and_predicted_from(s3, tmp_path):
    bucket = s3["bucket"]
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, **s3["env"], TMPDIR=str(tmp_path / "tmp"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db")
    env.pop("MLFLOW_REGISTRY_URI", None)
    data, runs = f"s3://{bucket}/data/star16", f"s3://{bucket}/runs"
    ingest = ["data", "ingest", "synthetic", "star", "--size", "16", "--n-train", "128", "--n-val", "32",
              "--n-test", "32", "--out", data, "--quiet"]
    _ebm(ingest, env, tmp_path)
    keys = clusterlab.s3_keys(s3, "data/")
    assert "data/star16/_dataset.json" in keys and "data/star16/train/part-00000.parquet" in keys
    assert not [k for k in keys if ".tmp-" in k]                          # the staging prefix is gone
    # nothing is replaced by accident, and nothing but a dataset is ever replaced
    assert "exists; pass --overwrite" in _ebm(ingest, env, tmp_path, rc=2).stderr
    r = _ebm(ingest[:-3] + ["--out", f"{data}/_dataset.json"], env, tmp_path, rc=2)
    assert "is a file, not a dataset location" in r.stderr
    assert "(verified)" in _ebm(["data", "inspect", data, "--verify"], env, tmp_path).stdout

    train = ["train", "demo", "--local", "--set", f"task.data_dir={data}", "--set", "sampler.M_train=16",
             "--set", "sampler.M_eval=32", "--set", "eval.every=1", "--storage", runs]
    _ebm([*train, "--set", "optim.epochs=2", "--name", "s3run"], env, tmp_path)
    ckpts = sorted(k for k in clusterlab.s3_keys(s3, "runs/s3run/") if k.endswith("/checkpoint.pt"))
    assert len(ckpts) == 2
    r = _ebm([*train, "--set", "optim.epochs=3", "--resume", "s3run"], env, tmp_path)
    assert "epoch 3/3" in r.stdout and "epoch 1/3" not in r.stdout      # continued from the bucket's checkpoint
    after = sorted(k for k in clusterlab.s3_keys(s3, "runs/s3run/") if k.endswith("/checkpoint.pt"))
    assert len(after) == 2 and after[0] == ckpts[1]                      # the last 2 kept

    _ebm(["register", "--run-name", "s3run", "--name", "s3model", "--alias", "champion"], env, tmp_path)
    r = _ebm(["predict", "models:/s3model@champion", "--input", data, "--limit", "3", "--out", "-"], env, tmp_path)
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all(0 <= row["mean"] < 6.3 for row in rows)
    # checkpoints lived in the bucket and in MLflow's artifact store only; no local copy was left
    left = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs
            if f == "checkpoint.pt" and not d.startswith(str(tmp_path / "mlruns"))]
    assert left == [] and [n for n in os.listdir(tmp_path / "tmp") if n.startswith("ebm-")] == []


def test_a_damaged_or_missing_dataset_in_the_bucket_is_one_clear_error(s3, tmp_path):
    import boto3
    env = dict(os.environ, **s3["env"])
    env.pop("MLFLOW_REGISTRY_URI", None)
    data = f"s3://{s3['bucket']}/damaged/toy1"
    _ebm(["data", "ingest", "synthetic", "toy1", "--n-train", "64", "--n-val", "16", "--n-test", "16",
          "--out", data, "--quiet"], env, tmp_path)
    boto3.client("s3", endpoint_url=s3["endpoint"], region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").delete_object(Bucket=s3["bucket"], Key="damaged/toy1/val/part-00000.parquet")
    r = _ebm(["data", "inspect", data], env, tmp_path, rc=2)
    assert f"{data}/val/part-00000.parquet: shard listed in _dataset.json is missing" in r.stderr
    r = _ebm(["data", "inspect", f"s3://{s3['bucket']}/nothing/here"], env, tmp_path, rc=2)
    assert "no such dataset directory" in r.stderr
    r = _ebm(["train", "debug", "--local", "--no-track", "--set", f"task.data_dir={data}"], env, tmp_path, rc=2)
    assert "val/part-00000.parquet: shard listed in _dataset.json is missing" in r.stderr
