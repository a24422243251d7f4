"""Ingest small fixtures written in each real source format, read them back with the plain
pyarrow reader and compare pixels and labels exactly; validation and bad-input errors; atomic
ingest. (The Ray Data round trip of the same fixtures is in test_data_readers.py.)

Each CASES builder writes a source and returns (format, source, ingest kwargs, expected) with
expected = {id: (uint8 (C, H, W), float32 (D,))}.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ebm.tasks import make_synthetic, rotate_with_circular_mask
from pipelines.cli.data import add_data_commands
from pipelines.data.ingest import cell_count, ingest
from pipelines.data.layout import SPLITS, DatasetError, read_metadata, validate
from pipelines.data.readers import ParquetStream, normalise

pytestmark = pytest.mark.integration


def _rng(seed=0):
    return np.random.default_rng(seed)


def _png(arr_hw_or_hwc: np.ndarray, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr_hw_or_hwc).save(buf, format=fmt)
    return buf.getvalue()


def write_ccgan(tmp: Path, name: str):
    n = 24
    images = _rng(1).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
    labels = np.linspace(-90, 90, n).astype(np.float32)
    if name.startswith("UTKFace"):
        labels = np.arange(n, dtype=np.float32) * 3.0 - 4.0    # -4 .. 65: some outside 1..60
    import h5py
    path = tmp / name
    with h5py.File(path, "w") as f:
        f["images"], f["labels"] = images, labels
    keep = [i for i in range(n) if not name.startswith("UTKFace") or 1 <= labels[i] <= 60]
    return "ccgan_h5", path, {}, {f"{path.stem}:{i:06d}": (images[i], labels[i:i + 1]) for i in keep}


def write_cell(tmp: Path):
    root = tmp / "cell"
    root.mkdir()
    expected = {}
    for i, img in enumerate(_rng(2).integers(0, 256, (20, 64, 64), dtype=np.uint8)):
        name = f"img{i:03d}_{(i * 7) % 200 + 1}.0.png"
        (root / name).write_bytes(_png(img))
        expected[name] = (img[None], np.array([(i * 7) % 200 + 1], np.float32))
    return "cell200", root, {}, expected


def write_biwi(tmp: Path, images=None):
    root = tmp / "biwi"
    root.mkdir()
    rng = _rng(3)
    expected = {}
    for part, n in (("train", 20), ("test", 8)):
        img = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) if images is None else images[:n]
        pose = rng.uniform(-70, 70, (n, 3)).astype(np.float32)
        np.savez(root / f"BIWI_{part}.npz", image=img, pose=pose)
        expected.update({f"BIWI_{part}:{i:06d}": (img[i].transpose(2, 0, 1), pose[i]) for i in range(n)})
    return "biwi", root, {}, expected


def write_folder_csv(tmp: Path):
    root = tmp / "folder"
    (root / "imgs").mkdir(parents=True)
    rng = _rng(4)
    rows, expected = ["file,y0,y1"], {}
    for i in range(18):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        jpeg = i % 3 == 0
        rel = f"imgs/{i:02d}.{'jpg' if jpeg else 'png'}"
        data = _png(img, "JPEG" if jpeg else "PNG")
        (root / rel).write_bytes(data)
        y = np.array([i * 0.5, -i], np.float32)
        rows.append(f"{rel},{y[0]},{y[1]}")
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))   # JPEG: the decoder's pixels
        expected[rel] = (decoded.transpose(2, 0, 1), y)
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return "folder_csv", root, {"task": "mytask"}, expected


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def write_fashion(tmp: Path):
    root = tmp / "fashion"
    root.mkdir()
    src = {"train-images-idx3-ubyte": _rng(5).integers(0, 256, (30, 28, 28), dtype=np.uint8),
           "t10k-images-idx3-ubyte": _rng(6).integers(0, 256, (10, 28, 28), dtype=np.uint8)}
    for stem, arr in src.items():
        write_idx(root / f"{stem}.gz", arr)
    # Angles are drawn at ingest: the check is that each stored image is its source rotated by
    # its stored angle (see _expected_fashion), so expected holds the sources.
    return "fashion_rotation", root, {}, {"__fashion__": src}


def write_synthetic(tmp: Path, name: str):
    kw = {"n": {"train": 40, "val": 10, "test": 10}, "size": 32} if name == "star" else {"shard_rows": 600}
    data = make_synthetic(name, 0, n=kw.get("n"), size=kw.get("size"))
    expected = {}
    for split, (x, y, _) in data.items():
        expected.update({f"{name}:{split}:{i:06d}": (x[i], y[i]) for i in range(len(y))})
    return "synthetic", name, kw, expected


CASES = {
    "steering_h5": lambda t: write_ccgan(t, "SteeringAngle_64x64.h5"),
    "age_h5": lambda t: write_ccgan(t, "UTKFace_64x64.h5"),
    "cell200": write_cell,
    "biwi": write_biwi,
    "folder_csv": write_folder_csv,
    "fashion_rotation": write_fashion,
    "toy1": lambda t: write_synthetic(t, "toy1"),
    "toy2": lambda t: write_synthetic(t, "toy2"),
    "star": lambda t: write_synthetic(t, "star"),
}


def build(case: str, tmp: Path, **over):
    """Write case's source, ingest it into tmp/ds -> (dataset dir, metadata, expected)."""
    tmp.mkdir(parents=True, exist_ok=True)
    fmt, source, kw, expected = CASES[case](tmp)
    out = tmp / f"ds-{case}"
    meta = ingest(fmt, source, out, **{"shard_rows": 7, "progress": False, **kw, **over})
    return out, meta, expected


