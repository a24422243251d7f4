"""Streaming readers of the dataset layout (:mod:`.layout`) yielding torch batches.

Both readers yield ``(x, y)`` (or ``(x, y, ids)`` with ``with_ids``): images x float32
(B, C, H, W) normalised per the dataset metadata (uint8 with ``normalise=False``), vector inputs
x float32 (B, d); y float32 (B, D). Memory is bounded by about one Parquet row group per reader
(plain path) or Ray Data's streaming backpressure (Ray path), never by the dataset size.

- :class:`ParquetStream`: pyarrow + Pillow in the calling process. Per-rank slicing for DDP.
- :func:`ray_dataset` + :class:`RayStream`: ``ray.data.read_parquet`` with decode, augmentation
  and normalisation in ``map_batches``; pass the Dataset to a trainer (which splits it per worker)
  and wrap the worker's ``get_dataset_shard`` iterator in RayStream.

Corrupt image bytes: ``on_corrupt="strict"`` (default) raises DatasetError naming the example id
and the shard file; ``"skip"`` drops the row and counts it (``stream.skipped``, ``skipped_ids``).
"""
from __future__ import annotations

import os
import zlib
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from .images import decode_image
from .layout import (ROW_GROUP_ROWS, DatasetChanged, DatasetError, check_shard, check_targets, list_to_numpy,
                     open_parquet, read_metadata, shard_paths, validate)

if TYPE_CHECKING:
    import torch

CORRUPT_POLICIES = ("strict", "skip")


