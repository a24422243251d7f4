"""Evaluation of a model on a split: NLL (grid, IS, proposal), point errors, CRPS, coverage, ESS,
and KL to the true density where the task knows it (docs/method.md §6)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import calibration as C
from . import metrics as M
from .config import Config
from .data import Split
from .predict import predict
from .tasks import MAX_D, TaskSpec


COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)


PIT_BINS = 10       # the PIT histogram of a 1-D target: fraction of examples per tenth of [0, 1]


def pit_key(source: str, b: int) -> str:
    """The metric of bin ``b`` of the PIT histogram from one source of ebm.calibration: the fraction
    of examples whose PIT lies in [b/10, (b+1)/10) (``pit_prediction_0``, ``pit_ebm_grid_9``); a
    calibrated source has 0.1 in every bin."""
    return f"pit_{source}_{b}"


def coverage_key(source: str, level: float) -> str:
    """The metric of the central interval at ``level`` from one source of ebm.calibration:
    ``coverage_90`` for the IS prediction, ``coverage_proposal_90``, ``coverage_ebm_grid_90``."""
    return f"coverage_{'' if source == 'prediction' else source + '_'}{round(level * 100)}"


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


def add_kl(model, task: TaskSpec, x: torch.Tensor, aux: dict, grid: torch.Tensor, add,
           ebm_scores: torch.Tensor | None = None, mix=None) -> None:
    """KL(p_true || model) on the task's 1-D grid for a batch of inputs, for the EBM and the proposal.
    ``ebm_scores`` (the EBM's scores f on this grid, (B, G)) and ``mix`` (the proposal of x): what the
    caller has computed already (the grid NLL's scores, the proposal NLL's mixture)."""
    lp_true = true_log_density(task, x.cpu(), aux, grid.cpu())
    if lp_true is None:
        return
    g = grid.unsqueeze(1)
    if model.has_energy:
        f = ebm_scores if ebm_scores is not None else M.model_log_density_on_grid(model, x, g, True)
        add("kl_ebm", M.kl_on_grid(lp_true, f.cpu()))
    if model.has_proposal:
        add("kl_proposal", M.kl_on_grid(lp_true, M.model_log_density_on_grid(model, x, g, False, mix=mix).cpu()))


def _is_mdn(cfg: Config) -> bool:
    return cfg.method.name in ("mdn", "mdn_ebm_teacher")


def batch_generator(seed: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The IS / prediction draws of evaluation batch ``batch``: a function of (seed, batch index) only,
    so a batch gets the same draws whichever rank evaluates it."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch) % 2**63)


class Shard:
    """Which evaluation batches this process takes and how partial results are combined: rank ``rank``
    of ``world`` takes the batches i with i % world == rank; ``all_reduce(t, "sum")`` and
    ``gather(obj)`` are the runtime's collectives (:class:`ebm.loop.Runtime` is one)."""
    rank, world = 0, 1

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def gather(self, obj) -> list:
        return [obj]


@torch.no_grad()
def evaluate(model, split: Split, task: TaskSpec, cfg: Config, *, generator: torch.Generator | None = None,
             seed: int | None = None, shard=None, device: torch.device | str = "cpu", grid_nll: bool | None = None,
             max_examples: int = 0, pits: dict[str, list[torch.Tensor]] | None = None,
             figures: str = "all") -> dict[str, float]:
    """Mean metrics over a split. ``nll`` is the primary figure: the EBM's grid NLL (or IS NLL when
    there is no grid), and for an MDN (also one trained with a teacher) its exact NLL. Per target dim
    d (D > 1): ``mae_mean_<name>`` and ``coverage_<name>`` beside the joint figures.

    Draws: with ``seed``, batch i draws from :func:`batch_generator` (seed, i); else every batch from
    ``generator``. ``shard`` (a runtime with rank, world, all_reduce, gather) splits the batches over
    ranks; every metric is an exact mean over examples, so per-batch sums (float64) are all-reduced into
    one vector indexed by batch and summed in batch order on every rank: the figures are bit-for-bit
    those of one rank evaluating everything, on every rank.

    ``figures="nll"`` (an epoch's validation, ``eval.val_figures``): only ``nll`` and what it is made of
    (the grid NLL, or the IS NLL without a grid; an MDN's exact NLL) and the exact KL; no prediction,
    coverage or PITs.

    ``pits`` (one process only): a dict that receives, per source of the predictive distribution
    (ebm.calibration.SOURCES), each batch's PIT values (B, D) in batch order — the ones the coverage
    figures come from, for a calibration report without a second pass.
    """
    shard = shard or Shard()
    if shard.world > 1 and seed is None:
        raise ValueError("an evaluation split over ranks needs a seed (per-batch draws)")
    if shard.world > 1 and pits is not None:
        raise ValueError("per-example PITs are collected in one process only")
    if figures not in ("all", "nll") or (figures == "nll" and pits is not None):
        raise ValueError(f"figures={figures!r}: expected 'all', or 'nll' without pits")
    model.eval()
    grid_nll = cfg.eval.grid_nll if grid_nll is None else grid_nll
    grids = [torch.as_tensor(g, dtype=torch.float32, device=device) for g in task.grid()]
    use_grid = grid_nll and model.has_energy and task.D <= MAX_D
    n = len(split) if not max_examples else min(len(split), max_examples)
    bs = cfg.eval.batch_size
    xg = None
    if task.has_true_density and task.name == "toy1":
        # docs/method.md §6: toy 1 is scored on a 2048-point x-grid over [-3, 3], not on the split's x.
        xg = torch.linspace(-3.0, 3.0, 2048, device=device).unsqueeze(1)
    starts = [("split", s) for s in range(0, n, bs)] + ([("xgrid", s) for s in range(0, xg.shape[0], bs)]
                                                       if xg is not None else [])
    sums: dict[str, dict[int, tuple[float, int]]] = {}

    for i, (where, s) in enumerate(starts):
        if i % shard.world != shard.rank:
            continue
        acc: dict[str, list[torch.Tensor]] = {}

        def add(k, v):
            acc.setdefault(k, []).append(v.detach().double().cpu())

        if where == "xgrid":
            add_kl(model, task, xg[s:s + bs], {}, grids[0], add)
        else:
            g = batch_generator(seed, i, device) if seed is not None else generator
            _evaluate_batch(model, split, task, cfg, s, min(s + bs, n), device, use_grid, grids, g, add, pits,
                            nll_only=figures == "nll")
        for k, v in acc.items():
            t = torch.cat(v)
            sums.setdefault(k, {})[i] = (float(t.sum()), t.numel())
    out = _reduce(sums, len(starts), shard)
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


def _reduce(sums: dict[str, dict[int, tuple[float, int]]], n_batches: int, shard) -> dict[str, float]:
    """Per-key means over examples from per-batch (sum, count): one (keys, batches) float64 tensor that
    each batch's owner fills and the others leave 0, all-reduced (x + 0 = x exactly), then summed in
    batch order — the same additions on every rank and for any number of ranks."""
    keys = sorted(set().union(*shard.gather(sorted(sums)))) if shard.world > 1 else sorted(sums)
    table = torch.zeros(2, len(keys), n_batches, dtype=torch.float64)
    for j, k in enumerate(keys):
        for i, (total, count) in sums.get(k, {}).items():
            table[0, j, i], table[1, j, i] = total, count
    if shard.world > 1:
        dev = getattr(shard, "device", torch.device("cpu"))
        table = shard.all_reduce(table.to(dev), "sum").cpu()
    out = {}
    for j, k in enumerate(keys):
        total = count = 0.0
        for i in range(n_batches):
            total, count = total + float(table[0, j, i]), count + float(table[1, j, i])
        out[k] = total / count if count else float("nan")
    return out


def _evaluate_batch(model, split: Split, task: TaskSpec, cfg: Config, s: int, e: int, device, use_grid: bool,
                    grids: list[torch.Tensor], generator, add, keep_pits: dict | None = None,
                    nll_only: bool = False) -> None:
    """Per-example figures of the examples s:e, handed to ``add(key, values (B,))``; the PITs also
    appended to ``keep_pits[source]`` when given. ``nll_only``: the NLLs and the KL alone."""
    x, y = split.x[s:e].to(device), split.y[s:e].to(device)
    aux = {k: np.asarray(v)[s:e] for k, v in split.aux.items()}
    pits = {}       # ebm.calibration's sources -> PIT (B, D), for the coverage at COVERAGE_LEVELS
    scores = mix = None     # the EBM's scores on the grid and the proposal, once: the NLLs, PITs and KL read them
    if use_grid:
        nll, scores = M.grid_nll(model, x, y, grids, task.cell_volume(), with_scores=True)
        add("grid_nll", nll)
        if task.D == 1 and not nll_only:
            pits["ebm_grid"] = C.pit_grid(scores, grids[0], y, task.circular)
    if model.has_energy and model.has_proposal and not (nll_only and (use_grid or _is_mdn(cfg))):
        add("is_nll", M.is_nll(model, x, y, cfg.sampler.M_eval, generator))
    if model.has_proposal:
        mix = model.propose(model.encode(x))        # once: the NLL and the PIT of the proposal
        add("proposal_nll", M.proposal_nll(model, x, y, mix))
    if model.has_proposal and not nll_only:
        p = predict(model, x, task.circular, M=cfg.sampler.M_eval, interval_level=cfg.eval.interval_level,
                    refine_steps=cfg.sampler.refine_steps, keep_samples=True, generator=generator)
        err_mean, err_mode = M.abs_error(p.mean, y, task.circular), M.abs_error(p.mode, y, task.circular)
        add("mae_mode", err_mode.mean(1))
        add("mae_mean", err_mean.mean(1))
        add("sq_err_mean", (err_mean ** 2).mean(1))
        add("sq_err_mode", (err_mode ** 2).mean(1))
        add("crps", M.crps_weighted(p.samples, p.weights, y, task.circular).mean(1))
        add("coverage", M.interval_covered(p.interval, y, task.circular).float())
        pits["prediction"] = C.pit_weighted(p.samples, p.weights, y, task.circular)
        pits["proposal"] = C.pit_mixture(mix, y)
        add("ess", p.ess)
        if task.D > 1:
            per_dim = M.interval_covered_per_dim(p.interval, y, task.circular).float()
            for d, name in enumerate(task.target_names):
                add(f"mae_mean_{name}", err_mean[:, d])
                add(f"coverage_{name}", per_dim[:, d])
    for source, pit in pits.items():
        if keep_pits is not None:
            keep_pits.setdefault(source, []).append(pit.detach().float().cpu())
        # every dim inside its central interval (the ``coverage`` figure's rule), at each level
        inside = C.in_central_interval(pit, COVERAGE_LEVELS).all(-1).float()         # (B, L)
        for j, level in enumerate(COVERAGE_LEVELS):
            add(coverage_key(source, level), inside[:, j])
        if task.D == 1:
            b = (pit[:, 0] * PIT_BINS).long().clamp(0, PIT_BINS - 1)
            for k in range(PIT_BINS):
                add(pit_key(source, k), (b == k).float())
    if task.has_true_density and task.D == 1 and task.name != "toy1":
        add_kl(model, task, x, aux, grids[0], add, ebm_scores=scores, mix=mix)
