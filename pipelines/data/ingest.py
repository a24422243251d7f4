"""Turn a source in one of the supported formats into the dataset layout of :mod:`.layout`.

``ingest(fmt, source, out, ...)`` with fmt one of FORMATS:

    ccgan_h5          SteeringAngle_64x64.h5 / UTKFace_64x64.h5: keys images (N, C, H, W) uint8,
                      labels (N,); task from --task or the file name; age keeps 1 <= label <= 60
    cell200           folder of grey images, count = float(name.split("_")[1].split(".0.")[0])
    biwi              BIWI_train.npz / BIWI_test.npz (a folder holding them, or one file): keys
                      image (N, 64, 64, 3) uint8, pose (N, 3) yaw/pitch/roll degrees
    folder_csv        image folder + CSV manifest: a file column (file|path|image|filename), target
                      columns (y, or y0..y{D-1}, or every other numeric column), optional split, id
    table             tabular inputs: one CSV or Parquet file, input columns (--inputs, default every
                      numeric column that is not a target) and target columns, optional split, id
    fashion_rotation  Debian dataset-fashion-mnist gzipped IDX files, rotated by y ~ U[0, 2π)
    synthetic         source = toy1 | toy2 | star (ebm.tasks.make_synthetic)

Splits: a source's own split is kept (BIWI test file, Fashion t10k, the synthetic generators, a
manifest's split column); otherwise a seeded permutation puts round(test_frac·N) examples in test,
round(val_frac·N) in val and the rest in train (val is drawn from the source's train part when it
has one). Within a split rows keep source order. Array sources are stored as lossless PNG; image
files are stored byte for byte. The dataset is written into a temporary directory beside ``out``
and renamed into place only after it validates, so a failed ingest leaves no dataset behind;
``out`` may be a URI (``s3://…``), published through a validated staging prefix
(:func:`pipelines.data.layout.write_atomic`).
"""
from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from pipelines import storage

from .images import ImageError, decode_image, image_channels
from .layout import DEFAULT_SHARD_ROWS, SPLITS, DatasetError, check_finite, check_out, check_targets, write_atomic

FORMATS = ("ccgan_h5", "cell200", "biwi", "folder_csv", "table", "fashion_rotation", "synthetic")
FASHION_DIR = "/usr/share/datasets/fashion-mnist/"
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
CHUNK = 256
# A chunk: (ids (B,), y float32 (B, D), payload: B encoded images or float32 (B, d), aux {name: (B,)})
Chunk = tuple[list, np.ndarray, object, dict]


def ingest(fmt: str, source: str | os.PathLike | None, out: str | os.PathLike, *, task: str | None = None,
           seed: int = 0, shard_rows: int = DEFAULT_SHARD_ROWS, val_frac: float = 0.1,
           test_frac: float = 0.2, size: int | None = None, n: dict | None = None,
           manifest: str | None = None, targets: dict | None = None, inputs: list[str] | None = None,
           overwrite: bool = False, progress: bool = True, dedupe: bool = False,
           allow_outside: bool = False) -> dict:
    """Ingest ``source`` (format ``fmt``) into dataset directory ``out`` -> the dataset metadata.

    Image folders (folder_csv, cell200) refuse duplicates — the same file or id listed twice, or the
    same image bytes under two names — since they would land in two splits; ``dedupe`` keeps the first
    of each and reports how many were dropped. A manifest's paths must stay inside the source folder
    unless ``allow_outside``.

    ``targets`` (folder_csv, table) declares a new task's targets: ``names`` (columns, in order),
    ``circular`` {name: period | None}, ``units`` {name: unit}, ``grid`` {name: (lo, hi, n)},
    ``sigmas`` (σ1, σ2); see :func:`declare_targets`. ``inputs`` (table): the input columns."""
    if inputs and fmt != "table":
        raise DatasetError(f"--inputs applies to the table format, not {fmt}")
    if targets and fmt not in ("folder_csv", "table"):
        raise DatasetError(f"target declarations (--targets, --circular, --units, --grid, --sigmas) apply to "
                           f"folder_csv and table, not {fmt}")
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if (dedupe or allow_outside) and fmt not in ("folder_csv", "cell200"):
        raise DatasetError(f"--dedupe and --allow-outside apply to image folders (folder_csv, cell200), not {fmt}")
    check_out(storage.absolute(out), overwrite)            # before any work: never replace anything by accident
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise DatasetError(f"split fractions val={val_frac}, test={test_frac} must be in [0, 1) and sum below 1")
    if n and fmt not in ("synthetic", "fashion_rotation"):
        raise DatasetError(f"split sizes (--n-train/--n-val/--n-test) apply to synthetic and fashion_rotation, not {fmt}")
    if n and any(int(m) < 1 for m in n.values()):
        raise DatasetError(f"split sizes must be >= 1, got {n}")
    opts = dict(task=task, seed=seed, val_frac=val_frac, test_frac=test_frac, size=size, n=n, manifest=manifest,
                targets=dict(targets or {}), inputs=list(inputs or []), dedupe=dedupe, allow_outside=allow_outside,
                progress=progress)
    if fmt == "fashion_rotation":
        source = source or FASHION_DIR
    if source is None:
        raise DatasetError(f"format {fmt} needs a SOURCE")
    if fmt != "synthetic" and not Path(source).exists():
        raise DatasetError(f"{source}: source not found")
    meta, total, chunks = SOURCES[fmt](source, opts)
    meta["split_seed"] = seed
    return write_atomic(out, meta, chunks, total, shard_rows, overwrite, progress)


