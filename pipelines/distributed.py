"""The main job on Ray Train: a TorchTrainer whose one worker function is the single-process loop
with DDP around the step (STYLE.md §8: Ray calls stay in this function).

Seed discipline: every rank builds the model from the same seed (DDP also broadcasts rank 0's
weights), standardises inputs with statistics of the whole train split, and sees its own slice of
one shared per-epoch permutation (equal step counts on all ranks); proposal sampling uses a
per-rank generator. Checkpoints are written every epoch by rank 0 and carry the full config,
optimiser, epoch, RNG states and versions, so a restarted worker group or a rerun with the same
run name continues from the latest one.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CKPT_FILE = "checkpoint.pt"
REQUIRED_KEYS = ("model", "optimizer", "epoch", "config", "rng")
PLOTS_DIR = "plots"


def save_checkpoint_dir(d: str | Path, state: dict) -> Path:
    """Write ``state`` to ``d/checkpoint.pt`` atomically (temp file + rename)."""
    path = Path(d) / CKPT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint_dir(d: str | Path) -> dict:
    """Load and check a checkpoint directory; a missing or half-written file is an error, never a
    silently partial state."""
    path = Path(d) / CKPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {d} has no {CKPT_FILE} (interrupted write?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable (half-written?): {e}") from e
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {missing}")
    return state


def _versions() -> dict:
    import ray
    return {"torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def worker_loop(config: dict) -> None:
    """Ray Train worker: ``config = {"cfg": flat config, "threads": int, "max_nonfinite_in_row": int,
    "ray_data": bool, "test_hooks": {"fail_at_epoch", "fail_marker", "nan_rank", "nan_from_epoch", "pause_at_epoch",
    "pause_marker"} | None}``.

    Reports every epoch (rank 0 with a checkpoint holding the weights, optimiser, RNG states, config,
    versions and a density plot). ``max_nonfinite_in_row`` skipped steps in a row end the run on every
    rank with a last report flagged ``nonfinite_stop`` (not an exception: a retry would repeat it).
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ebm.config import Config
    from ebm.nets import build_model
    from ebm.steps import StepModule
    from ebm.train import (NonFiniteLoss, evaluate, format_epoch, make_optimizer, proposal_sigmas, run_epoch,
                           seed_everything, set_input_stats)
    from pipelines.runtime import tune_malloc
    from pipelines.worker_data import for_rank

    tune_malloc()
    import logging
    # Ray Train logs every checkpoint at INFO, which drowns the one progress line per epoch
    for name in ("ray.train", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    cfg = Config.from_flat(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    data = for_rank(cfg, rank, world, ray.train.get_dataset_shard("train") if config.get("ray_data") else None)
    task, evals = data.task, data.eval_splits
    seed_everything(cfg.seed)               # identical init on every rank
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    if data.train_x is not None:
        set_input_stats(model, cfg, data.train_x)
    model.to(device)
    opt = make_optimizer(model, cfg)
    g_samp = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = load_checkpoint_dir(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        torch.set_rng_state(state["rng"]["torch"])
        g_samp.set_state(state["rng"]["samplers"][rank % len(state["rng"]["samplers"])])

    unused = cfg.schedule.freeze_backbone_epochs > 0 or cfg.schedule.proposal_warmup_epochs > 0
    step = StepModule(model, cfg, task.circular, proposal_sigmas(task, cfg), g_samp)
    ddp_step = ray.train.torch.prepare_model(step, parallel_strategy_kwargs={"find_unused_parameters": unused})

    def all_finite(loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss).all().float().reshape(1).to(device)
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    hooks = config.get("test_hooks") or {}       # fault injection for the tests only
    fail_at = int(hooks.get("fail_at_epoch", -1))
    max_row = int(config.get("max_nonfinite_in_row") or 20)
    last_val = 1e30     # "not validated yet": checkpoint scores must be finite (they round-trip through JSON)
    t_start = time.perf_counter()
    for epoch in range(start, cfg.optim.epochs):
        t0 = time.perf_counter()
        _maybe_pause(hooks, epoch)
        batches = _poisoned(data.train_epoch(epoch), hooks, rank, epoch)
        try:
            row = run_epoch(model, opt, batches, cfg, task, epoch, device=device, all_finite=all_finite,
                            step=lambda x, y, e: ddp_step(x, y, e), max_skips_in_row=max_row)
        except NonFiniteLoss as e:     # every rank gets here at the same step: the decision was all-reduced
            # the last good weights (skipped steps changed nothing), as of the end of the previous epoch
            states = _gather_states(g_samp, world, device)
            if rank == 0:
                print(f"stopping: {e}", flush=True)
            row = {"nonfinite_stop": 1.0, "epoch": float(epoch), "val_nll": last_val}
            ray.train.report(row, checkpoint=_checkpoint(model, opt, cfg, task, epoch - 1, row, states)
                             if rank == 0 else None)
            return
        if rank == 0 and epoch == fail_at and not _fired(hooks):
            _mark_fired(hooks)
            raise RuntimeError(f"test hook: injected failure at epoch {epoch}")
        # the mean of every train metric over ranks; examples/s summed
        keys = sorted(row)
        vec = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(vec)
        row = {k: v / world for k, v in zip(keys, vec.tolist())}
        row["examples_per_s"] *= world
        row["epoch"] = epoch
        row["first_epoch"] = start          # > 0 when this attempt resumed from a checkpoint
        row["param_spread_across_ranks"] = _param_spread(model, world, device)
        last = epoch == cfg.optim.epochs - 1
        checkpoint = None
        if rank == 0:
            if "val" in evals and ((epoch + 1) % cfg.eval.every == 0 or last):
                row.update({f"val_{k}": v for k, v in evaluate(model, evals["val"], task, cfg, device=device,
                                                              generator=g_samp).items()})
            if last and "test" in evals:
                row.update({f"test_{k}": v for k, v in evaluate(model, evals["test"], task, cfg, device=device,
                                                               generator=g_samp).items()})
            row["epoch_time_s"] = time.perf_counter() - t0
            last_val = row.get("val_nll", last_val)
            done = epoch + 1 - start
            eta = (time.perf_counter() - t_start) / done * (cfg.optim.epochs - epoch - 1)
            print(f"{format_epoch(row, cfg.optim.epochs)} | ETA {eta:.0f} s", flush=True)
            checkpoint = _checkpoint(model, opt, cfg, task, epoch, row, _gather_states(g_samp, world, device),
                                     evals.get("val"))
        else:
            _gather_states(g_samp, world, device)
        row["validated"] = float("val_nll" in row)   # this epoch's own validation, or a carried value
        row.setdefault("val_nll", last_val)      # checkpoint ranking (and Tune's schedulers) need one every epoch
        ray.train.report({k: float(v) for k, v in row.items()}, checkpoint=checkpoint)


def _checkpoint(model, opt, cfg, task, epoch: int, row: dict, sampler_states: list, val=None):
    """Rank 0: a self-describing checkpoint directory (weights, optimiser, epoch, RNG states, config,
    versions, metrics, and the epoch's density plot when ``val`` is given)."""
    import ray.train
    d = tempfile.mkdtemp(prefix="ebm-ckpt-")
    if val is not None:
        _density_plot(model, task, val, Path(d), epoch)
    save_checkpoint_dir(d, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "config": cfg.to_dict(),
        "metrics": row, "versions": _versions(), "task": task.name, "x_shape": tuple(task.x_shape),
        "rng": {"torch": torch.get_rng_state(), "samplers": sampler_states}})
    return ray.train.Checkpoint.from_directory(d)


def _poisoned(batches, hooks: dict, rank: int, epoch: int):
    """Test hook: on rank ``nan_rank`` the first batch of each epoch gets NaN targets, and every batch
    from epoch ``nan_from_epoch`` on."""
    if int(hooks.get("nan_rank", -1)) != rank:
        yield from batches
        return
    from_epoch = int(hooks.get("nan_from_epoch", 1 << 30))
    for i, (x, y) in enumerate(batches):
        if i == 0 or epoch >= from_epoch:
            y = torch.full_like(y, float("nan"))
        yield x, y


def _param_spread(model: torch.nn.Module, world: int, device) -> float:
    """max - min over ranks of a parameter checksum (0 when every rank holds the same weights)."""
    import torch.distributed as dist
    probe = torch.cat([p.detach().flatten().double() for p in model.parameters()]).sum().reshape(1).to(device)
    lo, hi = probe.clone(), probe.clone()
    if world > 1:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).item())


