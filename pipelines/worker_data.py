"""Where a training worker's data comes from: the task's in-memory generator (``task.data_dir = ""``)
or a Parquet dataset in the layout of :mod:`pipelines.data` (``task.data_dir = DIR``).

Both give every rank the same number of batches per epoch (DDP needs equal step counts), a
per-(seed, epoch) order that is the same on a rerun (a retried or resumed run repeats it), and the
validation/test splits in memory for rank 0's evaluation. The Ray Data path (``get_dataset_shard``)
enters as ``dataset_shard``: the worker function makes that Ray call and passes the iterator in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ebm.config import Config, ConfigError
from ebm.tasks import TaskSpec, get_task
from ebm.train import Split, load_data

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class WorkerData:
    task: TaskSpec
    eval_splits: dict[str, Split]        # "val" / "test", whole, in memory
    train_x: torch.Tensor | None         # the whole train split's x for input standardisation (vector inputs)
    train_epoch: Callable[[int], Batches]  # this rank's batches of one epoch: x (B, ...), y (B, D)


def prepare_dataset(cfg: Config) -> tuple[Config, str]:
    """Driver side, before Ray starts: ``task.data_dir`` made absolute (workers run in other
    directories) and validated; returns (config, data fingerprint)."""
    if cfg.task.data_dir and "://" not in cfg.task.data_dir:
        import json
        from pathlib import Path
        cfg = cfg.with_overrides([f"task.data_dir={json.dumps(str(Path(cfg.task.data_dir).resolve()))}"])
    return cfg, check_dataset(cfg)


def check_dataset(cfg: Config) -> str:
    """Driver side, before Ray starts: validate ``task.data_dir`` against the config; returns the data
    fingerprint (the dataset's content hash, or a description of the generated data)."""
    if not cfg.task.data_dir:
        return f"synthetic:{cfg.task.name}:seed{cfg.task.seed}:n{cfg.task.n_train}/{cfg.task.n_val}/{cfg.task.n_test}"
    from pipelines.data import DatasetError, validate
    try:
        meta = validate(cfg.task.data_dir)
    except DatasetError as e:
        raise ConfigError(f"task.data_dir: {e}") from None
    if meta["task"] != cfg.task.name:
        raise ConfigError(f"task.data_dir holds task {meta['task']!r} but task.name is {cfg.task.name!r}")
    return meta["fingerprint"]


def for_rank(cfg: Config, rank: int, world: int, dataset_shard=None) -> WorkerData:
    """This rank's data. ``dataset_shard``: a Ray Data iterator from ``get_dataset_shard`` (Parquet
    only); without it the Parquet path reads with pyarrow, slicing rows by rank."""
    if not cfg.task.data_dir:
        return _in_memory(cfg, rank, world)
    return _parquet(cfg, rank, world, dataset_shard)


def _in_memory(cfg: Config, rank: int, world: int) -> WorkerData:
    task, splits = load_data(cfg)
    train = splits["train"]
    n_per_rank = len(train) // world
    bs = cfg.optim.batch_size

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # one permutation shared by all ranks, each taking its own contiguous slice
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = perm[rank * n_per_rank:(rank + 1) * n_per_rank]
        for s in range(0, n_per_rank, bs):
            j = idx[s:s + bs]
            yield train.x[j], train.y[j]

    return WorkerData(task, {k: v for k, v in splits.items() if k != "train"}, train.x, epoch_batches)


def read_split(root: str, split: str) -> Split:
    """A whole split of a Parquet dataset in memory (x, y, aux)."""
    from pipelines.data.readers import ParquetStream, load_aux
    xs, ys = [], []
    for x, y in ParquetStream(root, split, batch_size=4096, check=False):
        xs.append(x)
        ys.append(y)
    return Split(torch.cat(xs), torch.cat(ys), load_aux(root, split))


def input_shape(meta: dict) -> tuple[int, ...]:
    """A dataset's per-example input shape from its metadata: (C, H, W) or (d,)."""
    inp = meta["input"]
    shape = (inp["channels"], inp["height"], inp["width"]) if inp["kind"] == "image" else (inp["dim"],)
    return tuple(int(s) for s in shape)


def load_splits(cfg: Config) -> tuple[TaskSpec, dict[str, Split]]:
    """Every split of ``task.data_dir`` in memory, in the form of :func:`ebm.train.load_data` (for
    ``ebm train --local``). Train rows come in stored order: ``fit`` shuffles them each epoch. The
    dataset's train-time augmentation (``augment`` in its metadata) is applied by the streaming
    readers only; a dataset that declares one is refused here rather than trained on without it."""
    from pipelines.data import read_metadata
    root = cfg.task.data_dir
    meta = read_metadata(root)
    if meta.get("augment"):
        raise ConfigError(f"task.data_dir {root} declares train-time augmentation {meta['augment']}, which "
                          "only the streaming readers apply: train it without --local (Ray Train)")
    splits = {s: read_split(root, s) for s in ("train", "val", "test") if meta["splits"].get(s, {}).get("rows")}
    if "train" not in splits:
        raise ConfigError(f"task.data_dir {root} has no train rows")
    return parquet_task(cfg, meta), splits


def parquet_task(cfg: Config, meta: dict) -> TaskSpec:
    return dataclasses.replace(get_task(meta["task"]), x_shape=input_shape(meta))


def _parquet(cfg: Config, rank: int, world: int, dataset_shard) -> WorkerData:
    from pipelines.data import read_metadata
    from pipelines.data.readers import ParquetStream, RayStream
    root = cfg.task.data_dir
    meta = read_metadata(root)
    task = parquet_task(cfg, meta)
    evals = {s: read_split(root, s) for s in ("val", "test") if meta["splits"].get(s, {}).get("rows")}
    train_x = read_split(root, "train").x if meta["input"]["kind"] == "vector" else None
    bs = cfg.optim.batch_size
    if dataset_shard is not None:
        stream = RayStream(dataset_shard, bs)
        return WorkerData(task, evals, train_x, lambda epoch: stream)
    stream = ParquetStream(root, "train", bs, shuffle=True, seed=cfg.seed, rank=rank, world_size=world,
                           augment="default", check=False)

    def epoch_batches(epoch: int) -> ParquetStream:
        stream.epoch = epoch          # the order is a function of (seed, epoch): a resumed run repeats it
        return stream

    return WorkerData(task, evals, train_x, epoch_batches)