def task_meta(name: str, input_: dict, **over) -> dict:
    """Metadata fields from a built-in task's defaults (ebm.tasks), with ``over`` taking precedence."""
    from ebm.tasks import get_task, task_metadata
    meta = dict(task_metadata(get_task(name)), input=input_, normalisation=None, augment={}, aux={})
    if input_["kind"] == "image":
        meta["normalisation"] = _normalisation(input_["channels"])
    meta.update(over)
    return meta


def _normalisation(channels: int) -> dict:
    from ebm.tasks import image_norm
    mean, std = image_norm(channels)
    return {"mean": list(mean), "std": list(std), "rule": "imagenet" if channels == 3 else "0.5/0.5 grey"}


def _seeded_rule(o: dict) -> str:
    return f"seeded permutation: test {o['test_frac']}, val {o['val_frac']}"


DEFAULT_GRID_N = {1: (1000, 1024), 2: (128, 128), 3: (30, 30)}   # per dim by D: (linear, circular)


def declare_targets(name: str, y: np.ndarray, names: list[str], decl: dict) -> tuple[dict, np.ndarray]:
    """A new task's target description from the data and the user's declarations -> (metadata
    fields, y with circular dims in radians on [0, 2π)).

    decl: ``circular`` {name: period or None (= 2π, radians)}, ``units`` {name: unit}, ``grid``
    {name: (lo, hi, n)}, ``sigmas`` (σ1, σ2). Defaults from the data: a linear dim's grid spans the
    observed range padded by 5 %; circular dims span [0, 2π); 1000 / 1024 points per dim for D = 1,
    128 for D = 2, 30 for D = 3; σ's per dim, 1 % and 20 % of a linear dim's grid width (mirroring
    docs/method.md §7's pairs) and 0.05 and 0.8 rad for a circular dim (as for the built-in angle tasks)."""
    from ebm.tasks import MAX_D, TWO_PI
    D = y.shape[1]
    if not 1 <= D <= MAX_D:
        raise DatasetError(f"{D} target columns {names}: targets of 1 to {MAX_D} dims are supported")
    for key in ("circular", "units", "grid"):
        unknown = sorted(set(decl.get(key) or {}) - set(names))
        if unknown:
            raise DatasetError(f"--{key} names {unknown}, which are not target columns; targets: {names}")
    circular = decl.get("circular") or {}
    y = y.astype(np.float64)
    periods = {}
    for d, n in enumerate(names):
        if n in circular:
            period = TWO_PI if circular[n] is None else float(circular[n])
            if not period > 0:
                raise DatasetError(f"--circular {n}: the period must be > 0, got {period}")
            lo_v, hi_v = float(y[:, d].min()), float(y[:, d].max())
            if circular[n] is None and (lo_v < -TWO_PI - 1e-6 or hi_v > TWO_PI + 1e-6):
                raise DatasetError(f"--circular {n}: without a period the column is taken as radians, but its values "
                                   f"span [{lo_v:g}, {hi_v:g}]; give the period, e.g. --circular {n}:360 for degrees")
            y[:, d] = np.mod(y[:, d], period) * (TWO_PI / period)
            periods[n] = period
    y = y.astype(np.float32)
    circ = [n in circular for n in names]
    for d in np.flatnonzero(circ):
        y[y[:, d] >= np.float32(TWO_PI), d] = 0.0      # float32 rounding may land a wrapped angle on 2π
    n_lin, n_circ = DEFAULT_GRID_N[D]
    lo, hi, num = [], [], []
    for d, n in enumerate(names):
        if circ[d]:
            g = (0.0, TWO_PI, n_circ)
            if n in (decl.get("grid") or {}):
                raise DatasetError(f"--grid {n}: a circular dim's grid is [0, 2π); give its point count with the "
                                   "linear dims' grids only")
        else:
            a, b = float(y[:, d].min()), float(y[:, d].max())
            pad = max(0.05 * (b - a), 1e-3)
            g = tuple((decl.get("grid") or {}).get(n) or (a - pad, b + pad, n_lin))
            if not (len(g) == 3 and g[1] > g[0] and int(g[2]) >= 2):
                raise DatasetError(f"--grid {n}: need LO:HI:N with HI > LO and N >= 2, got {g}")
            if y[:, d].min() < g[0] or y[:, d].max() > g[1]:
                raise DatasetError(f"--grid {n}: [{g[0]}, {g[1]}] does not hold the data's range "
                                   f"[{y[:, d].min()}, {y[:, d].max()}]")
        lo.append(float(g[0]))
        hi.append(float(g[1]))
        num.append(int(g[2]))
    if decl.get("sigmas"):
        sigmas = [float(v) for v in decl["sigmas"]]
        if len(sigmas) != 2 or min(sigmas) <= 0:
            raise DatasetError(f"--sigmas needs two positive values, got {sigmas}")
    else:
        per_dim = [(0.05, 0.8) if circ[d] else (0.01 * (hi[d] - lo[d]), 0.2 * (hi[d] - lo[d])) for d in range(D)]
        sigmas = list(per_dim[0]) if len(set(per_dim)) == 1 else [[p[0] for p in per_dim], [p[1] for p in per_dim]]
    units = [("radians" if circ[d] else (decl.get("units") or {}).get(n, "")) for d, n in enumerate(names)]
    meta = dict(task=name, D=D, units=units, target_names=list(names), circular=circ,
                grid={"lo": lo, "hi": hi, "n": num}, fixed_sigmas=sigmas, ml_is_sigmas=sigmas)
    if periods:
        meta["circular_source_period"] = periods    # circular dims were converted to radians from these
    return meta, y


