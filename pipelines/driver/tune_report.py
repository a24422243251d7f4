"""The end of a sweep: results table, plot, best config and (multi-seed) mean ± std on the parent run."""
from __future__ import annotations

import csv
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from ebm.config import Config

UNVALIDATED = 1e29      # worker_loop reports val_nll = 1e30 before the first validation


def _child_runs(uri: str, parent: str) -> dict[str, tuple[str, str]]:
    """trial id -> (MLflow child run id, status)."""
    from pipelines.tracking import open_client
    c = open_client(uri)
    exp = c.get_run(parent).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)
    return {r.data.tags.get("ebm.trial_id"): (r.info.run_id, r.info.status) for r in runs}


def close_runs(uri: str, rows: list[dict], children: dict, spec: dict, train_storage: str, epochs: int) -> None:
    """Close child runs whose trial actor Tune killed: early-stopped ones KILLED with a reason; ones
    that had reported their last epoch FINISHED, with the final checkpoint from Train's storage."""
    from pipelines import tracking
    for r in rows:
        run_id, status = children.get(r["trial_id"], ("", ""))
        if not run_id or status == "FINISHED":
            continue
        if r["status"] == "STOPPED":
            tracking.set_tag(uri, run_id, "ebm.stop_reason",
                             f"early-stopped by {spec['scheduler'].upper()} after {r['epochs']} epoch(s)")
            tracking.end_run(uri, run_id, "KILLED")
        elif r["status"] == "COMPLETED":
            from pipelines.driver.runs import latest_checkpoint
            found = latest_checkpoint(str(train_storage), f"{spec['name']}-{r['trial_id']}")
            if found is not None:
                tracking.log_artifacts(uri, run_id, str(found[0]), "checkpoint")
            tracking.log_metrics(uri, run_id, {k: v for k, v in r.items() if k.startswith("test_")}, step=epochs)
            tracking.end_run(uri, run_id, "FINISHED")


