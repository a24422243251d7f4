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
    grid {lo, hi, n}                    evaluation grid per target dim (docs/method.md §6)
    target_range {lo, hi}               observed min / max of y per dim over all splits
    fixed_sigmas, ml_is_sigmas          hand-designed proposal σ's (docs/method.md §4.4–4.6, §7)
    input                               {"kind": "image", "column": "image", "channels", "height",
                                        "width", "encoding"} or {"kind": "vector", "column": "x", "dim"}
    normalisation                       image inputs: x = (u8 / 255 − mean[c]) / std[c]; ImageNet
                                        mean/std for 3 channels (the ResNet's pre-training
                                        convention, docs/method.md §1), 0.5 / 0.5 for grey — the same
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

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

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
    directory, validate it, then publish it at ``out`` (a local path or a URI). Locally the temporary
    directory sits beside ``out`` and is renamed into place: an ingest that fails or is killed midway
    leaves at most a hidden ``.NAME.tmp-*`` directory without ``_dataset.json``. On object storage see
    :func:`_publish`."""
    out = storage.absolute(out)
    check_out(out, overwrite)
    remote = storage.is_uri(out)
    if not remote:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    # object storage: staged on local disk first (the shards are rewritten once their metadata is known)
    tmp = Path(tempfile.mkdtemp(prefix=f".{storage.name(out)}.tmp-", dir=None if remote else Path(out).parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the dataset gets the usual permissions
    try:
        writer = ShardWriter(tmp, meta, shard_rows)
        from pipelines.progress import bar
        with bar(total=total, desc=f"ingest {storage.name(out)}", unit="rows") if progress else \
                contextlib.nullcontext() as rows:
            for split, (ids, y, payload, aux) in chunks:      # the sources decode and encode as they are read
                writer.write(split, ids, y, payload, aux)
                if rows is not None:
                    rows.update(len(ids))
        meta = writer.finish()
        validate(tmp)
        if remote:
            _publish(tmp, out, meta)
        elif Path(out).exists():
            old = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.old-", dir=Path(out).parent))
            os.rename(out, old / "d")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def check_out(out: str, overwrite: bool) -> None:
    """``out`` must be free, or (with overwrite) a complete dataset: never replace anything else."""
    if storage.is_uri(out):
        if not storage.is_dir(out):
            if storage.exists(out):
                raise DatasetError(f"{out} is a file, not a dataset location")
            return
    else:
        p = Path(out)
        if not p.exists():
            return
        if not p.is_dir():
            raise DatasetError(f"{out} is a file, not a dataset location")
        if not any(p.iterdir()):
            return
    if not overwrite:
        raise DatasetError(f"{out} exists; pass --overwrite to replace it")
    if not storage.is_file(storage.join(out, METADATA_FILE)):
        raise DatasetError(f"{out} exists and is not a dataset; refusing to replace it")


def _publish(local: Path, out: str, meta: dict) -> None:
    """Object storage has no rename. The validated dataset is uploaded to a hidden staging prefix
    beside ``out`` (``.NAME.tmp-*``) and validated there (every footer read back); then ``out``'s old
    ``_dataset.json`` is deleted first (readers see no dataset, never a mix), the old objects removed,
    the staged objects copied server-side, and ``_dataset.json`` written last. If publishing fails
    after the old dataset was removed, the staging prefix is kept and the error names it."""
    staging = storage.join(storage.parent(out), f".{storage.name(out)}.tmp-{os.urandom(4).hex()}")
    try:
        storage.upload_dir(local, staging)
        validate(staging)
    except BaseException:
        storage.delete_dir(staging)
        raise
    fs, dst = storage.resolve(out)
    _, src = storage.resolve(staging)
    try:
        storage.delete_file(storage.join(out, METADATA_FILE))
        storage.delete_dir(out)
        for split in SPLITS:
            for rel in meta["splits"][split]["shards"]:
                fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
        fs.copy_file(f"{src}/{METADATA_FILE}", f"{dst}/{METADATA_FILE}")
    except BaseException as e:
        raise DatasetError(f"{out}: publishing the ingested dataset failed ({e}); the complete, validated "
                           f"dataset is kept at {staging}") from None
    storage.delete_dir(staging)


def read_metadata(root: str | os.PathLike) -> dict:
    """The metadata of a complete dataset (a local directory or a URI), DatasetError if it is not one."""
    root = str(root)
    path = storage.join(root, METADATA_FILE)
    try:
        text = storage.read_bytes(path)
    except FileNotFoundError:
        if not storage.is_dir(root):
            raise DatasetError(f"{root}: no such dataset directory") from None
        raise DatasetError(f"{root}: missing {METADATA_FILE}, so this is not a complete dataset "
                           "(an interrupted ingest, or not made by `ebm data ingest`)") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: a directory, not the dataset's metadata file") from None
    except storage.StorageError as e:
        raise DatasetError(str(e)) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {version!r}, this code reads version {FORMAT_VERSION}")
    return meta


def shard_paths(root: str | os.PathLike, meta: dict, split: str) -> list[str]:
    """The split's shard locations (local paths or URIs, like ``root``)."""
    if split not in meta["splits"]:
        raise DatasetError(f"{root}: no split {split!r}; splits are {sorted(meta['splits'])}")
    return [storage.join(str(root), rel) for rel in meta["splits"][split]["shards"]]


