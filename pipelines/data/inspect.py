"""``ebm data inspect DIR``: what a dataset holds, without loading it into memory.

Row counts per split (Parquet footers), target statistics per split and dim (streams the y column
only), the Arrow schema, the stored fingerprint (optionally recomputed), and a contact sheet PNG
of the first images of a split with their labels (a scatter of x against y for vector inputs).
"""
from __future__ import annotations

import io
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
    fp = Fingerprint()
    col = meta["input"]["column"]
    for split in SPLITS:
        for path in shard_paths(root, meta, split):
            with open_parquet(path) as pf:
                for batch in pf.iter_batches(columns=["id", col, "y"]):
                    y = list_to_numpy(batch.column(2), int(meta["D"]))
                    payload = (batch.column(1).to_pylist() if col == "image"
                               else list_to_numpy(batch.column(1), int(meta["input"]["dim"])))
                    fp.update(batch.column(0).to_pylist(), split, y, payload)
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


def contact_sheet(root: str | os.PathLike, out_png: str | os.PathLike, split: str = "train", n: int = 16,
                  cols: int = 8) -> Path:
    """Write a PNG of the first n examples of split with their labels -> the PNG path."""
    from PIL import Image, ImageDraw
    meta = validate(root)
    if meta["input"]["kind"] == "vector":
        return _scatter(root, meta, out_png, split)
    with open_parquet(shard_paths(root, meta, split)[0]) as pf:
        first = pf.read_row_group(0, columns=["id", "image", "y"])
    rows = first.slice(0, n)
    y = list_to_numpy(rows.column("y"), int(meta["D"]))
    h, w = meta["input"]["height"], meta["input"]["width"]
    scale = max(1, 96 // max(h, w))
    cw, ch = w * scale, h * scale + 14
    cols = min(cols, rows.num_rows)
    sheet = Image.new("RGB", (cols * cw, -(-rows.num_rows // cols) * ch), "white")
    draw = ImageDraw.Draw(sheet)
    for i, data in enumerate(rows.column("image").to_pylist()):
        r, c = divmod(i, cols)
        try:
            im = Image.open(io.BytesIO(data)).convert("RGB").resize((cw, h * scale), Image.NEAREST)
            sheet.paste(im, (c * cw, r * ch))
        except Exception:  # a corrupt example is shown as a blank tile
            pass
        draw.text((c * cw + 2, r * ch + h * scale), " ".join(f"{v:.3g}" for v in y[i]), fill="black")
    out_png = Path(out_png)
    sheet.save(out_png)
    return out_png


def _scatter(root, meta: dict, out_png, split: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tables = []
    for p in shard_paths(root, meta, split):
        with open_parquet(p) as pf:
            tables.append(pf.read(columns=["x", "y"]))
    x = np.concatenate([list_to_numpy(t.column("x"), int(meta["input"]["dim"]))[:, 0] for t in tables])
    y = np.concatenate([list_to_numpy(t.column("y"), int(meta["D"]))[:, 0] for t in tables])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(x, y, s=2)
    from ebm.tasks import task_from_metadata
    task = task_from_metadata(meta)
    ax.set(xlabel="x", ylabel=f"{task.target_names[0]} {task.units[0]}".strip(), title=f"{meta['task']} {split} ({len(y)} rows)")
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
