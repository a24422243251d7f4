"""Where the loop's data comes from: the task's in-memory generator (``task.data_dir = ""``) or a
Parquet dataset in the layout of :mod:`pipelines.data` (``task.data_dir = DIR``), whose metadata
defines the task (:func:`ebm.tasks.task_from_metadata`) — there is no lookup by task name.

Every path (``--local``, each Ray Train rank, each Tune trial) takes its batches from
:func:`for_rank`, so the same seed gives the same order everywhere: each rank gets an equal number
of batches per epoch (DDP needs equal step counts), in a per-(seed, epoch) order that a retried or
resumed run repeats. The Ray Data path (``get_dataset_shard``) enters as ``dataset_shard``: the
worker function makes that Ray call and passes the iterator in.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ebm.config import Config, ConfigError
from ebm.data import LoopData, Split, generated_task, in_memory, load_data
from ebm.tasks import TaskSpec, task_from_metadata



def prepare_dataset(cfg: Config) -> tuple[Config, TaskSpec, str]:
    """Driver side, before Ray or MLflow: ``task.data_dir`` made absolute (workers run elsewhere) and
    validated, the task taken from the dataset (``task.name`` set to the dataset's), the model config
    checked against it. Returns (config, task, data fingerprint); ConfigError names what is wrong."""
    if not cfg.task.data_dir:
        task = generated_task(cfg)
        fingerprint = f"synthetic:{cfg.task.name}:seed{cfg.task.seed}:n{cfg.task.n_train}/{cfg.task.n_val}/{cfg.task.n_test}"
    else:
        from pipelines.data import DatasetError, validate
        root = cfg.task.data_dir if "://" in cfg.task.data_dir else str(Path(cfg.task.data_dir).resolve())
        try:
            meta = validate(root)
            task = task_from_metadata(meta)
        except (DatasetError, ValueError) as e:
            raise ConfigError(f"task.data_dir: {e}") from None
        cfg = cfg.with_overrides([f"task.data_dir={json.dumps(root)}", f"task.name={json.dumps(task.name)}"])
        fingerprint = meta["fingerprint"]
    check_model_fits(cfg, task)
    return cfg, task, fingerprint


def check_model_fits(cfg: Config, task: TaskSpec) -> None:
    """The feature net must take the task's inputs."""
    kind = cfg.features.kind
    if kind == "toy_mlp" and task.is_image:
        raise ConfigError(f"features.kind = 'toy_mlp' takes vector inputs, task {task.name!r} has images "
                          f"{task.x_shape}: use resnet18 or resnet_slim")
    if kind != "toy_mlp" and not task.is_image:
        raise ConfigError(f"features.kind = {kind!r} takes images, task {task.name!r} has vector inputs "
                          f"{task.x_shape}: use toy_mlp")
    if task.is_image and cfg.features.in_channels and cfg.features.in_channels != task.x_shape[0]:
        raise ConfigError(f"features.in_channels = {cfg.features.in_channels}, the task's images have "
                          f"{task.x_shape[0]} channel(s)")


def read_split(root: str, split: str) -> Split:
    """A whole split of a Parquet dataset in memory (x normalised per the dataset, y, aux)."""
    from pipelines.data.readers import ParquetStream, load_aux
    xs, ys = [], []
    for x, y in ParquetStream(root, split, batch_size=4096, check=False):
        xs.append(x)
        ys.append(y)
    return Split(torch.cat(xs), torch.cat(ys), load_aux(root, split))


def for_rank(cfg: Config, rank: int = 0, world: int = 1, dataset_shard=None) -> LoopData:
    """This rank's loop data. ``dataset_shard``: a Ray Data iterator from ``get_dataset_shard``
    (Parquet only); without it the Parquet path reads with pyarrow, slicing rows by rank."""
    if not cfg.task.data_dir:
        task, splits = load_data(cfg)
        return in_memory(task, splits, cfg, rank, world)
    from pipelines.data import read_metadata
    from pipelines.data.readers import ParquetStream, RayStream
    root = cfg.task.data_dir
    meta = read_metadata(root)
    task = task_from_metadata(meta)
    evals = {s: read_split(root, s) for s in ("val", "test") if meta["splits"].get(s, {}).get("rows")}
    train_x = read_split(root, "train").x if not task.is_image else None
    bs = cfg.optim.batch_size
    if dataset_shard is not None:
        stream = RayStream(dataset_shard, bs)
        return LoopData(task, evals, train_x, lambda epoch, seed: stream)
    stream = ParquetStream(root, "train", bs, shuffle=True, seed=cfg.seed, rank=rank, world_size=world,
                           augment="default", check=False)

    def epoch_batches(epoch: int, seed: int) -> ParquetStream:
        stream.seed, stream.epoch = seed, epoch    # the order is a function of (seed, epoch): a resume repeats it
        return stream

    return LoopData(task, evals, train_x, epoch_batches)
