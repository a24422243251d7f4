"""Step benchmark: examples/s of the learned-proposal train step vs a straightforward reference form.

The reference form is what the released code does: features replicated per sample and concatenated
with the y-embedding before the first joint layer, and mixture densities computed exp-then-log.
Both run in this process, side by side, on the same weights and batch; the ratio is the figure.
Also prints the achieved GFLOP/s of each step (FLOPs counted by torch's FlopCounterMode) against
this machine's measured matmul GFLOP/s.

    python bench/bench_step.py            # toy and image configs, M = 1024 (paper heads)
    python bench/bench_step.py --quick    # fewer repetitions
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
from ebm.steps import train_step

IMAGE = {"features": {"kind": "resnet18", "width": 64},
         "energy": {"y_embed": [16, 32, 64, 128], "hidden": 512, "residual_blocks": 0},
         "proposal": {"K": 4}, "sampler": {"M_train": 1024}}


def reference_step(model, batch, cfg, epoch=0):
    """The released code's step: concatenated first layer, exp-then-log mixture densities."""
    x, y = batch
    enc = model.encode(x, freeze_backbone=epoch < cfg.schedule.freeze_backbone_epochs)
    mix = model.propose(enc)
    ys = mix.sample(cfg.sampler.M_train)
    y_all = torch.cat([y.unsqueeze(1), ys], 1)                                  # (B, 1+M, D)
    sig = torch.exp(0.5 * mix.log_sigma2)
    w = torch.softmax(mix.logits, -1)
    dens = torch.exp(torch.distributions.Normal(mix.means.unsqueeze(1), sig.unsqueeze(1))
                     .log_prob(y_all.unsqueeze(2))).prod(-1)                   # (B, 1+M, K)
    logq = torch.log((w.unsqueeze(1) * dens).sum(-1))
    f = model.energy_head.forward_concat(enc.h_energy, y_all)
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
    torch.manual_seed(0)
    model = build_model(cfg, x_shape, 1, (False,))
    B = cfg.optim.batch_size
    batch = (torch.randn(B, *x_shape), torch.randn(B, 1))
    # check both forms compute the same loss on the same samples before timing them
    torch.manual_seed(1)
    l_ref = reference_step(model, batch, cfg, epoch)[0].item()
    torch.manual_seed(1)
    l_ours = ours_step(model, batch, cfg, epoch)[0].item()
    assert math.isclose(l_ref, l_ours, rel_tol=1e-3, abs_tol=1e-3), (l_ref, l_ours)
    res = {}
    for label, step in (("reference", reference_step), ("ours", ours_step)):
        t = time_step(step, model, batch, cfg, reps, epoch)
        fl = count_flops(step, model, batch, cfg, epoch)
        res[label] = (B / t, fl / t / 1e9, fl / 1e9)
    r, o = res["reference"], res["ours"]
    print(f"{name:<28} reference {r[0]:8.1f} ex/s ({r[2]:6.2f} GFLOP/step, {r[1]:5.1f} GFLOP/s) | "
          f"ours {o[0]:8.1f} ex/s ({o[2]:6.2f} GFLOP/step, {o[1]:5.1f} GFLOP/s) | speed-up {o[0] / r[0]:.2f}x")
    return o[0] / r[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    from pipelines.worker.runtime import tune_malloc
    tuned = tune_malloc()       # process-wide: applies to both forms alike
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 10
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, malloc tuned: {tuned}; "
          f"matmul 1024^3: {matmul_gflops():.1f} GFLOP/s")
    bench("toy2 (M=1024, B=32)", Config(), (1,), reps * 3)
    img = Config.from_dict(IMAGE)
    bench("image resnet18 64x64 (M=1024)", img, (3, 64, 64), reps)
    frozen = Config.from_dict({**IMAGE, "schedule": {"freeze_backbone_epochs": 20}})
    bench("  same, backbone frozen", frozen, (3, 64, 64), reps)
    slim = Config.from_dict({**IMAGE, "features": {"kind": "resnet_slim", "width": 16}})
    bench("image resnet_slim 32x32 (M=1024)", slim, (1, 32, 32), reps)


if __name__ == "__main__":
    main()
