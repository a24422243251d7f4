"""The Ray Train worker function: the one loop (:func:`ebm.loop.train`) given a Ray runtime — the
glue a Ray Train example has (Ray calls stay in this module).

Rank 0 reports a checkpoint every epoch (the format of :mod:`ebm.checkpoint`, plus the epoch's
density plot for the driver to log); a restarted worker group, or a rerun of the same run name,
continues from the latest one. A run that cannot go on (:class:`ebm.loop.TrainingFailed`) ends with a
last report carrying ``failure`` — not an exception, since a retry would only repeat it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

PLOTS_DIR = "plots"
FAILURE_KEY = "failure"
CKPT_PREFIX = "ebm-ckpt-"       # + "<pid>-": a report's temporary checkpoint directory


class RayRuntime:
    """:class:`ebm.loop.Runtime` inside a Ray Train worker: DDP via ``prepare_model``, gloo/NCCL
    collectives, reports to Ray Train."""

    def __init__(self, val_split=None):
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.val_split = val_split
        self.quiet = False          # -q: no per-epoch lines

    def wrap(self, step, find_unused_parameters: bool):
        import ray.train.torch
        return ray.train.torch.prepare_model(step, parallel_strategy_kwargs={"find_unused_parameters":
                                                                               find_unused_parameters})

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def report(self, row: dict, state: dict | None, model) -> None:
        import ray.train
        from ebm import checkpoint
        metrics = {k: float(v) for k, v in row.items()}
        if state is None:
            ray.train.report(metrics)
            return
        # Ray copies it to storage (sync upload); removed after, or by the next worker if this one is killed
        with tempfile.TemporaryDirectory(prefix=f"{CKPT_PREFIX}{os.getpid()}-") as d:
            checkpoint.save(d, state)
            if row.get("validated"):
                density_plot(model, state, self.val_split, Path(d))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def log(self, line: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(line, flush=True)


def remove_orphaned_checkpoints() -> int:
    """Remove the temporary checkpoint directories of workers that were killed while reporting (Ray
    kills the surviving workers of a group it restarts): those whose process is gone. -> how many."""
    import shutil
    n = 0
    for d in Path(tempfile.gettempdir()).glob(f"{CKPT_PREFIX}*-*"):
        pid = d.name[len(CKPT_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue                    # alive (another run's worker on this node)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue                    # alive, another user's
        shutil.rmtree(d, ignore_errors=True)
        n += 1
    return n


def density_plot(model, state: dict, val, d: Path) -> None:
    """The epoch's density plot of fixed validation examples (1-D targets), beside the weights; the
    driver side logs it to MLflow (workers never talk to MLflow)."""
    from ebm.tasks import TaskSpec
    task = TaskSpec.from_dict(state["task"])
    if val is None or task.D != 1:
        return
    from pipelines.plots import density_figure
    epoch = state["epoch"]
    (d / PLOTS_DIR).mkdir(exist_ok=True)
    density_figure(model, task, val, d / PLOTS_DIR / f"density_epoch{epoch:03d}.png", title=f"epoch {epoch + 1}")


def train_worker(config: dict, runtime_factory=RayRuntime) -> None:
    """Ray Train worker: ``config = {"cfg": flat config, "threads": int, "max_nonfinite_in_row": int,
    "ray_data": bool, "resume_from": checkpoint directory or None}``. ``runtime_factory(val_split)`` builds the runtime (tests wrap it to inject
    faults)."""
    import logging

    import ray.train

    from ebm import checkpoint
    from ebm.config import Config
    from ebm.loop import NOT_VALIDATED, TrainingFailed, train
    from pipelines.data.layout import DatasetChanged
    from pipelines.worker.data import for_rank
    from pipelines.worker.runtime import tune_malloc

    tune_malloc()
    remove_orphaned_checkpoints()
    # Ray Train logs every report at INFO, which drowns the one progress line per epoch; its report
    # logger is named by its file's path, so Train's own log-level filter (ray.train.*) misses it
    from ray.train.v2._internal.execution import context as train_context
    level = getattr(logging, str(config.get("log_level") or "WARNING").upper(), logging.WARNING)
    for name in ("ray.train", "ray.train.v2._internal.execution.storage", train_context.__file__):
        logging.getLogger(name).setLevel(level)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    cfg = Config.from_flat(config["cfg"])
    ctx = ray.train.get_context()
    data = for_rank(cfg, ctx.get_world_rank(), ctx.get_world_size(),
                    ray.train.get_dataset_shard("train") if config.get("ray_data") else None, config.get("data_meta"))
    rt = runtime_factory(data.eval_splits.get("val"))
    rt.quiet = bool(config.get("quiet"))
    # Ray's own checkpoint (the latest it registered for this run name: a restarted worker group, or a
    # rerun), or the one the driver chose for --resume (e.g. of epochs trained --local): the later wins
    found = []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            found.append(checkpoint.load(d))
    if config.get("resume_from"):
        found.append(_load_uri(config["resume_from"]))
    resume = max(found, key=lambda s: s["epoch"]) if found else None
    try:
        train(cfg, data, rt, resume, max_nonfinite_in_row=int(config.get("max_nonfinite_in_row") or 20))
    except (TrainingFailed, DatasetChanged) as e:
        # TrainingFailed: every rank gets here at the same step (the decision was all-reduced);
        # DatasetChanged: a retry would read the changed data again
        rt.log(f"stopping: {e}")
        ray.train.report({FAILURE_KEY: str(e), "val_nll": NOT_VALIDATED})   # Tune checks its metric in every report


def _load_uri(where: str) -> dict:
    """A checkpoint directory given as a local path or a URI (``s3://…``)."""
    import io

    from ebm import checkpoint
    from pipelines import storage
    return checkpoint.loads(io.BytesIO(storage.read_bytes(storage.join(where, checkpoint.CKPT_FILE))), where=where)


def worker_loop(config: dict) -> None:
    """The production worker function (what ``TorchTrainer`` runs)."""
    train_worker(config)
