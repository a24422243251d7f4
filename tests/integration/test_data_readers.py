"""Readers: the Ray Data path against the same fixtures as test_data_formats.py (exact pixels and
labels), corrupt images in strict and skip modes through both readers, BIWI augmentation label
consistency, per-rank slicing and shuffling of the plain reader. One Ray cluster per module."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_data_formats import CASES, build, check_against, read_all, write_biwi  # noqa: E402

from pipelines.data.layout import SPLITS, DatasetError  # noqa: E402
from pipelines.data.readers import ParquetStream, RayStream, augment_biwi, ray_dataset  # noqa: E402

pytestmark = pytest.mark.integration
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=200 * 1024 ** 2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_ray_roundtrip_every_format(ray_local, tmp_path):
    for case in sorted(CASES):    # one test: each Ray Data execution costs ~1.5 s of fixed overhead
        root, _, expected = build(case, tmp_path / case)
        got = read_all(RayStream(ray_dataset(root, SPLITS, normalise=False), batch_size=5, with_ids=True))
        check_against(got, expected, root)


def test_ray_normalised_matches_plain(ray_local, tmp_path):
    root, _, _ = build("biwi", tmp_path)
    ray_rows = read_all(RayStream(ray_dataset(root, "val"), 4, with_ids=True))
    plain = read_all(ParquetStream(root, "val", 4, with_ids=True))
    assert sorted(ray_rows) == sorted(plain)
    for ex, (x, y) in plain.items():
        np.testing.assert_array_equal(ray_rows[ex][0], x)
        assert x.dtype == np.float32 and abs(float(x.mean())) < 3


def corrupt_one(root: Path, meta: dict, split: str = "train", row: int = 2) -> tuple[str, Path]:
    """Truncate one example's PNG in the first shard of split (schema and metadata unchanged)."""
    shard = root / meta["splits"][split]["shards"][0]
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[row] = images[row][:len(images[row]) // 2]
    i = table.schema.get_field_index("image")
    table = table.set_column(i, table.schema.field(i), pa.array(images, pa.binary()))
    pq.write_table(table, shard)
    return table.column("id")[row].as_py(), shard


def test_corrupt_png_strict_and_skip_plain(tmp_path):
    root, meta, expected = build("cell200", tmp_path)
    bad_id, shard = corrupt_one(root, meta)
    with pytest.raises(DatasetError, match=rf"{shard}: example '{bad_id}' has a corrupt image"):
        list(ParquetStream(root, "train", 4))
    stream = ParquetStream(root, "train", 4, on_corrupt="skip", with_ids=True, normalise=False)
    got = read_all(stream)
    assert stream.skipped == 1 and stream.skipped_ids == [bad_id]
    assert len(got) == meta["splits"]["train"]["rows"] - 1 and bad_id not in got
    check_against(got, {k: v for k, v in expected.items() if k in got}, root)
    with pytest.raises(DatasetError, match="on_corrupt must be one of"):
        ParquetStream(root, "train", on_corrupt="ignore")


def test_corrupt_png_strict_and_skip_ray(ray_local, tmp_path):
    root, meta, expected = build("cell200", tmp_path)
    bad_id, shard = corrupt_one(root, meta)
    with pytest.raises(Exception, match=rf"example '{bad_id}' has a corrupt image") as err:
        list(RayStream(ray_dataset(root, "train"), 4))
    assert str(shard) in str(err.value)
    stream = RayStream(ray_dataset(root, "train", on_corrupt="skip", normalise=False), 4, with_ids=True)
    got = read_all(stream)
    assert stream.skipped == 1 and stream.skipped_ids == [bad_id] and bad_id not in got
    check_against(got, {k: v for k, v in expected.items() if k in got}, root)


def asymmetric_images(n: int) -> np.ndarray:
    """uint8 (n, 64, 64, 3): left half bright, right half dark, so a mirror is visible."""
    img = np.zeros((n, 64, 64, 3), dtype=np.uint8)
    img[:, :, :32] = 200
    img[:, 10:20, 5:15] = 255           # also top/bottom asymmetric: a flip must not be a rotation
    return img


def flipped(x: np.ndarray) -> bool:
    """Whether an augmented (C, H, W) image shows the left-bright picture mirrored."""
    return float(x[:, :, 32:].mean()) > float(x[:, :, :32].mean())


def test_biwi_augment_exact_flip_and_identity():
    img = asymmetric_images(3).transpose(0, 3, 1, 2)
    y = np.array([[30, 10, -5], [-12, 0, 40], [0, -7, 1]], np.float32)
    rng = np.random.default_rng(0)
    out, y_out = augment_biwi(img, y, rng, flip_prob=1.0, scale=(1.0, 1.0))
    np.testing.assert_array_equal(out, img[:, :, :, ::-1])
    np.testing.assert_array_equal(y_out, y * np.array([-1, 1, -1], np.float32))
    out, y_out = augment_biwi(img, y, rng, flip_prob=0.0, scale=(1.0, 1.0))
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(y_out, y)


def test_biwi_augment_random_keeps_labels_consistent():
    n = 200
    img = asymmetric_images(n).transpose(0, 3, 1, 2)
    y = np.tile(np.array([[25.0, 8.0, -14.0]], np.float32), (n, 1))
    out, y_out = augment_biwi(img, y, np.random.default_rng(1))
    assert out.shape == (n, 3, 64, 64) and out.dtype == np.uint8
    flips = np.array([flipped(x) for x in out])
    assert 60 < flips.sum() < 140                      # both branches exercised
    np.testing.assert_array_equal(y_out[:, 0], np.where(flips, -25.0, 25.0))
    np.testing.assert_array_equal(y_out[:, 2], np.where(flips, 14.0, -14.0))
    np.testing.assert_array_equal(y_out[:, 1], 8.0)
    assert len({x.tobytes() for x in out}) > n // 2    # rescale/crop vary the picture


def _check_augmented(rows: dict, expected: dict) -> int:
    n_flip = 0
    for ex, (x, y) in rows.items():
        y0 = expected[ex][1]
        f = flipped(x)
        n_flip += f
        np.testing.assert_array_equal(y, y0 * np.array([-1, 1, -1], np.float32) if f else y0, err_msg=ex)
    return n_flip


def test_biwi_augment_in_both_readers(ray_local, tmp_path):
    fmt, source, _, expected = write_biwi(tmp_path, images=asymmetric_images(20))
    from pipelines.data.ingest import ingest
    root = tmp_path / "ds"
    meta = ingest(fmt, source, root, shard_rows=8, progress=False)
    assert meta["augment"] == {"train": "biwi_headpose"}
    plain = read_all(ParquetStream(root, "train", 4, augment="default", normalise=False, with_ids=True, seed=1))
    ray_rows = read_all(RayStream(ray_dataset(root, "train", augment="default", normalise=False, seed=1), 4,
                                  with_ids=True))
    flips = _check_augmented(plain, expected) + _check_augmented(ray_rows, expected)
    assert 0 < flips < 2 * len(plain)
    val = read_all(ParquetStream(root, "val", 4, augment="default", normalise=False, with_ids=True))
    assert _check_augmented(val, expected) == 0        # no augmentation outside train


def test_plain_reader_ranks_and_shuffle(tmp_path):
    root, meta, _ = build("star", tmp_path)        # 40 train rows in 6 shards
    ranks = [read_all(ParquetStream(root, "train", 3, world_size=3, rank=r, shuffle=True, seed=5, with_ids=True))
             for r in range(3)]
    assert [len(r) for r in ranks] == [13, 13, 13]
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])
    s = ParquetStream(root, "train", 40, shuffle=True, seed=5, with_ids=True)
    e0, e1 = next(iter(s))[2], next(iter(s))[2]
    assert sorted(e0) == sorted(e1) and e0 != e1      # a new order each epoch
    again = ParquetStream(root, "train", 40, shuffle=True, seed=5, with_ids=True)
    assert next(iter(again))[2] == e0                  # deterministic per (seed, epoch)
    assert len(ParquetStream(root, "train", 3, drop_last=True)) == 13
