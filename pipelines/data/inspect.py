"""``ebm data inspect DIR``: what a dataset holds, without loading it into memory.

Row counts per split (Parquet footers), target statistics per split and dim (streams the y column
only), the Arrow schema, the stored fingerprint (optionally recomputed), and a contact sheet PNG
of the first images of a split with their labels (a scatter of x against y for vector inputs).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .layout import (SPLITS, DatasetError, Fingerprint, check_targets, list_to_numpy, open_parquet, schema_for,
                     shard_paths, validate)


def target_stats(root: str | os.PathLike, meta: dict, split: str) -> dict:
    """{count, min, max, mean, std} per target dim (lists of length D), streaming y only."""
    D = int(meta["D"])
    n, s1, s2 = 0, np.zeros(D), np.zeros(D)
    lo, hi = np.full(D, np.inf), np.full(D, -np.inf)
    for path in shard_paths(root, meta, split):
        with open_parquet(path) as pf:
            for batch in pf.iter_batches(columns=["id", "y"]):
                y = list_to_numpy(batch.column(1), D)
                check_targets(y, batch.column(0).to_pylist(), D,
                              where=f"{path} (labels edited after ingest? `--verify` re-hashes the rows)")
                y = y.astype(np.float64)
                n += len(y)
                s1 += y.sum(0)
                s2 += (y ** 2).sum(0)
                lo, hi = np.minimum(lo, y.min(0)), np.maximum(hi, y.max(0))
    mean = s1 / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean ** 2, 0.0))
    return {"count": n, "min": lo.tolist(), "max": hi.tolist(), "mean": mean.tolist(), "std": std.tolist()}


def recompute_fingerprint(root: str | os.PathLike, meta: dict) -> str:
    """The content fingerprint recomputed from the shards (reads every row once)."""
    from pipelines.progress import bar
    fp = Fingerprint()
    col = meta["input"]["column"]
    total = sum(int(meta["splits"].get(s, {}).get("rows", 0)) for s in SPLITS)
    with bar(total=total, desc="hashing rows", unit="rows") as hashed:
        for split in SPLITS:
            for path in shard_paths(root, meta, split):
                with open_parquet(path) as pf:
                    for batch in pf.iter_batches(columns=["id", col, "y"]):
                        y = list_to_numpy(batch.column(2), int(meta["D"]))
                        payload = (batch.column(1).to_pylist() if col == "image"
                                   else list_to_numpy(batch.column(1), int(meta["input"]["dim"])))
                        fp.update(batch.column(0).to_pylist(), split, y, payload)
                        hashed.update(batch.num_rows)
    return fp.hexdigest()


def summary(root: str | os.PathLike, verify: bool = False) -> dict:
    """Validated metadata plus per-split counts and target stats (and a fingerprint check).
    DatasetError if the dataset is damaged, or replaced while it is read."""
    try:
        return _summary(root, verify)
    except FileNotFoundError as e:
        raise DatasetError(f"{root}: a file vanished while it was read ({e}): the dataset was replaced or deleted "
                           "meanwhile (another ingest --overwrite?); run inspect again") from None


def _summary(root: str | os.PathLike, verify: bool) -> dict:
    meta = validate(root)
    from ebm.tasks import task_from_metadata
    task = task_from_metadata(meta)
    out = {"task": meta["task"], "D": meta["D"], "targets": [
        f"{n} ({'circular' if c else 'linear'}{', ' + u if u else ''})"
        for n, c, u in zip(task.target_names, task.circular, task.units)], "input": meta["input"],
           "normalisation": meta["normalisation"], "fingerprint": meta["fingerprint"],
           "splits": {s: target_stats(root, meta, s) for s in SPLITS},
           "schema": schema_for(meta, with_metadata=False).to_string()}
    if verify:
        got = recompute_fingerprint(root, meta)
        from .layout import read_metadata
        if read_metadata(root) != meta:
            raise FileNotFoundError("its metadata changed")
        if got != meta["fingerprint"]:
            raise DatasetError(f"{root}: content fingerprint {got} differs from the stored {meta['fingerprint']}")
        out["fingerprint_verified"] = True
    return out


def format_summary(s: dict) -> str:
    lines = [f"task {s['task']}  D={s['D']}  targets: {', '.join(s['targets'])}  input={s['input']}",
             f"normalisation {s['normalisation']}", f"fingerprint {s['fingerprint']}"
             + ("  (verified)" if s.get("fingerprint_verified") else "")]
    for split, st in s["splits"].items():
        dims = ", ".join(f"[{lo:.4g}, {hi:.4g}] mean {m:.4g} std {sd:.4g}"
                         for lo, hi, m, sd in zip(st["min"], st["max"], st["mean"], st["std"]))
        lines.append(f"{split:5s} {st['count']:8d} rows  y: {dims}")
    lines += ["schema:", *("  " + ln for ln in s["schema"].splitlines())]
    return "\n".join(lines)


def _label_text(values: np.ndarray, names: list[str], units: list[str], circular: tuple[bool, ...]) -> str:
    """One example's targets as "name = value unit" lines; angles also in degrees."""
    out = []
    for v, n, u, c in zip(values, names, units, circular):
        unit = "rad" if c else u
        out.append(f"{n} = {v:.3g}" + (f" {unit}" if unit else "") + (f" ({np.degrees(v):.0f}°)" if c else ""))
    return "\n".join(out)


