"""Where does under-coverage come from? For finished runs of the matching groups: the coverage of the
central 50/80/90/95 % intervals on the test split from each source of the run's predictive
distribution — the EBM's density on the task grid (1-D targets), the proposal alone (its exact mixture
CDF), and the importance-sampled prediction at several M — with the prediction's effective sample size
(ESS / M, mean over examples) at each M (issue 16, calibration).

If the EBM on its grid covers and the IS prediction under-covers at small M and approaches the grid as
M grows, the interval is computed from too few effective samples (a defect of the prediction); if the
grid density itself under-covers, the EBM is over-confident (the model). Each run's final checkpoint
(artifact ``checkpoint/checkpoint.pt``: the selected epoch's model) is evaluated with the same PIT rule
as training's evaluation (ebm.calibration), the same seed for every M.

The figures are logged to each run as ``diag_*`` metrics (``diag_epoch``: the selected epoch evaluated),
so that the export keeps them and the results page's ``{{diagnosis GLOB...}}`` table is rebuilt by
``make results`` without the checkpoints; the table printed here is that one. ``--no-log`` only prints.
MLflow keeps every metric ever logged: diagnose a run again with the same ``--M`` list.

    .venv/bin/python results/diagnose_coverage.py --groups 'star/conv_learned_K4' --seeds 0 1 --M 64 256 1024 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///results/mlruns.db")
    ap.add_argument("--experiment", default="paper-claims")
    ap.add_argument("--groups", nargs="+", required=True, help="ebm.group glob patterns")
    ap.add_argument("--seeds", nargs="*", default=[], help="only these seeds (default: every finished run)")
    ap.add_argument("--M", nargs="+", type=int, default=[64, 256, 1024, 4096], help="IS sample counts")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--no-log", action="store_true", help="print the table only; log nothing to the runs")
    args = ap.parse_args()

    import torch

    from ebm import calibration as C
    from ebm import checkpoint
    from ebm.predict import predict
    from pipelines import tracking
    from pipelines.driver.results import Group, collect, select
    from pipelines.driver.results_page import DIAG_EPOCH, LEVELS, diag_metrics, diagnosis_table
    from pipelines.serve.serving import from_state
    from pipelines.worker.data import for_rank

    torch.set_num_threads(1)
    uri = tracking.resolve_uri(args.tracking_uri)
    c = tracking.open_client(uri)
    todo = [(g, r) for g in select(collect(uri, args.experiment), args.groups) for r in g.runs if not args.seeds or r.tags.get("seed") in args.seeds]
    if not todo:
        print(f"no finished runs in {', '.join(args.groups)}" + (f" with seeds {args.seeds}" if args.seeds else ""))
        return 1
    shown: dict[str, Group] = {}
    for g, r in sorted(todo, key=lambda gr: (gr[0].name, int(gr[1].tags.get("seed", 0)))):
        p = from_state(checkpoint.load(c.download_artifacts(r.run_id, "checkpoint/checkpoint.pt")))
        data = for_rank(p.cfg)      # the test split as the run's evaluation read it: generated, or its dataset
        task, test = data.task, data.eval_splits["test"]
        grid = torch.as_tensor(task.grid()[0], dtype=torch.float32) if task.D == 1 else None
        pits: dict[tuple[str, int | None], list] = {}
        ess: dict[int, list] = {}
        with torch.no_grad():
            for s in range(0, len(test), args.batch_size):
                x, y = test.x[s:s + args.batch_size], test.y[s:s + args.batch_size]
                # the proposal alone and the EBM on its grid (no M: the prediction at each M follows)
                for k, v in C.model_pits(p.model, x, y, task.circular, M=None, grid=grid).items():
                    pits.setdefault((k, None), []).append(v)
                for M in args.M:
                    if not p.model.has_proposal:
                        break
                    pr = predict(p.model, x, task.circular, M=M, keep_samples=True,
                                 generator=torch.Generator().manual_seed(s))
                    pits.setdefault(("prediction", M), []).append(C.pit_weighted(pr.samples, pr.weights, y, task.circular))
                    ess.setdefault(M, []).append(pr.ess)
        found = {DIAG_EPOCH: float(r.metrics.get("selected_epoch", -1))}
        for (k, M), chunks in pits.items():
            cov = C.coverage(torch.cat(chunks).reshape(-1, 1), [lv / 100 for lv in LEVELS])[:, 0].tolist()
            found.update(diag_metrics(k, cov, M, torch.cat(ess[M]).float().mean().item() if M else None))
        if not args.no_log:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            c.log_batch(r.run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(found.items())])
        r.metrics.update(found)
        shown.setdefault(g.name, Group(g.name, g.task)).runs.append(r)
    print(diagnosis_table(list(shown.values())), end="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
