"""Data for the loop: in-memory splits, input normalisation, and the generated tasks' batches.

A Parquet dataset reaches the loop through ``pipelines`` (pyarrow stays out of ``ebm``); the
generated tasks (toy 1, toy 2, star) are made here in memory. Either way the loop gets a
:class:`LoopData`: the same per-(seed, epoch) order on a rerun, equal step counts on every rank. The seed is an
argument of each epoch's batches, so one LoopData serves every seed of a multi-seed run.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .config import Config
from .tasks import TaskSpec, get_task, image_norm

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Split:
    """In-memory split: x float (N, ...) ready for the feature net, y (N, D), aux per-example arrays."""
    x: torch.Tensor
    y: torch.Tensor
    aux: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class LoopData:
    """What the loop trains and evaluates on, for one rank."""
    task: TaskSpec
    eval_splits: dict[str, Split]          # "val" / "test", whole, in memory
    train_x: torch.Tensor | None           # the whole train split's x, for input standardisation (vector inputs)
    train_epoch: Callable[[int, int], Batches]  # (epoch, seed) -> this rank's batches: x (B, ...), y (B, D)


def to_inputs(x: np.ndarray | torch.Tensor, task: TaskSpec | None = None) -> torch.Tensor:
    """Vector inputs: float (N, d) as is. Images: uint8 (N, C, H, W) -> float32 normalised with the
    task's statistics (the dataset's ``normalisation``), or the default rule for C channels."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        return x.float()
    mean, std = (task.norm_mean, task.norm_std) if task is not None and task.norm_mean else image_norm(x.shape[1])
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def generated_task(cfg: Config) -> TaskSpec:
    """The built-in spec of a generated task (``task.data_dir = ""``; the config has checked the name),
    with the image size the config asks for."""
    task = get_task(cfg.task.name)
    if task.is_image and cfg.task.image_size:
        task = dataclasses.replace(task, x_shape=(task.x_shape[0], cfg.task.image_size, cfg.task.image_size))
    return task


def load_data(cfg: Config) -> tuple[TaskSpec, dict[str, Split]]:
    """A generated task's splits in memory (``task.data_dir = ""``), with its built-in spec."""
    from .tasks import make_synthetic
    task = generated_task(cfg)
    n = {k: v for k, v in (("train", cfg.task.n_train), ("val", cfg.task.n_val), ("test", cfg.task.n_test)) if v}
    raw = make_synthetic(cfg.task.name, seed=cfg.task.seed, n=n or None, size=cfg.task.image_size or None)
    splits = {name: Split(to_inputs(x, task), torch.as_tensor(y, dtype=torch.float32), dict(aux or {}))
              for name, (x, y, aux) in raw.items()}
    return task, splits


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of one epoch: a function of (seed, epoch) only, shared by every rank."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def in_memory(task: TaskSpec, splits: dict[str, Split], cfg: Config, rank: int = 0, world: int = 1) -> LoopData:
    """Loop data over in-memory splits: each rank takes its contiguous slice of the epoch's permutation
    (``len(train) // world`` examples, so every rank runs the same number of steps)."""
    train = splits["train"]
    n_per_rank = len(train) // world
    bs = cfg.optim.batch_size

    def epoch_batches(epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = epoch_permutation(len(train), seed, epoch)[rank * n_per_rank:(rank + 1) * n_per_rank]
        for s in range(0, n_per_rank, bs):
            j = idx[s:s + bs]
            yield train.x[j], train.y[j]

    return LoopData(task, {k: v for k, v in splits.items() if k != "train"},
                    train.x if not task.is_image else None, epoch_batches)


class Prefetch:
    """Iterate ``batches`` in a background thread, ``depth`` items ahead (a bounded queue), so the next
    batch's decode (pyarrow, Pillow, numpy: they release the GIL) overlaps the current step.

    ``with Prefetch(batches) as it: for x, y in it: ...`` — an error in the producer is raised in the
    consumer at the item where it happened; leaving the ``with`` (the epoch ended, early or by an
    exception) stops the producer and joins it. The items and their order are those of ``batches``.
    """

    _END = object()

    def __init__(self, batches: Iterable, depth: int = 2):
        self._source, self._q = batches, queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="ebm-prefetch", daemon=True)
        self._started = False

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        it = iter(self._source)
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:      # handed to the consumer, raised there
            self._put(_Raised(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> "Prefetch":
        return self

    def __iter__(self) -> Iterator:
        if not self._started:
            self._started = True
            self._thread.start()
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join()


@dataclass
class _Raised:
    error: BaseException
