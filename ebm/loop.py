"""The one training loop: epochs, steps, divergence handling, evaluation, model selection and the
checkpoint's contents. ``ebm train --local``, every Ray Train worker and every Tune trial run
:func:`train`; they differ only in the :class:`Runtime` (rank, world size, device, collectives, the
data-parallel wrapper, and where a report goes) and the :class:`~ebm.data.LoopData` they pass in.

Seed discipline (the same on every path, so ``--local`` and a 1-worker Ray run give the same
numbers): every rank builds the model from ``cfg.seed``; each epoch's data order is a function of
(seed, epoch); rank r samples from a generator seeded ``seed * 1000 + r + 1``; a resumed run restores
every rank's generator and torch's RNG. Evaluation batch i draws from a generator seeded from
(:func:`eval_seed`, i), so its figures are a function of the weights alone (the same IS samples at
every epoch, whichever rank evaluates the batch) and evaluating never shifts the training stream.

Divergence: a step whose loss is non-finite on any rank is skipped on every rank (the decision is
all-reduced). ``max_nonfinite_in_row`` skipped steps in a row — counted across epochs and kept in
the checkpoint — or an epoch without one successful step fail the run with :class:`TrainingFailed`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import checkpoint
from .config import Config
from .data import LoopData, Prefetch
from .evaluate import evaluate
from .nets import build_model
from .steps import StepModule, frozen_modules, native_bf16
from .tasks import TaskSpec

MAX_NONFINITE_IN_ROW = 20
NOT_VALIDATED = 1e30    # "no validation yet": reported scores must stay finite (they round-trip through JSON)


def usable(value) -> bool:
    """A figure a model can be judged by: a finite number, not the "not validated yet" stand-in."""
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) < NOT_VALIDATED / 10


class TrainingFailed(RuntimeError):
    """The run cannot go on (diverged, or an epoch had no successful step); the message says why."""


class Runtime:
    """A single process: rank 0 of 1 on ``device``. Distributed runtimes override the collectives,
    ``wrap`` (data parallelism) and ``report`` (where metrics and checkpoints go)."""
    rank: int = 0
    world: int = 1

    def __init__(self, device: torch.device | str = "cpu", quiet: bool = False):
        self.device = torch.device(device)
        self.quiet = quiet

    def wrap(self, step: torch.nn.Module, find_unused_parameters: bool) -> Callable:
        return step

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``op`` in sum | min | max over ranks (in place); identity for one rank."""
        return t

    def gather(self, obj) -> list:
        """Every rank's ``obj`` in rank order (collective)."""
        return [obj]

    def report(self, row: dict, state: dict | None, model: torch.nn.Module) -> None:
        """After every epoch, on every rank: the epoch's metrics; ``state`` (the checkpoint dict) on
        rank 0 only."""

    def log(self, line: str) -> None:
        if self.rank == 0 and not self.quiet:
            print(line, flush=True)


