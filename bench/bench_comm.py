"""Bytes all-reduced per optimiser step by a 2-worker Ray Train job on CPU (gloo), measured (issue 15).

    python bench/bench_comm.py [--features resnet18] [--image-size 64]

Runs the production job (``run_job``, 2 workers) once per option, on the paper's image model
(ResNet-18 features, the paper's energy head, K = 4) with a tiny generated star dataset — the bytes
per step depend on the parameters, not on the batch or M:

- ``fp32``: DDP's default (each gradient bucket all-reduced in fp32);
- ``bf16``: ``optim.grad_comm = "bf16"`` (the compression hook the runtime registers);
- ``frozen``: ``schedule.freeze_backbone_epochs = 1``: epoch 1 trains with the backbone frozen,
  epoch 2 with it trained (both reported);
- ``accumulate``: ``optim.accumulate = 2`` (two micro-batches per optimiser step).

It then applies ``docs/scaling.md``'s model to the measured bytes (:func:`scaling_table`): the
smallest per-worker batch at which 8 and 64 GPUs reach 80 % scaling efficiency for each option.

Counting happens in the workers and only in this bench: the worker function is wrapped from
outside (pickled by value) so that every ``torch.distributed.all_reduce`` call is counted (tensor
bytes), split into gradient buckets (calls made from inside the DDP communication hook) and the
loop's own collectives (non-finite flag, epoch metrics, evaluation). DDP's built-in fp32 reduction is
C++ and invisible to Python, so for ``fp32`` the bench registers PyTorch's ``allreduce_hook`` (the
documented Python equivalent of the built-in) wrapped the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

OPTIONS = {"fp32": [], "bf16": ["optim.grad_comm=\"bf16\""], "frozen": ["schedule.freeze_backbone_epochs=1"],
           "accumulate": ["optim.accumulate=2"]}


def counting_worker(out_path: str):
    """The production worker function with all-reduce counting installed in its process."""
    def worker(config: dict, runtime=None):
        import torch
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        import pipelines.worker.loop as loop
        counts = {"grad_bytes": 0, "other_bytes": 0, "grad_calls": 0, "other_calls": 0}
        in_hook = []
        all_reduce = dist.all_reduce

        def counted_all_reduce(tensor, *a, **kw):
            kind = "grad" if in_hook else "other"
            counts[f"{kind}_bytes"] += tensor.numel() * tensor.element_size()
            counts[f"{kind}_calls"] += 1
            return all_reduce(tensor, *a, **kw)
        dist.all_reduce = counted_all_reduce

        def counted(hook):
            def counted_hook(state, bucket):
                in_hook.append(1)
                try:
                    return hook(state, bucket)
                finally:
                    in_hook.pop()
            return counted_hook

        ddp = torch.nn.parallel.DistributedDataParallel
        register = ddp.register_comm_hook

        def register_counted(self, state, hook):
            self._bench_hooked = True
            return register(self, state, counted(hook))
        ddp.register_comm_hook = register_counted
        production = loop.register_comm_hook

        def register_comm_hook(model, grad_comm):
            production(model, grad_comm)
            if isinstance(model, ddp) and not getattr(model, "_bench_hooked", False):
                model.register_comm_hook(None, default_hooks.allreduce_hook)     # fp32: DDP's built-in, in Python
        loop.register_comm_hook = register_comm_hook
        report = loop.RayRuntime.report
        epochs = []

        def counting_report(self, row, state, model):
            epochs.append({"epoch": int(row["epoch"]), "steps": row["steps"], **counts})
            for k in counts:
                counts[k] = 0
            if self.rank == 0:
                Path(out_path).write_text(json.dumps(epochs))
            return report(self, row, state, model)
        loop.RayRuntime.report = counting_report
        return loop.train_worker(config, runtime)
    return worker


def measure(name: str, cfg, tmp: str) -> list[dict]:
    import pipelines.worker.loop as loop
    from pipelines.driver.train_job import run_job
    out = f"{tmp}/{name}.json"
    production = loop.worker_loop
    loop.worker_loop = counting_worker(out)
    try:
        run_job(cfg, name=f"comm-{name}-{time.time_ns()}", num_workers=2, storage_path=f"{tmp}/runs",
                tracking_uri=f"sqlite:///{tmp}/mlruns.db", cpus_per_worker=1.0, threads=1)
    finally:
        loop.worker_loop = production
    return json.loads(Path(out).read_text())


# docs/scaling.md's assumptions (see there): link, ring latency, GPU rate, DDP overlap overhead
LINK_BYTES_S = 1.1e9            # 10 Gbit/s per node, usable
HOP_LATENCY_S = 50e-6           # per ring hop
GFLOP_PER_EXAMPLE = 1.34        # measured (bench_step.py, FlopCounterMode): ResNet-18 64x64, M = 1024
GPU_FLOP_S = 11e12              # A10G at 35 % of its fp32 peak
BACKBONE_SHARE = 2 / 3          # of a step's FLOPs (issue 15, bench_step.py); frozen: its backward (2/3 of it) is skipped
OVERLAP_OVERHEAD = 1.1          # DDP overlaps the all-reduce with the backward: max(compute, comm) + 10 %


def allreduce_s(nbytes: float, buckets: float, n: int) -> float:
    """Ring all-reduce of ``nbytes`` in ``buckets`` calls over ``n`` workers: 2(N-1)/N of the bytes
    through each link, and 2(N-1) hops of latency per call."""
    return 2 * (n - 1) / n * nbytes / LINK_BYTES_S + buckets * 2 * (n - 1) * HOP_LATENCY_S


def efficiency(b: int, n: int, nbytes: float, buckets: float, per_example_s: float, k: int = 1) -> float:
    """Throughput of n workers / (n x one worker) at per-worker micro-batch b and k micro-batches per
    optimiser step: the first k-1 backward passes communicate nothing (no_sync), the last overlaps
    its all-reduce."""
    compute = b * per_example_s
    step = (k - 1) * compute + OVERLAP_OVERHEAD * max(compute, allreduce_s(nbytes, buckets, n))
    return k * compute / step


def batch_for(target: float, n: int, nbytes: float, buckets: float, per_example_s: float, k: int = 1) -> int | None:
    """The smallest per-worker (micro-)batch reaching ``target`` efficiency (None: never, below 1/overhead)."""
    for b in range(1, 1 << 16):
        if efficiency(b, n, nbytes, buckets, per_example_s, k) >= target:
            return b
    return None


def scaling_table(options: dict[str, tuple[float, float, float, int]]) -> list[str]:
    """``options``: name -> (gradient bytes per optimiser step, buckets, FLOP share of a full step, k)."""
    per_example = GFLOP_PER_EXAMPLE * 1e9 / GPU_FLOP_S
    lines = ["| option | MB all-reduced / step | 8 GPUs: batch for 80 % | 64 GPUs: batch for 80 % | "
             "efficiency at batch 32 (8 / 64 GPUs) |", "| --- | --- | --- | --- | --- |"]
    for name, (nbytes, buckets, share, k) in options.items():
        c = per_example * share
        b8, b64 = (batch_for(0.8, n, nbytes, buckets, c, k) for n in (8, 64))
        e8, e64 = (efficiency(32, n, nbytes, buckets, c, k) for n in (8, 64))
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {b8} | {b64} | {e8:.0%} / {e64:.0%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", default="resnet18")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--save", default="", help="write the per-epoch counts to this JSON file")
    ap.add_argument("--load", default="", help="print the counts (and the model) of a --save file, running nothing")
    args = ap.parse_args()
    import ray

    from ebm.config import Config
    from ebm.nets import build_model
    from pipelines.worker.data import prepare_dataset
    base = Config.from_dict({
        "task": {"name": "star", "image_size": args.image_size, "n_train": 64, "n_val": 16, "n_test": 16},
        "features": {"kind": args.features, "width": args.width},
        "energy": {"y_embed": [16, 32, 64, 128], "hidden": 512, "residual_blocks": 0},
        "proposal": {"K": 4}, "sampler": {"M_train": 8, "M_eval": 16, "refine_steps": 0},
        "optim": {"batch_size": 8, "epochs": 2}, "eval": {"every": 2, "batch_size": 16}}).with_overrides(args.set)
    _, task, _ = prepare_dataset(base)
    model = build_model(base, task.x_shape, task.D, task.circular)
    n_params = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.feature_net.parameters()) if hasattr(model, "feature_net") else 0
    if args.load:
        report(args, json.loads(Path(args.load).read_text()), n_params, backbone)
        return
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=200 * 1024 ** 2, log_to_driver=False, logging_level="ERROR")
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.options.split(","):
                results[name] = measure(name, base.with_overrides(OPTIONS[name]), tmp)
    finally:
        ray.shutdown()
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1))
    report(args, results, n_params, backbone)


def report(args, results: dict, n_params: int, backbone: int) -> None:
    print(f"{args.features} (width {args.width}) {args.image_size}x{args.image_size}, paper energy head, K=4: "
          f"{n_params / 1e6:.2f} M parameters ({backbone / 1e6:.2f} M in the backbone) = "
          f"{4 * n_params / 1e6:.1f} MB of fp32 gradients; 2 workers, gloo; per optimiser step, rank 0:")
    fp32 = None
    for name, epochs in results.items():
        for e in epochs:
            steps = max(e["steps"], 1)
            grad = e["grad_bytes"] / steps
            fp32 = fp32 or (grad if name == "fp32" else None)
            phase = {"frozen": " (backbone frozen)" if e["epoch"] == 0 else " (backbone trained)"}.get(name, "")
            ratio = f"{grad / fp32:.3f}x fp32" if fp32 else ""
            print(f"  {name:10s} epoch {e['epoch'] + 1}{phase:20s} gradients {grad / 1e6:8.2f} MB in "
                  f"{e['grad_calls'] / steps:4.1f} buckets  {ratio:12s} other collectives "
                  f"{e['other_bytes'] / steps:6.0f} B/step (incl. evaluation)")
    if "fp32" not in results:
        return
    # the backbone-frozen epoch for "frozen"; else the last epoch (DDP has rebuilt its buckets by then)
    chosen = {name: epochs[0] if name == "frozen" else epochs[-1] for name, epochs in results.items()}
    per_step = {name: (e["grad_bytes"] / max(e["steps"], 1), e["grad_calls"] / max(e["steps"], 1))
                for name, e in chosen.items()}
    frozen_share = (1 - BACKBONE_SHARE) + BACKBONE_SHARE / 3
    model = {"fp32": (*per_step["fp32"], 1.0, 1)}
    if "bf16" in per_step:
        model["bf16 hook"] = (*per_step["bf16"], 1.0, 1)
    if "frozen" in per_step:
        model["frozen backbone"] = (*per_step["frozen"], frozen_share, 1)
        if "bf16" in per_step:
            ratio = per_step["bf16"][0] / per_step["fp32"][0]
            # not run: the frozen epoch's bytes at the bf16 hook's measured ratio
            model["frozen backbone + bf16 (derived)"] = (per_step["frozen"][0] * ratio, per_step["frozen"][1], frozen_share, 1)
    acc_bytes = per_step.get("accumulate", per_step["fp32"])    # per optimiser step: k micro-batches, one all-reduce
    for k in (4, 8):
        model[f"fp32, accumulate k={k} (batch = micro-batch)"] = (*acc_bytes, 1.0, k)
    if "bf16" in per_step:
        model["bf16 hook, accumulate k=4"] = (acc_bytes[0] * per_step["bf16"][0] / per_step["fp32"][0], acc_bytes[1], 1.0, 4)
    print(f"\nscaling model (docs/scaling.md): {GFLOP_PER_EXAMPLE} GFLOP/example at {GPU_FLOP_S / 1e12:.0f} TFLOP/s "
          f"= {GFLOP_PER_EXAMPLE * 1e9 / GPU_FLOP_S * 1e6:.0f} us/example (frozen backbone x{frozen_share:.2f}); "
          f"{LINK_BYTES_S / 1e9} GB/s links, {HOP_LATENCY_S * 1e6:.0f} us per hop; step = (k-1) x compute + "
          f"{OVERLAP_OVERHEAD} x max(compute, all-reduce)")
    print("\n".join(scaling_table(model)))


if __name__ == "__main__":
    main()
