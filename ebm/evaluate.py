"""Evaluation of a model on a split: NLL (grid, IS, proposal), point errors, CRPS, coverage, ESS,
and KL to the true density where the task knows it (docs/method.md §6)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import metrics as M
from .config import Config
from .data import Split
from .predict import predict
from .tasks import MAX_D, TaskSpec


def true_log_density(task: TaskSpec, x: torch.Tensor, aux: dict, grid: torch.Tensor) -> torch.Tensor | None:
    """log p_true(y|x) on a 1-D grid (G,) for tasks that know it -> (B, G), else None."""
    from . import tasks
    if not task.has_true_density:
        return None
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


def _is_mdn(cfg: Config) -> bool:
    return cfg.method.name in ("mdn", "mdn_ebm_teacher")


@torch.no_grad()
def evaluate(model, split: Split, task: TaskSpec, cfg: Config, *, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu", grid_nll: bool | None = None, max_examples: int = 0) -> dict[str, float]:
    """Mean metrics over a split. ``nll`` is the primary figure: the EBM's grid NLL (or IS NLL when
    there is no grid), and for an MDN (also one trained with a teacher) its exact NLL. Per target dim
    d (D > 1): ``mae_mean_<name>`` and ``coverage_<name>`` beside the joint figures."""
    model.eval()
    grid_nll = cfg.eval.grid_nll if grid_nll is None else grid_nll
    grids = [torch.as_tensor(g, dtype=torch.float32, device=device) for g in task.grid()]
    use_grid = grid_nll and model.has_energy and task.D <= MAX_D
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
            err_mean, err_mode = M.abs_error(p.mean, y, task.circular), M.abs_error(p.mode, y, task.circular)
            add("mae_mode", err_mode.mean(1))
            add("mae_mean", err_mean.mean(1))
            add("sq_err_mean", (err_mean ** 2).mean(1))
            add("sq_err_mode", (err_mode ** 2).mean(1))
            add("crps", M.crps_weighted(p.samples, p.weights, y, task.circular).mean(1))
            add("coverage", M.interval_covered(p.interval, y, task.circular).float())
            add("ess", p.ess)
            if task.D > 1:
                per_dim = M.interval_covered_per_dim(p.interval, y, task.circular).float()
                for d, name in enumerate(task.target_names):
                    add(f"mae_mean_{name}", err_mean[:, d])
                    add(f"coverage_{name}", per_dim[:, d])
        if task.has_true_density and task.D == 1 and task.name != "toy1":
            add_kl(model, task, x, aux, grids[0], add)
    if task.has_true_density and task.name == "toy1":
        # docs/method.md §6: toy 1 is scored on a 2048-point x-grid over [-3, 3], not on the split's x.
        xg = torch.linspace(-3.0, 3.0, 2048, device=device).unsqueeze(1)
        for s in range(0, xg.shape[0], bs):
            add_kl(model, task, xg[s:s + bs], {}, grids[0], add)
    out = {k: torch.cat(v).mean().item() for k, v in acc.items()}
    for k in ("mean", "mode"):
        if f"sq_err_{k}" in out:
            out[f"rmse_{k}"] = math.sqrt(out.pop(f"sq_err_{k}"))
    if _is_mdn(cfg):
        out["nll"] = out["proposal_nll"]
    else:
        out["nll"] = out.get("grid_nll", out.get("is_nll", float("nan")))
    kl_key = "kl_proposal" if _is_mdn(cfg) else "kl_ebm"
    if kl_key in out:
        out["kl"] = out[kl_key]
    return out
