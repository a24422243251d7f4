"""The one on-disk dataset layout: sharded Parquet, one row per example.

Directory::

    DIR/_dataset.json                   the dataset metadata (below), written last: its presence
                                        marks a complete dataset
    DIR/train/part-00000.parquet ...    shards of each split, numbered from 0 in reading order
    DIR/val/part-00000.parquet ...
    DIR/test/part-00000.parquet ...

Columns (every shard of a dataset has exactly this Arrow schema):

    id     string                         stable example id (source file name or "<file>:<index>")
    split  string                         "train" | "val" | "test" (same as the shard's folder)
    image  binary                         image inputs: encoded bytes, PNG/JPEG as given by the source,
                                          lossless PNG when the source holds arrays
      or x fixed_size_list<float32>[d]    vector inputs (the toys: d = 1)
    y      fixed_size_list<float32>[D]    target, raw units (years, degrees, counts, radians)
    aux_<name>  int64 | float64           optional per-example extras (star: aux_k, aux_theta_r)

Exactly one of ``image`` / ``x`` exists; ``metadata["input"]["kind"]`` says which.

Metadata: one JSON object, stored under the key ``b"ebm.dataset"`` of every shard's Arrow schema
metadata and, identically, in ``_dataset.json``::

    format_version  int (FORMAT_VERSION)
    task, D, units, circular [D]        task name and target description
    grid {lo, hi, n}                    evaluation grid per target dim (METHOD.md §4)
    target_range {lo, hi}               observed min / max of y per dim over all splits
    fixed_sigmas, ml_is_sigmas          hand-designed proposal σ's (METHOD.md §3)
    input                               {"kind": "image", "column": "image", "channels", "height",
                                        "width", "encoding"} or {"kind": "vector", "column": "x", "dim"}
    normalisation                       image inputs: x = (u8 / 255 − mean[c]) / std[c]; ImageNet
                                        mean/std for 3 channels (the ResNet's pre-training
                                        convention, METHOD.md §1), 0.5 / 0.5 for grey — the same
                                        rule as ebm.train.image_norm. null for vector inputs (the
                                        toy nets standardise x themselves).
    augment {split: name}               train-time augmentation the task expects ("biwi_headpose")
    aux {name: dtype}                   the aux_<name> columns
    splits {split: {rows, shards}}      row counts and shard paths relative to DIR
    split_seed, split_rule, source      how the splits were drawn and from what
    fingerprint                         "sha256:<hex>" over every row in reading order (train, val,
                                        test; shards in order; rows in order) of the length-prefixed
                                        fields id, split, y (float32 LE), then image bytes or x
                                        (float32 LE). Independent of shard size and compression.

Validation (:func:`validate`) reads only Parquet footers: every listed shard must exist, no
unlisted shard may exist, each shard's schema must match column by column and its metadata must
equal ``_dataset.json``. Any problem is a :class:`DatasetError` naming the file (and column).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
METADATA_KEY = b"ebm.dataset"
METADATA_FILE = "_dataset.json"
from ebm.tasks import SPLITS  # noqa: E402  (one home: the generators split the same way)
DEFAULT_SHARD_ROWS = 4096
ROW_GROUP_ROWS = 512          # the streaming reader holds about one row group per shard in memory
AUX_TYPES = {"int64": pa.int64(), "float64": pa.float64()}


class DatasetError(ValueError):
    """A dataset (or its source) is missing, malformed or inconsistent; the message says where."""


def schema_for(meta: dict, with_metadata: bool = True) -> pa.Schema:
    """The Arrow schema every shard of a dataset with this metadata must have."""
    inp = meta["input"]
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("split", pa.string(), nullable=False)]
    if inp["kind"] == "image":
        fields.append(pa.field("image", pa.binary(), nullable=False))
    elif inp["kind"] == "vector":
        fields.append(pa.field("x", pa.list_(pa.float32(), int(inp["dim"])), nullable=False))
    else:
        raise DatasetError(f"unknown input kind {inp['kind']!r}; expected 'image' or 'vector'")
    fields.append(pa.field("y", pa.list_(pa.float32(), int(meta["D"])), nullable=False))
    for name, dtype in sorted(meta.get("aux", {}).items()):
        fields.append(pa.field(f"aux_{name}", AUX_TYPES[dtype], nullable=False))
    metadata = {METADATA_KEY: encode_metadata(meta)} if with_metadata else None
    return pa.schema(fields, metadata=metadata)


def encode_metadata(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


class Fingerprint:
    """Incremental content hash of rows in reading order (see the module docstring)."""

    def __init__(self):
        self._h = hashlib.sha256()

    def _field(self, b: bytes) -> None:
        self._h.update(struct.pack("<Q", len(b)))
        self._h.update(b)

    def update(self, ids: Iterable[str], split: str, y: np.ndarray, payload: Iterable[bytes] | np.ndarray) -> None:
        """ids (B,), y float32 (B, D), payload: B encoded images or float32 (B, d)."""
        y = np.ascontiguousarray(y, dtype="<f4")
        if isinstance(payload, np.ndarray):
            payload = [r.tobytes() for r in np.ascontiguousarray(payload, dtype="<f4")]
        for i, (ex_id, p) in enumerate(zip(ids, payload)):
            self._field(ex_id.encode())
            self._field(split.encode())
            self._field(y[i].tobytes())
            self._field(bytes(p))

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    """float32 (B, width) -> fixed_size_list<float32>[width]."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def list_to_numpy(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """fixed_size_list<float32>[width] column -> float32 (B, width) (a copy, writable)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


