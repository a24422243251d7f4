"""Real collectives without Ray: N processes on 127.0.0.1 joined by torch.distributed (gloo), each
running a function of (rank, world). :class:`GlooRuntime` is :class:`ebm.loop.Runtime` over that
process group, with DDP as the data-parallel wrapper (what ``ray.train.torch.prepare_model`` builds);
its comm hook counts the gradient elements each rank sends per optimiser step."""
from __future__ import annotations

import os
import pickle
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ebm.loop import Runtime


class GlooRuntime(Runtime):
    def __init__(self, rank: int, world: int):
        super().__init__("cpu", quiet=True)
        self.rank, self.world = rank, world
        self.rows, self.sent, self.wrapped_trainable = [], [], []

    def wrap(self, step, find_unused_parameters: bool):
        self.wrapped_trainable.append(sum(p.numel() for p in step.parameters() if p.requires_grad))
        ddp = torch.nn.parallel.DistributedDataParallel(step, find_unused_parameters=find_unused_parameters)
        ddp.register_comm_hook(self.sent, _counting_allreduce)
        return ddp

    def all_reduce(self, t, op="sum"):
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t

    def gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def report(self, row, state, model):
        self.rows.append(dict(row))
        self.last_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _counting_allreduce(sent: list, bucket):
    sent.append(bucket.buffer().numel())
    fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` in ``world`` spawned processes joined by gloo -> the results in rank
    order (``fn`` must be importable: a module-level function)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, _free_port(), d, fn, args), nprocs=world, join=True)
        out = []
        for r in range(world):
            with open(os.path.join(d, f"{r}.pkl"), "rb") as f:
                out.append(pickle.load(f))
        return out