def normalise(images: np.ndarray, meta: dict) -> np.ndarray:
    """uint8 (B, C, H, W) -> float32 (u8 / 255 − mean[c]) / std[c] (metadata normalisation)."""
    norm = meta["normalisation"]
    mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(norm["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def augment_biwi(images: np.ndarray, y: np.ndarray, rng: np.random.Generator, flip_prob: float = 0.5,
                 scale: tuple[float, float] = (0.7, 1.4), out_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """BIWI train-time augmentation per example: h-flip with probability flip_prob, negating yaw
    and roll (y[:, 0], y[:, 2]; pitch is unchanged by a mirror); rescale by s ~ U(scale); zero-pad
    to at least out_size; random out_size × out_size crop.

    images uint8 (B, C, H, W), y float32 (B, 3) -> (uint8 (B, C, out_size, out_size), float32 (B, 3)).
    """
    out = np.empty((images.shape[0], images.shape[1], out_size, out_size), dtype=np.uint8)
    y = np.array(y, dtype=np.float32, copy=True)
    for i, img in enumerate(images):
        if rng.random() < flip_prob:
            img = img[:, :, ::-1]
            y[i, 0], y[i, 2] = -y[i, 0], -y[i, 2]
        s = rng.uniform(*scale)
        h, w = img.shape[1:]
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) != (h, w):
            img = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((nw, nh), Image.BILINEAR))
                            for c in img])
        ph, pw = max(0, out_size - nh), max(0, out_size - nw)
        if ph or pw:
            img = np.pad(img, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        top = int(rng.integers(0, img.shape[1] - out_size + 1))
        left = int(rng.integers(0, img.shape[2] - out_size + 1))
        out[i] = img[:, top:top + out_size, left:left + out_size]
    return out, y


AUGMENTS: dict[str, Callable] = {"biwi_headpose": augment_biwi}


def resolve_augment(meta: dict, split: str, augment: str | None) -> Callable | None:
    """augment: None (none), "default" (the dataset's own for this split) or a name in AUGMENTS."""
    if augment == "default":
        augment = meta.get("augment", {}).get(split)
    if augment is None:
        return None
    if augment not in AUGMENTS:
        raise DatasetError(f"unknown augmentation {augment!r}; known: {sorted(AUGMENTS)}")
    if meta["input"]["kind"] != "image":
        raise DatasetError(f"augmentation {augment!r} needs image inputs")
    return AUGMENTS[augment]


def decode_rows(table: pa.Table | pa.RecordBatch, meta: dict, shard: str | list[str], on_corrupt: str,
                augment: Callable | None, rng: np.random.Generator | None, norm: bool = True) -> dict:
    """One batch of rows -> {"x", "y" float32 (B, D), "id" (B,), "ok" bool (B,)}.

    Images: x float32 (B, C, H, W) normalised (uint8 without norm); a corrupt row raises
    (strict) or gets ok = False and zero pixels (skip). Vectors: x float32 (B, d). shard: the
    file the rows come from, or one file per row.
    """
    ids = table.column("id").to_pylist()
    y = list_to_numpy(table.column("y"), int(meta["D"]))
    check_targets(y, ids, int(meta["D"]), where=shard if isinstance(shard, str) else ",".join(sorted(set(shard))))
    ok = np.ones(len(ids), dtype=bool)
    inp = meta["input"]
    if inp["kind"] == "vector":
        return {"x": list_to_numpy(table.column("x"), int(inp["dim"])), "y": y, "id": np.asarray(ids, dtype=object), "ok": ok}
    c, h, w = inp["channels"], inp["height"], inp["width"]
    images = np.zeros((len(ids), c, h, w), dtype=np.uint8)
    for i, data in enumerate(table.column("image").to_pylist()):
        try:
            images[i] = decode_image(data, (c, h, w), shard if isinstance(shard, str) else shard[i])
        except Exception as e:  # Pillow raises many types for damaged bytes
            if on_corrupt == "strict":
                where = shard if isinstance(shard, str) else shard[i]
                raise DatasetError(f"{where}: example {ids[i]!r} has a corrupt image ({type(e).__name__}: {e}); "
                                   "read with on_corrupt='skip' to drop such rows") from None
            ok[i] = False
    if augment is not None:
        images[ok], y[ok] = augment(images[ok], y[ok], rng, out_size=h)
    x = normalise(images, meta) if norm else images
    return {"x": x, "y": y, "id": np.asarray(ids, dtype=object), "ok": ok}


def _check_policy(on_corrupt: str) -> None:
    if on_corrupt not in CORRUPT_POLICIES:
        raise DatasetError(f"on_corrupt must be one of {CORRUPT_POLICIES}, got {on_corrupt!r}")


def _columns(meta: dict) -> list[str]:
    return ["id", meta["input"]["column"], "y"]


class ParquetStream:
    """Plain pyarrow streaming reader of one split; iterate once per epoch.

    shuffle: shard order and rows within each row group, from (seed, epoch). rank/world_size: this
    process keeps every world_size-th row (by position in the epoch's order) and stops after
    rows // world_size of them, so all ranks see the same number of batches.
    """

    def __init__(self, root: str | os.PathLike, split: str, batch_size: int = 32, *, shuffle: bool = False,
                 seed: int = 0, augment: str | None = None, on_corrupt: str = "strict", drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, normalise: bool = True, with_ids: bool = False,
                 check: bool = True, meta: dict | None = None):
        _check_policy(on_corrupt)
        # meta: the metadata the caller already holds (every shard opened is checked against it)
        self.meta = meta if meta is not None else validate(root) if check else read_metadata(root)
        self.files = shard_paths(root, self.meta, split)
        self.augment = resolve_augment(self.meta, split, augment)
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.on_corrupt, self.drop_last, self.norm, self.with_ids = on_corrupt, drop_last, normalise, with_ids
        self.rank, self.world_size = rank, world_size
        self.rows = self.meta["splits"][split]["rows"]
        self.epoch, self.skipped, self.skipped_ids = 0, 0, []

    def __len__(self) -> int:
        n = self.rows // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple["torch.Tensor", ...]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        files = [self.files[i] for i in (rng.permutation(len(self.files)) if self.shuffle else range(len(self.files)))]
        quota, pos = self.rows // self.world_size, 0
        pending: list[dict] = []
        n_pending = 0
        for path in files:
            for batch in self._batches(path):
                order = rng.permutation(batch.num_rows) if self.shuffle else np.arange(batch.num_rows)
                mine = order[(pos + np.arange(batch.num_rows)) % self.world_size == self.rank]
                pos += batch.num_rows
                mine = mine[:max(0, quota)]
                quota -= len(mine)
                if len(mine) == 0:
                    continue
                rows = decode_rows(batch.take(pa.array(mine)), self.meta, str(path), self.on_corrupt,
                                   self.augment, rng, self.norm)
                self._count_bad(rows)
                pending.append({k: v[rows["ok"]] for k, v in rows.items()})
                n_pending += int(rows["ok"].sum())
                while n_pending >= self.batch_size:
                    out, pending, n_pending = _take(pending, self.batch_size)
                    yield self._emit(out)
        if n_pending and not self.drop_last:
            yield self._emit(_take(pending, n_pending)[0])

    def _batches(self, path: str) -> Iterator[pa.RecordBatch]:
        """The shard's row groups, after checking it is still the dataset this stream started on."""
        try:
            pf = open_parquet(path)
        except FileNotFoundError:
            raise DatasetChanged(f"{path}: shard missing: the dataset changed or was deleted during the run") from None
        with pf:
            check_shard(path, pf, self.meta)
            yield from pf.iter_batches(batch_size=ROW_GROUP_ROWS, columns=_columns(self.meta))

    def _count_bad(self, rows: dict) -> None:
        bad = ~rows["ok"]
        if bad.any():
            self.skipped += int(bad.sum())
            self.skipped_ids.extend(rows["id"][bad].tolist())

    def _emit(self, rows: dict) -> tuple:
        import torch
        out = (torch.from_numpy(rows["x"]), torch.from_numpy(rows["y"]))
        return out + (list(rows["id"]),) if self.with_ids else out


def _take(pending: list[dict], k: int) -> tuple[dict, list[dict], int]:
    """First k rows of the pending list of row dicts -> (rows, remaining list, remaining count)."""
    cat = {key: np.concatenate([p[key] for p in pending]) for key in pending[0]}
    head = {key: v[:k] for key, v in cat.items()}
    n_rest = len(cat["y"]) - k
    rest = [{key: v[k:] for key, v in cat.items()}] if n_rest else []
    return head, rest, n_rest


def _ray_decode(table: pa.Table, meta: dict, on_corrupt: str, augment: str | None, seed: int | None,
                norm: bool) -> dict:
    """map_batches body: one Arrow block -> numpy columns x, y, id, ok (see decode_rows)."""
    shard = table.column("path").to_pylist()
    fn = AUGMENTS[augment] if augment else None
    # Seeded runs repeat the same augmentation each epoch (reproducible); unseeded draw fresh entropy.
    rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(table.column("id")[0].as_py().encode())])
    return decode_rows(table, meta, shard, on_corrupt, fn, rng, norm)