def rows_of(grid, spec: dict, base: Config, children: dict[str, str]) -> list[dict]:
    keys = list(spec["space"])
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or Path(r.path).name
        hist = r.metrics_dataframe
        vals = [v for v in (hist["val_nll"].tolist() if hist is not None and "val_nll" in hist else [])
                if v == v and v < UNVALIDATED]
        epochs = int(m["epoch"]) + 1 if "epoch" in m else 0
        status = "ERROR" if r.error else ("COMPLETED" if epochs >= base.optim.epochs else "STOPPED")
        cfg = Config.from_flat({**base.to_flat(), **{k: (r.config or {}).get(k) for k in keys if k in (r.config or {})}})
        flat = cfg.to_flat()
        row = {"trial_id": trial_id, "run_id": children.get(trial_id, ""), "status": status,
               **{k: flat[k] for k in keys},
               "proposal.K": flat["proposal.K"], "sampler.M_train": flat["sampler.M_train"],
               "sampler.M_eval": flat["sampler.M_eval"], "epochs": epochs,
               "val_nll": vals[-1] if vals else math.nan, "best_val_nll": min(vals) if vals else math.nan,
               "time_s": float(m.get("time_total_s", math.nan))}
        row.update({k: float(v) for k, v in m.items() if k.startswith("test_") and isinstance(v, (int, float))})
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def plot(rows: list[dict], path: Path, metric: str = "val_nll") -> Path:
    """``metric`` against K (one line per M_train) and against M_train (one line per K): each trial a
    faint point, the mean over trials with the same (K, M) (seeds, other settings) a line; the best
    trial starred. Log-2 x axes labelled with the values swept; trials without the metric are counted
    in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator
    ok = [r for r in rows if r.get(metric) == r.get(metric) and r.get(metric) is not None]
    name = metric.replace("_nll", " NLL").replace("_", " ")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    best = min(ok, key=lambda r: r[metric]) if ok else None
    panels = (("proposal.K", "sampler.M_train", "K (proposal components)", "M"),
              ("sampler.M_train", "proposal.K", "M (proposal samples per example in training)", "K"))
    for ax, (xk, ck, xlabel, cname) in zip(axes, panels):
        groups = sorted({r[ck] for r in ok})
        colours = plt.cm.viridis(np.linspace(0.05, 0.85, max(len(groups), 1)))
        for c, colour in zip(groups, colours):
            mine = [r for r in ok if r[ck] == c]
            xs = sorted({r[xk] for r in mine})
            ax.scatter([r[xk] for r in mine], [r[metric] for r in mine], s=14, color=colour, alpha=0.35, lw=0)
            means = [statistics.fmean(r[metric] for r in mine if r[xk] == x) for x in xs]
            ax.plot(xs, means, "o-", color=colour, ms=5, lw=1.6, label=f"{cname} = {c}")
        if best is not None:
            ax.plot([best[xk]], [best[metric]], "*", color="C3", ms=14, mec="k", mew=0.6, label="best trial", zorder=5)
        values = sorted({r[xk] for r in ok})
        if values and min(values) > 0:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(values))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{v:g}" for v in values])
            ax.set_xlim(min(values) / 1.4, max(values) * 1.4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} at the last epoch (lower is better)")
        ax.grid(alpha=0.3)
        if ok:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(groups) + 1, 5),
                      frameon=False, title=f"lines: the mean over trials of each {cname}", title_fontsize=8)
    missing = len(rows) - len(ok)
    fig.suptitle(f"sweep: {name} against K and M — {len(ok)} trials"
                 + (f" ({missing} more without a {metric}: errored or stopped before validating)" if missing else ""),
                 fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def seed_summary(rows: list[dict], metric: str = "test_nll", best: int = 5) -> dict:
    """Mean ± std over seeds, and over the ``best`` seeds (lowest ``metric``)."""
    vals = sorted(r[metric] for r in rows if metric in r and r[metric] == r[metric])
    if not vals:
        return {}
    top = vals[:best]
    return {f"{metric}_mean": statistics.fmean(vals), f"{metric}_std": statistics.pstdev(vals), "n_seeds": len(vals),
            f"{metric}_best{best}_mean": statistics.fmean(top), f"{metric}_best{best}_std": statistics.pstdev(top)}


def finish(uri: str, parent: str, grid, spec: dict, base: Config, train_storage: str, wall_s: float,
           out=None) -> dict:
    """Log the sweep's outcome on the parent run; returns the summary."""
    from pipelines import tracking
    out = out or sys.stdout          # at call time: a default bound at import would keep a replaced stream
    children = _child_runs(uri, parent)
    rows = rows_of(grid, spec, base, {k: v[0] for k, v in children.items()})
    close_runs(uri, rows, children, spec, str(train_storage), base.optim.epochs)
    metric, sign = spec["metric"], (1 if spec["mode"] == "min" else -1)
    done = [r for r in rows if r["status"] == "COMPLETED" and r["val_nll"] == r["val_nll"]]
    best = min(done, key=lambda r: sign * r[metric if metric in r else "val_nll"]) if done else None
    summary = {"rows": rows, "errors": sum(r["status"] == "ERROR" for r in rows), "best": best,
               "best_run_id": best["run_id"] if best else "",
               "compute": {"epochs_total": sum(r["epochs"] for r in rows),
                           "trial_time_total_s": sum(r["time_s"] for r in rows if r["time_s"] == r["time_s"]),
                           "sweep_wall_s": wall_s, "trials": len(rows)}}
    if spec["seeds"]:
        summary["seeds"] = seed_summary(rows)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_csv(rows, d / "results.csv")
        plot(rows, d / "val_nll_vs_K_M.png")
        if best:
            cfg = Config.from_flat({**base.to_flat(), **{k: best[k] for k in spec["space"]}})
            (d / "best_config.toml").write_text(cfg.to_toml())
        if spec["seeds"] and summary["seeds"]:
            s = summary["seeds"]
            (d / "seeds.md").write_text(
                "| metric | mean ± std | best-5 mean ± std | seeds |\n|---|---|---|---|\n"
                f"| test NLL | {s['test_nll_mean']:.4f} ± {s['test_nll_std']:.4f} | "
                f"{s['test_nll_best5_mean']:.4f} ± {s['test_nll_best5_std']:.4f} | {s['n_seeds']} |\n")
            write_csv([{"seed": r["seed"], **{k: v for k, v in r.items() if k.startswith("test_")}} for r in rows],
                      d / "seeds.csv")
        tracking.log_artifacts(uri, parent, str(d), "sweep")
    metrics = {k: float(v) for k, v in summary["compute"].items()}
    metrics["errored_trials"] = float(summary["errors"])
    if best:
        metrics.update({f"best_{k}": v for k, v in best.items() if (k.startswith("test_") or k in
                                                                  ("val_nll", "best_val_nll")) and v == v})
        tracking.set_tag(uri, parent, "ebm.best_run_id", best["run_id"])
        tracking.set_tag(uri, parent, "ebm.best_trial_id", best["trial_id"])
        for k in spec["space"]:
            tracking.set_tag(uri, parent, f"best.{k}", str(best[k]))
    metrics.update(summary.get("seeds", {}))
    tracking.log_metrics(uri, parent, metrics, step=0)
    _print(summary, spec, out)
    return summary


def _print(summary: dict, spec: dict, out) -> None:
    keys = list(spec["space"])
    print(f"{summary['compute']['trials']} trials, {summary['compute']['epochs_total']} epochs in total, "
          f"{summary['compute']['sweep_wall_s']:.0f} s; errored: {summary['errors']}", file=out)
    for r in summary["rows"]:
        kv = ", ".join(f"{k}={r[k]}" for k in keys)
        print(f"  {r['trial_id']} {r['status']:9s} {kv} epochs {r['epochs']} val_nll {r['val_nll']:.4f}", file=out)
    if summary["best"]:
        b = summary["best"]
        print(f"best: {', '.join(f'{k}={b[k]}' for k in keys)} val_nll {b['val_nll']:.4f}"
              + (f" test_nll {b['test_nll']:.4f}" if "test_nll" in b else "") + f" (MLflow run {b['run_id']})", file=out)
    if summary.get("seeds"):
        s = summary["seeds"]
        print(f"test NLL over {s['n_seeds']} seeds: {s['test_nll_mean']:.4f} ± {s['test_nll_std']:.4f} "
              f"(best 5: {s['test_nll_best5_mean']:.4f} ± {s['test_nll_best5_std']:.4f})", file=out)