def read_all(stream) -> dict:
    """{id: (x numpy, y numpy)} from a stream built with with_ids=True."""
    got = {}
    for x, y, ids in stream:
        for i, ex in enumerate(ids):
            assert ex not in got, f"{ex} read twice"
            got[ex] = (x[i].numpy(), y[i].numpy())
    return got


def check_against(got: dict, expected: dict, root: Path) -> None:
    if "__fashion__" in expected:
        expected = _expected_fashion(got, expected["__fashion__"])
    assert sorted(got) == sorted(expected)
    for ex, (x, y) in expected.items():
        np.testing.assert_array_equal(got[ex][1], y, err_msg=ex)
        want = x.astype(np.float32) if x.dtype != np.uint8 else x
        np.testing.assert_array_equal(got[ex][0], want, err_msg=ex)


def _expected_fashion(got: dict, src: dict) -> dict:
    out = {}
    for ex, (_, y) in got.items():
        stem, i = ex.split(":")
        out[ex] = (rotate_with_circular_mask(src[stem][int(i)][None], y.astype(np.float64))[0], y)
    return out


def read_plain(root: Path, **kw) -> dict:
    got = {}
    for split in SPLITS:
        got.update(read_all(ParquetStream(root, split, batch_size=5, normalise=False, with_ids=True, **kw)))
    return got


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_plain_reader(case, tmp_path):
    root, meta, expected = build(case, tmp_path)
    check_against(read_plain(root), expected, root)
    assert meta == read_metadata(root) == validate(root)
    assert sum(meta["splits"][s]["rows"] for s in SPLITS) == (len(expected) if "__fashion__" not in expected else 40)
    for split in SPLITS:
        table = pq.read_table(root / split, columns=["split"])
        assert set(table.column("split").to_pylist()) == {split}


def test_file_formats_store_bytes_as_given_and_normalise(tmp_path):
    root, meta, _ = build("folder_csv", tmp_path)
    table = pq.read_table(root / "train")
    for ex, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
        assert data == (tmp_path / "folder" / ex).read_bytes()
    assert meta["input"]["encoding"] == "jpeg/png" and meta["D"] == 2 and meta["task"] == "mytask"
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    u8 = next(iter(ParquetStream(root, "train", 4, normalise=False)))[0].numpy()
    x = next(iter(ParquetStream(root, "train", 4)))[0].numpy()
    np.testing.assert_array_equal(x, normalise(u8, meta))


