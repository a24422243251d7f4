"""ASHA vs the full grid over the same search space on toy 2, through ``ebm tune``'s own code path.

    python bench/bench_tune.py --epochs 20 --K 1,4,16 --M 64,256,1024

Both sweeps run every point of the grid K × M_train (one trial each, 1 Ray Train worker per trial);
FIFO trains every trial to the end, ASHA (val NLL, grace period --grace, reduction factor --rf)
stops the worse ones at its rungs. Compute is reported as epochs trained and as trial-seconds (the
sum of the trials' wall times); goal of issue 5: ASHA within 0.02 nats of the grid's best val NLL
for ≤ 40 % of its compute. MLflow goes to a throw-away SQLite store unless --tracking-uri is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ebm.config import Config  # noqa: E402


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
    print(f"{cfg.task.name}, {args.epochs} epochs, K in {{{args.K}}} x M_train in {{{args.M}}}; ASHA grace {args.grace}, "
          f"rf {args.rf}; max concurrent trials {args.max_concurrent}")
    for k, v in out.items():
        print(f"{k:5s}: {v['trials']} trials ({v['stopped']} stopped early), {v['epochs_total']} epochs, "
              f"{v['trial_time_total_s']:.0f} trial-s, sweep wall {v['sweep_wall_s']:.0f} s; best val NLL "
              f"{v['best_val_nll']:.4f} at K={v['best'][0]}, M_train={v['best'][1]}")
    if set(out) != {"fifo", "asha"}:
        return 0
    f, a = out["fifo"], out["asha"]
    print(f"ASHA / grid: {a['epochs_total'] / f['epochs_total']:.0%} of the epochs, "
          f"{a['trial_time_total_s'] / f['trial_time_total_s']:.0%} of the trial-seconds; "
          f"best val NLL {a['best_val_nll'] - f['best_val_nll']:+.4f} nats vs the grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