class ShardWriter:
    """Writes rows split by split into ``root`` (a temporary directory), rolling shards every
    ``shard_rows`` rows and hashing rows in write order.

    Shards are first written as drafts without the final metadata (the fingerprint, counts and
    target range are only known at the end); :meth:`finish` streams each draft into its final
    shard with the complete metadata, writes ``_dataset.json`` last and returns the metadata.
    """

    def __init__(self, root: Path, meta: dict, shard_rows: int = DEFAULT_SHARD_ROWS):
        if shard_rows < 1:
            raise DatasetError(f"shard size must be at least 1 row, got {shard_rows}")
        self.root, self.meta, self.shard_rows = Path(root), dict(meta), int(shard_rows)
        self.draft_schema = schema_for(self.meta, with_metadata=False)
        self.fingerprint = Fingerprint()
        self.shards: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
        self._writer: pq.ParquetWriter | None = None
        self._split, self._rows_in_shard = None, 0
        self._lo = np.full(int(meta["D"]), np.inf)
        self._hi = np.full(int(meta["D"]), -np.inf)

    def _open(self, split: str) -> None:
        self._close()
        rel = f"{split}/part-{len(self.shards[split]):05d}.parquet"
        (self.root / "_draft" / split).mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.root / "_draft" / rel, self.draft_schema, **_WRITE_OPTS)
        self.shards[split].append((rel, 0))
        self._split, self._rows_in_shard = split, 0

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, split: str, ids: list[str], y: np.ndarray, payload, aux: dict | None = None) -> None:
        """Append B rows: ids (B,), y float32 (B, D), payload B encoded images or float32 (B, d),
        aux {name: (B,)}. Splits must be written one after another in SPLITS order."""
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; splits are {SPLITS}")
        if self._split is not None and SPLITS.index(split) < SPLITS.index(self._split):
            raise DatasetError(f"split {split!r} written after {self._split!r}: write in order {SPLITS}")
        y = np.asarray(y, dtype=np.float32).reshape(len(ids), -1)
        check_targets(y, ids, int(self.meta["D"]), where="source")
        if len(ids):
            self._lo = np.minimum(self._lo, y.min(0))
            self._hi = np.maximum(self._hi, y.max(0))
        start = 0
        while start < len(ids):
            if self._writer is None or self._split != split or self._rows_in_shard >= self.shard_rows:
                self._open(split)
            stop = min(len(ids), start + self.shard_rows - self._rows_in_shard)
            part = slice(start, stop)
            self._writer.write_table(self._table(split, ids[part], y[part], payload[part],
                                                 {k: np.asarray(v)[part] for k, v in (aux or {}).items()}),
                                     row_group_size=ROW_GROUP_ROWS)
            self._rows_in_shard += stop - start
            rel, n = self.shards[split][-1]
            self.shards[split][-1] = (rel, n + stop - start)
            start = stop
        self.fingerprint.update(ids, split, y, payload)

    def _table(self, split, ids, y, payload, aux) -> pa.Table:
        cols = [pa.array(list(ids), pa.string()), pa.array([split] * len(ids), pa.string())]
        if self.meta["input"]["kind"] == "image":
            cols.append(pa.array([bytes(p) for p in payload], pa.binary()))
        else:
            cols.append(fixed_list(payload, int(self.meta["input"]["dim"])))
        cols.append(fixed_list(y, int(self.meta["D"])))
        for name, dtype in sorted(self.meta.get("aux", {}).items()):
            cols.append(pa.array(np.asarray(aux[name]).astype(dtype), AUX_TYPES[dtype]))
        return pa.Table.from_arrays(cols, schema=self.draft_schema)

    def finish(self) -> dict:
        """Finalise the shards, write ``_dataset.json`` and return the complete metadata."""
        self._close()
        for split in SPLITS:
            if not self.shards[split]:
                raise DatasetError(f"split {split!r} is empty: every dataset needs train, val and test rows")
        meta = dict(self.meta)
        meta["format_version"] = FORMAT_VERSION
        meta["splits"] = {s: {"rows": sum(n for _, n in v), "shards": [r for r, _ in v]}
                          for s, v in self.shards.items()}
        meta["target_range"] = {"lo": self._lo.tolist(), "hi": self._hi.tolist()}
        meta["fingerprint"] = self.fingerprint.hexdigest()
        final = schema_for(meta)
        for split in SPLITS:
            (self.root / split).mkdir(parents=True, exist_ok=True)
            for rel, _ in self.shards[split]:
                draft = self.root / "_draft" / rel
                with pq.ParquetWriter(self.root / rel, final, **_WRITE_OPTS) as w:
                    for batch in pq.ParquetFile(draft).iter_batches(batch_size=ROW_GROUP_ROWS):
                        w.write_batch(batch.replace_schema_metadata(final.metadata), row_group_size=ROW_GROUP_ROWS)
                draft.unlink()
        shutil.rmtree(self.root / "_draft", ignore_errors=True)
        (self.root / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return meta


# Image bytes are already compressed: no codec and no dictionary for them (or for unique ids).
_WRITE_OPTS = dict(compression={"id": "snappy", "split": "snappy", "image": "none", "x": "snappy",
                                "y": "snappy"}, use_dictionary=["split"])


def check_targets(y: np.ndarray, ids, D: int, where: str) -> None:
    """Targets must be finite float32 (B, D); otherwise DatasetError naming the first bad id."""
    if y.ndim != 2 or y.shape[1] != D:
        raise DatasetError(f"{where}: targets have shape {tuple(y.shape)}, expected (N, {D})")
    check_finite(y, ids, where, "target")


def check_finite(values: np.ndarray, ids, where: str, what: str) -> None:
    """Rows of ``values`` (B, k) must be finite; otherwise DatasetError naming the first bad id."""
    bad = ~np.isfinite(values).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where}: example {ids[i]!r} has a non-finite {what} {values[i].tolist()}"
                           f" ({int(bad.sum())} such rows)")