def open_parquet(location: str) -> pq.ParquetFile:
    """A shard opened for streaming reads (footer first, then only the row groups asked for)."""
    fs, path = storage.resolve(location)
    return pq.ParquetFile(path, filesystem=fs)


def validate(root: str | os.PathLike) -> dict:
    """Check every shard's presence, schema and metadata (footers only) -> the metadata."""
    root = str(root)
    meta = read_metadata(root)
    expected = schema_for(meta, with_metadata=False)
    listed = set()
    for split in SPLITS:
        info = meta["splits"].get(split)
        if not info or info["rows"] == 0 or not info["shards"]:
            raise DatasetError(f"{root}: split {split!r} is empty")
        rows = 0
        for rel, path in zip(info["shards"], shard_paths(root, meta, split)):
            listed.add(rel)
            try:
                pf = open_parquet(path)
            except FileNotFoundError:
                raise DatasetError(f"{path}: shard listed in {METADATA_FILE} is missing") from None
            except Exception as e:  # pyarrow raises several types for a damaged footer
                raise DatasetError(f"{path}: not a readable Parquet file ({e})") from None
            with pf:
                _check_schema(path, pf.schema_arrow, expected, meta)
                rows += pf.metadata.num_rows
        if rows != info["rows"]:
            raise DatasetError(f"{root}/{split}: shards hold {rows} rows, {METADATA_FILE} says {info['rows']}")
    _, base = storage.resolve(root)
    extra = sorted(rel for rel in (i.path[len(base) + 1:] for i in storage.list_dir(root, recursive=True)
                                   if i.path.endswith(".parquet"))
                   if rel.count("/") == 1 and rel not in listed)
    if extra:
        raise DatasetError(f"{storage.join(root, extra[0])}: shard not listed in {METADATA_FILE} "
                           f"({len(extra)} unlisted)")
    return meta


class DatasetChanged(DatasetError):
    """The dataset a run fixed at its start is not the one found now (replaced, edited or deleted
    underneath the run). Not retried: a restarted worker would read the changed data again."""


def check_unchanged(root: str, expected: dict) -> dict:
    """The dataset at ``root`` must still be the one whose metadata the run fixed at its start
    (``expected``): same content fingerprint, same shards, same metadata. -> the metadata."""
    try:
        got = read_metadata(root)
    except DatasetError as e:
        raise DatasetChanged(f"{root}: the dataset this run started with is gone ({e})") from None
    if got != expected:
        raise DatasetChanged(describe_change(root, expected, got))
    return got


def describe_change(root: str, expected: dict, got: dict) -> str:
    if got.get("fingerprint") != expected.get("fingerprint"):
        what = (f"its content fingerprint was {expected.get('fingerprint')} when the run started and is "
                f"{got.get('fingerprint')} now")
    elif got.get("splits") != expected.get("splits"):
        what = "its shard list changed"
    else:
        what = "its metadata changed (" + ", ".join(sorted(k for k in set(got) | set(expected)
                                                            if got.get(k) != expected.get(k))) + ")"
    return (f"dataset {root} changed during the run: {what} (replaced by another ingest --overwrite, or edited). "
            "A run trains on one dataset: start a new run on the new data")


def check_shard(path: str, pf: pq.ParquetFile, meta: dict) -> None:
    """A shard opened mid-run must carry the run's dataset metadata (its footer holds the fingerprint)."""
    stored = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    got = json.loads(stored) if stored else {}
    if got != meta:
        raise DatasetChanged(describe_change(path.rsplit("/", 2)[0], meta, got))


def _check_schema(path: str, got: pa.Schema, expected: pa.Schema, meta: dict) -> None:
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