def test_seeded_splits_are_saved_and_reproducible(tmp_path):
    a = build("cell200", tmp_path / "a", seed=3)[1]
    b = build("cell200", tmp_path / "b", seed=3)[1]
    c = build("cell200", tmp_path / "c", seed=4)[1]
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]
    assert {s: v["rows"] for s, v in a["splits"].items()} == {"train": 14, "val": 2, "test": 4}


def test_fingerprint_ignores_shard_size_and_is_verifiable(tmp_path):
    from pipelines.data.inspect import recompute_fingerprint
    a = build("star", tmp_path / "a", shard_rows=7)[1]
    root, b, _ = build("star", tmp_path / "b", shard_rows=1000)
    assert a["fingerprint"] == b["fingerprint"] and len(a["splits"]["train"]["shards"]) == 6
    assert recompute_fingerprint(root, b) == b["fingerprint"]


def test_cell_count_parse():
    assert cell_count("img003_37.0.png") == 37.0
    assert cell_count("x_200.0.png") == 200.0
    for bad in ("img37.png", "img_37.5.png"):
        with pytest.raises(DatasetError, match="cannot parse a cell count"):
            cell_count(bad)


def _rewrite_shard(path: Path, fn) -> None:
    """Replace a shard by fn(table) written with fn's schema (keeps the schema metadata if fn does)."""
    table = fn(pq.read_table(path))
    pq.write_table(table, path)


def test_schema_mismatch_names_file_and_column(tmp_path):
    root, meta, _ = build("star", tmp_path)
    shard = root / meta["splits"]["val"]["shards"][0]

    def loosen_y(t):  # fixed_size_list<float>[1] -> list<float>, metadata kept
        i = t.schema.get_field_index("y")
        return t.set_column(i, pa.field("y", pa.list_(pa.float32())), t.column("y").cast(pa.list_(pa.float32())))
    _rewrite_shard(shard, loosen_y)
    with pytest.raises(DatasetError, match=rf"{shard}: column 'y' has type list<.*expected fixed_size_list"):
        validate(root)
    with pytest.raises(DatasetError, match="column 'y'"):
        ParquetStream(root, "train")   # checked before any training-split row is read


def test_wrong_target_length_in_shard(tmp_path):
    root, meta, _ = build("toy2", tmp_path)
    shard = root / meta["splits"]["test"]["shards"][1]

    def widen(t):
        y2 = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * t.num_rows, np.float32)), 2)
        return t.set_column(t.schema.get_field_index("y"), pa.field("y", y2.type, nullable=False), y2)
    _rewrite_shard(shard, widen)
    with pytest.raises(DatasetError, match=r"column 'y' has type fixed_size_list<element: float>\[2\]"):
        validate(root)


def test_missing_files_and_metadata(tmp_path):
    root, meta, _ = build("toy2", tmp_path)
    (root / meta["splits"]["val"]["shards"][0]).unlink()
    with pytest.raises(DatasetError, match="val/part-00000.parquet: shard listed in _dataset.json is missing"):
        validate(root)
    (root / "_dataset.json").unlink()
    with pytest.raises(DatasetError, match="missing _dataset.json"):
        validate(root)
    with pytest.raises(DatasetError, match="no such dataset directory"):
        validate(tmp_path / "nope")
    with pytest.raises(DatasetError, match="source not found"):
        ingest("cell200", tmp_path / "nope", tmp_path / "out")


