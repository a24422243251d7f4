"""Step benchmark: examples/s of the learned-proposal train step vs a straightforward reference form,
each in fp32 and in bf16 (``optim.precision``).

The reference form is what the released code does: features replicated per sample and concatenated
with the y-embedding before the first joint layer, and mixture densities computed exp-then-log.
In bf16 both forms run the backbone and the energy head under autocast and everything else in fp32.
All four run in this process, side by side, on the same weights and batch; the ratios are the
figures: bf16 vs fp32 of each form, and ours vs the reference in each precision. Also prints the
achieved GFLOP/s of each step (FLOPs counted by torch's FlopCounterMode) against this machine's
measured matmul GFLOP/s.

    python bench/bench_step.py            # toy and image configs, M = 1024 (paper heads)
    python bench/bench_step.py --quick    # fewer repetitions
    python bench/bench_step.py --data-wait  # also: the loop's data_wait_frac on a Parquet image dataset,
                                            # decode inline vs prefetched (bench_data.py's 64x64 RGB set)
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ebm import losses
from ebm.config import Config
from ebm.nets import build_model
from ebm.steps import autocast, train_step

IMAGE = {"features": {"kind": "resnet18", "width": 64},
         "energy": {"y_embed": [16, 32, 64, 128], "hidden": 512, "residual_blocks": 0},
         "proposal": {"K": 4}, "sampler": {"M_train": 1024}}


def reference_step(model, batch, cfg, epoch=0):
    """The released code's step: concatenated first layer, exp-then-log mixture densities."""
    x, y = batch
    with autocast(cfg, x.device.type):
        enc = model.encode(x, freeze_backbone=epoch < cfg.schedule.freeze_backbone_epochs)
    enc = type(enc)(*(h.float() for h in enc))
    mix = model.propose(enc)
    ys = mix.sample(cfg.sampler.M_train)
    y_all = torch.cat([y.unsqueeze(1), ys], 1)                                  # (B, 1+M, D)
    sig = torch.exp(0.5 * mix.log_sigma2)
    w = torch.softmax(mix.logits, -1)
    dens = torch.exp(torch.distributions.Normal(mix.means.unsqueeze(1), sig.unsqueeze(1))
                     .log_prob(y_all.unsqueeze(2))).prod(-1)                   # (B, 1+M, K)
    logq = torch.log((w.unsqueeze(1) * dens).sum(-1))
    with autocast(cfg, x.device.type):
        f = model.energy_head.forward_concat(enc.h_energy, y_all).float()
    loss = (losses.nce_loss(f[:, 0], f[:, 1:], logq[:, 0], logq[:, 1:])
            + losses.proposal_kl_loss(f[:, 1:], logq[:, 1:]))
    return loss, {}


def ours_step(model, batch, cfg, epoch=0):
    return train_step(model, batch, cfg, epoch=epoch)


