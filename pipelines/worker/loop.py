"""The worker function: the one loop (:func:`ebm.loop.train`) given a runtime — the glue a Ray
Train example has (Ray calls stay in this module and in the runtimes).

:func:`worker_loop` runs in every Ray Train worker (with :class:`RayRuntime`) and, for a 1-worker
Tune trial, in the trial's own process (with the trial's runtime, :class:`pipelines.driver.tune.TrialRuntime`):
the same set-up, data, resume and failure handling either way. Rank 0 reports a checkpoint every
epoch (the format of :mod:`ebm.checkpoint`, plus the epoch's density plot for the driver to log); a
restarted worker group, or a rerun of the same run name, continues from the latest one. A run that
cannot go on (:class:`ebm.loop.TrainingFailed`) ends with a last report carrying ``failure`` — not
an exception, since a retry would only repeat it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ebm.loop import Runtime

PLOTS_DIR = "plots"
FAILURE_KEY = "failure"
CKPT_PREFIX = "ebm-ckpt-"       # + "<pid>-": a report's temporary checkpoint directory


class RayRuntime(Runtime):
    """:class:`ebm.loop.Runtime` inside a Ray Train worker: DDP via ``prepare_model`` (with the
    gradient communication hook of ``optim.grad_comm``), gloo/NCCL collectives, reports to Ray Train.
    Besides the loop's interface, the worker function asks it for the Ray Data shard
    (:meth:`dataset_shard`), the checkpoint to continue from (:meth:`restored`) and where a run that
    cannot go on reports why (:meth:`report_failure`)."""

    def __init__(self, log_level: str | None = None, val_split=None):
        import logging

        import ray.train
        import ray.train.torch
        # Ray Train logs every report at INFO, which drowns the one progress line per epoch; its report
        # logger is named by its file's path, so Train's own log-level filter (ray.train.*) misses it
        from ray.train.v2._internal.execution import context as train_context
        level = getattr(logging, str(log_level or "WARNING").upper(), logging.WARNING)
        for name in ("ray.train", "ray.train.v2._internal.execution.storage", train_context.__file__):
            logging.getLogger(name).setLevel(level)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.val_split = val_split
        self.quiet = False          # -q: no per-epoch lines
        self.grad_comm = "fp32"     # optim.grad_comm (set by the worker function)

    def wrap(self, step, find_unused_parameters: bool):
        """DDP over ``step`` (world > 1); called again at a phase boundary, so the hook is registered on
        every model it builds."""
        import ray.train.torch
        model = ray.train.torch.prepare_model(step, parallel_strategy_kwargs={"find_unused_parameters":
                                                                                find_unused_parameters})
        register_comm_hook(model, self.grad_comm)
        return model

    def dataset_shard(self, name: str):
        import ray.train
        return ray.train.get_dataset_shard(name)

    def restored(self) -> dict | None:
        """Ray's own checkpoint: the latest it registered for this run name (a restarted worker group,
        or a rerun)."""
        import ray.train

        from ebm import checkpoint
        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return None
        with ckpt.as_directory() as d:
            return checkpoint.load(d)

    def report_failure(self, row: dict) -> None:
        import ray.train
        ray.train.report(row)

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


def register_comm_hook(model, grad_comm: str) -> None:
    """``optim.grad_comm = "bf16"``: DDP all-reduces each gradient bucket in bfloat16 (half the bytes),
    divided by the world size first, and copies the sum back into the fp32 gradients before the
    optimiser sees them. On NCCL this is PyTorch's ``bf16_compress_hook``. torch refuses to register
    that hook by name without CUDA + NCCL, although gloo reduces bfloat16 tensors; on gloo (CPU) the
    same library function, :func:`default_hooks._compress_hook` with ``torch.bfloat16``, is
    registered under another name. A model that is not DDP (one worker) communicates nothing."""
    if grad_comm == "fp32" or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    if grad_comm != "bf16":
        raise ValueError(f"optim.grad_comm = {grad_comm!r}: no DDP communication hook for it (fp32, bf16)")
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    model.register_comm_hook(None, default_hooks.bf16_compress_hook if dist.get_backend() == "nccl"
                             else bf16_allreduce_hook)


def bf16_allreduce_hook(process_group, bucket):
    """``bf16_compress_hook`` for backends other than NCCL (see :func:`register_comm_hook`)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


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


def train_worker(config: dict, runtime: Runtime | None = None) -> dict:
    """The worker function's body. ``config = {"cfg": flat config, "threads": int, "max_nonfinite_in_row":
    int, "ray_data": bool, "resume_from": checkpoint directory or None, "data_meta": dict or None,
    "log_level": str, "quiet": bool}`` (:func:`pipelines.driver.train_job.worker_config`).
    ``runtime``: a :class:`RayRuntime` (built here, inside a Ray Train worker) or any runtime with
    ``dataset_shard``, ``restored`` and ``report_failure`` (a 1-worker Tune trial's). Returns the last
    epoch's row, or ``{FAILURE_KEY: reason, ...}`` for a run that could not go on."""
    from ebm.config import Config
    from ebm.loop import NOT_VALIDATED, TrainingFailed, train
    from pipelines.data.layout import DatasetChanged
    from pipelines.worker.data import for_rank
    from pipelines.worker.runtime import tune_malloc

    tune_malloc()
    remove_orphaned_checkpoints()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    rt = runtime if runtime is not None else RayRuntime(config.get("log_level"))
    cfg = Config.from_flat(config["cfg"])
    rt.grad_comm = cfg.optim.grad_comm
    data = for_rank(cfg, rt.rank, rt.world, rt.dataset_shard("train") if config.get("ray_data") else None,
                    config.get("data_meta"))
    rt.val_split = data.eval_splits.get("val")
    rt.quiet = bool(config.get("quiet"))
    # the runtime's own checkpoint (Ray's latest for this run name, or the trial's latest in storage),
    # or the one the driver chose for --resume (e.g. of epochs trained --local): the later wins
    found = [s for s in (rt.restored(),) if s is not None]
    if config.get("resume_from"):
        found.append(_load_uri(config["resume_from"]))
    resume = max(found, key=lambda s: s["epoch"]) if found else None
    try:
        return dict(train(cfg, data, rt, resume, max_nonfinite_in_row=int(config.get("max_nonfinite_in_row") or 20)).last)
    except (TrainingFailed, DatasetChanged) as e:
        # TrainingFailed: every rank gets here at the same step (the decision was all-reduced);
        # DatasetChanged: a retry would read the changed data again
        rt.log(f"stopping: {e}")
        row = {FAILURE_KEY: str(e), "val_nll": NOT_VALIDATED}     # Tune checks its metric in every report
        rt.report_failure(row)
        return row


def _load_uri(where: str) -> dict:
    """A checkpoint directory given as a local path or a URI (``s3://…``)."""
    import io

    from ebm import checkpoint
    from pipelines import storage
    return checkpoint.loads(io.BytesIO(storage.read_bytes(storage.join(where, checkpoint.CKPT_FILE))), where=where)


def worker_loop(config: dict, runtime: Runtime | None = None) -> dict:
    """The production worker function: what ``TorchTrainer`` runs (``runtime`` None: a
    :class:`RayRuntime`), and what a 1-worker Tune trial runs in its own process."""
    return train_worker(config, runtime)
