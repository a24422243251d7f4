"""ASHA vs the full grid over the same search space on toy 2, through ``ebm tune``'s own code path,
and the per-trial start-up of a 1-worker trial trained in its own process vs a nested TorchTrainer.

    python bench/bench_tune.py --epochs 20 --K 1,4,16 --M 64,256,1024

Both sweeps run every point of the grid K × M_train (one trial each, 1 worker per trial, trained in
the trial's process); FIFO trains every trial to the end, ASHA (val NLL, grace period --grace,
reduction factor --rf) stops the worse ones at its rungs. Compute is reported as epochs trained and
as trial-seconds (the sum of the trials' wall times); goal of issues 5 and 15: ASHA within 0.02 nats
of the grid's best val NLL (the same best config) for ≤ 40 % of the grid's trial-seconds.

Start-up (``--startup-trials N``, 0 to skip): two more small sweeps of N one-epoch trials, one with
each kind of trial (``run_sweep(in_process=...)``). A trial's start-up is the time from its function's
start to its first training step: the first report's ``time_this_iter_s`` minus that epoch's own
``epoch_time_s`` (read back from Tune's results). MLflow goes to a throw-away SQLite store unless
--tracking-uri is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ebm.config import Config  # noqa: E402


def trial_startups(storage: str, name: str) -> list[float]:
    """Each trial's function start -> first training step, from Tune's stored results."""
    from ray.tune import ExperimentAnalysis
    ea = ExperimentAnalysis(os.path.join(storage, name))
    out = []
    for df in ea.trial_dataframes.values():
        first = df.sort_values("training_iteration").iloc[0]
        out.append(float(first["time_this_iter_s"] - first["epoch_time_s"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--K", default="1,4,16")
    ap.add_argument("--M", default="64,256,1024")
    ap.add_argument("--grace", type=int, default=2)
    ap.add_argument("--rf", type=int, default=3)
    ap.add_argument("--max-concurrent", type=int, default=1)
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--storage", default="")
    ap.add_argument("--schedulers", default="fifo,asha", help="which sweeps to run")
    ap.add_argument("--startup-trials", type=int, default=2, help="trials per kind in the start-up comparison")
    args = ap.parse_args(argv)
    from pipelines.configs import resolve_config
    from pipelines.driver.tune import check_space, run_sweep
    cfg = Config.from_toml(resolve_config(args.config), [f"optim.epochs={args.epochs}", "eval.every=1",
                                                         "sampler.refine_steps=0"])
    space = check_space({"proposal.K": {"grid": [int(v) for v in args.K.split(",")]},
                         "sampler.M_train": {"grid": [int(v) for v in args.M.split(",")]}}, cfg)
    tmp = tempfile.mkdtemp(prefix="bench-tune-")
    uri = args.tracking_uri or f"sqlite:///{tmp}/mlruns.db"
    stamp = time.strftime("%H%M%S")
    out = {}
    for sched in args.schedulers.split(","):
        t0 = time.perf_counter()
        s = run_sweep(cfg, name=f"bench-{sched}-{stamp}", space=space,
                      opts={"scheduler": sched, "grace_period": args.grace, "reduction_factor": args.rf},
                      storage_path=args.storage or f"{tmp}/runs", tracking_uri=uri, num_workers=1,
                      cpus_per_worker=1.0, max_concurrent=args.max_concurrent, max_failures=0,
                      out=open(os.devnull, "w"))
        best = min((r for r in s["rows"] if r["best_val_nll"] == r["best_val_nll"]), key=lambda r: r["best_val_nll"])
        out[sched] = {**s["compute"], "best_val_nll": best["best_val_nll"], "best": (best["proposal.K"], best["sampler.M_train"]),
                      "wall": time.perf_counter() - t0, "stopped": sum(r["status"] == "STOPPED" for r in s["rows"])}
    starts = {}
    if args.startup_trials:
        one = cfg.with_overrides(["optim.epochs=1"])
        grid = check_space({"seed": {"grid": [cfg.seed + i for i in range(args.startup_trials)]}}, one)
        for kind, in_process in (("TorchTrainer trial", False), ("in-process trial", True)):
            name = f"bench-startup-{int(in_process)}-{stamp}"
            storage = args.storage or f"{tmp}/runs"
            run_sweep(one, name=name, space=grid, opts={"scheduler": "fifo"}, storage_path=storage, tracking_uri=uri,
                      num_workers=1, cpus_per_worker=1.0, max_concurrent=1, max_failures=0, in_process=in_process,
                      out=open(os.devnull, "w"))
            starts[kind] = trial_startups(storage, name)
    print(f"{cfg.task.name}, {args.epochs} epochs, K in {{{args.K}}} x M_train in {{{args.M}}}; ASHA grace {args.grace}, "
          f"rf {args.rf}; max concurrent trials {args.max_concurrent}")
    for k, v in out.items():
        print(f"{k:5s}: {v['trials']} trials ({v['stopped']} stopped early), {v['epochs_total']} epochs, "
              f"{v['trial_time_total_s']:.0f} trial-s, sweep wall {v['sweep_wall_s']:.0f} s; best val NLL "
              f"{v['best_val_nll']:.4f} at K={v['best'][0]}, M_train={v['best'][1]}")
    for kind, ts in starts.items():
        print(f"start-up per trial, {kind:18s}: " + ", ".join(f"{t:.1f}" for t in ts)
              + f" s (mean {sum(ts) / len(ts):.1f} s)")
    if len(starts) == 2:
        a, b = (sum(v) / len(v) for v in starts.values())
        print(f"in-process / TorchTrainer start-up: {b / a:.2f}x")
    if set(out) != {"fifo", "asha"}:
        return 0
    f, a = out["fifo"], out["asha"]
    print(f"ASHA / grid: {a['epochs_total'] / f['epochs_total']:.0%} of the epochs, "
          f"{a['trial_time_total_s'] / f['trial_time_total_s']:.0%} of the trial-seconds; "
          f"best val NLL {a['best_val_nll'] - f['best_val_nll']:+.4f} nats vs the grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