def describe_targets(meta: dict) -> str:
    """One line per target dim, as ingest prints it."""
    out = []
    period = meta.get("circular_source_period") or {}
    names = meta.get("target_names") or (["y"] if meta["D"] == 1 else [f"y{d}" for d in range(meta["D"])])
    units = meta["units"] if isinstance(meta["units"], list) else [meta["units"]] * meta["D"]
    sig = meta["fixed_sigmas"]
    per_dim = isinstance(sig[0], list)
    for d, n in enumerate(names):
        kind = "circular [0, 2π)" + (f", converted from period {period[n]:g}" if n in period else "") \
            if meta["circular"][d] else f"linear, grid [{meta['grid']['lo'][d]:.4g}, {meta['grid']['hi'][d]:.4g}]"
        out.append(f"  target {n}: {kind}, {meta['grid']['n'][d]} grid points" + (f", units {units[d]}" if units[d] else "")
                   + (f", fixed-proposal σ's {sig[0][d]:.4g}, {sig[1][d]:.4g}" if per_dim else ""))
    if not per_dim:
        out.append(f"  fixed-proposal σ's {sig[0]:.4g}, {sig[1]:.4g}")
    return "\n".join(out)


def seeded_split(n: int, seed: int, val_frac: float, test_frac: float, has_test: bool = False) -> dict:
    """{split: sorted int64 indices}; with has_test the source's own test set is kept aside."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = 0 if has_test else int(round(test_frac * n))
    n_val = int(round(val_frac * n))
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    return {s: np.sort(parts[s]) for s in SPLITS if not (has_test and s == "test")}


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) with C in {1, 3} -> PNG bytes (lossless)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise DatasetError(f"expected a uint8 (C, H, W) image with C in (1, 3), got {image.dtype} {image.shape}")
    arr = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def probe_image(data: bytes, where: str) -> tuple[int, int, int, str]:
    """(channels, height, width, encoding) of encoded image bytes from the header, under the one image
    rule (:mod:`.images`); DatasetError if not a readable image of a mode this project reads."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            (w, h), fmt = im.size, (im.format or "").lower()
            channels = image_channels(im, where)
            im.verify()
    except ImageError as e:
        raise DatasetError(str(e)) from None
    except Exception as e:  # Pillow raises many types for bad files
        raise DatasetError(f"{where}: not a readable image ({e})") from None
    return channels, h, w, fmt


def image_input(channels: int, h: int, w: int, encoding: str) -> dict:
    return {"kind": "image", "column": "image", "channels": channels, "height": h, "width": w, "encoding": encoding}


