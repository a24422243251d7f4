"""``ebm train --local``: the one loop (:func:`ebm.loop.train`) in this process, without Ray.

The same data (:func:`pipelines.worker.data.for_rank` as rank 0 of 1), checkpoints (every epoch,
under ``STORAGE/NAME/checkpoint_*``, resumable and registrable), run states and MLflow logging as a
Ray Train job. Each seed is one run, written from this process only: the flat config as params; tags
for git SHA, seed, task, method, data fingerprint, package versions, ``ebm.group`` (what ``ebm
results`` groups by) and ``ebm.command``; per-epoch metrics and density plots; the final checkpoint
and ``test_*`` metrics, ``train_time_s`` (wall) and ``train_cpu_s`` (this process's CPU time; both
include the final test evaluation, and a resumed run's earlier attempts up to its checkpoint); status FINISHED, FAILED (reason tagged), or KILLED on
Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ebm import checkpoint
from ebm.config import Config
from ebm.loop import Runtime, train
from pipelines.driver import runs

GROUP_TAG = "ebm.group"
COMMAND_TAG = "ebm.command"


class LocalRuntime(Runtime):
    """Rank 0 of 1 in this process: checkpoints to the run's storage location (a local directory or a
    URI; the last ``keep`` kept), per-epoch metrics and plots to MLflow."""

    def __init__(self, run_dir: str, log_epoch=None, val_split=None, keep: int = 2, prefix: str = ""):
        super().__init__("cpu", quiet=os.environ.get("EBM_QUIET") == "1")      # -q: no per-epoch lines
        self.run_dir, self.log_epoch, self.val_split, self.keep, self.prefix = str(run_dir), log_epoch, val_split, keep, prefix
        self.last_dir: str | None = None        # the newest checkpoint written (the run's final one at the end)

    def report(self, row: dict, state: dict | None, model) -> None:
        from pipelines import storage
        now = datetime.datetime.now(datetime.timezone.utc)       # one clock read, no daylight-saving jumps
        stamp = now.strftime("%Y-%m-%d_%H-%M-%S.%f")
        d = storage.join(self.run_dir, f"checkpoint_{stamp}")
        if storage.is_uri(self.run_dir):
            # written to a temporary directory, uploaded, and the local copy removed; an object appears
            # whole, and a directory whose checkpoint.pt is not there yet is passed over by resume
            with tempfile.TemporaryDirectory(prefix="ebm-ckpt-") as tmp:
                self._write(Path(tmp), row, state, model)
                storage.upload_dir(tmp, d)
                self._log(row, Path(tmp))
        else:
            tmp = Path(self.run_dir) / f".tmp_{stamp}"
            self._write(tmp, row, state, model)
            tmp.rename(d)                # a checkpoint directory appears whole or not at all
            self._log(row, Path(d))
        self.last_dir = d
        root, name = storage.parent(self.run_dir), storage.name(self.run_dir)
        for old in runs.checkpoint_dirs(root, name)[:-self.keep]:
            storage.delete_dir(old)

    def _write(self, d: Path, row: dict, state: dict, model) -> None:
        from pipelines.worker.loop import density_plot
        checkpoint.save(d, state)
        if row.get("validated"):
            density_plot(model, state, self.val_split, d)

    def _log(self, row: dict, d: Path) -> None:
        from pipelines.worker.loop import PLOTS_DIR
        if self.log_epoch:
            self.log_epoch(row, d / PLOTS_DIR)

    def log(self, line: str) -> None:
        if not self.quiet:
            print(f"{self.prefix}{line}", flush=True)


def train_local(cfg: Config, *, name: str = "", seeds: int = 1, resume: bool = False, allow_config_change: bool = False,
                storage: str | None = None, track: bool = True, tracking_uri: str | None = None,
                experiment: str = "ebm", group: str = "", command: str = "", threads: int = 0,
                out: str = "", verify_data: bool = False) -> list[dict]:
    """Train ``seeds`` seeds (cfg.seed, cfg.seed + 1, ...) one after another in this process; returns
    each seed's last metrics (``test_*`` included) and prints mean ± std. Raises ConfigError /
    TrackingError before any training, TrainingFailed if a seed's run failed."""
    from pipelines.worker.runtime import tune_malloc
    tune_malloc()
    threads_before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        return _train_seeds(cfg, name, seeds, resume, allow_config_change, storage, track, tracking_uri, experiment,
                            group, command, out, verify_data)
    finally:
        torch.set_num_threads(threads_before)