@dataclass
class LoopResult:
    model: torch.nn.Module          # the selected weights (best validation epoch, or the last)
    history: list[dict]
    last: dict                      # the last epoch's row (test_* on rank 0)
    selected_epoch: int


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def proposal_sigmas(task: TaskSpec, cfg: Config) -> tuple[float, ...]:
    if cfg.method.fixed_sigmas:
        return tuple(cfg.method.fixed_sigmas)
    return task.ml_is_sigmas if cfg.method.name == "ml_is" else task.fixed_sigmas


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    groups = model.param_groups() if hasattr(model, "param_groups") else model.parameters()
    return torch.optim.Adam(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def set_input_stats(model: torch.nn.Module, cfg: Config, x_train: torch.Tensor) -> None:
    """Standardise vector inputs with statistics of the whole train split (``features.standardize``),
    the same on every rank, kept in the model's buffers."""
    if not (cfg.features.standardize and cfg.features.kind == "toy_mlp"):
        return
    mean, std = x_train.float().mean(0), x_train.float().std(0)
    for mod in model.modules():
        if hasattr(mod, "set_input_stats"):
            mod.set_input_stats(mean, std)


def _micro_batches(data: Iterable, k: int) -> Iterator[list]:
    """``data``'s batches in groups of ``k`` (the last group may be shorter): one optimiser step each."""
    group: list = []
    for batch in data:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def run_epoch(model, opt, data: Iterable, cfg: Config, epoch: int, step: Callable, *,
              all_finite: Callable[[torch.Tensor], bool], device, in_row: int = 0,
              max_in_row: int = MAX_NONFINITE_IN_ROW) -> tuple[dict[str, float], int]:
    """One pass over ``data`` ((x, y) batches) with ``step(x, y, epoch) -> (loss, metrics)``.

    Each optimiser step takes ``optim.accumulate`` = k micro-batches: each one's loss is weighted by its
    share of the step's examples, so the gradient is that of the mean loss over all k·b examples (k
    micro-batches of b equal one batch of k·b up to float rounding, given the same samples). Under a
    data-parallel wrapper only the last micro-batch's backward communicates (``no_sync`` for the
    others). The non-finite decision covers the whole step and is the step's one host sync
    (``all_finite``, all-reduced); metrics stay on the device until the epoch ends.

    Returns (mean metrics per micro-batch, examples/s, data-wait fraction, step counts; the
    non-finite-in-a-row count to carry into the next epoch). Raises :class:`TrainingFailed` at
    ``max_in_row`` skipped steps in a row.
    """
    model.train()
    sums: dict[str, torch.Tensor] = {}
    n_steps = n_micro = n_ex = skipped = 0
    wait = 0.0
    t0 = t_last = time.perf_counter()
    no_sync = getattr(step, "no_sync", contextlib.nullcontext)
    for group in _micro_batches(data, cfg.optim.accumulate):
        wait += time.perf_counter() - t_last
        group = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in group]
        total = sum(y.shape[0] for _, y in group)
        step_losses: list[torch.Tensor] = []
        opt.zero_grad(set_to_none=True)
        step_mets: list[dict[str, torch.Tensor]] = []
        for i, (x, y) in enumerate(group):
            last = i == len(group) - 1
            with contextlib.nullcontext() if last else no_sync():
                try:
                    loss, mets = step(x, y, epoch)
                except FloatingPointError as e:
                    # an update made the network non-finite, which breaks the step (sampling from a NaN
                    # mixture) before its loss can be checked: a diverged run, not a crash to retry
                    raise TrainingFailed(f"{e} at epoch {epoch + 1}: the run diverged; lower optim.lr "
                                         f"({cfg.optim.lr:g})") from e
                step_losses.append(loss.detach())
                step_mets.append(mets)
                if last:
                    break
                (loss * (y.shape[0] / total)).backward()
        if not all_finite(torch.stack(step_losses)):
            opt.zero_grad(set_to_none=True)
            skipped += 1
            in_row += 1
            if in_row >= max_in_row:
                raise TrainingFailed(f"{in_row} non-finite losses in a row (at epoch {epoch + 1}); lower "
                                     "optim.lr or check the data for NaN")
            t_last = time.perf_counter()
            continue
        in_row = 0
        (loss * (y.shape[0] / total) if len(group) > 1 else loss).backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        for mets in step_mets:
            for k, v in mets.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        n_steps += 1
        n_micro += len(group)
        n_ex += total
        t_last = time.perf_counter()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    keys = sorted(sums)
    means = (torch.stack([sums[k].float() for k in keys]) / max(n_micro, 1)).tolist() if keys else []
    out = {f"train_{k}": v for k, v in zip(keys, means)}       # the epoch's one read of the step metrics
    out.update(examples_per_s=n_ex / elapsed, data_wait_frac=wait / elapsed, skipped_steps=float(skipped),
               steps=float(n_steps))
    return out, in_row


def _mean_over_ranks(row: dict, rt: Runtime) -> dict:
    """Every train metric averaged over ranks; examples/s summed. The keys match on all ranks: the
    skip decision is all-reduced, so every rank ran the same successful steps."""
    keys = sorted(k for k in row)
    vec = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=rt.device)
    vec = rt.all_reduce(vec, "sum")
    out = {k: v / rt.world for k, v in zip(keys, vec.tolist())}
    out["examples_per_s"] *= rt.world
    return out


def _param_spread(model: torch.nn.Module, rt: Runtime) -> float:
    """max − min over ranks of a parameter checksum (0 when every rank holds the same weights)."""
    probe = torch.cat([p.detach().flatten().double() for p in model.parameters()]).sum().reshape(1).to(rt.device)
    return float((rt.all_reduce(probe.clone(), "max") - rt.all_reduce(probe.clone(), "min")).item())


