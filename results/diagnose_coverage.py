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

    .venv/bin/python results/diagnose_coverage.py --groups 'star/conv_learned_K4' --seeds 0 1 --M 64 256 1024 4096
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LEVELS = (0.5, 0.8, 0.9, 0.95)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///results/mlruns.db")
    ap.add_argument("--experiment", default="paper-claims")
    ap.add_argument("--groups", nargs="+", required=True, help="ebm.group glob patterns")
    ap.add_argument("--seeds", nargs="*", default=[], help="only these seeds (default: every finished run)")
    ap.add_argument("--M", nargs="+", type=int, default=[64, 256, 1024, 4096], help="IS sample counts")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args()

    import torch

    from ebm import calibration as C
    from ebm import checkpoint
    from ebm.data import load_data
    from ebm.predict import predict
    from pipelines import tracking
    from pipelines.driver.results import collect, select
    from pipelines.serve.serving import from_state

    torch.set_num_threads(1)
    uri = tracking.resolve_uri(args.tracking_uri)
    c = tracking.open_client(uri)
    runs = [(g.name, r) for g in select(collect(uri, args.experiment), args.groups) for r in g.runs
            if not args.seeds or r.tags.get("seed") in args.seeds]
    if not runs:
        print(f"no finished runs in {', '.join(args.groups)}" + (f" with seeds {args.seeds}" if args.seeds else ""))
        return 1
    head = ["run", "source", "M", "ESS/M"] + [f"{round(lv * 100)}%" for lv in LEVELS]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for group, r in sorted(runs, key=lambda gr: (gr[0], int(gr[1].tags.get("seed", 0)))):
        p = from_state(checkpoint.load(c.download_artifacts(r.run_id, "checkpoint/checkpoint.pt")))
        task, splits = load_data(p.cfg)
        test = splits["test"]
        grid = torch.as_tensor(task.grid()[0], dtype=torch.float32) if task.D == 1 else None
        name = f"`{group}` seed {r.tags.get('seed')} (epoch {int(r.metrics.get('selected_epoch', -1))})"
        pits: dict[tuple[str, int | None], list] = {}
        ess: dict[int, list] = {}
        with torch.no_grad():
            for s in range(0, len(test), args.batch_size):
                x, y = test.x[s:s + args.batch_size], test.y[s:s + args.batch_size]
                # the proposal alone and the EBM on its grid (M does not enter; M = 1 for the unused prediction)
                for k, v in C.model_pits(p.model, x, y, task.circular, M=1, grid=grid).items():
                    if k != "prediction":
                        pits.setdefault((k, None), []).append(v)
                for M in args.M:
                    if not p.model.has_proposal:
                        break
                    pr = predict(p.model, x, task.circular, M=M, keep_samples=True,
                                 generator=torch.Generator().manual_seed(s))
                    pits.setdefault(("prediction", M), []).append(C.pit_weighted(pr.samples, pr.weights, y, task.circular))
                    ess.setdefault(M, []).append(pr.ess)
        for (k, M), chunks in sorted(pits.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            cov = C.coverage(torch.cat(chunks).reshape(-1, 1), LEVELS)[:, 0].tolist()
            e = f"{torch.cat(ess[M]).float().mean().item():.3f}" if M else ""
            print(f"| {name} | {k} | {M or ''} | {e} | " + " | ".join(f"{v:.3f}" for v in cov) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