def ray_dataset(root: str | os.PathLike, split: str | Sequence[str], *, on_corrupt: str = "strict", augment: str | None = None,
                seed: int | None = None, normalise: bool = True, shuffle_files: bool = False,
                batch_size: int = 256):
    """A Ray Dataset of decoded rows: x float32 (C, H, W) (or (d,)), y float32 (D,), id, ok.

    split may be several splits read as one dataset (their augmentations must agree). Validates
    every shard's schema first (driver side, footers only). ``ok`` is False for rows dropped by
    on_corrupt="skip"; :class:`RayStream` filters and counts them.
    """
    import ray.data
    _check_policy(on_corrupt)
    meta = validate(root)
    splits = (split,) if isinstance(split, str) else tuple(split)
    files = [p for s in splits for p in shard_paths(root, meta, s)]
    names = {s: resolve_augment(meta, s, augment) for s in splits}
    if len(set(names.values())) > 1:
        raise DatasetError(f"splits {splits} have different augmentations; read them separately")
    resolved = names[splits[0]]
    name = None if resolved is None else next(k for k, v in AUGMENTS.items() if v is resolved)
    ds = ray.data.read_parquet(files, columns=_columns(meta), include_paths=True,
                               shuffle="files" if shuffle_files else None)
    return ds.map_batches(_ray_decode, batch_format="pyarrow", batch_size=batch_size,
                          fn_kwargs={"meta": meta, "on_corrupt": on_corrupt, "augment": name,
                                     "seed": seed, "norm": normalise})


class RayStream:
    """Torch batches from a Ray Dataset / DataIterator made by :func:`ray_dataset`; iterate once per
    epoch. Rows flagged ok = False (on_corrupt="skip") are dropped and counted in ``skipped``."""

    def __init__(self, ds, batch_size: int = 32, *, drop_last: bool = False, with_ids: bool = False,
                 local_shuffle_buffer_size: int | None = None, prefetch_batches: int = 1):
        self.ds, self.batch_size, self.drop_last, self.with_ids = ds, batch_size, drop_last, with_ids
        self.shuffle_buffer, self.prefetch = local_shuffle_buffer_size, prefetch_batches
        self.skipped, self.skipped_ids = 0, []

    def __iter__(self) -> Iterator[tuple["torch.Tensor", ...]]:
        for b in self.ds.iter_batches(batch_size=self.batch_size, batch_format="numpy", drop_last=self.drop_last,
                                      local_shuffle_buffer_size=self.shuffle_buffer,
                                      prefetch_batches=self.prefetch):
            ok = np.asarray(b["ok"], dtype=bool)
            if not ok.all():
                self.skipped += int((~ok).sum())
                self.skipped_ids.extend(np.asarray(b["id"])[~ok].tolist())
            if not ok.any():
                continue
            import torch
            out = (torch.from_numpy(np.ascontiguousarray(b["x"][ok])), torch.from_numpy(np.ascontiguousarray(b["y"][ok])))
            yield out + ([str(i) for i in np.asarray(b["id"])[ok]],) if self.with_ids else out


def load_aux(root: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """The aux_<name> columns of a split in row order -> {name: (N,)} (small: no images read)."""
    meta = validate(root)
    names = sorted(meta.get("aux", {}))
    if not names:
        return {}
    tables = []
    for p in shard_paths(root, meta, split):
        with open_parquet(p) as pf:
            tables.append(pf.read(columns=[f"aux_{n}" for n in names]))
    return {n: np.concatenate([t.column(f"aux_{n}").to_numpy() for t in tables]) for n in names}
