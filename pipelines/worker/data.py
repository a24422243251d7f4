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
from dataclasses import dataclass

import torch

from ebm.config import Config, ConfigError
from ebm.data import LoopData, Split, generated_task, in_memory, load_data
from ebm.tasks import TaskSpec, task_from_metadata



@dataclass(frozen=True)
class DataIdentity:
    """The data a run trains on, fixed by the driver at the start: the fingerprint it is tagged with,
    the dataset metadata every worker checks what it reads against (None for generated data) and what
    was verified: ``"footers"`` (metadata and every shard's footer), ``"content"`` (every row
    re-hashed, ``--verify-data``) or ``"generator"`` (an in-memory task, a function of its seed)."""
    fingerprint: str
    meta: dict | None
    verified: str

    def tags(self) -> dict[str, str]:
        return {"data_fingerprint": self.fingerprint, "ebm.data_verified": self.verified}


def prepare_dataset(cfg: Config, verify_content: bool = False) -> tuple[Config, TaskSpec, DataIdentity]:
    """Driver side, before Ray or MLflow: ``task.data_dir`` made absolute (workers run elsewhere; a URI
    is kept) and validated, the task taken from the dataset (``task.name`` set to the dataset's), the
    model config checked against it, the data's identity fixed (``verify_content``: every row
    re-hashed against the stored fingerprint). ConfigError names what is wrong."""
    if not cfg.task.data_dir:
        task = generated_task(cfg)
        identity = DataIdentity(f"synthetic:{cfg.task.name}:seed{cfg.task.seed}:n{cfg.task.n_train}/"
                                f"{cfg.task.n_val}/{cfg.task.n_test}", None, "generator")
    else:
        from pipelines import storage
        from pipelines.data import DatasetError, validate
        from pipelines.data.inspect import recompute_fingerprint
        root = storage.absolute(cfg.task.data_dir)
        try:
            meta = validate(root)
            task = task_from_metadata(meta)
            if verify_content:
                got = recompute_fingerprint(root, meta)
                if got != meta["fingerprint"]:
                    raise DatasetError(f"{root}: the rows hash to {got}, the dataset's metadata says "
                                       f"{meta['fingerprint']}: its shards were edited after ingest")
        except (DatasetError, ValueError) as e:
            raise ConfigError(f"task.data_dir: {e}") from None
        cfg = cfg.with_overrides([f"task.data_dir={json.dumps(root)}", f"task.name={json.dumps(task.name)}"])
        identity = DataIdentity(meta["fingerprint"], meta, "content" if verify_content else "footers")
    check_model_fits(cfg, task)
    return cfg, task, identity


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


def read_split(root: str, split: str, meta: dict | None = None) -> Split:
    """A whole split of a Parquet dataset in memory (x normalised per the dataset, y, aux); ``meta``:
    the dataset metadata the caller holds (each shard is checked against it)."""
    from pipelines.data.readers import ParquetStream, load_aux
    xs, ys = [], []
    for x, y in ParquetStream(root, split, batch_size=4096, check=False, meta=meta):
        xs.append(x)
        ys.append(y)
    return Split(torch.cat(xs), torch.cat(ys), load_aux(root, split))


def for_rank(cfg: Config, rank: int = 0, world: int = 1, dataset_shard=None, expected: dict | None = None) -> LoopData:
    """This rank's loop data. ``dataset_shard``: a Ray Data iterator from ``get_dataset_shard``
    (Parquet only); without it the Parquet path reads with pyarrow, slicing rows by rank.
    ``expected``: the dataset metadata the driver fixed (:class:`DataIdentity`); the dataset found now
    must be that one, and every shard an epoch opens is checked again (DatasetChanged otherwise)."""
    if not cfg.task.data_dir:
        task, splits = load_data(cfg)
        return in_memory(task, splits, cfg, rank, world)
    from pipelines.data.layout import check_unchanged, read_metadata
    from pipelines.data.readers import ParquetStream, RayStream
    root = cfg.task.data_dir
    meta = check_unchanged(root, expected) if expected is not None else read_metadata(root)
    task = task_from_metadata(meta)
    evals = {s: read_split(root, s, meta) for s in ("val", "test") if meta["splits"].get(s, {}).get("rows")}
    train_x = read_split(root, "train", meta).x if not task.is_image else None
    bs = cfg.optim.batch_size
    if dataset_shard is not None:
        stream = RayStream(dataset_shard, bs)

        def ray_epoch(epoch: int, seed: int) -> RayStream:
            check_unchanged(root, meta)       # Ray Data re-reads the shards every epoch
            return stream

        return LoopData(task, evals, train_x, ray_epoch)
    stream = ParquetStream(root, "train", bs, shuffle=True, seed=cfg.seed, rank=rank, world_size=world,
                           augment="default", meta=meta)

    def epoch_batches(epoch: int, seed: int) -> ParquetStream:
        stream.seed, stream.epoch = seed, epoch    # the order is a function of (seed, epoch): a resume repeats it
        return stream

    return LoopData(task, evals, train_x, epoch_batches)
