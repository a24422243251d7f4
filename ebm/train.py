"""The single-process training loop and evaluation.

Free of Ray on purpose: the distributed path wraps the model in DDP and feeds ``run_epoch`` from
``get_dataset_shard``; the math is this file's ``train_step`` calls and ``evaluate``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import metrics as M
from .config import Config
from .nets import build_model
from .predict import predict
from .steps import is_finite, train_step
from .tasks import TaskSpec, get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Split:
    """In-memory split: x float (N, ...) ready for the feature net, y (N, D), aux per-example arrays."""
    x: torch.Tensor
    y: torch.Tensor
    aux: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.y.shape[0]


def image_norm(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics for RGB (METHOD.md §1); 0.5 / 0.5 for grey images."""
    return (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)


def to_inputs(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Toys: float (N, d) as is. Images: uint8 (N, C, H, W) -> normalised float32."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        return x.float()
    mean, std = image_norm(x.shape[1])
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def load_data(cfg: Config) -> tuple[TaskSpec, dict[str, Split]]:
    """The task's splits generated in memory (Parquet datasets come through pipelines/)."""
    from .tasks import make_synthetic
    task = get_task(cfg.task.name)
    n = {k: v for k, v in (("train", cfg.task.n_train), ("val", cfg.task.n_val), ("test", cfg.task.n_test)) if v}
    raw = make_synthetic(cfg.task.name, seed=cfg.task.seed, n=n or None, size=cfg.task.image_size or None)
    splits = {}
    for name, (x, y, aux) in raw.items():
        splits[name] = Split(to_inputs(x), torch.as_tensor(y, dtype=torch.float32), dict(aux or {}))
    if cfg.task.image_size and len(task.x_shape) == 3:
        task = _with_image_size(task, splits["train"].x.shape[1:])
    return task, splits


def _with_image_size(task: TaskSpec, shape) -> TaskSpec:
    import dataclasses
    return dataclasses.replace(task, x_shape=tuple(int(s) for s in shape))


def proposal_sigmas(task: TaskSpec, cfg: Config) -> tuple[float, ...]:
    if cfg.method.fixed_sigmas:
        return tuple(cfg.method.fixed_sigmas)
    return task.ml_is_sigmas if cfg.method.name == "ml_is" else task.fixed_sigmas


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    groups = model.param_groups() if hasattr(model, "param_groups") else model.parameters()
    return torch.optim.Adam(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def batches(split: Split, batch_size: int, generator: torch.Generator | None, drop_last: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        idx = order[s:s + batch_size]
        yield split.x[idx], split.y[idx]


class NonFiniteLoss(RuntimeError):
    pass


def run_epoch(model, opt, data: Iterable, cfg: Config, task: TaskSpec, epoch: int, *,
              generator: torch.Generator | None = None, device: torch.device | str = "cpu",
              all_finite: Callable[[torch.Tensor], bool] | None = None,
              step: Callable | None = None, max_skips_in_row: int = 20) -> dict[str, float]:
    """One pass over ``data`` (an iterable of (x, y) batches). Returns mean metrics, examples/s and
    the data-wait fraction. ``all_finite`` decides whether to skip a step (the distributed loop passes
    one that all-reduces, so every rank skips the same steps). ``step(x, y, epoch)`` replaces the
    plain ``train_step`` call (the distributed loop passes a DDP-wrapped ``StepModule``)."""
    model.train()
    all_finite = all_finite or is_finite
    sums: dict[str, float] = {}
    n_steps = n_ex = skipped = in_row = 0
    wait = 0.0
    t0 = t_last = time.perf_counter()
    sig = proposal_sigmas(task, cfg)
    for x, y in data:
        t_got = time.perf_counter()
        wait += t_got - t_last
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step is not None:
            loss, mets = step(x, y, epoch)
        else:
            loss, mets = train_step(model, (x, y), cfg, epoch=epoch, circular=task.circular, fixed_sigmas=sig,
                                    generator=generator)
        if not all_finite(loss.detach()):
            skipped += 1
            in_row += 1
            if in_row >= max_skips_in_row:
                raise NonFiniteLoss(f"{in_row} non-finite losses in a row at epoch {epoch}; stopping "
                                    f"(lower optim.lr or check the data for NaN)")
            opt.zero_grad(set_to_none=True)
            t_last = time.perf_counter()
            continue
        in_row = 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        for k, v in mets.items():
            sums[k] = sums.get(k, 0.0) + v
        n_steps += 1
        n_ex += y.shape[0]
        t_last = time.perf_counter()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    out = {f"train_{k}": v / max(n_steps, 1) for k, v in sums.items()}
    out.update(examples_per_s=n_ex / elapsed, data_wait_frac=wait / elapsed, skipped_steps=float(skipped),
               steps=float(n_steps))
    return out


def true_log_density(task: TaskSpec, x: torch.Tensor, aux: dict, grid: torch.Tensor) -> torch.Tensor | None:
    """log p_true(y|x) on a 1-D grid (G,) for tasks that know it -> (B, G), else None."""
    from . import tasks
    g = grid.numpy()
    if task.name == "toy1":
        return torch.as_tensor(tasks.toy1_true_log_density(x[:, 0].numpy(), g), dtype=torch.float32)
    if task.name == "star" and "theta_r" in aux:
        return torch.as_tensor(tasks.star_true_log_density(np.asarray(aux["theta_r"]), np.asarray(aux["k"]), g),
                               dtype=torch.float32)
    return None


def add_kl(model, task: TaskSpec, x: torch.Tensor, aux: dict, grid: torch.Tensor, add) -> None:
    """KL(p_true || model) on the task's 1-D grid for a batch of inputs, for the EBM and the proposal."""
    lp_true = true_log_density(task, x.cpu(), aux, grid.cpu())
    if lp_true is None:
        return
    g = grid.unsqueeze(1)
    if model.has_energy:
        add("kl_ebm", M.kl_on_grid(lp_true, M.model_log_density_on_grid(model, x, g, True).cpu()))
    if model.has_proposal:
        add("kl_proposal", M.kl_on_grid(lp_true, M.model_log_density_on_grid(model, x, g, False).cpu()))


@torch.no_grad()
def evaluate(model, split: Split, task: TaskSpec, cfg: Config, *, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu", grid_nll: bool | None = None, max_examples: int = 0) -> dict[str, float]:
    """Mean metrics over a split. ``nll`` is the primary figure: the EBM's grid NLL (or IS NLL when
    there is no grid), and for an MDN (also one trained with a teacher) its exact NLL."""
    model.eval()
    grid_nll = cfg.eval.grid_nll if grid_nll is None else grid_nll
    grids = [torch.as_tensor(g, dtype=torch.float32, device=device) for g in task.grid()]
    use_grid = grid_nll and model.has_energy and task.D <= 3
    acc: dict[str, list[torch.Tensor]] = {}

    def add(k, v):
        acc.setdefault(k, []).append(v.detach().float().cpu())

    n = len(split) if not max_examples else min(len(split), max_examples)
    bs = cfg.eval.batch_size
    for s in range(0, n, bs):
        x, y = split.x[s:min(s + bs, n)].to(device), split.y[s:min(s + bs, n)].to(device)
        aux = {k: np.asarray(v)[s:min(s + bs, n)] for k, v in split.aux.items()}
        if use_grid:
            add("grid_nll", M.grid_nll(model, x, y, grids, task.cell_volume()))
        if model.has_energy and model.has_proposal:
            add("is_nll", M.is_nll(model, x, y, cfg.sampler.M_eval, generator))
        if model.has_proposal:
            add("proposal_nll", M.proposal_nll(model, x, y))
            p = predict(model, x, task.circular, M=cfg.sampler.M_eval, interval_level=cfg.eval.interval_level,
                        refine_steps=cfg.sampler.refine_steps, keep_samples=True, generator=generator)
            add("mae_mode", M.abs_error(p.mode, y, task.circular).mean(1))
            add("mae_mean", M.abs_error(p.mean, y, task.circular).mean(1))
            add("sq_err_mean", (M.abs_error(p.mean, y, task.circular) ** 2).mean(1))
            add("sq_err_mode", (M.abs_error(p.mode, y, task.circular) ** 2).mean(1))
            add("crps", M.crps_weighted(p.samples, p.weights, y, task.circular).mean(1))
            add("coverage", M.interval_covered(p.interval, y, task.circular).float())
            add("ess", p.ess)
        if task.has_true_density and task.D == 1 and task.name != "toy1":
            add_kl(model, task, x, aux, grids[0], add)
    if task.name == "toy1":
        # METHOD.md §4: toy 1 is scored on a 2048-point x-grid over [-3, 3], not on the split's x.
        xg = torch.linspace(-3.0, 3.0, 2048, device=device).unsqueeze(1)
        for s in range(0, xg.shape[0], bs):
            add_kl(model, task, xg[s:s + bs], {}, grids[0], add)
    out = {k: torch.cat(v).mean().item() for k, v in acc.items()}
    for k in ("mean", "mode"):
        if f"sq_err_{k}" in out:
            out[f"rmse_{k}"] = math.sqrt(out.pop(f"sq_err_{k}"))
    if cfg.method.name in ("mdn", "mdn_ebm_teacher"):
        out["nll"] = out["proposal_nll"]
    else:
        out["nll"] = out.get("grid_nll", out.get("is_nll", float("nan")))
    kl_key = "kl_proposal" if cfg.method.name in ("mdn", "mdn_ebm_teacher") else "kl_ebm"
    if kl_key in out:
        out["kl"] = out[kl_key]
    return out


@dataclass
class FitResult:
    model: torch.nn.Module
    task: TaskSpec
    history: list[dict[str, float]]
    test: dict[str, float]
    best_epoch: int


def set_input_stats(model: torch.nn.Module, cfg: Config, x_train: torch.Tensor) -> None:
    """Standardise vector inputs with train-split statistics (``features.standardize``).

    Every net that has a ``ToyFeatureNet`` gets the same statistics; a distributed run must pass
    statistics of the whole train split (not a rank's shard) so all ranks hold identical buffers.
    """
    if not (cfg.features.standardize and cfg.features.kind == "toy_mlp"):
        return
    mean, std = x_train.float().mean(0), x_train.float().std(0)
    for mod in model.modules():
        if hasattr(mod, "set_input_stats"):
            mod.set_input_stats(mean, std)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def fit(cfg: Config, *, log: Callable[[str], None] | None = print, data: tuple[TaskSpec, dict[str, Split]] | None = None,
        device: str = "cpu", on_epoch: Callable[[int, dict, torch.nn.Module], None] | None = None) -> FitResult:
    """Train ``cfg`` in one process and evaluate on the test split."""
    task, splits = data or load_data(cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg, task.x_shape, task.D, task.circular).to(device)
    set_input_stats(model, cfg, splits["train"].x)
    opt = make_optimizer(model, cfg)
    g_data = torch.Generator().manual_seed(cfg.seed)
    g_samp = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    history: list[dict[str, float]] = []
    best = (math.inf, -1, None)
    for epoch in range(cfg.optim.epochs):
        t0 = time.perf_counter()
        row = {"epoch": epoch}
        row.update(run_epoch(model, opt, batches(splits["train"], cfg.optim.batch_size, g_data), cfg, task, epoch,
                             generator=g_samp, device=device))
        last = epoch == cfg.optim.epochs - 1
        if "val" in splits and ((epoch + 1) % cfg.eval.every == 0 or last):
            val = evaluate(model, splits["val"], task, cfg, generator=g_samp, device=device)
            row.update({f"val_{k}": v for k, v in val.items()})
            if cfg.eval.select == "best_val" and val["nll"] < best[0]:
                best = (val["nll"], epoch, copy.deepcopy(model.state_dict()))
        row["epoch_time_s"] = time.perf_counter() - t0
        history.append(row)
        if log:
            log(format_epoch(row, cfg.optim.epochs))
        if on_epoch:
            on_epoch(epoch, row, model)
    best_epoch = cfg.optim.epochs - 1
    if cfg.eval.select == "best_val" and best[2] is not None:
        model.load_state_dict(best[2])
        best_epoch = best[1]
    test = evaluate(model, splits["test"], task, cfg, generator=g_samp, device=device) if "test" in splits else {}
    return FitResult(model, task, history, test, best_epoch)


def format_epoch(row: dict[str, float], epochs: int) -> str:
    parts = [f"epoch {row['epoch'] + 1}/{epochs}", f"loss {row.get('train_loss', float('nan')):.4f}"]
    for k in ("val_nll", "val_is_nll", "val_kl", "val_mae_mean"):
        if k in row and not math.isnan(row[k]):
            parts.append(f"{k} {row[k]:.4f}")
    parts.append(f"{row.get('examples_per_s', 0):.0f} ex/s")
    return " | ".join(parts)