def _restore_sampler(g: torch.Generator, samplers: list, cfg: Config, rt: Runtime, epoch: int) -> None:
    """Each rank's sampling stream as the checkpoint left it; when the world size or the device type
    changed since (4 workers resuming a 2-worker run, a GPU run resumed on CPU) the states cannot map
    onto the ranks, so each rank starts a fresh stream from (seed, rank, epoch) and says so."""
    if len(samplers) == rt.world:
        try:
            g.set_state(samplers[rt.rank])
            return
        except RuntimeError:        # a generator state of another device type
            pass
    g.manual_seed(cfg.seed * 1000 + rt.rank + 1 + 7919 * epoch)
    rt.log(f"resuming with {rt.world} rank(s) on {rt.device.type} from a checkpoint of {len(samplers)} rank(s) "
           f"(or another device): sampling streams restart from (seed, rank, epoch); the run is no longer "
           f"bit-for-bit the one an uninterrupted run would give")


def eval_seed(cfg: Config) -> int:
    """The seed of every evaluation's draws (batch i draws from :func:`ebm.evaluate.batch_generator`
    (this, i)): the same draws every time for the same seed, on any rank."""
    return cfg.seed * 1000 + 999


def _cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def _set_phase(model: torch.nn.Module, cfg: Config, epoch: int) -> tuple[int, ...]:
    """``requires_grad`` of every parameter for ``epoch``'s phase (:func:`ebm.steps.frozen_modules` off,
    the rest on) -> the frozen parameters' ids, to tell when the phase changes."""
    frozen = {id(p) for m in frozen_modules(model, cfg, epoch) for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return tuple(sorted(frozen))


# the row's keys that measure time (they differ between two otherwise identical runs)
TIMING_KEYS = ("epoch_time_s", "examples_per_s", "data_wait_frac", "elapsed_s", "elapsed_cpu_s")


def train(cfg: Config, data: LoopData, rt: Runtime, resume: dict | None = None,
          max_nonfinite_in_row: int = MAX_NONFINITE_IN_ROW) -> LoopResult:
    """Train ``cfg`` on ``data`` from scratch or from a checkpoint dict ``resume``, evaluating on every
    rank, each taking its share of the batches (val every ``eval.every`` epochs and at the last; test at
    the last on the selected weights); the figures, and so the model selection, are identical on every
    rank. ``rt.report`` gets every epoch's row and, on rank 0, the checkpoint dict.

    Parameters that get no gradient in a phase (``schedule.freeze_backbone_epochs``,
    ``schedule.proposal_warmup_epochs``) are ``requires_grad=False`` for it, and the data-parallel
    wrapper is rebuilt (``rt.wrap``) when the phase changes, so nothing is communicated for them."""
    task, evals, device = data.task, data.eval_splits, rt.device
    seed_everything(cfg.seed)               # identical init on every rank
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    if data.train_x is not None:
        set_input_stats(model, cfg, data.train_x)
    model.to(device)
    opt = make_optimizer(model, cfg)
    g = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rt.rank + 1)
    start, in_row, best = 0, 0, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        # the optimiser's moments are restored; its hyperparameters are the config's (load_state_dict
        # would bring back the saved lr and weight decay, silently undoing a change a resume let through)
        hyper = [{k: grp[k] for k in ("lr", "weight_decay")} for grp in opt.param_groups]
        opt.load_state_dict(resume["optimizer"])
        for grp, h in zip(opt.param_groups, hyper):
            grp.update(h)
        start = int(resume["epoch"]) + 1
        torch.set_rng_state(resume["rng"]["torch"])
        _restore_sampler(g, resume["rng"]["samplers"], cfg, rt, start)
        in_row, best = int(resume.get("nonfinite_in_row", 0)), resume.get("best")
    unused = cfg.schedule.freeze_backbone_epochs > 0 or cfg.schedule.proposal_warmup_epochs > 0
    step, phase = None, None
    if cfg.optim.precision == "bf16" and not native_bf16(torch.device(device)):
        rt.log("warning: optim.precision = \"bf16\" on a CPU without native bf16 (no avx512_bf16/amx_bf16): "
               "torch emulates it, slower than fp32 here; it pays on GPUs and on CPUs that have it")

    def all_finite(loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss).all().to(torch.float32).reshape(1).to(device)
        return bool(rt.all_reduce(flag, "min").item() > 0)

    def evaluate_split(m: torch.nn.Module, split: str) -> dict[str, float]:
        return evaluate(m, evals[split], task, cfg, seed=eval_seed(cfg), shard=rt, device=device,
                        figures=cfg.eval.val_figures if split == "val" else "all")

    epochs, history, row = cfg.optim.epochs, [], {}
    last_val = best["val_nll"] if best else NOT_VALIDATED
    # the run's training time so far, carried on by every checkpoint (a resumed run counts its earlier attempts)
    before = resume.get("metrics", {}) if resume is not None else {}
    base_wall, base_cpu = float(before.get("elapsed_s", 0.0)), float(before.get("elapsed_cpu_s", 0.0))
    t_start, c_start = time.perf_counter(), time.process_time()
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        frozen = _set_phase(model, cfg, epoch)
        if frozen != phase:
            phase, step = frozen, None      # the old wrapper (and its gradient hooks) goes before the new one is built
            step = rt.wrap(StepModule(model, cfg, task.circular, proposal_sigmas(task, cfg), g), unused)
        with Prefetch(data.train_epoch(epoch, cfg.seed)) as batches:
            row, in_row = run_epoch(model, opt, batches, cfg, epoch, step, all_finite=all_finite, device=device,
                                    in_row=in_row, max_in_row=max_nonfinite_in_row)
        if row["steps"] == 0:
            raise TrainingFailed(f"epoch {epoch + 1} had no successful step ({int(row['skipped_steps'])} skipped as "
                                 "non-finite, or no batches); lower optim.lr or check the data")
        row = _mean_over_ranks(row, rt)
        row.update(epoch=epoch, first_epoch=start, param_spread_across_ranks=_param_spread(model, rt))
        last = epoch == epochs - 1
        if "val" in evals and ((epoch + 1) % cfg.eval.every == 0 or last):
            val = evaluate_split(model, "val")
            row.update({f"val_{k}": v for k, v in val.items()})
            if cfg.eval.select == "best_val" and math.isfinite(val["nll"]) and (best is None or val["nll"] < best["val_nll"]):
                best = {"epoch": epoch, "val_nll": float(val["nll"]), "model": _cpu_copy(model.state_dict())}
        if last and "test" in evals:
            row.update({f"test_{k}": v for k, v in evaluate_split(_selected_model(model, best), "test").items()})
            row["selected_epoch"] = best["epoch"] if best else epoch
        row["validated"] = float("val_nll" in row)     # this epoch's own validation, or a carried value
        last_val = row.setdefault("val_nll", last_val)  # Tune's schedulers need one every epoch
        row["epoch_time_s"] = time.perf_counter() - t0
        row["elapsed_s"] = base_wall + time.perf_counter() - t_start
        row["elapsed_cpu_s"] = base_cpu + time.process_time() - c_start
        done = epoch + 1 - start
        eta = (time.perf_counter() - t_start) / done * (epochs - epoch - 1)
        rt.log(f"{format_epoch(row, epochs)} | ETA {eta:.0f} s")
        samplers = rt.gather(g.get_state())
        state = checkpoint.make_state(model=model, optimizer=opt, config=cfg.to_dict(), task=task.to_dict(),
                                      epoch=epoch, metrics=row, samplers=samplers, best=best,
                                      nonfinite_in_row=in_row) if rt.rank == 0 else None
        rt.report(row, state, model)
        history.append(row)
    for p in model.parameters():
        p.requires_grad_(True)
    return LoopResult(_selected_model(model, best), history, row, best["epoch"] if best else epochs - 1)


def _selected_model(model: torch.nn.Module, best: dict | None) -> torch.nn.Module:
    if best is None:
        return model
    selected = copy.deepcopy(model)
    selected.load_state_dict(best["model"])
    return selected


def format_epoch(row: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {int(row['epoch']) + 1}/{epochs}", f"loss {row.get('train_loss', float('nan')):.4f}"]
    if row.get("validated", 1.0) > 0:
        for k in ("val_nll", "val_is_nll", "val_kl", "val_mae_mean"):
            if k in row and not math.isnan(row[k]):
                parts.append(f"{k} {row[k]:.4f}")
    parts.append(f"{row.get('examples_per_s', 0):.0f} ex/s")
    return " | ".join(parts)


def fit(cfg: Config, data: LoopData | None = None, quiet: bool = True, device: str = "cpu") -> LoopResult:
    """:func:`train` in this process with nothing written (no checkpoints, no tracking): for notebooks,
    benchmarks and tests. ``data`` defaults to the generated task's splits in memory."""
    from .data import in_memory, load_data
    return train(cfg, data or in_memory(*load_data(cfg), cfg), Runtime(device, quiet=quiet))
