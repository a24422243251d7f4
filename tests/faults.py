"""Fault injection for the tests, and only here: worker and trial functions that wrap the production
ones (``pipelines.worker.loop.worker_loop``, ``pipelines.driver.tune.train_trial``) and tamper with
the batches a rank sees. Production code has no hook for this; a test puts these functions where
Ray looks for the worker function (monkeypatch, or :mod:`fault_driver` for a subprocess) and
registers this module to be pickled by value, so Ray's workers need not import ``tests``.

faults (a dict):
    fail_at_epoch, fail_marker    rank 0 raises once (the marker file records it) as that epoch starts
    nan_rank, nan_from_epoch      on rank ``nan_rank`` the first batch of every epoch gets NaN targets,
                                  and every batch from epoch ``nan_from_epoch`` on
    pause_at_epoch, pause_marker  every rank holds ``pause_s`` seconds as that epoch starts (once per
                                  marker), so a test can kill the driver at a known checkpoint
"""
from __future__ import annotations

import time
from pathlib import Path


def register_by_value() -> None:
    import sys

    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _tampered(batches, faults: dict, rank: int, epoch: int):
    marker = faults.get("pause_marker")
    if marker and int(faults.get("pause_at_epoch", -1)) == epoch and not Path(marker).exists():
        Path(marker).write_text("paused")
        time.sleep(float(faults.get("pause_s", 120)))
    fired = faults.get("fail_marker")
    if rank == 0 and int(faults.get("fail_at_epoch", -1)) == epoch and fired and not Path(fired).exists():
        Path(fired).write_text("fired")
        raise RuntimeError(f"injected failure at epoch {epoch}")
    if int(faults.get("nan_rank", -1)) != rank:
        yield from batches
        return
    import torch
    from_epoch = int(faults.get("nan_from_epoch", 1 << 30))
    for i, (x, y) in enumerate(batches):
        yield x, (torch.full_like(y, float("nan")) if i == 0 or epoch >= from_epoch else y)


def install(faults: dict) -> None:
    """In this process: every ``for_rank`` hands out tampered batches."""
    import pipelines.worker.data as wd
    original = getattr(wd.for_rank, "original", wd.for_rank)

    def for_rank(cfg, rank=0, world=1, dataset_shard=None, expected=None):
        data = original(cfg, rank, world, dataset_shard, expected)
        inner = data.train_epoch
        data.train_epoch = lambda epoch, seed: _tampered(inner(epoch, seed), faults, rank, epoch)
        return data

    for_rank.original = original
    wd.for_rank = for_rank


def worker_with_faults(faults: dict):
    """A worker function (TorchTrainer's, or an in-process trial's): the production one, with
    ``faults`` installed in the process that trains."""
    def worker(config: dict, runtime=None) -> dict:
        install(faults)
        from pipelines.worker.loop import train_worker
        return train_worker(config, runtime)
    return worker


def trial_with_faults(faults: dict, trial_suffix: str):
    """A Tune trainable: the production trial, whose worker function (in a Train worker, or in the
    trial's own process) gets ``faults`` when the trial id ends with ``trial_suffix``."""
    def train_trial(config: dict, job: dict) -> None:      # Tune's restore matches trainables by name
        import ray.tune

        import pipelines.worker.loop as loop
        from pipelines.driver import tune
        if ray.tune.get_context().get_trial_id().endswith(trial_suffix):
            loop.worker_loop = worker_with_faults(faults)
        original = getattr(tune.train_trial, "original", tune.train_trial)
        original(config, job)
    return train_trial
