"""Single-process training from the CLI (the distributed path reuses the same loop in a Ray worker)."""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from ebm.config import Config
from ebm.train import fit, load_data


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: Config, extra: dict) -> None:
    """Self-describing checkpoint: weights, the full config and library versions, written atomically."""
    import platform
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "versions": {"torch": torch.__version__, "python": platform.python_version()}, **extra}, tmp)
    tmp.replace(path)


def train_local(cfg: Config, out: str = "", seeds: int = 1) -> int:
    from pipelines.runtime import tune_malloc
    tune_malloc()
    data = load_data(cfg)
    task = data[0]
    print(f"task {task.name}: D={task.D}, train {len(data[1]['train'])} / val {len(data[1].get('val', []))} / "
          f"test {len(data[1].get('test', []))}; method {cfg.method.name}, K={cfg.proposal.K}, "
          f"M={cfg.sampler.M_train}", flush=True)
    results = []
    for i in range(seeds):
        c = cfg.with_overrides([f"seed={cfg.seed + i}"])
        t0 = time.perf_counter()
        res = fit(c, data=data, log=(lambda s: print(f"[seed {c.seed}] {s}", flush=True)))
        res.test["train_time_s"] = time.perf_counter() - t0
        results.append(res.test)
        print(f"[seed {c.seed}] test: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(res.test.items())), flush=True)
        if out:
            save_checkpoint(Path(out) / f"seed{c.seed}" / "model.pt", res.model, c,
                            {"test": res.test, "best_epoch": res.best_epoch, "history": res.history})
    summary = {}
    for k in results[0]:
        vals = [r[k] for r in results if k in r and not math.isnan(r[k])]
        if vals:
            summary[k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "values": vals}
    for k in ("nll", "grid_nll", "is_nll", "kl", "mae_mode", "mae_mean", "crps", "coverage"):
        if k in summary:
            s = summary[k]
            spread = f" ± {s['std']:.4f} over {seeds} seeds (max {max(s['values']):.4f})" if seeds > 1 else ""
            print(f"test {k}: {s['mean']:.4f}{spread}")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps({"config": cfg.to_flat(), "test": summary}, indent=1))
    return 0
