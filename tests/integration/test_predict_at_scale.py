"""``ebm predict --workers N`` (Ray Data, :mod:`pipelines.serve.batch`) against the single-process path:
the same Parquet output byte for byte in values and schema, local and on S3 (moto), and clear
errors that leave nothing under ``--out``. Real components: a tiny star-image model trained for
real, a real ingested dataset (several shards and row groups), a real local Ray (2 CPUs, 2 actors
of 1 CPU, a small object store)."""
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

pytestmark = pytest.mark.integration
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
STAR = {"task.name": "star", "task.image_size": 16, "task.n_train": 64, "task.n_val": 16, "task.n_test": 32,
        "features.kind": "resnet_slim", "features.width": 4, "optim.epochs": 1, "eval.batch_size": 16,
        "sampler.M_eval": 32, "sampler.refine_steps": 0}
FLAGS = ["--M", "24", "--seed", "5", "--quantiles", "0.1,0.5,0.9", "--log-density"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3, its credentials in this process's environment before Ray starts (the actors and the
    read/write tasks inherit them)."""
    from clusterlab import s3_server

    from pipelines.cli import _environ      # set for the block, restored after (what each ebm command does)
    with s3_server(tmp_path_factory.mktemp("moto")) as s3, _environ(s3["env"]):
        yield s3


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", log_to_driver=False, include_dashboard=False,
             object_store_memory=150 * 1024 ** 2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    """A tiny trained star model (its checkpoint directory) and a 700-row test split in 3 shards of
    256 rows (row groups of 256, so the row groups straddle no shard)."""
    from pipelines import api
    from pipelines.cli import main
    d = tmp_path_factory.mktemp("scale")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = api.train("debug", overrides=STAR, name="scale-star", storage=str(d / "runs"),
                          tracking_uri=f"sqlite:///{d}/mlflow.db")
    finally:
        torch.set_num_threads(threads)
    data = d / "data"
    assert main(["data", "ingest", "synthetic", "star", "--out", str(data), "--size", "16", "--n-train", "16",
                 "--n-val", "8", "--n-test", "700", "--shard-rows", "256", "--quiet"]) == 0
    return {"model": model, "ckpt": model.source, "data": data, "dir": d}


def same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The same rows, ids and draws; the values equal up to float32 rounding (the network's reductions
    over a batch of another shape, or with another thread count, may round the last bit otherwise)."""
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6, atol=1e-6)


def _hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_the_ray_data_path_writes_what_the_single_process_path_writes(star, ray_local, tmp_path, capsys):
    from pipelines.cli import main
    from pipelines.serve import serving
    one, ray_out = tmp_path / "one.parquet", tmp_path / "ray.parquet"
    assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(one), *FLAGS]) == 0
    warned = capsys.readouterr().err
    # 2 actors, batches of 50 rows: batches straddle row groups and shards, and neither actor sees all
    assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(ray_out), *FLAGS,
                 "--workers", "2", "--batch-size", "50"]) == 0
    said = capsys.readouterr()
    assert "700 predictions" in said.out
    # M = 24 leaves ~1 effective sample per 5 % tail: both paths warn, with the same rows' figures
    assert "ebm predict: warning: the 90% intervals of 700 of 700 rows rest on fewer than 10" in warned
    assert [ln for ln in said.err.splitlines() if "warning" in ln] == [ln for ln in warned.splitlines() if "warning" in ln]
    assert pq.read_schema(ray_out) == pq.read_schema(one)
    a, b = pd.read_parquet(one), pd.read_parquet(ray_out)
    assert len(a) == 700 and list(a["id"]) == [f"star:test:{i:06d}" for i in range(700)]
    same(a, b)
    assert np.isfinite(a["log_p"]).all() and a["q0.5"].nunique() > 600
    assert _hidden(tmp_path) == []                  # no staging parts or temporary files left behind
    # the Python API over the same split gives the same numbers (its index is the ids)
    got = star["model"].predict(str(star["data"]), M=24, seed=5, quantiles=[0.1, 0.5, 0.9])
    same(got.reset_index(drop=True), a.drop(columns=["id", "log_p"]))
    # a row's numbers are its own: rows 300..329 alone, with their indices, are rows 300..329 of the whole
    from pipelines.serve.model_eval import read_inputs
    p = star["model"].predictor
    ids, values, y = read_inputs(str(star["data"]), p)
    part = serving.predict_rows(p, serving.inputs_tensor(p, values[300:330]), y[300:330], M=24, seed=5,
                                quantiles=[0.1, 0.5, 0.9], rows=range(300, 330))
    same(pd.DataFrame(part), a.drop(columns=["id"]).iloc[300:330].reset_index(drop=True))
    # --limit: the first rows either way
    lim1, lim2 = tmp_path / "l1.parquet", tmp_path / "l2.parquet"
    assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(lim1), *FLAGS,
                 "--limit", "300"]) == 0
    assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(lim2), *FLAGS,
                 "--limit", "300", "--workers", "2"]) == 0
    same(pd.read_parquet(lim1), a.iloc[:300])
    same(pd.read_parquet(lim2), a.iloc[:300])