def test_bad_sources_give_clear_errors(tmp_path):
    fmt, root, kw, _ = write_folder_csv(tmp_path)
    manifest = (root / "labels.csv").read_text().splitlines()
    with pytest.raises(DatasetError, match="unknown format 'tfrecord'"):
        ingest("tfrecord", root, tmp_path / "o")
    (root / "labels.csv").write_text("\n".join(manifest[:3] + ["imgs/02.png,nan,-2.0"] + manifest[4:]))
    with pytest.raises(DatasetError, match=r"example 'imgs/02.png' has a non-finite target"):
        ingest(fmt, root, tmp_path / "o", progress=False)
    (root / "labels.csv").write_text("\n".join(manifest[:2] + [manifest[2].rsplit(",", 1)[0]] + manifest[3:]))
    with pytest.raises(DatasetError, match=r"row 3 \(imgs/01.png\): target y1=None is not a number"):
        ingest(fmt, root, tmp_path / "o", progress=False)
    (root / "labels.csv").write_text("\n".join([manifest[0] + ",split"] + [m + ",train" for m in manifest[1:]]))
    with pytest.raises(DatasetError, match="split 'val' is empty"):
        ingest(fmt, root, tmp_path / "o", progress=False)
    (root / "labels.csv").write_text("\n".join(manifest))
    with pytest.raises(DatasetError, match="task age has D = 1"):
        ingest(fmt, root, tmp_path / "o", task="age", progress=False)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_interrupted_ingest_leaves_no_dataset(tmp_path, monkeypatch):
    import pipelines.data.ingest as ing
    fmt, source, kw, _ = write_biwi(tmp_path)
    out = tmp_path / "ds"
    calls = {"n": 0}
    real = ing.encode_png

    def crash_after_15(img):
        calls["n"] += 1
        if calls["n"] > 15:
            raise KeyboardInterrupt("simulated crash")
        return real(img)
    monkeypatch.setattr(ing, "encode_png", crash_after_15)
    with pytest.raises(KeyboardInterrupt):
        ingest(fmt, source, out, shard_rows=4, progress=False)
    assert calls["n"] == 16 and not out.exists() and sorted(tmp_path.iterdir()) == [source]
    monkeypatch.setattr(ing, "encode_png", real)
    meta = ingest(fmt, source, out, shard_rows=4, progress=False)
    calls["n"] = 0
    monkeypatch.setattr(ing, "encode_png", crash_after_15)
    with pytest.raises(KeyboardInterrupt):   # a failed --overwrite keeps the old dataset
        ingest(fmt, source, out, shard_rows=4, overwrite=True, progress=False)
    assert validate(out) == meta and sorted(tmp_path.iterdir()) == [source, out]
    with pytest.raises(DatasetError, match="exists; pass --overwrite"):
        ingest(fmt, source, out, progress=False)


def test_cli_ingest_and_inspect(tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="ebm")
    add_data_commands(ap.add_subparsers(dest="command", required=True))
    out, sheet = tmp_path / "star", tmp_path / "sheet.png"
    args = ap.parse_args(["data", "ingest", "synthetic", "star", "--out", str(out), "--size", "32",
                          "--n-train", "20", "--n-val", "4", "--n-test", "4", "--shard-rows", "8", "--quiet"])
    assert args.func(args) == 0
    args = ap.parse_args(["data", "inspect", str(out), "--sheet", str(sheet), "--verify", "--json"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert summary["splits"]["train"]["count"] == 20 and summary["fingerprint_verified"]
    assert Image.open(sheet).size[0] > 0
    args = ap.parse_args(["data", "inspect", str(tmp_path / "missing")])
    assert args.func(args) == 2
    assert "no such dataset directory" in capsys.readouterr().err


def test_fashion_subsets_are_seeded_samples_of_the_full_ingest(tmp_path):
    full_root, full, _ = build("fashion_rotation", tmp_path / "full", seed=1)
    root, meta, _ = build("fashion_rotation", tmp_path / "sub", seed=1, n={"train": 10, "test": 4})
    again = build("fashion_rotation", tmp_path / "again", seed=1, n={"train": 10, "test": 4})[1]
    assert {s: v["rows"] for s, v in meta["splits"].items()} == {"train": 10, "val": 3, "test": 4}
    assert meta["fingerprint"] == again["fingerprint"] != full["fingerprint"]
    assert "seeded subsets train 10, test 4" in meta["split_rule"]
    whole, sub = read_plain(full_root), read_plain(root)
    for ex, (x, y) in sub.items():      # the same image and angle as in the full dataset
        np.testing.assert_array_equal(x, whole[ex][0])
        np.testing.assert_array_equal(y, whole[ex][1])
    with pytest.raises(DatasetError, match="--n-train 99: the train split has only 27 examples"):
        build("fashion_rotation", tmp_path / "big", n={"train": 99})
    with pytest.raises(DatasetError, match="apply to synthetic and fashion_rotation, not cell200"):
        build("cell200", tmp_path / "cell", n={"train": 5})
