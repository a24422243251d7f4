"""Ray Train overhead benchmark (issue 4 acceptance 2). Prints, in one run:

1. train examples/s of one epoch in the plain single-process loop (``ebm.loop.fit``) and of the same
   epoch inside a 1-worker Ray Train job (DDP wrapper, all-reduced NaN check, per-epoch report and
   checkpoint), both with 1 torch thread, and their ratio (goal <= 1.10);
2. the same for 2 workers with 1 thread each, and the speed-up over 1 worker.

Throughput is measured over the last of ``--epochs`` epochs (the first warms up), training steps
only (``run_epoch``'s examples/s; evaluation and checkpoint writing are reported separately as the
whole job's wall time). Usage: ``python bench/bench_ray.py [--n-train 4096] [--config debug]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cfg(args):
    from ebm.config import Config
    from pipelines.configs import resolve_config
    return Config.from_toml(resolve_config(args.config), [
        f"task.n_train={args.n_train}", "task.n_val=64", "task.n_test=64", f"optim.epochs={args.epochs}",
        f"sampler.M_train={args.m_train}", f"eval.every={args.epochs}", "eval.grid_nll=false"] + args.set)


def plain(cfg) -> tuple[float, float]:
    import torch

    from ebm.loop import fit
    from pipelines.worker.runtime import tune_malloc
    tune_malloc()           # as train_local and every Ray worker do
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = fit(cfg)
    return res.history[-1]["examples_per_s"], time.perf_counter() - t0


def ray_job(cfg, workers: int, tmp: str) -> tuple[float, float]:
    from pipelines.driver.train_job import run_job
    t0 = time.perf_counter()
    m = run_job(cfg, name=f"bench-{workers}w-{time.time_ns()}", num_workers=workers, storage_path=f"{tmp}/runs",
                tracking_uri=f"sqlite:///{tmp}/mlruns.db", cpus_per_worker=1.0, threads=1)
    return m["examples_per_s"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="debug")
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--m-train", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    cfg = _cfg(args)
    import ray
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=200 * 1024 ** 2, log_to_driver=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p_rate, p_wall = plain(cfg)
            r1, w1 = ray_job(cfg, 1, tmp)
            r2, w2 = ray_job(cfg, 2, tmp)
    finally:
        ray.shutdown()
    print(f"config {args.config}: n_train {args.n_train}, M_train {args.m_train}, batch {cfg.optim.batch_size}, "
          f"{args.epochs} epochs; last epoch's training steps, 1 torch thread per process")
    print(f"plain loop          {p_rate:9.0f} ex/s   (whole fit {p_wall:.1f} s)")
    print(f"Ray Train, 1 worker {r1:9.0f} ex/s   (whole job {w1:.1f} s incl. start-up, eval, checkpoints)")
    print(f"Ray Train, 2 workers{r2:9.0f} ex/s   (whole job {w2:.1f} s)")
    print(f"1-worker epoch time / plain epoch time: {p_rate / r1:.3f}x (goal <= 1.10)")
    print(f"2 workers vs 1 worker speed-up: {r2 / r1:.2f}x")


if __name__ == "__main__":
    main()
