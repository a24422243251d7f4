"""Reading prediction inputs (image folders, Parquet) and scoring a model on a Parquet dataset."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ebm.circular import wrap_diff
from ebm.data import Split
from ebm.evaluate import evaluate
from ebm.predict import predict
from pipelines.serve.serving import InputError, Predictor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CALIBRATION_LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.99)


def read_inputs(path: str | Path, p: Predictor, split: str = "test") -> tuple[list[str], list, list | None]:
    """(ids, input values, y values or None) from an image folder, a Parquet file or a dataset
    directory (the layout of :mod:`pipelines.data`, split ``split``) — each a local path or a URI."""
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
                raise InputError(f"{f}: not a readable Parquet file: {e}") from None
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
    if not p.is_image:
        raise InputError(f"{loc}: an image folder, but the model takes vector inputs x of size {p.task.x_shape[0]}")
    return ([i.base_name for i in imgs], [storage.read_bytes(storage.join(loc, i.base_name)) for i in imgs], None)


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


@torch.no_grad()
def calibration(p: Predictor, split: Split, M_samples: int, seed: int = 0, batch_size: int = 256) -> dict:
    """Coverage of central intervals at CALIBRATION_LEVELS from the probability integral transform
    of the weighted IS samples (per dim, on the samples unwrapped around the mean for circular dims)."""
    g = torch.Generator().manual_seed(seed)
    pits = []
    for s in range(0, len(split), batch_size):
        x, y = split.x[s:s + batch_size], split.y[s:s + batch_size]
        pr = predict(p.model, x, p.task.circular, M=M_samples, keep_samples=True, generator=g)
        centred = wrap_diff(pr.samples - pr.mean.unsqueeze(1), p.task.circular)       # (B, M, D)
        yc = wrap_diff(y - pr.mean, p.task.circular)                                   # (B, D)
        pits.append((pr.weights.unsqueeze(-1) * (centred <= yc.unsqueeze(1))).sum(1))  # (B, D)
    pit = torch.cat(pits).flatten().numpy()
    cov = [float(np.mean(np.abs(pit - 0.5) <= lv / 2)) for lv in CALIBRATION_LEVELS]
    return {"levels": list(CALIBRATION_LEVELS), "coverage": cov, "pit": pit}


def calibration_plot(cal: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    axes[0].plot([0, 1], [0, 1], "k:", lw=0.8)
    axes[0].plot(cal["levels"], cal["coverage"], "o-")
    axes[0].set_xlabel("nominal central-interval level")
    axes[0].set_ylabel("observed coverage")
    axes[1].hist(cal["pit"], bins=20, range=(0, 1), density=True)
    axes[1].axhline(1.0, color="k", lw=0.8, ls=":")
    axes[1].set_xlabel("PIT")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)


def evaluate_dataset(p: Predictor, root: str | Path, split: str = "test", out_dir: str | Path | None = None,
                     M_samples: int | None = None, seed: int = 0) -> dict:
    """Test NLL (grid and IS), MAE, CRPS, coverage of the model on a dataset split; with ``out_dir``
    writes metrics.json and calibration.png there."""
    from pipelines.serve.serving import check_M
    if M_samples is not None:           # the serving bound on M (an integer in [1, EBM_SERVE_MAX_M]) holds here too
        check_M(p, M_samples)
    data = read_split(root, split, p)
    cfg = p.cfg if M_samples is None else p.cfg.with_overrides([f"sampler.M_eval={int(M_samples)}"])
    g = torch.Generator().manual_seed(seed)
    out = evaluate(p.model, data, p.task, cfg, generator=g)
    cal = calibration(p, data, cfg.sampler.M_eval, seed)
    out["calibration_error"] = float(np.mean(np.abs(np.array(cal["coverage"]) - np.array(cal["levels"]))))
    out["n"] = len(data)
    if out_dir:
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps({k: v for k, v in out.items() if not (isinstance(v, float) and
                                                                                        math.isnan(v))}, indent=1))
        calibration_plot(cal, d / "calibration.png", f"{p.task.name} {split}: coverage")
        (d / "calibration.json").write_text(json.dumps({"levels": cal["levels"], "coverage": cal["coverage"]}))
    return out
