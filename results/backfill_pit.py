"""Add the PIT histogram (test_pit_<source>_<bin>) to finished runs that were trained before every
evaluation logged it (issue 16: the first cells of the `toys` batch started minutes before it).

For each FINISHED run of the matching groups without ``test_pit_prediction_0``/``test_pit_ebm_grid_0``:
its final checkpoint (the run's ``checkpoint/checkpoint.pt`` artifact) is evaluated on the test split
by the training loop's own evaluation (``ebm.evaluate.evaluate`` with the loop's ``eval_seed``, so the
same draws as the run's own test evaluation), the recomputed test NLL and coverage must equal the
logged ones (else the run is left alone and named), and only the ``test_pit_*`` metrics are logged.
Generated tasks only (the toys); image runs log the histogram themselves.

    .venv/bin/python results/backfill_pit.py --groups 'toy2/p20_*' 'toy1/p20_*'
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///results/mlruns.db")
    ap.add_argument("--experiment", default="paper-claims")
    ap.add_argument("--groups", nargs="+", required=True, help="ebm.group glob patterns")
    args = ap.parse_args()

    import torch
    from mlflow.entities import Metric

    from ebm import checkpoint
    from ebm.data import load_data
    from ebm.evaluate import evaluate
    from ebm.loop import eval_seed
    from pipelines import tracking
    from pipelines.driver.results import collect, select
    from pipelines.serve.serving import from_state

    torch.set_num_threads(1)
    uri = tracking.resolve_uri(args.tracking_uri)
    c = tracking.open_client(uri)
    seed = lambda r: (len(r.tags.get("seed", "")), r.tags.get("seed", ""))
    todo = [(g.name, r) for g in select(collect(uri, args.experiment), args.groups)      # FINISHED runs only
            for r in sorted(g.runs, key=seed) if not any(k.startswith("test_pit_") for k in r.metrics)]
    print(f"{len(todo)} finished runs without a PIT histogram in {', '.join(args.groups)}")
    bad = 0
    for group, r in todo:
        name = f"{group} seed {r.tags.get('seed')}"
        p = from_state(checkpoint.load(c.download_artifacts(r.run_id, "checkpoint/checkpoint.pt")))
        cfg = p.cfg
        if cfg.task.data_dir:
            print(f"  {name}: skipped (a dataset on disk; only generated tasks are backfilled)")
            continue
        task, splits = load_data(cfg)
        got = evaluate(p.model, splits["test"], task, cfg, seed=eval_seed(cfg))
        logged = r.metrics
        same = [k for k in ("nll", "coverage_90", "coverage_ebm_grid_90", "coverage_proposal_90")
                if f"test_{k}" in logged]
        if not same or any(not math.isclose(got[k], logged[f"test_{k}"], rel_tol=1e-9, abs_tol=1e-12) for k in same):
            print(f"  {name}: NOT backfilled, the recomputed test figures differ from the logged ones: "
                  + ", ".join(f"{k} {got[k]!r} vs {logged[f'test_{k}']!r}" for k in same))
            bad += 1
            continue
        pit = {f"test_{k}": v for k, v in got.items() if k.startswith("pit_")}
        step = int(logged.get("selected_epoch", cfg.optim.epochs - 1))
        now = int(time.time() * 1000)
        c.log_batch(r.run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(pit.items())])
        print(f"  {name}: {len(pit)} PIT bins logged (test {', '.join(f'{k} {got[k]:.4f}' for k in same)} as logged)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
