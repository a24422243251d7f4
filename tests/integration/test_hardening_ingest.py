"""Adversarial inputs to `ebm data ingest` / `ebm data inspect` and the one image rule: each is a clear,
early error naming what is wrong (exit 2), never a silently converted, duplicated or half-written
dataset. Real files, real images, the real command in subprocesses where exit codes and signals matter."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.images import ImageError, decode_image
from pipelines.data.ingest import ingest
from pipelines.data.layout import DatasetError

pytestmark = pytest.mark.integration
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")


def _save(path, arr, mode=None, **kw):
    Image.fromarray(arr, mode=mode).save(path, **kw) if mode else Image.fromarray(arr).save(path, **kw)
    return path


def _folder(tmp_path, n=12, rows=None):
    """n distinct 8x8 grey PNGs and a manifest (file,y); ``rows`` overrides the manifest's lines."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        _save(src / f"im{i:02d}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    lines = rows if rows is not None else [f"im{i:02d}.png,{i}" for i in range(n)]
    (src / "labels.csv").write_text("file,y\n" + "\n".join(lines) + "\n")
    return src


def _ebm(args, rc, cwd=None):
    r = subprocess.run([EBM, *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == rc, f"exit {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


@pytest.mark.parametrize("mode,arr,says", [
    ("RGB", np.zeros((8, 8, 3), np.uint8), "has 3 channel(s) (mode RGB)"),
    ("LA", np.zeros((8, 8, 2), np.uint8), "grey with an alpha channel (mode LA)"),
    ("P", np.zeros((8, 8), np.uint8), "has 3 channel(s) (mode P)"),
    ("I;16", np.full((8, 8), 4000, np.uint16), "a 16-bit image (mode I;16)"),
])
def test_one_image_mode_rule_at_ingest_refuses_a_mixed_folder_naming_the_file(tmp_path, mode, arr, says):
    src = _folder(tmp_path)
    im = Image.fromarray(arr, mode="LA") if mode == "LA" else Image.fromarray(arr)
    if mode == "P":
        im = im.convert("P")
    im.save(src / "im07.png")
    with pytest.raises(DatasetError) as e:
        ingest("folder_csv", src, tmp_path / "out", task="mine", progress=False)
    assert str(src / "im07.png") in str(e.value) and says in str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_same_rule_decodes_in_training_and_serving_and_checks_the_header_before_decoding(monkeypatch):
    def png(arr, mode=None):
        buf = io.BytesIO()
        (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(buf, format="PNG")
        return buf.getvalue()
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert (decode_image(png(grey), (1, 8, 8), "row") == grey[None]).all()                  # exact
    bilevel = Image.fromarray(grey > 31).convert("1")
    buf = io.BytesIO()
    bilevel.save(buf, format="PNG")
    assert set(np.unique(decode_image(buf.getvalue(), (1, 8, 8), "row"))) == {0, 255}
    with pytest.raises(ImageError, match="a 16-bit image"):
        decode_image(png(np.full((8, 8), 4000, np.uint16)), (1, 8, 8), "row")              # would clip to 255
    with pytest.raises(ImageError, match="RGB with an alpha channel"):
        decode_image(png(np.zeros((8, 8, 4), np.uint8)), (3, 8, 8), "row")
    with pytest.raises(ImageError, match="a 32-bit float image"):
        decode_image(_tiff_float(), (1, 8, 8), "row")
    # a small file declaring a huge image is refused from its header: no pixel is decoded
    big = io.BytesIO()
    Image.new("L", (13000, 13000)).save(big, format="PNG")
    assert len(big.getvalue()) < 400_000
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("pixels decoded before the size check")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match="13000x13000 pixels"):
        decode_image(big.getvalue(), (1, 32, 32), "request row 0")


def _tiff_float() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("case,counted", [("same file", "file 1"), ("same id", "id 1"),
                                           ("same bytes", "image bytes 1")])
def test_duplicates_are_refused_or_deduplicated_with_counts(tmp_path, case, counted):
    src = _folder(tmp_path)
    lines = [f"im{i:02d}.png,{i},ex{i}" for i in range(12)]
    if case == "same file":
        lines.append("im03.png,3,ex12")
    elif case == "same id":
        _save(src / "other.png", np.full((8, 8), 3, np.uint8))           # a different image under a taken id
        lines.append("other.png,3,ex2")
    else:
        (src / "copy.png").write_bytes((src / "im05.png").read_bytes())
        lines.append("copy.png,5,ex12")
    (src / "labels.csv").write_text("file,y,id\n" + "\n".join(lines) + "\n")
    r = _ebm(["data", "ingest", "folder_csv", str(src), "--task", "mine", "--out", str(tmp_path / "out"), "--quiet"], 2)
    assert f"1 duplicate row(s) ({counted})" in r.stderr, r.stderr
    assert "--dedupe" in r.stderr and not (tmp_path / "out").exists()
    r = _ebm(["data", "ingest", "folder_csv", str(src), "--task", "mine", "--out", str(tmp_path / "out"), "--quiet",
              "--dedupe"], 0)
    assert "--dedupe dropped 1 duplicate row(s)" in r.stderr
    meta = json.loads((tmp_path / "out" / "_dataset.json").read_text())
    assert sum(v["rows"] for v in meta["splits"].values()) == 12


def test_manifest_paths_must_stay_inside_the_source_unless_allowed(tmp_path):
    src = _folder(tmp_path)
    outside = _save(tmp_path / "secret.png", np.full((8, 8), 7, np.uint8))
    for name in ("../secret.png", str(outside)):
        (src / "labels.csv").write_text("file,y\n" + "\n".join([f"im{i:02d}.png,{i}" for i in range(12)]
                                                                + [f"{name},99"]) + "\n")
        r = _ebm(["data", "ingest", "folder_csv", str(src), "--task", "mine", "--out", str(tmp_path / "o"), "--quiet"], 2)
        assert f"row 14: {name!r} is outside the source folder" in r.stderr and "--allow-outside" in r.stderr
    _ebm(["data", "ingest", "folder_csv", str(src), "--task", "mine", "--out", str(tmp_path / "o"), "--quiet",
          "--allow-outside"], 0)


def test_unsupported_suffix_and_out_at_a_file_are_one_line_before_any_work(tmp_path):
    src = _folder(tmp_path)
    Image.new("L", (8, 8)).save(src / "anim.gif")
    (src / "labels.csv").write_text("file,y\nim00.png,0\nanim.gif,1\nim01.png,2\n")
    r = _ebm(["data", "ingest", "folder_csv", str(src), "--task", "mine", "--out", str(tmp_path / "o"), "--quiet"], 2)
    assert "anim.gif: unsupported image type '.gif'" in r.stderr and "supported: .png, .jpg, .jpeg" in r.stderr
    (tmp_path / "file").write_text("not a folder")
    # synthetic star at this size takes a while to generate: the --out check comes first
    r = _ebm(["data", "ingest", "synthetic", "star", "--size", "64", "--n-train", "50000", "--out",
              str(tmp_path / "file"), "--quiet"], 2)
    assert "is a file, not a dataset location" in r.stderr
    assert (tmp_path / "file").read_text() == "not a folder"


def test_sigterm_during_ingest_removes_its_temporary_folder(tmp_path):
    out = tmp_path / "big"
    proc = subprocess.Popen([EBM, "data", "ingest", "synthetic", "toy1", "--n-train", "4000000", "--shard-rows", "50000",
                             "--out", str(out), "--quiet"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".big.tmp-*")) and time.monotonic() < deadline:    # the write has begun
        time.sleep(0.02)
    assert proc.poll() is None, "the ingest ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing was written" in err
    assert list(tmp_path.iterdir()) == []


def _rewrite_shard_y(path, fn):
    t = pq.read_table(path)
    y = t.column("y").combine_chunks()
    vals = fn(y.flatten().to_numpy().copy())
    import pyarrow as pa
    new = pa.FixedSizeListArray.from_arrays(pa.array(vals, pa.float32()), y.type.list_size)
    pq.write_table(t.set_column(t.schema.get_field_index("y"), t.schema.field("y"), new), path)


def test_inspect_refuses_labels_edited_after_ingest(tmp_path):
    root = tmp_path / "toy"
    ingest("synthetic", "toy1", root, n={"train": 64, "val": 16, "test": 16}, progress=False)
    shard = root / "val" / "part-00000.parquet"

    def nan_third(v):
        v[3] = np.nan
        return v
    _rewrite_shard_y(shard, nan_third)
    r = _ebm(["data", "inspect", str(root)], 2)
    assert "val/part-00000.parquet" in r.stderr and "non-finite target" in r.stderr and "--verify" in r.stderr
    _rewrite_shard_y(shard, lambda v: np.nan_to_num(v) + 1.0)               # finite, but not the ingested labels
    r = _ebm(["data", "inspect", str(root), "--verify"], 2)
    assert "differs from the stored" in r.stderr


def test_inspect_verify_of_a_dataset_replaced_meanwhile_is_one_clear_error(tmp_path, monkeypatch):
    from pipelines.data import inspect as insp
    root = tmp_path / "toy"
    ingest("synthetic", "toy1", root, n={"train": 64, "val": 16, "test": 16}, progress=False)
    real = insp.recompute_fingerprint

    def replaced_midway(r, meta):         # another ingest --overwrite lands while the rows are hashed
        ingest("synthetic", "toy1", root, seed=5, n={"train": 64, "val": 16, "test": 16}, overwrite=True,
               progress=False)
        return real(r, meta)
    monkeypatch.setattr(insp, "recompute_fingerprint", replaced_midway)
    with pytest.raises(DatasetError, match="replaced or deleted meanwhile"):
        insp.summary(root, verify=True)


@pytest.mark.parametrize("manifest,says", [
    ("file,y,y\nim00.png,1,2\n", "the header names column(s) ['y'] more than once"),       # was: last y taken
    ("file,y\nim00.png,1\nim01.png,2,7\n", "row 3 has 3 fields, the header has 2"),          # was: 7 dropped
    ("file,y\nim00.png,1\n,2\n", "row 3 has an empty file"),
])
def test_malformed_manifests_are_refused_not_read_partly(tmp_path, manifest, says):
    src = _folder(tmp_path)
    (src / "labels.csv").write_text(manifest)
    with pytest.raises(DatasetError, match=re.escape(says)):
        ingest("folder_csv", src, tmp_path / "o", task="mine", progress=False)


def test_a_spreadsheets_byte_order_mark_is_read(tmp_path):
    src = _folder(tmp_path)
    (src / "labels.csv").write_bytes(b"\xef\xbb\xbf" + (src / "labels.csv").read_bytes())   # was: "no file column"
    meta = ingest("folder_csv", src, tmp_path / "o", task="mine", progress=False)
    assert sum(v["rows"] for v in meta["splits"].values()) == 12


def test_verify_data_rehashes_the_rows_and_the_run_is_tagged_with_what_was_verified(tmp_path):
    from mlflow.tracking import MlflowClient
    root = tmp_path / "toy"
    ingest("synthetic", "toy1", root, n={"train": 128, "val": 32, "test": 32}, progress=False)
    uri = f"sqlite:///{tmp_path}/m.db"
    train = ["train", "debug", "--local", "--set", f"task.data_dir={root}", "--set", "optim.epochs=1",
             "--tracking-uri", uri, "--storage", str(tmp_path / "runs")]
    _ebm([*train, "--name", "plain"], 0)
    _ebm([*train, "--name", "verified", "--verify-data"], 0)
    c = MlflowClient(uri)
    tags = {r.info.run_name: r.data.tags for r in c.search_runs([c.get_experiment_by_name("ebm").experiment_id])}
    assert tags["plain"]["ebm.data_verified"] == "footers" and tags["verified"]["ebm.data_verified"] == "content"
    assert tags["plain"]["data_fingerprint"] == tags["verified"]["data_fingerprint"]
    _rewrite_shard_y(root / "train" / "part-00000.parquet", lambda v: v + 0.5)   # labels edited after ingest
    r = _ebm([*train, "--name", "edited", "--verify-data"], 2)
    assert "its shards were edited after ingest" in r.stderr
    assert "edited" not in {r.info.run_name for r in c.search_runs([c.get_experiment_by_name("ebm").experiment_id])}