def write_atomic(out, meta: dict, chunks: Iterator[tuple[str, tuple]], total: int,
                 shard_rows: int = DEFAULT_SHARD_ROWS, overwrite: bool = False, progress: bool = True) -> dict:
    """Write (split, (ids, y, payload, aux)) pairs (see ShardWriter.write) into a temporary
    directory beside ``out``, validate it, then rename it into place: an ingest that fails or is
    killed midway leaves at most a hidden ``.NAME.tmp-*`` directory without ``_dataset.json``."""
    out = Path(out).absolute()
    if out.exists():
        if not overwrite:
            raise DatasetError(f"{out} exists; pass --overwrite to replace it")
        if any(out.iterdir()) and not (out / "_dataset.json").is_file():
            raise DatasetError(f"{out} exists and is not a dataset; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the dataset gets the usual permissions
    try:
        writer = ShardWriter(tmp, meta, shard_rows)
        bar = Progress(total, f"ingest {out.name}", enabled=progress)
        for split, (ids, y, payload, aux) in chunks:
            writer.write(split, ids, y, payload, aux)
            bar.update(len(ids))
        bar.close()
        meta = writer.finish()
        validate(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "d")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class Progress:
    """Rows done / total on stderr, at most once a second."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def update(self, k: int) -> None:
        self.done += k
        now = time.monotonic()
        if self.enabled and now - self.last >= 1.0:
            self.last = now
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-9)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(f"{self.label}: {self.done}/{self.total} rows{pct}, {rate:.0f} rows/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._print(time.monotonic())


def read_metadata(root: str | os.PathLike) -> dict:
    """The metadata of a complete dataset, DatasetError if DIR is not one."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    path = root / METADATA_FILE
    if not path.is_file():
        raise DatasetError(f"{root}: missing {METADATA_FILE}, so this is not a complete dataset "
                           "(an interrupted ingest, or not made by `ebm data ingest`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}")
    return meta


def shard_paths(root: str | os.PathLike, meta: dict, split: str) -> list[Path]:
    if split not in meta["splits"]:
        raise DatasetError(f"{root}: no split {split!r}; splits are {sorted(meta['splits'])}")
    return [Path(root) / rel for rel in meta["splits"][split]["shards"]]


def validate(root: str | os.PathLike) -> dict:
    """Check every shard's presence, schema and metadata (footers only) -> the metadata."""
    root = Path(root)
    meta = read_metadata(root)
    expected = schema_for(meta, with_metadata=False)
    listed = set()
    for split in SPLITS:
        info = meta["splits"].get(split)
        if not info or info["rows"] == 0 or not info["shards"]:
            raise DatasetError(f"{root}: split {split!r} is empty")
        rows = 0
        for path in shard_paths(root, meta, split):
            listed.add(path.resolve())
            if not path.is_file():
                raise DatasetError(f"{path}: shard listed in {METADATA_FILE} is missing")
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several types for a damaged footer
                raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
            _check_schema(path, pf.schema_arrow, expected, meta)
            rows += pf.metadata.num_rows
        if rows != info["rows"]:
            raise DatasetError(f"{root}/{split}: shards hold {rows} rows, {METADATA_FILE} says {info['rows']}")
    extra = sorted(p for p in root.glob("*/*.parquet") if p.resolve() not in listed)
    if extra:
        raise DatasetError(f"{extra[0]}: shard not listed in {METADATA_FILE} ({len(extra)} unlisted)")
    return meta


def _check_schema(path: Path, got: pa.Schema, expected: pa.Schema, meta: dict) -> None:
    names = {f.name for f in got}
    for field in expected:
        if field.name not in names:
            raise DatasetError(f"{path}: column {field.name!r} is missing (expected {field.type})")
        actual = got.field(field.name).type
        if actual != field.type:
            raise DatasetError(f"{path}: column {field.name!r} has type {actual}, expected {field.type}")
    for field in got:
        if expected.get_field_index(field.name) < 0:
            raise DatasetError(f"{path}: column {field.name!r} is not in the layout")
    stored = (got.metadata or {}).get(METADATA_KEY)
    if stored is None:
        raise DatasetError(f"{path}: schema metadata key {METADATA_KEY.decode()!r} is missing")
    if json.loads(stored) != meta:
        raise DatasetError(f"{path}: schema metadata differs from {METADATA_FILE}")