def _array_chunks(index: dict, images: Callable, labels: np.ndarray, make_id: Callable
                  ) -> Iterator[tuple[str, Chunk]]:
    """Chunks of PNG-encoded array images: images(idx sorted) -> uint8 (B, C, H, W)."""
    for split in SPLITS:
        idx = index[split]
        for s in range(0, len(idx), CHUNK):
            part = idx[s:s + CHUNK]
            block = images(part)
            yield split, ([make_id(i) for i in part], labels[part], [encode_png(im) for im in block], {})


def _ccgan_h5(source, o):
    try:
        import h5py
    except ImportError:
        raise DatasetError("the ccgan_h5 format needs h5py: pip install 'ebm-proposals[h5]'") from None
    name = o["task"] or ("steering" if "steering" in Path(source).name.lower()
                         else "age" if "utkface" in Path(source).name.lower() else None)
    if name is None:
        raise DatasetError(f"{source}: cannot tell the task from the file name; pass --task steering|age")
    f = h5py.File(source, "r")
    for key in ("images", "labels"):
        if key not in f:
            raise DatasetError(f"{source}: HDF5 key {key!r} missing (keys: {sorted(f.keys())})")
    images, n = f["images"], f["images"].shape[0]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
        raise DatasetError(f"{source}: images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    labels = np.asarray(f["labels"][:], dtype=np.float32).reshape(n, -1) if f["labels"].shape[0] == n else None
    if labels is None or labels.shape[1] != 1:
        raise DatasetError(f"{source}: labels must be (N,) with N = {n}, got {f['labels'].shape}")
    keep = np.arange(n)
    rule = "all rows"
    if name == "age":
        keep = np.flatnonzero((labels[:, 0] >= 1) & (labels[:, 0] <= 60))
        rule = "1 <= label <= 60"
    split = seeded_split(len(keep), o["seed"], o["val_frac"], o["test_frac"])
    index = {s: keep[v] for s, v in split.items()}
    stem = Path(source).stem
    meta = task_meta(name, image_input(images.shape[1], images.shape[2], images.shape[3], "png"),
                     source={"format": "ccgan_h5", "file": Path(source).name, "filter": rule},
                     split_rule=_seeded_rule(o))

    def read(idx):  # one contiguous HDF5 read per chunk, then select
        return images[idx[0]:idx[-1] + 1][idx - idx[0]]

    def chunks():
        with f:
            yield from _array_chunks(index, read, labels, lambda i: f"{stem}:{i:06d}")
    return meta, len(keep), chunks()


def cell_count(name: str) -> float:
    """The Cell-200 label parse (docs/method.md §7): "img_37.0.png" -> 37.0."""
    try:
        return float(name.split("_")[1].split(".0.")[0])
    except (IndexError, ValueError):
        raise DatasetError(f"{name}: cannot parse a cell count from the file name "
                           "(expected NAME_<count>.0.<ext>, e.g. img_37.0.png)") from None


def _image_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _file_chunks(files: list[Path], y: np.ndarray, ids: list[str], index: dict, shape: tuple
                 ) -> Iterator[tuple[str, Chunk]]:
    """Image files stored byte for byte, each decoded once under the one image rule (the dataset's
    (C, H, W), 8-bit grey or RGB, exactly): training and serving then read every stored image alike."""
    first = files[0].name
    for split in SPLITS:
        idx = index[split]
        for s in range(0, len(idx), CHUNK):
            part = idx[s:s + CHUNK]
            data = []
            for i in part:
                b = files[i].read_bytes()
                try:
                    decode_image(b, shape, str(files[i]), owner=f"the dataset (its first image, {first})")
                except ImageError as e:
                    raise DatasetError(str(e)) from None
                data.append(b)
            yield split, ([ids[i] for i in part], y[part], data, {})


def _first_image(files: list[Path]) -> tuple[int, int, int, str]:
    bad = sorted({p.suffix for p in files if p.suffix.lower() not in IMAGE_SUFFIXES})
    if bad:
        example = next(p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
        raise DatasetError(f"{example}: unsupported image type {bad[0]!r} ({len(bad)} such suffixes: {bad}); "
                           f"supported: {', '.join(IMAGE_SUFFIXES)}")
    channels, h, w, _ = probe_image(files[0].read_bytes(), str(files[0]))
    encs = {IMAGE_SUFFIXES[p.suffix.lower()] for p in files}
    return channels, h, w, "/".join(sorted(encs))


def _duplicates(files: list[Path], ids: list[str], where: str, dedupe: bool, progress: bool = False) -> np.ndarray:
    """Indices of the rows to keep. Rows that repeat an earlier row's file, id or image bytes are
    leakage (the same example in two splits): DatasetError naming the first such pair, or with
    ``dedupe`` dropped (the first of each kept) and reported on stderr."""
    import hashlib
    seen: dict[tuple[str, str], int] = {}
    dropped: dict[str, int] = {}
    first_example = None
    keep = []
    from pipelines.progress import bar
    rows = zip(files, ids)
    for i, (path, ex_id) in enumerate(bar(rows, total=len(files), desc="checking for duplicates", unit="files")
                                      if progress else rows):
        keys = (("file", os.path.normpath(str(path))), ("id", ex_id),
                ("image bytes", hashlib.sha256(path.read_bytes()).hexdigest()))
        hit = next(((what, seen[(what, k)]) for what, k in keys if (what, k) in seen), None)
        if hit is None:
            for key in keys:
                seen[key] = i
            keep.append(i)
            continue
        what, j = hit
        dropped[what] = dropped.get(what, 0) + 1
        first_example = first_example or f"{files[i]} (id {ex_id!r}) repeats {files[j]} (id {ids[j]!r}): same {what}"
    n = sum(dropped.values())
    if n and not dedupe:
        counts = ", ".join(f"{k} {v}" for k, v in dropped.items())
        raise DatasetError(f"{where}: {n} duplicate row(s) ({counts}), e.g. {first_example}. The same example "
                           f"would land in two splits; remove them, or pass --dedupe to keep the first of each")
    if n:
        print(f"ingest: --dedupe dropped {n} duplicate row(s) (" + ", ".join(f"same {k}: {v}" for k, v in dropped.items())
              + f"), e.g. {first_example}", file=sys.stderr)
    return np.asarray(keep, dtype=np.int64)


def _inside(root: Path, name: str, where: str, allow_outside: bool) -> Path:
    """A manifest path, which must stay inside the source folder unless allow_outside."""
    norm = os.path.normpath(name)
    if not allow_outside and (os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep)):
        raise DatasetError(f"{where}: {name!r} is outside the source folder {root} (absolute, or through '..'); "
                           "pass --allow-outside if that is intended")
    return root / name


def _cell200(source, o):
    root = Path(source)
    files = _image_files(root)
    keep = _duplicates(files, [p.relative_to(root).as_posix() for p in files], str(root), o["dedupe"],
                      o["progress"])
    files = [files[i] for i in keep]
    y = np.array([[cell_count(p.name)] for p in files], dtype=np.float32)
    _, h, w, enc = _first_image(files)
    split = seeded_split(len(files), o["seed"], o["val_frac"], o["test_frac"])
    meta = task_meta(o["task"] or "cell", image_input(1, h, w, enc),
                     source={"format": "cell200", "folder": root.name},
                     split_rule=_seeded_rule(o))
    ids = [p.relative_to(root).as_posix() for p in files]
    return meta, len(files), _file_chunks(files, y, ids, split, (1, h, w))


def _biwi(source, o):
    source = Path(source)
    paths = ({"train": source / "BIWI_train.npz", "test": source / "BIWI_test.npz"}
             if source.is_dir() else {"all": source})
    for p in paths.values():
        if not p.is_file():
            raise DatasetError(f"{p}: missing (a BIWI folder needs BIWI_train.npz and BIWI_test.npz)")
    arrays = {}
    for part, p in paths.items():
        with np.load(p) as z:
            if "image" not in z or "pose" not in z:
                raise DatasetError(f"{p}: npz needs keys image and pose, has {sorted(z.keys())}")
            img, pose = z["image"], np.asarray(z["pose"], dtype=np.float32)
        if img.dtype != np.uint8 or img.ndim != 4 or img.shape[3] != 3:
            raise DatasetError(f"{p}: image must be uint8 (N, H, W, 3), got {img.dtype} {img.shape}")
        if pose.shape != (img.shape[0], 3):
            raise DatasetError(f"{p}: pose must be (N, 3) = ({img.shape[0]}, 3), got {pose.shape}")
        arrays[part] = (img.transpose(0, 3, 1, 2), pose, p.stem)
    first = next(iter(arrays.values()))[0]
    meta = task_meta("headpose", image_input(3, first.shape[2], first.shape[3], "png"),
                     augment={"train": "biwi_headpose"},
                     source={"format": "biwi", "files": [p.name for p in paths.values()]},
                     split_rule=(f"test = BIWI_test.npz; val = seeded {o['val_frac']} of BIWI_train.npz"
                                 if "train" in arrays else
                                 _seeded_rule(o)))
    has_test = "train" in arrays
    base = arrays["train" if has_test else "all"]
    index = seeded_split(len(base[1]), o["seed"], o["val_frac"], o["test_frac"], has_test=has_test)

    def chunks():
        for split in SPLITS:
            img, pose, stem = arrays["test"] if split == "test" and has_test else base
            idx = np.arange(len(pose)) if split == "test" and has_test else index[split]
            for s in range(0, len(idx), CHUNK):
                part = idx[s:s + CHUNK]
                yield split, ([f"{stem}:{i:06d}" for i in part], pose[part],
                              [encode_png(im) for im in img[part]], {})
    total = sum(len(a[1]) for a in arrays.values())
    return meta, total, chunks()


def _read_manifest(path: Path, names: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str], list | None,
                                                                      list | None]:
    """(files, y float32 (N, D), target column names, splits or None, ids or None) from a CSV manifest;
    ``names``: the target columns in order (default: y, or y0..y{D-1}, or every other column)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:     # utf-8-sig: a spreadsheet's byte-order mark
        table = list(csv.reader(fh))
    if len(table) < 2:
        raise DatasetError(f"{path}: manifest has no rows")
    cols = [c.strip() for c in table[0]]
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DatasetError(f"{path}: the header names column(s) {dup} more than once")
    # a row with more fields than the header would lose some silently (a short one fails below, naming the value)
    ragged = [(line, len(row)) for line, row in enumerate(table[1:], start=2) if len(row) > len(cols)]
    if ragged:
        raise DatasetError(f"{path}: row {ragged[0][0]} has {ragged[0][1]} fields, the header has {len(cols)} "
                           f"({len(ragged)} such rows)")
    rows = [dict(zip(cols, row + [None] * (len(cols) - len(row)))) for row in table[1:] if any(row)]
    file_col = next((c for c in ("file", "path", "image", "filename") if c in cols), None)
    if file_col is None:
        raise DatasetError(f"{path}: manifest needs a file column (file, path, image or filename); has {cols}")
    rest = [c for c in cols if c not in (file_col, "split", "id")]
    if names:
        missing = [c for c in names if c not in rest]
        if missing:
            raise DatasetError(f"{path}: --targets names {missing}, which are not columns of the manifest "
                               f"(target candidates: {rest})")
        ycols = list(names)
    else:
        ycols = (["y"] if "y" in rest else [c for c in rest if c.startswith("y") and c[1:].isdigit()] or rest)
        ycols = sorted(ycols, key=lambda c: int(c[1:]) if c[1:].isdigit() else -1)
    y = np.empty((len(rows), len(ycols)), dtype=np.float32)
    for r, row in enumerate(rows):
        for d, c in enumerate(ycols):
            try:
                y[r, d] = float(row[c])
            except (TypeError, ValueError):
                raise DatasetError(f"{path}: row {r + 2} ({row[file_col]}): target {c}={row[c]!r} is not a "
                                   f"number (expected {len(ycols)} targets: {ycols})") from None
    splits = [row["split"] for row in rows] if "split" in cols else None
    bad = sorted({s for s in splits or [] if s not in SPLITS})
    if bad:
        raise DatasetError(f"{path}: unknown split value(s) {bad}; use {SPLITS}")
    empty = [r + 2 for r, row in enumerate(rows) if not (row[file_col] or "").strip()]
    if empty:
        raise DatasetError(f"{path}: row {empty[0]} has an empty {file_col} ({len(empty)} such rows)")
    return [row[file_col] for row in rows], y, ycols, splits, ([row["id"] for row in rows] if "id" in cols else None)


def _folder_csv(source, o):
    root = Path(source)
    manifest = Path(o["manifest"]) if o["manifest"] else None
    if manifest is None:
        found = sorted(root.glob("*.csv"))
        if len(found) != 1:
            raise DatasetError(f"{root}: expected exactly one CSV manifest in the folder, found "
                               f"{len(found)}; pass --manifest")
        manifest = found[0]
    decl = o["targets"]
    names, y, ycols, splits, ids = _read_manifest(manifest, decl.get("names"))
    files = [_inside(root, n, f"{manifest}: row {r + 2}", o["allow_outside"]) for r, n in enumerate(names)]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]}: image listed in {manifest.name} is missing ({len(missing)} missing)")
    channels, h, w, enc = _first_image(files)
    keep = _duplicates(files, ids or names, str(manifest), o["dedupe"], o["progress"])
    if len(keep) < len(files):
        files, names, y = [files[i] for i in keep], [names[i] for i in keep], y[keep]
        ids = [ids[i] for i in keep] if ids else None
        splits = [splits[i] for i in keep] if splits else None
    inp = image_input(channels, h, w, enc)
    from ebm.tasks import TASKS
    if o["task"] in TASKS:
        if decl:
            raise DatasetError(f"task {o['task']} is built in (its targets are fixed); the target declarations "
                               "(--targets, --circular, --units, --grid, --sigmas) describe a new task: give another --task")
        meta = task_meta(o["task"], inp)
        if meta["D"] != y.shape[1]:
            raise DatasetError(f"{manifest}: {y.shape[1]} target columns, task {o['task']} has D = {meta['D']}")
    else:
        check_targets(y, ids or names, y.shape[1], where=str(manifest))
        fields, y = declare_targets(o["task"] or root.name, y, ycols, decl)
        meta = dict(fields, input=inp, normalisation=_normalisation(inp["channels"]), augment={}, aux={})
    if splits is None:
        index = seeded_split(len(files), o["seed"], o["val_frac"], o["test_frac"])
        meta["split_rule"] = _seeded_rule(o)
    else:
        index = {s: np.flatnonzero(np.asarray(splits) == s) for s in SPLITS}
        meta["split_rule"] = f"split column of {manifest.name}"
    meta["source"] = {"format": "folder_csv", "folder": root.name, "manifest": manifest.name}
    ids = ids or list(names)
    return meta, len(files), _file_chunks(files, y, ids, index, (channels, h, w))


def _table(source, o):
    """Tabular inputs from one CSV or Parquet file: x = the input columns (float32), y = the targets."""
    import pyarrow as pa
    import pyarrow.compute as pc
    path = Path(source)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
        elif path.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv
            table = pacsv.read_csv(path)
        else:
            raise DatasetError(f"{path}: the table format reads .csv or .parquet files")
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{path}: not a readable table ({e})") from None
    if table.num_rows == 0:
        raise DatasetError(f"{path}: the table has no rows")
    cols = table.column_names
    decl = o["targets"]
    names = decl.get("names") or (["y"] if "y" in cols else sorted((c for c in cols if c.startswith("y") and c[1:].isdigit()),
                                                                    key=lambda c: int(c[1:])))
    if not names:
        raise DatasetError(f"{path}: name the target columns with --targets (columns: {cols})")
    numeric = [c for c in cols if pa.types.is_integer(table.schema.field(c).type) or pa.types.is_floating(table.schema.field(c).type)]
    inputs = o["inputs"] or [c for c in numeric if c not in names and c not in ("split", "id")]
    for what, want in (("--targets", names), ("--inputs", inputs)):
        missing = [c for c in want if c not in cols]
        if missing:
            raise DatasetError(f"{path}: {what} names {missing}, which are not columns ({cols})")
        bad = [c for c in want if c not in numeric]
        if bad:
            raise DatasetError(f"{path}: {what} columns {bad} are not numeric")
    if not inputs:
        raise DatasetError(f"{path}: no input columns left (columns: {cols}); name them with --inputs")
    overlap = sorted(set(inputs) & set(names))
    if overlap:
        raise DatasetError(f"{path}: columns {overlap} are both inputs and targets")

    def matrix(columns):
        return np.stack([pc.cast(table.column(c), pa.float64()).to_numpy(zero_copy_only=False) for c in columns], 1)
    x, y = matrix(inputs).astype(np.float32), matrix(names).astype(np.float32)
    ids = [str(v) for v in table.column("id").to_pylist()] if "id" in cols else [f"row{i:07d}" for i in range(len(y))]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{path}: the id column has duplicates")
    check_finite(x, ids, str(path), f"input ({', '.join(inputs)})")
    check_targets(y, ids, y.shape[1], where=str(path))
    fields, y = declare_targets(o["task"] or path.stem, y, names, decl)
    meta = dict(fields, input={"kind": "vector", "column": "x", "dim": len(inputs), "names": inputs},
                normalisation=None, augment={}, aux={}, source={"format": "table", "file": path.name})
    if "split" in cols:
        splits = np.asarray([str(v) for v in table.column("split").to_pylist()])
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise DatasetError(f"{path}: unknown split value(s) {unknown}; use {SPLITS}")
        index = {s: np.flatnonzero(splits == s) for s in SPLITS}
        meta["split_rule"] = f"split column of {path.name}"
    else:
        index = seeded_split(len(y), o["seed"], o["val_frac"], o["test_frac"])
        meta["split_rule"] = _seeded_rule(o)

    def chunks():
        for split in SPLITS:
            for s in range(0, len(index[split]), CHUNK):
                part = index[split][s:s + CHUNK]
                yield split, ([ids[i] for i in part], y[part], x[part], {})
    return meta, len(y), chunks()


def _fashion_rotation(source, o):
    from ebm.tasks import make_fashion_rotation, read_idx
    root = Path(source)
    found = {part: sorted(root.glob(f"{prefix}-images*")) for part, prefix in (("train", "train"), ("test", "t10k"))}
    for part, paths in found.items():
        if not paths:
            raise DatasetError(f"{root}: no {'train' if part == 'train' else 't10k'}-images IDX file")
    raw = {part: read_idx(paths[0]) for part, paths in found.items()}
    seeds = np.random.SeedSequence(o["seed"]).generate_state(2)
    data = {}
    for j, (part, imgs) in enumerate(raw.items()):
        if imgs.ndim != 3 or imgs.dtype != np.uint8:
            raise DatasetError(f"{found[part][0]}: expected uint8 images (N, H, W), got {imgs.dtype} {imgs.shape}")
        data[part] = (*make_fashion_rotation(imgs, int(seeds[j])), found[part][0].name.split(".")[0])
    h, w = raw["train"].shape[1:]
    meta = task_meta("fashion_rotation", image_input(1, h, w, "png"),
                     source={"format": "fashion_rotation", "files": [p[0].name for p in found.values()]},
                     split_rule=f"test = t10k; val = seeded {o['val_frac']} of train; angles seeded")
    index = seeded_split(len(data["train"][1]), o["seed"], o["val_frac"], 0.0, has_test=True)
    index["test"] = np.arange(len(data["test"][1]))
    if o.get("n"):
        index = _subsample(index, o["n"], o["seed"])
        meta["split_rule"] += "; seeded subsets " + ", ".join(f"{s} {len(index[s])}" for s in SPLITS if s in o["n"])

    def chunks():
        for split in SPLITS:
            images, y, stem = data["test" if split == "test" else "train"]
            for s in range(0, len(index[split]), CHUNK):
                part = index[split][s:s + CHUNK]
                yield split, ([f"{stem}:{i:05d}" for i in part], y[part], [encode_png(im) for im in images[part]], {})
    return meta, sum(len(d[1]) for d in data.values()), chunks()


def _subsample(index: dict, n: dict, seed: int) -> dict:
    """Seeded subsets of a split's indices (sorted, so rows keep source order): every angle and image
    is the one the full dataset holds, so a subset is a sample of the full ingest, not a new draw."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    out = dict(index)
    for split, m in n.items():
        have = len(index[split])
        if m > have:
            raise DatasetError(f"--n-{split} {m}: the {split} split has only {have} examples")
        out[split] = np.sort(rng.permutation(index[split])[:m])
    return out