def test_an_existing_output_is_refused_unless_overwrite(star, ray_local, tmp_path, capsys):
    from pipelines.cli import main
    out = tmp_path / "p.parquet"
    out.write_bytes(b"keep me")
    for extra in ([], ["--workers", "2"]):
        assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(out), "--limit", "20",
                     *extra]) == 2
        assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(out), "--limit", "20",
                 "--workers", "2", "--overwrite"]) == 0
    assert len(pd.read_parquet(out)) == 20


@pytest.mark.parametrize("args, message", [
    (["--workers", "2", "--out", "{tmp}/p.csv"], "--workers writes Parquet"),
    (["--workers", "2", "--out", "-"], "--workers writes a Parquet file"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--use-gpu"], "--use-gpu applies to the Ray Data path"),
    (["--workers", "2", "--input", "{tmp}/folder"], "not a dataset directory"),
    (["--workers", "2", "--input", "{tmp}/x.parquet"], "no column 'image'"),
    (["--workers", "2", "--input", "{tmp}/data", "--split", "nope"], "no split 'nope'"),
    (["--workers", "3"], "--workers 3 needs 3 CPUs"),                 # would wait for a third CPU, not fail
])
def test_bad_requests_are_one_line_and_exit_2(star, ray_local, tmp_path, capsys, args, message):
    from pipelines.cli import main
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(b"")
    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "x.parquet")
    (tmp_path / "data").symlink_to(star["data"])
    full = {"--input": str(star["data"]), "--out": str(tmp_path / "p.parquet")}
    it = iter(args)
    rest = []
    for a in it:
        if a in full:
            full[a] = next(it).format(tmp=tmp_path)
        else:
            rest.append(a)
    argv = ["predict", star["ckpt"], "--input", full["--input"], "--out", full["--out"], *rest]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_dataset_on_s3_predicts_to_s3_with_the_same_numbers(star, ray_local, s3, tmp_path):
    from clusterlab import s3_keys

    from pipelines import storage
    from pipelines.cli import main
    storage.upload_dir(star["data"], f"s3://{s3['bucket']}/data")
    local = tmp_path / "local.parquet"
    assert main(["predict", star["ckpt"], "--input", str(star["data"]), "--out", str(local), *FLAGS]) == 0
    uri = f"s3://{s3['bucket']}/preds/p.parquet"
    assert main(["predict", star["ckpt"], "--input", f"s3://{s3['bucket']}/data", "--out", uri, *FLAGS,
                 "--workers", "2"]) == 0
    # the staging prefix is gone (an empty "preds/" marker may stay: pyarrow keeps a deleted prefix's parent)
    assert [k for k in s3_keys(s3, "preds/") if not k.endswith("/")] == ["preds/p.parquet"]
    fs, path = storage.resolve(uri)
    got = pq.read_table(path, filesystem=fs)
    same(got.to_pandas(), pd.read_parquet(local))
    assert main(["predict", star["ckpt"], "--input", f"s3://{s3['bucket']}/data", "--out", uri, "--limit", "5",
                 "--workers", "2"]) == 2                          # exists: refused


def test_a_bad_row_fails_the_job_naming_it_and_leaves_no_output(star, ray_local, tmp_path, capsys):
    """A bare Parquet file (no ids: rows are named by index) whose row 430 is not an image: exit 2, one
    line naming the row, nothing under --out and no staging left — on both paths. Last in the file: the
    failed run's actors can outlive it in a Ray that stays up (seen under load), and the next pool of 2
    would wait for their CPUs; each `ebm predict` starts and stops its own Ray, so the CLI never does."""
    from pipelines.cli import main
    from pipelines.data.layout import shard_paths, validate
    shards = shard_paths(str(star["data"]), validate(str(star["data"])), "test")
    images = pa.concat_tables([pq.read_table(s, columns=["image"]) for s in shards]).column("image").to_pylist()
    src = tmp_path / "in.parquet"
    # first the good file: it predicts, its rows named by index
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), src, row_group_size=100)
    out = tmp_path / "ok.parquet"
    assert main(["predict", star["ckpt"], "--input", str(src), "--out", str(out), "--M", "8", "--workers", "2"]) == 0
    assert list(pd.read_parquet(out)["id"][:3]) == ["row 0", "row 1", "row 2"]
    assert "rest on fewer than 10 effective samples" in capsys.readouterr().err     # M = 8: the warning
    images[430] = b"not an image"
    pq.write_table(pa.table({"image": pa.array(images, pa.binary())}), src, row_group_size=100)
    for extra in ([], ["--workers", "2"]):
        out = tmp_path / "out" / "p.parquet"
        assert main(["predict", star["ckpt"], "--input", str(src), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "row 430: not a readable image" in err[0], err
        assert not out.exists() and (not out.parent.exists() or _hidden(out.parent) == [])
