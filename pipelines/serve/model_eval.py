"""Reading prediction inputs (image folders, Parquet) and scoring a model on a Parquet dataset."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ebm import calibration as C
from ebm.calibration import LEVELS
from ebm.data import Split
from ebm.evaluate import evaluate
from pipelines.serve.serving import InputError, Predictor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_inputs(path: str | Path, p: Predictor, split: str = "test") -> tuple[list[str], list, list | None]:
    """(ids, input values, y values or None) from an image folder, one image file, a Parquet file or
    a dataset directory (the layout of :mod:`pipelines.data`, split ``split``) — each a local path or
    a URI."""
    from pipelines import storage
    from pipelines.data.layout import METADATA_FILE, DatasetError, open_parquet, read_metadata, shard_paths
    loc = str(path)
    try:
        if storage.is_dir(loc):
            if not storage.is_file(storage.join(loc, METADATA_FILE)):
                return _image_folder(loc, p)
            meta = read_metadata(loc)
            files = shard_paths(loc, meta, split)
            if not files:
                raise InputError(f"{loc}: the dataset has no {split!r} split")
        elif storage.is_file(loc) and Path(loc).suffix.lower() in IMAGE_SUFFIXES:
            return _images(loc, [loc], p, "an image")
        elif storage.is_file(loc):
            files = [loc]
        else:
            raise InputError(f"{loc}: no such file or directory")
        import pyarrow as pa
        tables = []
        for f in files:
            try:
                with open_parquet(f) as pf:
                    tables.append(pf.read())
            except Exception as e:
                what = "a readable Parquet file" if f != loc else f"an image ({', '.join(IMAGE_SUFFIXES)}) or a readable Parquet file"
                raise InputError(f"{f}: not {what}: {str(e).splitlines()[0] if str(e) else e}") from None
        table = pa.concat_tables(tables)
    except (storage.StorageError, DatasetError) as e:
        raise InputError(str(e)) from None
    col = p.input_column
    if col not in table.column_names:
        raise InputError(f"{loc}: no column {col!r} (columns: {table.column_names}); the model takes "
                         f"{'encoded images' if p.is_image else 'vector inputs x'}")
    n = table.num_rows
    ids = [str(v) for v in table.column("id").to_pylist()] if "id" in table.column_names else [f"row {i}" for i in range(n)]
    y = table.column("y").to_pylist() if "y" in table.column_names else None
    return ids, table.column(col).to_pylist(), y


def _image_folder(loc: str, p: Predictor) -> tuple[list[str], list, None]:
    from pipelines import storage
    import pyarrow.fs as pafs
    files = sorted((i for i in storage.list_dir(loc) if i.type == pafs.FileType.File
                    and not i.base_name.startswith(".")), key=lambda i: i.base_name)
    imgs = [i for i in files if Path(i.base_name).suffix.lower() in IMAGE_SUFFIXES]
    if not imgs:
        raise InputError(f"{loc}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no _dataset.json; "
                         f"give an image folder, a Parquet file or a dataset directory")
    return _images(loc, [storage.join(loc, i.base_name) for i in imgs], p, "an image folder")


def _images(loc: str, files: list[str], p: Predictor, what: str) -> tuple[list[str], list, None]:
    """(file names, encoded images, no y) of image files, for an image model only."""
    from pipelines import storage
    if not p.is_image:
        raise InputError(f"{loc}: {what}, but the model takes vector inputs x of size {p.task.x_shape[0]}")
    return [storage.name(f) for f in files], [storage.read_bytes(f) for f in files], None


def write_table(out: dict[str, list], path: str | Path) -> Path:
    """Columns -> .csv (list cells as JSON), .parquet or .json (records)."""
    import pandas as pd
    path = Path(path)
    df = pd.DataFrame(out)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        df.map(lambda v: json.dumps(v) if isinstance(v, list) else v).to_csv(path, index=False)
    elif suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif suffix == ".json":
        path.write_text(df.to_json(orient="records", indent=1))
    else:
        raise InputError(f"{path}: output must end in .csv, .parquet or .json")
    return path


def read_split(root: str | Path, split: str, p: Predictor) -> Split:
    """A dataset split in memory, checked against the model: the task the dataset defines must be the
    one the model was trained on (name, target dims, circular dims, input shape)."""
    from ebm.tasks import task_from_metadata
    from pipelines.data import validate
    from pipelines.worker.data import read_split as read_parquet_split
    meta = validate(root)
    task = task_from_metadata(meta)
    for what, got, want in (("task", task.name, p.task.name), ("target dims", task.target_names, p.task.target_names),
                            ("circular dims", task.circular, p.task.circular), ("input shape", task.x_shape, p.task.x_shape)):
        if got != want:
            raise InputError(f"{root}: dataset {what} {got!r}, the model was trained on {want!r}")
    if not meta["splits"].get(split, {}).get("rows"):
        raise InputError(f"{root}: the dataset has no {split!r} rows")
    return read_parquet_split(str(root), split)


class _Ticking:
    """A tensor that ticks a progress bar by the rows of every slice taken of it: ebm.evaluate reads a
    split batch by batch as ``x[s:e]``, so its progress shows without a hook in the single-device code."""

    def __init__(self, t: torch.Tensor, bar):
        self.t, self.bar = t, bar

    def __getitem__(self, idx):
        out = self.t[idx]
        self.bar.update(out.shape[0] if out.dim() else 1)
        return out

    def __len__(self) -> int:
        return len(self.t)

    def __getattr__(self, name):
        return getattr(self.t, name)


@torch.no_grad()
def calibration(pits: dict[str, torch.Tensor], M_samples: int, target_names: list[str],
                levels: tuple[float, ...] = LEVELS) -> dict:
    """Coverage of central intervals at ``levels`` from PIT values (N, D) per source (the ones
    :func:`ebm.evaluate.evaluate` computed its coverage from: the IS prediction with ``M_samples``, the
    proposal alone, the EBM on the task grid for D = 1): per dim, pooled over dims, and joint (every dim)."""
    sources = {}
    for k, pit in pits.items():
        sources[k] = {"pit": pit.numpy(), "coverage": C.coverage(pit, levels).tolist(),
                      "pooled": C.coverage(pit.reshape(-1, 1), levels)[:, 0].tolist(),
                      "joint": C.joint_coverage(pit, levels).tolist(),
                      "calibration_error": C.calibration_error(pit, levels)}
    return {"levels": list(levels), "M": int(M_samples), "target_names": list(target_names), "sources": sources}


def _input_names(root) -> list[str] | None:
    """A table dataset's input column names (its metadata keeps them), for the figures' titles."""
    from pipelines.data.layout import read_metadata
    return read_metadata(root)["input"].get("names")


def evaluate_dataset(p: Predictor, root: str | Path, split: str = "test", out_dir: str | Path | None = None,
                     M_samples: int | None = None, seed: int = 0, n_examples: int = 4) -> dict:
    """Test NLL (grid and IS), MAE, CRPS, coverage of the model on a dataset split, and its calibration
    (:func:`calibration`, from the same pass and draws); with ``out_dir`` writes there metrics.json, calibration.json (coverage per
    source and level), calibration.png (PIT histograms, coverage against the nominal level) and
    densities.png (``n_examples`` predicted densities beside their inputs, the label marked)."""
    from pipelines import plots, progress
    from pipelines.serve.serving import check_M
    if M_samples is not None:           # the serving bound on M (an integer in [1, EBM_SERVE_MAX_M]) holds here too
        check_M(p, M_samples)
    data = read_split(root, split, p)
    cfg = p.cfg if M_samples is None else p.cfg.with_overrides([f"sampler.M_eval={int(M_samples)}"])
    g = torch.Generator().manual_seed(seed)
    pits: dict[str, list[torch.Tensor]] = {}
    with progress.bar(total=len(data), desc=f"evaluate {split}", unit="ex") as b:
        out = evaluate(p.model, Split(_Ticking(data.x, b), data.y, data.aux), p.task, cfg, generator=g, pits=pits)
    # the calibration report from the same PITs as the coverage figures (one IS pass, not two)
    cal = calibration({k: torch.cat(v) for k, v in pits.items()}, cfg.sampler.M_eval, p.task.target_names)
    main = cal["sources"].get("prediction") or next(iter(cal["sources"].values()), None)
    if main is not None:
        out["calibration_error"] = main["calibration_error"]
    out["n"] = len(data)
    out["calibration"] = {k: {"levels": cal["levels"], "coverage": v["pooled"]} for k, v in cal["sources"].items()}
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps({k: v for k, v in out.items() if k != "calibration" and not (
            isinstance(v, float) and math.isnan(v))}, indent=1))
        (d / "calibration.json").write_text(json.dumps(
            {"levels": cal["levels"], "M": cal["M"], "target_names": cal["target_names"],
             "sources": {k: {kk: vv for kk, vv in v.items() if kk != "pit"} for k, v in cal["sources"].items()}},
            indent=1))
        title = f"{p.task.name}, {split} split ({len(data)} examples)"
        if cal["sources"]:
            plots.calibration_figure(cal, d / "calibration.png", title)
        n = min(n_examples, len(data))
        plots.prediction_figure(p, data.x[:n], data.y[:n], {k: np.asarray(v)[:n] for k, v in data.aux.items()},
                                d / "densities.png", M=cfg.sampler.M_eval, interval_level=cfg.eval.interval_level,
                                seed=seed, title=title, x_names=_input_names(root))
    return out
