"""Test NLL by importance sampling with the learned proposal vs by the task grid, on one trained model.

    python bench/bench_eval.py                          # train toy 2 here (--epochs, --M-train), then compare
    python bench/bench_eval.py --model models:/NAME@champion   # a registered model (toy or image task)
    python bench/bench_eval.py --ranks 2                # also: the whole evaluation on 2 ranks vs 1
    python bench/bench_eval.py --grid-scores --config star --epochs 1   # also: grid scoring, per example vs shared

--grid-scores: the energy on the task grid for a batch of --batch examples, as ``model.score`` of the
grid repeated per example (the form before the shared one) vs ``ebm.metrics.scores_on_grid`` (the
grid's y-side terms once for all examples, chunked to stay in cache); prints both times, the ratio and
whether the scores are identical.

--val-figures: one epoch's validation as ``ebm.evaluate.evaluate`` of the test split with every figure
(``eval.val_figures = "all"``) vs the NLL alone (``"nll"``: what eval.select and the curves read, and the
exact KL); prints both times, the ratio and whether the shared figures are identical.

--ranks N: ``ebm.evaluate.evaluate`` of the test split (every metric, IS and prediction draws per
batch) in this process vs split over N spawned processes joined by torch.distributed (gloo,
127.0.0.1), one thread each; prints both wall times, the ratio, and checks the figures are identical.

Grid: −f(y_i) + logsumexp_j f(y_j) + log Δ over the task grid (toy 2: 8192 points), G + 1 energy
evaluations per example. IS: −f(y_i) + log Ẑ, Ẑ from M proposal samples, M + 1 evaluations. Goal of
issue 5: within 0.02 nats with ≥ 20× fewer energy evaluations. Prints one line per M (mean over
--reps sample draws, and the spread of the IS mean across draws).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ebm import metrics as MET  # noqa: E402
from ebm.config import Config  # noqa: E402


def trained(args):
    """(model, task, test split) from a registered model or a fresh in-process training run."""
    from ebm.data import in_memory, load_data
    from ebm.loop import fit
    if args.model:
        import mlflow

        from pipelines.serve.registry import load_predictor
        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)
        p = load_predictor(args.model)
        _, splits = load_data(p.cfg)             # generated tasks: the test split is regenerated from the config
        return p.model, p.task, splits["test"], f"{args.model} ({p.task.name})", p.cfg
    from pipelines.configs import resolve_config
    cfg = Config.from_toml(resolve_config(args.config),
                           [f"optim.epochs={args.epochs}", f"sampler.M_train={args.M_train}", "eval.grid_nll=false",
                            f"eval.every={args.epochs}", "sampler.refine_steps=0"])
    t0 = time.perf_counter()
    data = load_data(cfg)
    loop_data = in_memory(data[0], {"train": data[1]["train"]}, cfg)      # no evaluation: only the weights matter
    res = fit(cfg, data=loop_data)
    print(f"trained {cfg.task.name} K={cfg.proposal.K} M_train={cfg.sampler.M_train} for {cfg.optim.epochs} epochs "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return res.model.eval(), data[0], data[1]["test"], f"{cfg.task.name} trained here", cfg


def timed(fn, x, y, bs: int) -> tuple[float, float]:
    """(mean NLL over the split, seconds) evaluated in batches."""
    t0 = time.perf_counter()
    out = torch.cat([fn(x[s:s + bs], y[s:s + bs]) for s in range(0, len(y), bs)])
    return out.mean().item(), time.perf_counter() - t0


class _GlooShard:
    """The collectives ``evaluate`` needs, over the default process group."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.device = rank, world, torch.device("cpu")

    def all_reduce(self, t, op="sum"):
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj):
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _eval_rank(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    from ebm.data import Split
    from ebm.evaluate import evaluate
    from ebm.nets import build_model
    from ebm.tasks import TaskSpec
    torch.set_num_threads(1)
    job = torch.load(path, weights_only=True)
    cfg, task = Config.from_flat(job["cfg"]), TaskSpec.from_dict(job["task"])
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    model.load_state_dict(job["weights"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dist.barrier()
        t0 = time.perf_counter()
        out = evaluate(model, Split(job["x"], job["y"], job["aux"]), task, cfg, seed=job["seed"],
                       shard=_GlooShard(rank, world))
        dist.barrier()
        if rank == 0:
            torch.save({"out": out, "s": time.perf_counter() - t0}, path + ".out")
    finally:
        dist.destroy_process_group()


def rank_scaling(model, cfg: Config, task, test, ranks: int) -> None:
    """The test split's full evaluation on 1 rank (here) vs ``ranks`` processes; same figures."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    from ebm.evaluate import evaluate
    from ebm.loop import eval_seed
    seed = eval_seed(cfg)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    one = evaluate(model, test, task, cfg, seed=seed)
    t_one = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/job.pt"
        torch.save({"cfg": cfg.to_flat(), "task": task.to_dict(), "weights": model.state_dict(), "x": test.x,
                    "y": test.y, "seed": seed,
                    # plain lists: the ranks read the file with weights_only=True like every torch.load here
                    "aux": {k: np.asarray(v).tolist() for k, v in test.aux.items()}}, path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_eval_rank, args=(ranks, port, path), nprocs=ranks, join=True)
        got = torch.load(path + ".out", weights_only=True)
    same = got["out"] == one
    print(f"evaluation of {len(test)} test examples ({len(one)} metrics), 1 thread per rank: 1 rank {t_one:.2f} s, "
          f"{ranks} ranks {got['s']:.2f} s -> {t_one / got['s']:.2f}x faster; figures identical: {same}")


def validation_figures(model, cfg: Config, task, split, reps: int = 2) -> None:
    """evaluate(figures="all") vs evaluate(figures="nll") on one split: times, ratio, shared figures equal."""
    from ebm.evaluate import evaluate
    from ebm.loop import eval_seed
    out, secs = {}, {}
    for figures in ("all", "nll"):
        t0 = time.perf_counter()
        for _ in range(reps):
            out[figures] = evaluate(model, split, task, cfg, seed=eval_seed(cfg), figures=figures)
        secs[figures] = (time.perf_counter() - t0) / reps
    shared = sorted(out["nll"])
    same = all(out["all"][k] == out["nll"][k] for k in shared)
    print(f"validation of {len(split)} examples: every figure ({len(out['all'])}) {secs['all']:.2f} s, the NLL alone "
          f"({', '.join(shared)}) {secs['nll']:.2f} s -> {secs['all'] / secs['nll']:.2f}x faster; "
          f"shared figures identical: {same}")


def grid_scoring(model, grids: list[torch.Tensor], x: torch.Tensor, reps: int = 5) -> None:
    """Per-example vs shared grid scores of a batch x: times, ratio, identical or the largest difference."""
    grid = MET.grid_points(grids)
    B = x.shape[0]
    with torch.no_grad():
        enc = model.encode(x)
        forms = {"per example": lambda: model.score(enc, grid.unsqueeze(0).expand(B, -1, -1)),
                 "shared": lambda: MET.scores_on_grid(model, enc, grid)}
        out, secs = {}, {}
        for name, fn in forms.items():
            out[name] = fn()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            secs[name] = (time.perf_counter() - t0) / reps
    a, b = out["per example"], out["shared"]
    same = "identical" if torch.equal(a, b) else f"largest difference {(a - b).abs().max().item():.2e}"
    print(f"grid scores, {B} examples x {grid.shape[0]} grid points: per example {secs['per example'] * 1e3:.1f} ms, "
          f"shared {secs['shared'] * 1e3:.1f} ms -> {secs['per example'] / secs['shared']:.2f}x faster; scores {same}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--M-train", type=int, default=1024)
    ap.add_argument("--model", default="", help="a registered model URI instead of training")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--M", default="32,64,128,256,400", help="IS sample counts to compare")
    ap.add_argument("--reps", type=int, default=3, help="IS repetitions (different samples) per M")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranks", type=int, default=0, help="also time the whole evaluation on this many ranks vs 1")
    ap.add_argument("--grid-scores", action="store_true", help="also time grid scoring per example vs shared")
    ap.add_argument("--val-figures", action="store_true", help="also time a validation with every figure vs the NLL alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, task, test, what, cfg = trained(args)
    if args.ranks > 1:
        rank_scaling(model, cfg, task, test, args.ranks)
        torch.set_num_threads(args.threads)
    x, y = test.x, test.y
    grids = [torch.as_tensor(g, dtype=torch.float32) for g in task.grid()]
    if args.grid_scores:
        grid_scoring(model, grids, x[:50])
    if args.val_figures:
        # the task's own evaluation settings (training here turned off the grid and refinement for speed)
        from pipelines.configs import resolve_config
        vcfg = cfg if args.model else Config.from_toml(resolve_config(args.config), [f"optim.epochs={args.epochs}"])
        validation_figures(model, vcfg, task, test)
    G = 1
    for g in grids:
        G *= len(g)
    with torch.no_grad():
        grid, t_grid = timed(lambda a, b: MET.grid_nll(model, a, b, grids, task.cell_volume()), x, y, args.batch)
    n = len(y)
    print(f"model: {what}; test split: {n} examples; threads {args.threads}")
    print(f"grid   G={G:6d}  evals/example {G + 1:6d}  NLL {grid:.4f}  time {t_grid:6.2f} s")
    for M in [int(v) for v in args.M.split(",")]:
        vals, times = [], []
        for r in range(args.reps):
            g = torch.Generator().manual_seed(1000 + r)
            v, t = timed(lambda a, b: MET.is_nll(model, a, b, M, g), x, y, args.batch)
            vals.append(v)
            times.append(t)
        mean = statistics.fmean(vals)
        spread = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        print(f"IS     M={M:6d}  evals/example {M + 1:6d}  NLL {mean:.4f} ± {spread:.4f}  time {statistics.fmean(times):6.2f} s"
              f"  |IS − grid| {abs(mean - grid):.4f} nats  {(G + 1) / (M + 1):5.1f}× fewer evals  "
              f"{t_grid / statistics.fmean(times):5.1f}× faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