def time_step(step, model, batch, cfg, reps, epoch=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def once():
        loss, _ = step(model, batch, cfg, epoch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def count_flops(step, model, batch, cfg, epoch=0) -> float:
    with FlopCounterMode(display=False) as fc:
        loss, _ = step(model, batch, cfg, epoch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def matmul_gflops(n=1024, reps=10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def bench(name, cfg, x_shape, reps, epoch=0):
    """The four steps on one model and batch -> {(form, precision): examples/s}; prints one line each."""
    torch.manual_seed(0)
    model = build_model(cfg, x_shape, 1, (False,))
    B = cfg.optim.batch_size
    batch = (torch.randn(B, *x_shape), torch.randn(B, 1))
    res = {}
    for prec in ("fp32", "bf16"):
        c = cfg.with_overrides([f'optim.precision="{prec}"'])
        # check both forms compute the same loss on the same samples before timing them
        torch.manual_seed(1)
        l_ref = reference_step(model, batch, c, epoch)[0].item()
        torch.manual_seed(1)
        l_ours = ours_step(model, batch, c, epoch)[0].item()
        tol = 1e-3 if prec == "fp32" else 2e-2
        assert math.isclose(l_ref, l_ours, rel_tol=tol, abs_tol=tol), (prec, l_ref, l_ours)
        for label, step in (("reference", reference_step), ("ours", ours_step)):
            t = time_step(step, model, batch, c, reps, epoch)
            fl = count_flops(step, model, batch, c, epoch)
            res[label, prec] = B / t
            print(f"{name:<32} {label:<9} {prec}  {B / t:8.1f} ex/s  ({fl / 1e9:6.2f} GFLOP/step, "
                  f"{fl / t / 1e9:6.1f} GFLOP/s)", flush=True)
    print(f"{'':<32} bf16/fp32: ours {res['ours', 'bf16'] / res['ours', 'fp32']:.2f}x, reference "
          f"{res['reference', 'bf16'] / res['reference', 'fp32']:.2f}x | ours/reference: fp32 "
          f"{res['ours', 'fp32'] / res['reference', 'fp32']:.2f}x, bf16 "
          f"{res['ours', 'bf16'] / res['reference', 'bf16']:.2f}x", flush=True)
    return res


def data_wait(n_batches: int, precision: str = "fp32") -> None:
    """run_epoch over the first ``n_batches`` of a Parquet 64x64 RGB train split (pyarrow + PNG decode)
    with the image config: the data-wait fraction with the decode inline vs in the prefetch thread."""
    import itertools
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_data import make_dataset

    from ebm.data import Prefetch
    from ebm.loop import make_optimizer, run_epoch
    from pipelines.worker.data import for_rank
    root = make_dataset(Path("/tmp/ebm-bench-data/rgb64-100MB"), 100e6)
    cfg = Config.from_dict({**IMAGE, "task": {"data_dir": str(root)}, "optim": {"precision": precision}})
    data = for_rank(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.task.x_shape, data.task.D, data.task.circular)
    opt = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(0)

    def step(x, y, e):
        return train_step(model, (x, y), cfg, epoch=e, circular=data.task.circular,
                          fixed_sigmas=data.task.fixed_sigmas, generator=g)
    finite = lambda t: bool(torch.isfinite(t).all())        # noqa: E731
    for label, wrap in (("inline", None), ("prefetch", Prefetch), ("inline", None), ("prefetch", Prefetch)):
        batches = itertools.islice(data.train_epoch(0, 0), n_batches)
        if wrap is None:
            out, _ = run_epoch(model, opt, batches, cfg, 0, step, all_finite=finite, device="cpu")
        else:
            with wrap(batches) as it:
                out, _ = run_epoch(model, opt, it, cfg, 0, step, all_finite=finite, device="cpu")
        print(f"data wait, {precision} image step, {n_batches} batches of {cfg.optim.batch_size} from Parquet: "
              f"{label:<8} data_wait_frac {out['data_wait_frac']:.3f}  {out['examples_per_s']:.1f} ex/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--data-wait", action="store_true", help="also measure the loop's data wait, inline vs prefetch")
    ap.add_argument("--only", default="", help="comma-separated: toy,image,frozen,slim,wait (default: all steps)")
    args = ap.parse_args()
    from pipelines.worker.runtime import tune_malloc
    tuned = tune_malloc()       # process-wide: applies to both forms alike
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuned: {tuned}; "
          f"matmul 1024^3: {matmul_gflops():.1f} GFLOP/s")
    only = set(args.only.split(",")) if args.only else {"toy", "image", "frozen", "slim"}
    if "toy" in only:
        bench("toy2 (M=1024, B=32)", Config(), (1,), reps * 3)
    if "image" in only:
        bench("image resnet18 64x64 (M=1024)", Config.from_dict(IMAGE), (3, 64, 64), reps)
    if "frozen" in only:
        frozen = Config.from_dict({**IMAGE, "schedule": {"freeze_backbone_epochs": 20}})
        bench("  same, backbone frozen", frozen, (3, 64, 64), reps)
    if "slim" in only:
        slim = Config.from_dict({**IMAGE, "features": {"kind": "resnet_slim", "width": 16}})
        bench("image resnet_slim 32x32 (M=1024)", slim, (1, 32, 32), reps)
    if args.data_wait or "wait" in only:
        data_wait(8 if args.quick else 20)


if __name__ == "__main__":
    main()
