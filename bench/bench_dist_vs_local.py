"""Same config, same seeds: the single-process loop vs the 2-worker Ray Train job (issue 4 acceptance 3).

For each seed, trains the config with ``ebm.loop.fit`` in this process and with ``run_job`` on a local
Ray (2 DDP workers, 1 CPU and 1 torch thread each), and prints both test NLLs side by side with the
mean ± std over seeds. ``optim.batch_size`` is per worker, so the distributed run uses half the
configured batch per worker to keep the global batch (and steps per epoch) of the paper's protocol.
The two paths see the data in different orders (one permutation per epoch, sliced by rank), so they
agree in distribution, not bit for bit.

Usage: ``python bench/bench_dist_vs_local.py [--config toy2] [--seeds 3] [--set section.key=value ...]``
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="toy2")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()

    import ray
    import torch

    from ebm.config import Config
    from ebm.loop import fit
    from pipelines.configs import resolve_config
    from pipelines.worker.runtime import tune_malloc
    from pipelines.driver.train_job import run_job

    base = Config.from_toml(resolve_config(args.config), args.set)
    if base.optim.batch_size % 2:
        raise SystemExit(f"optim.batch_size={base.optim.batch_size} must be even to split over 2 workers")
    tune_malloc()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=200 * 1024 ** 2, log_to_driver=False, logging_level="ERROR")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.seeds):
                cfg = base.with_overrides([f"seed={base.seed + i}"])
                t0 = time.perf_counter()
                local = {k[5:]: v for k, v in fit(cfg).last.items() if k.startswith("test_")}
                t_local = time.perf_counter() - t0
                t0 = time.perf_counter()
                dist = run_job(cfg.with_overrides([f"optim.batch_size={cfg.optim.batch_size // 2}"]),
                               name=f"cmp-seed{cfg.seed}-{time.time_ns()}", num_workers=2,
                               storage_path=f"{tmp}/runs", tracking_uri=f"sqlite:///{tmp}/mlruns.db",
                               cpus_per_worker=1.0, threads=1)
                t_dist = time.perf_counter() - t0
                rows.append((cfg.seed, local["nll"], dist["test_nll"], t_local, t_dist))
                print(f"seed {cfg.seed}: local test NLL {local['nll']:.4f} ({t_local:.0f} s) | "
                      f"2-worker Ray Train test NLL {dist['test_nll']:.4f} ({t_dist:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    loc, dis = [r[1] for r in rows], [r[2] for r in rows]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
    print(f"config {args.config} {' '.join(args.set)}; {len(rows)} seeds from {base.seed}")
    print(f"single process   test NLL {statistics.fmean(loc):.4f} ± {sd(loc):.4f}")
    print(f"2-worker DDP     test NLL {statistics.fmean(dis):.4f} ± {sd(dis):.4f}")
    diffs = [d - l for l, d in zip(loc, dis)]
    print(f"difference (DDP - local) per seed: {', '.join(f'{d:+.4f}' for d in diffs)}; "
          f"mean {statistics.fmean(diffs):+.4f}")


if __name__ == "__main__":
    main()
