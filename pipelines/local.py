"""Single-process training from the CLI (the distributed path reuses the same loop in a Ray worker).

With tracking on (the default of ``ebm train --local``), each seed is one MLflow run, written from
this process only: the flat config as params; tags for git SHA, seed, task, method, data
fingerprint, package versions, ``ebm.group`` (what ``ebm results`` groups by) and ``ebm.command``
(the command line that made the run); per-epoch metrics; ``test_*`` metrics, ``train_time_s`` (wall)
and ``train_cpu_s`` (this process's CPU time; both include the final test evaluation);
a density plot of the final model; status FINISHED, FAILED, or KILLED on Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import json
import math
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ebm.config import Config
from ebm.train import fit, load_data

GROUP_TAG = "ebm.group"
COMMAND_TAG = "ebm.command"


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: Config, extra: dict) -> None:
    """Self-describing checkpoint: weights, the full config and library versions, written atomically."""
    import platform
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "versions": {"torch": torch.__version__, "python": platform.python_version()}, **extra}, tmp)
    tmp.replace(path)


class _Tracker:
    """One MLflow run per seed, opened and closed by the loop in :func:`train_local`."""

    def __init__(self, uri: str | None, experiment: str, group: str, command: str):
        from pipelines import tracking
        self.t = tracking
        self.uri = tracking.resolve_uri(uri)
        tracking.check_reachable(self.uri)              # fail fast, before any training
        self.experiment, self.group, self.command = experiment, group, command

    def start(self, cfg: Config, fingerprint: str) -> str:
        tags = {"git_sha": self.t.git_sha(), "seed": str(cfg.seed), "task": cfg.task.name, "method": cfg.method.name,
                "data_fingerprint": fingerprint, GROUP_TAG: self.group, COMMAND_TAG: self.command,
                "ebm.mode": "local", **self.t.package_versions()}
        name = f"{self.group}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        return self.t.start_run(self.uri, self.experiment, name, cfg.to_flat(), tags, cfg.to_toml())

    def epoch(self, run_id: str, epoch: int, row: dict) -> None:
        self.t.log_metrics(self.uri, run_id, {k: v for k, v in row.items() if k != "epoch"}, step=epoch)

    def finish(self, run_id: str, cfg: Config, res, splits: dict) -> None:
        """Test metrics (``test_*``), ``train_time_s``, and the final model's densities on the first test inputs."""
        metrics = {f"test_{k}": v for k, v in res.test.items() if k not in ("train_time_s", "train_cpu_s")}
        metrics.update(train_time_s=res.test["train_time_s"], train_cpu_s=res.test["train_cpu_s"])
        self.t.log_metrics(self.uri, run_id, metrics, step=cfg.optim.epochs)
        if "test" in splits:
            from pipelines.plots import density_figure
            with tempfile.TemporaryDirectory() as d:
                density_figure(res.model, res.task, splits["test"], Path(d) / "density.png",
                               title=f"{self.group} seed {cfg.seed}")
                self.t.log_artifacts(self.uri, run_id, d, "plots")

    def end(self, run_id: str, status: str) -> None:
        self.t.end_run(self.uri, run_id, status)


def train_local(cfg: Config, out: str = "", seeds: int = 1, *, track: bool = False, tracking_uri: str | None = None,
                experiment: str = "ebm", group: str = "", command: str = "") -> int:
    """Train ``seeds`` seeds (cfg.seed, cfg.seed + 1, ...) one after another in this process and print
    mean ± std of the test metrics. ``track``: one MLflow run per seed (raises ``TrackingError`` before
    training if the store is unreachable)."""
    from pipelines.runtime import tune_malloc
    tune_malloc()
    tracker = None
    if track:
        tracker = _Tracker(tracking_uri, experiment, group or cfg.task.name,
                           command or shlex.join(["ebm", *sys.argv[1:]]))
        print(f"MLflow: experiment {experiment!r}, group {tracker.group!r} in {tracker.uri}", flush=True)
    from pipelines.worker_data import load_splits, prepare_dataset
    cfg, fingerprint = prepare_dataset(cfg)      # validates task.data_dir (ConfigError) before any training
    data = load_splits(cfg) if cfg.task.data_dir else load_data(cfg)
    task = data[0]
    print(f"task {task.name}: D={task.D}, train {len(data[1]['train'])} / val {len(data[1].get('val', []))} / "
          f"test {len(data[1].get('test', []))}; method {cfg.method.name}, K={cfg.proposal.K}, "
          f"M={cfg.sampler.M_train}", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    results = []
    try:
        for i in range(seeds):
            c = cfg.with_overrides([f"seed={cfg.seed + i}"])
            run_id = tracker.start(c, fingerprint) if tracker else None
            status = "FAILED"
            try:
                on_epoch = (lambda e, row, model: tracker.epoch(run_id, e, row)) if tracker else None
                t0, c0 = time.perf_counter(), time.process_time()
                res = fit(c, data=data, log=(lambda s: print(f"[seed {c.seed}] {s}", flush=True)), on_epoch=on_epoch)
                # wall time depends on what else the machine runs; CPU time of this process much less so
                res.test.update(train_time_s=time.perf_counter() - t0, train_cpu_s=time.process_time() - c0)
                if tracker:
                    tracker.finish(run_id, c, res, data[1])
                status = "FINISHED"
            except (KeyboardInterrupt, SystemExit):
                status = "KILLED"
                raise
            finally:
                if tracker:
                    tracker.end(run_id, status)
            results.append(res.test)
            print(f"[seed {c.seed}] test: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(res.test.items())),
                  flush=True)
            if out:
                save_checkpoint(Path(out) / f"seed{c.seed}" / "model.pt", res.model, c,
                                {"test": res.test, "best_epoch": res.best_epoch, "history": res.history})
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(results, seeds)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps({"config": cfg.to_flat(), "test": _summary(results)},
                                                           indent=1))
    return 0


def _summary(results: list[dict]) -> dict:
    summary = {}
    for k in results[0]:
        vals = [r[k] for r in results if k in r and not math.isnan(r[k])]
        if vals:
            summary[k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "values": vals}
    return summary


def _print_summary(results: list[dict], seeds: int) -> None:
    summary = _summary(results)
    for k in ("nll", "grid_nll", "is_nll", "kl", "mae_mode", "mae_mean", "crps", "coverage"):
        if k in summary:
            s = summary[k]
            spread = f" ± {s['std']:.4f} over {seeds} seeds (max {max(s['values']):.4f})" if seeds > 1 else ""
            print(f"test {k}: {s['mean']:.4f}{spread}")