def _density_plot(model, task, val, d: Path, epoch: int) -> None:
    """The epoch's density plot of fixed validation examples, written beside the weights; the driver
    side logs it to MLflow (workers never talk to MLflow)."""
    if val is None or task.D != 1:
        return
    from pipelines.plots import density_figure
    (d / PLOTS_DIR).mkdir()
    density_figure(model, task, val, d / PLOTS_DIR / f"density_epoch{epoch:03d}.png", title=f"epoch {epoch + 1}")


def _gather_states(g: torch.Generator, world: int, device) -> list[torch.Tensor]:
    """Every rank's sampler state, gathered (collective: all ranks call it)."""
    state = g.get_state()
    if world == 1:
        return [state]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, state)
    return out


def _maybe_pause(hooks: dict, epoch: int) -> None:
    """Test hook: hold every rank at the start of epoch ``pause_at_epoch`` (once per ``pause_marker``
    file), so a test can kill the driver at a known checkpoint."""
    marker = hooks.get("pause_marker")
    if int(hooks.get("pause_at_epoch", -1)) != epoch or not marker or Path(marker).exists():
        return
    Path(marker).write_text("paused")
    time.sleep(float(hooks.get("pause_s", 120)))


def _fired(config: dict) -> bool:
    return bool(config.get("fail_marker")) and Path(config["fail_marker"]).exists()


def _mark_fired(config: dict) -> None:
    if config.get("fail_marker"):
        Path(config["fail_marker"]).write_text("fired")
