"""Evaluation metrics, all in log space where densities are involved (docs/method.md §6).

Grid NLL: −log p(y_i|x_i) = −f(y_i) + logsumexp_j f(y_j) + log Δ over the task grid (D ≤ 3).
IS NLL:   −f(y_i) + log Ẑ with the learned proposal. MDN NLL is exact: −log q(y_i|x_i).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .circular import TWO_PI, circ_mask, wrap_diff
from .losses import log_partition_is


def grid_points(grids: list[torch.Tensor]) -> torch.Tensor:
    """Cartesian product of per-dim grids -> (G, D)."""
    mesh = torch.meshgrid(*grids, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


GRID_CHUNK_PAIRS = 8192     # about this many (example, grid point) pairs scored at once, so that the
                            # (B, chunk, hidden) activations stay in cache (image head, B = 50: 74 ms for
                            # 1024 points in one piece, 19 ms in chunks of 128)


def scores_on_grid(model, enc, grid: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """f(x_b, g_j) for all examples and grid points: grid (G, D) -> (B, G), in chunks of ``chunk`` grid
    points (default GRID_CHUNK_PAIRS // B rounded down to a multiple of 64, at least 64: a ragged chunk
    took another matmul kernel path and moved the KL in the 11th digit), the grid's y-side terms computed
    once for all examples (``score_shared``)."""
    B = next(t for t in enc if t is not None).shape[0]
    chunk = chunk or max(64, GRID_CHUNK_PAIRS // max(B, 1) // 64 * 64)
    return torch.cat([model.score_shared(enc, grid[s:s + chunk]) for s in range(0, grid.shape[0], chunk)], dim=1)


@torch.no_grad()
def grid_nll(model, x: torch.Tensor, y: torch.Tensor, grids: list[torch.Tensor], cell_volume: float,
             with_scores: bool = False):
    """Per-example NLL by log-space quadrature: x (B, ...), y (B, D) -> (B,); with ``with_scores`` also
    the scores f on the grid points (B, G) it normalised over (for the grid's PIT, ebm.calibration)."""
    enc = model.encode(x)
    f_true = model.score(enc, y.unsqueeze(1))[:, 0]
    scores = scores_on_grid(model, enc, grid_points(grids).to(y))
    nll = -f_true + torch.logsumexp(scores, dim=1) + math.log(cell_volume)
    return (nll, scores) if with_scores else nll


@torch.no_grad()
def is_nll(model, x: torch.Tensor, y: torch.Tensor, M: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example NLL with IS log Ẑ from the learned proposal (M energy evaluations each) -> (B,)."""
    enc = model.encode(x)
    mix = model.propose(enc)
    ys = mix.sample(M, generator)
    f = model.score(enc, torch.cat([y.unsqueeze(1), ys], dim=1))
    log_z = log_partition_is(f[:, 1:], mix.log_prob(ys))
    return -f[:, 0] + log_z


@torch.no_grad()
def proposal_nll(model, x: torch.Tensor, y: torch.Tensor, mix=None) -> torch.Tensor:
    """Exact NLL of the mixture proposal / MDN: −log q(y|x) -> (B,)."""
    mix = model.propose(model.encode(x)) if mix is None else mix     # the caller's, when it has it already
    return -mix.log_prob(y.unsqueeze(1))[:, 0]


def kl_on_grid(log_p_true: torch.Tensor, log_p_model: torch.Tensor) -> torch.Tensor:
    """KL(P_true ‖ P_model) of the grid-normalised distributions, per row: (B, G) -> (B,).

    Both inputs are unnormalised log-densities on the same grid; −inf in the truth contributes 0.
    """
    lp = torch.log_softmax(log_p_true, dim=1)
    lq = torch.log_softmax(log_p_model, dim=1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(1)


@torch.no_grad()
def model_log_density_on_grid(model, x: torch.Tensor, grid: torch.Tensor, use_energy: bool = True,
                              mix=None) -> torch.Tensor:
    """Unnormalised log density of the EBM (f) or the proposal (log q) on grid (G, D) -> (B, G);
    ``mix``: the proposal of x when the caller has it already."""
    if use_energy and model.has_energy:
        return scores_on_grid(model, model.encode(x), grid)
    mix = model.propose(model.encode(x)) if mix is None else mix
    return mix.log_prob(grid.unsqueeze(0).expand(x.shape[0], -1, -1))


def crps_weighted(samples: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                  circular: tuple[bool, ...]) -> torch.Tensor:
    """CRPS per example and dim from weighted samples: E|X − y| − ½E|X − X'|.

    samples (B, M, D), w (B, M) summing to 1, y (B, D) -> (B, D). Linear dims use the sorted O(M log M)
    form of E|X − X'|; circular dims use the geodesic distance (a valid kernel score on the circle),
    also in a sorted O(M log M) form (:func:`_geodesic_pair_mean`).
    """
    B, M, D = samples.shape
    wd = w.unsqueeze(-1).expand(B, M, D)
    d_obs = wrap_diff(samples - y.unsqueeze(1), circular).abs()
    e1 = (wd * d_obs).sum(1)
    circ = [bool(circular[d]) if d < len(circular) else False for d in range(D)]
    lin = [d for d in range(D) if not circ[d]]
    e2 = torch.empty_like(e1)
    if lin:         # only the linear dims are sorted on the line (a star or Fashion-MNIST target has none)
        xs, order = torch.sort(samples[:, :, lin], dim=1)
        ws = torch.gather(wd[:, :, lin], 1, order)
        cum = torch.cumsum(ws, dim=1)
        # E|X − X'| = 2 Σ_i w_i x_(i) (2 F_i − w_i − 1) for sorted samples with cumulative weight F_i.
        e2[:, lin] = 2.0 * (ws * xs * (2.0 * cum - ws - 1.0)).sum(1)
    for d in (d for d in range(D) if circ[d]):
        e2[:, d] = _geodesic_pair_mean(samples[:, :, d], w).to(e2.dtype)
    return e1 - 0.5 * e2


def _geodesic_pair_mean(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i Σ_j w_i w_j d(θ_i, θ_j) for angles (B, M) and weights (B, M), d the geodesic distance on the
    circle, in O(M log M) (the pairwise form costs M² differences: most of a star validation's time).
    Sorted on [0, 2π) and unrolled twice: from each θ_j the points less than π ahead are at θ_i − θ_j,
    the rest at θ_j + 2π − θ_i, both sums read off prefix sums of w and w·θ (float64)."""
    B, M = theta.shape
    t, order = torch.sort(torch.remainder(theta.double(), TWO_PI), dim=1)
    ws = torch.gather(w.double(), 1, order)
    te, we = torch.cat([t, t + TWO_PI], 1), torch.cat([ws, ws], 1)
    zero = torch.zeros(B, 1, dtype=te.dtype, device=te.device)
    pw = torch.cat([zero, torch.cumsum(we, 1)], 1)                  # pw[:, k] = Σ_{i<k} we_i
    px = torch.cat([zero, torch.cumsum(we * te, 1)], 1)
    k = torch.searchsorted(te, t + math.pi)                          # first point at least π ahead: j < k ≤ j + M
    j = torch.arange(M, device=te.device).expand(B, M)
    g = lambda a, idx: torch.gather(a, 1, idx)  # noqa: E731
    ahead = (g(px, k) - g(px, j + 1)) - t * (g(pw, k) - g(pw, j + 1))
    behind = (t + TWO_PI) * (g(pw, j + M) - g(pw, k)) - (g(px, j + M) - g(px, k))
    return (ws * (ahead + behind)).sum(1)


def abs_error(pred: torch.Tensor, y: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """|pred − y| per dim, on the circle for circular dims: (B, D) -> (B, D)."""
    return wrap_diff(pred - y, circular).abs()


def interval_covered_per_dim(interval: torch.Tensor, y: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """Whether y lies in the central interval (B, 2, D), per dim -> (B, D) bool.

    Circular intervals are arcs from lo to hi counter-clockwise (they may wrap through 0).
    """
    lo, hi = interval[:, 0], interval[:, 1]
    inside = (y >= lo) & (y <= hi)
    if any(circular):
        arc = torch.remainder(y - lo, TWO_PI) <= torch.remainder(hi - lo, TWO_PI)
        inside = torch.where(circ_mask(circular, y.device), arc, inside)
    return inside


def interval_covered(interval: torch.Tensor, y: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """Whether y lies in the central interval (B, 2, D) in every dim -> (B,) bool."""
    return interval_covered_per_dim(interval, y, circular).all(dim=1)


@torch.no_grad()
def marginal_density(model, task, x: torch.Tensor, y_grid: np.ndarray | None, dim: int, energy: bool) -> np.ndarray:
    """p(y_dim | x) of one input x (1, ...) on ``y_grid`` (None: the task's grid): f (or log q) on its
    product with the other dims' task grids, those dims summed out by quadrature; the EBM's normalised by
    its quadrature over the whole task grid (:func:`grid_nll`'s log Z). For plots and the Python API."""
    task_grids = [torch.as_tensor(g, dtype=torch.float32) for g in task.grid()]
    grids = list(task_grids)
    on_task_grid = y_grid is None
    if not on_task_grid:
        grids[dim] = torch.as_tensor(y_grid, dtype=torch.float32)
    lf = model_log_density_on_grid(model, x, grid_points(grids), use_energy=energy)[0].double()
    if energy:          # log Z: on the task grid (the same points when no other grid was asked for)
        full = lf if on_task_grid else model_log_density_on_grid(model, x, grid_points(task_grids), use_energy=True)[0].double()
        lf = lf - (torch.logsumexp(full, 0) + math.log(task.cell_volume()))
    lf = lf.reshape([len(g) for g in grids])
    others = [d for d in range(task.D) if d != dim]
    if others:
        cells = [float(task_grids[d][1] - task_grids[d][0]) for d in others]
        lf = torch.logsumexp(lf, dim=others) + sum(math.log(c) for c in cells)
    return lf.exp().numpy()