def _train_seeds(cfg, name, seeds, resume, allow_config_change, storage, track, tracking_uri, experiment, group,
                 command, out, verify_data) -> list[dict]:
    from pipelines import tracking
    from pipelines.worker.data import for_rank, prepare_dataset
    cfg, task, identity = prepare_dataset(cfg, verify_data)     # a bad data_dir or config fails before anything runs
    storage = runs.storage_root(storage)
    group = group or task.name
    stamp = runs.default_stamp()
    names = [name or f"{group}-seed{cfg.seed}-{stamp}"] if seeds == 1 else \
        [f"{name or group}-seed{cfg.seed + i}" + ("" if name else f"-{stamp}") for i in range(seeds)]
    cfgs = [cfg.with_overrides([f"seed={cfg.seed + i}"]) for i in range(seeds)]
    uri = tracking.resolve_uri(tracking_uri) if track else None
    if uri:
        tracking.check_reachable(uri)                   # fail fast, before any training
    plans = [runs.plan(c, task, n, storage, resume, allow_config_change, runs.finished_in(uri, n))
             for c, n in zip(cfgs, names)]
    if uri:
        print(f"MLflow: experiment {experiment!r}, group {group!r} in {uri}", flush=True)
    command = command or shlex.join(["ebm", *sys.argv[1:]])
    data = for_rank(cfg, 0, 1, expected=identity.meta)
    print(f"task {task.name}: D={task.D} ({', '.join(task.target_names)}), train {_train_rows(cfg)} / val "
          f"{len(data.eval_splits.get('val', []))} / test {len(data.eval_splits.get('test', []))}; method "
          f"{cfg.method.name}, K={cfg.proposal.K}, M={cfg.sampler.M_train}", flush=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    results = []
    try:
        for c, run_name, plan in zip(cfgs, names, plans):
            run_id = None
            if uri:
                tags = {"git_sha": tracking.git_sha(), "seed": str(c.seed), "task": task.name, "method": c.method.name,
                        **identity.tags(), GROUP_TAG: group, COMMAND_TAG: command, "ebm.mode": "local",
                        **tracking.package_versions()}
                run_id = tracking.start_run(uri, experiment, run_name, c.to_flat(), tags, c.to_toml(), reopen=resume)
                runs.reopened(uri, run_id, plan)
            results.append(_one_seed(c, run_name, plan, storage, data, uri, run_id,     # one data load for all seeds
                                     prefix=f"[seed {c.seed}] " if seeds > 1 else ""))
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(results, seeds)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "summary.json").write_text(json.dumps({"config": cfg.to_flat(), "runs": names,
                                                            "test": _summary(results)}, indent=1))
    return results


def _train_rows(cfg: Config) -> str:
    from pipelines.data import read_metadata
    return str(read_metadata(cfg.task.data_dir)["splits"]["train"]["rows"]) if cfg.task.data_dir else "(generated)"


def _earlier_time(plan: runs.Plan, uri: str | None, run_id: str | None) -> tuple[float, float]:
    """Wall and CPU seconds a resumed run trained before this attempt: what its checkpoint carries
    (``elapsed_s``, ``elapsed_cpu_s``), or for a checkpoint written before those were recorded, the
    times its finished attempt logged (a killed attempt logged none)."""
    if plan.state is None:
        return 0.0, 0.0
    m = plan.state.get("metrics", {})
    if "elapsed_s" in m:
        return float(m["elapsed_s"]), float(m.get("elapsed_cpu_s", 0.0))
    if not (uri and run_id):
        return 0.0, 0.0
    from pipelines import tracking
    logged = tracking.open_client(uri).get_run(run_id).data.metrics
    return float(logged.get("train_time_s", 0.0)), float(logged.get("train_cpu_s", 0.0))


def _one_seed(cfg: Config, name: str, plan: runs.Plan, storage: str, data, uri, run_id, prefix: str) -> dict:
    from pipelines import tracking
    from pipelines import storage as fs
    run_dir = fs.join(storage, name)        # made by the first checkpoint
    log_epoch = (lambda row, plots: tracking.log_epoch(uri, run_id, row, str(plots))) if uri else None
    rt = LocalRuntime(run_dir, log_epoch, data.eval_splits.get("val"), prefix=prefix)
    status = "FAILED"
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        earlier = _earlier_time(plan, uri, run_id)
        # a run stopped after its last checkpoint and before it was marked FINISHED is only finalised
        last = dict(plan.state["metrics"]) if plan.finalize_only else dict(train(cfg, data, rt, plan.state).last)
        # wall time depends on what else the machine runs; CPU time of this process much less so; a
        # resumed run's earlier attempts count (up to the checkpoint it resumed from)
        last.update(train_time_s=earlier[0] + time.perf_counter() - t0,
                    train_cpu_s=earlier[1] + time.process_time() - c0)
        final = rt.last_dir or plan.checkpoint_dir      # what this run wrote last, or the one it finalises
        runs.finish(uri, run_id, last, str(final) if final else None, cfg.optim.epochs)
        if uri:
            tracking.log_metrics(uri, run_id, {"train_time_s": last["train_time_s"],
                                               "train_cpu_s": last["train_cpu_s"]}, step=cfg.optim.epochs)
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    except Exception as e:
        if uri:
            tracking.set_tag(uri, run_id, runs.STOP_REASON_TAG, str(e)[:5000])
        raise
    finally:
        if uri:
            tracking.end_run(uri, run_id, status)
    print(f"{prefix}run {name}: test " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in sorted(last.items())
                                                     if k.startswith("test_")), flush=True)
    return {**last, "run_name": name, "mlflow_run_id": run_id}


def _summary(results: list[dict]) -> dict:
    summary = {}
    for k in results[0]:
        vals = [r[k] for r in results if isinstance(r.get(k), float) and not math.isnan(r[k])]
        if vals and k.startswith("test_"):
            summary[k[5:]] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "values": vals}
    return summary


def _print_summary(results: list[dict], seeds: int) -> None:
    summary = _summary(results)
    for k in ("nll", "grid_nll", "is_nll", "kl", "mae_mode", "mae_mean", "crps", "coverage"):
        if k in summary:
            s = summary[k]
            spread = f" ± {s['std']:.4f} over {seeds} seeds (max {max(s['values']):.4f})" if seeds > 1 else ""
            print(f"test {k}: {s['mean']:.4f}{spread}")