def _synthetic(source, o):
    from ebm.tasks import make_synthetic
    name = str(source)
    if name not in ("toy1", "toy2", "star"):
        raise DatasetError(f"unknown synthetic task {name!r}; synthetic tasks: toy1, toy2, star")
    data = make_synthetic(name, o["seed"], n=o["n"], size=o["size"] if name == "star" else None)
    x0 = data["train"][0]
    if name == "star":
        inp = image_input(1, x0.shape[2], x0.shape[3], "png")
        aux = {"k": "int64", "theta_r": "float64"}
    else:
        inp, aux = {"kind": "vector", "column": "x", "dim": int(x0.shape[1])}, {}
    meta = task_meta(name, inp, aux=aux, source={"format": "synthetic", "generator": f"ebm.tasks.make_synthetic({name!r})"},
                     split_rule="the generator's splits" + (" (fixed reference split)" if name == "toy2" else ""))

    def chunks():
        for split in SPLITS:
            x, y, extra = data[split]
            for s in range(0, len(y), CHUNK):
                sl = slice(s, s + CHUNK)
                payload = [encode_png(im) for im in x[sl]] if name == "star" else x[sl]
                yield split, ([f"{name}:{split}:{i:06d}" for i in range(s, min(s + CHUNK, len(y)))], y[sl],
                              payload, {k: extra[k][sl] for k in aux})
    return meta, sum(len(d[1]) for d in data.values()), chunks()


SOURCES = {"ccgan_h5": _ccgan_h5, "cell200": _cell200, "biwi": _biwi, "folder_csv": _folder_csv, "table": _table,
           "fashion_rotation": _fashion_rotation, "synthetic": _synthetic}
assert set(SOURCES) == set(FORMATS)