def _first_rows(root, meta: dict, split: str, n: int, columns: list[str]):
    """The first n rows of a split (across row groups and shards) as one Arrow table."""
    import pyarrow as pa
    paths = shard_paths(root, meta, split)
    if not paths:
        raise DatasetError(f"{root}: the dataset has no {split!r} split")
    parts, have = [], 0
    for path in paths:
        with open_parquet(path) as pf:
            for batch in pf.iter_batches(columns=columns, batch_size=max(n, 1)):
                parts.append(batch.slice(0, n - have))
                have += parts[-1].num_rows
                if have >= n:
                    return pa.Table.from_batches(parts)
    return pa.Table.from_batches(parts)


def contact_sheet(root: str | os.PathLike, out_png: str | os.PathLike, split: str = "train", n: int = 16,
                  cols: int = 8) -> Path:
    """A PNG of the first n examples of a split with their labels (target names and units from the
    metadata), to see that the data was read right -> the PNG path. Vector inputs: each target
    against the first input, for the whole split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ebm.tasks import task_from_metadata

    from .images import decode_image
    meta = validate(root)
    if n < 1:
        raise DatasetError(f"-n must be >= 1, got {n}")
    task = task_from_metadata(meta)
    if meta["input"]["kind"] == "vector":
        return _scatter(root, meta, task, out_png, split)
    rows = _first_rows(root, meta, split, n, ["id", "image", "y"])
    y = list_to_numpy(rows.column("y"), int(meta["D"]))
    shape = (int(meta["input"]["channels"]), int(meta["input"]["height"]), int(meta["input"]["width"]))
    k = rows.num_rows
    cols = min(cols, k)
    nrows = -(-k // cols)
    text_lines = task.D + 1
    fig, axes = plt.subplots(nrows, cols, figsize=(1.55 * cols, (1.45 + 0.16 * text_lines) * nrows + 0.7),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (ex_id, data) in enumerate(zip(rows.column("id").to_pylist(), rows.column("image").to_pylist())):
        ax = axes.flat[i]
        try:
            img = decode_image(data, shape, f"{ex_id}")           # (C, H, W) uint8, as training reads it
            ax.imshow(img[0] if shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
        except Exception as e:      # a damaged image is shown as such, not skipped
            ax.text(0.5, 0.5, f"unreadable:\n{type(e).__name__}", ha="center", va="center", fontsize=7, color="C3")
        ax.set_title(_label_text(y[i], task.target_names, task.units, task.circular) + f"\n{str(ex_id)[-18:]}",
                     fontsize=7, pad=2)
    counts = meta["splits"].get(split, {}).get("rows", k)
    fig.suptitle(f"{meta['task']}: the first {k} of {counts} {split} examples, "
                 f"{shape[1]}×{shape[2]} {'grey' if shape[0] == 1 else 'RGB'}; title: label, id", fontsize=9)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _scatter(root, meta: dict, task, out_png, split: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tables = []
    for p in shard_paths(root, meta, split):
        with open_parquet(p) as pf:
            tables.append(pf.read(columns=["x", "y"]))
    x = np.concatenate([list_to_numpy(t.column("x"), int(meta["input"]["dim"]))[:, 0] for t in tables])
    y = np.concatenate([list_to_numpy(t.column("y"), int(meta["D"])) for t in tables])
    names = meta["input"].get("names") or ["x" if int(meta["input"]["dim"]) == 1 else "x0"]
    D = y.shape[1]
    fig, axes = plt.subplots(1, D, figsize=(4.6 * D, 3.8), squeeze=False, layout="constrained")
    for d, ax in enumerate(axes[0]):
        ax.scatter(x, y[:, d], s=3, alpha=0.6)
        name, unit = task.target_names[d], ("radians" if task.circular[d] else task.units[d])
        ax.set(xlabel=names[0], ylabel=f"{name} ({unit})" if unit else name)
        if task.circular[d]:
            ax.set_yticks(np.arange(5) * np.pi / 2)
            ax.set_yticklabels(["0", "π/2", "π", "3π/2", "2π"])
    more = f" (first of {meta['input']['dim']} inputs)" if int(meta["input"]["dim"]) > 1 else ""
    fig.suptitle(f"{meta['task']}: {split} split, {len(y)} rows: targets against {names[0]}{more}", fontsize=10)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
