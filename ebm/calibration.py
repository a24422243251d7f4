"""Calibration of predictive distributions: the probability integral transform (PIT) and the coverage
of central intervals, per example and target dim, for each source of a predictive distribution:

    ``prediction``  the IS-based prediction: weighted samples from the proposal (docs/method.md §5),
    ``proposal``    the proposal q(y|x) alone, through its exact mixture CDF (§2),
    ``ebm_grid``    the EBM's density normalised on the task grid (§6, 1-D targets).

PIT: u = F(y), the predictive marginal CDF at the label; for a calibrated predictor u is uniform on
[0, 1]. The central interval at level ℓ is [F⁻¹((1 − ℓ)/2), F⁻¹((1 + ℓ)/2)], so it holds y iff
|u − ½| ≤ ℓ/2, and the coverage at every level follows from the PIT values.

Circular dims (§3, §5): the CDF runs along the circle from the antipode of the predictive circular
mean ȳ, F(y) = P(wrap_Δ(Y − ȳ) ≤ wrap_Δ(y − ȳ)) — deviations unwrapped around the mean, as the
prediction's quantiles are — so the central interval is the arc the prediction reports.

Weighted samples (and grid points, which are weighted samples with weights softmax f) use the
prediction's own CDF: mid-point plotting positions, linearly interpolated (ebm.predict.weighted_quantiles
is its inverse), so u ∈ [α, 1 − α] exactly when y lies in the interval ebm.predict reports.
"""
from __future__ import annotations

import math

import torch

from .circular import TWO_PI, circ_mask, wrap_diff
from .predict import weighted_mean
from .proposal import Mixture

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
SOURCES = ("prediction", "proposal", "ebm_grid")


def pit_weighted(samples: torch.Tensor, weights: torch.Tensor, y: torch.Tensor,
                 circular: tuple[bool, ...]) -> torch.Tensor:
    """PIT of y under weighted samples: samples (B, M, D), weights (B, M) summing to 1, y (B, D) -> (B, D).

    The CDF is the prediction's: sorted deviations from the (circular) weighted mean with mid-point
    positions F_j = Σ_{l≤j} w_(l) − w_(j)/2, linear between them, 0 below the first, 1 above the last."""
    B, M, D = samples.shape
    centre = weighted_mean(samples, weights, circular)                        # (B, D)
    dev = wrap_diff(samples - centre.unsqueeze(1), circular)                   # (B, M, D)
    yd = wrap_diff(y - centre, circular)                                       # (B, D)
    xs, order = torch.sort(dev, dim=1)
    ws = torch.gather(weights.unsqueeze(-1).expand(B, M, D), 1, order)
    cdf = torch.cumsum(ws, dim=1) - 0.5 * ws                                   # (B, M, D)
    xs_t, cdf_t = xs.transpose(1, 2).contiguous(), cdf.transpose(1, 2)         # (B, D, M)
    hi = torch.searchsorted(xs_t, yd.unsqueeze(-1).contiguous()).squeeze(-1)   # (B, D): first sample > y or = y
    lo_i, hi_i = (hi - 1).clamp(min=0), hi.clamp(max=M - 1)
    x_lo, x_hi = xs_t.gather(2, lo_i.unsqueeze(-1))[..., 0], xs_t.gather(2, hi_i.unsqueeze(-1))[..., 0]
    c_lo, c_hi = cdf_t.gather(2, lo_i.unsqueeze(-1))[..., 0], cdf_t.gather(2, hi_i.unsqueeze(-1))[..., 0]
    t = ((yd - x_lo) / (x_hi - x_lo).clamp_min(1e-30)).clamp(0.0, 1.0)
    u = c_lo + t * (c_hi - c_lo)
    u = torch.where(yd < xs_t[..., 0], torch.zeros_like(u), u)
    return torch.where(yd > xs_t[..., -1], torch.ones_like(u), u)


def pit_grid(log_density: torch.Tensor, grid: torch.Tensor, y: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """PIT of y under a 1-D density known on a grid: log_density (B, G) unnormalised at grid (G,),
    y (B, 1) -> (B, 1). The grid points are weighted samples with weights softmax(log_density)."""
    B, G = log_density.shape
    pts = grid.to(log_density).view(1, G, 1).expand(B, G, 1)
    return pit_weighted(pts, torch.softmax(log_density, dim=1), y, circular)


def von_mises_cdf(delta: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """P(Θ ≤ δ) for Θ ~ VM(0, κ) on (−π, π], δ in [−π, π] (float64).

    κ < 50: the Fourier series F = ½ + δ/2π + (1/π) Σ_n (I_n(κ)/I_0(κ)) sin(nδ)/n, with the Bessel
    ratios by backward recurrence (Hill 1977, algorithm 518; as scipy.stats.vonmises); κ ≥ 50: the
    normal approximation Φ(b sin(δ/2)), b = √(2/π) e^κ / I_0(κ)."""
    delta, kappa = torch.broadcast_tensors(delta.double(), kappa.double())
    k = kappa.clamp(max=50.0)
    s, c = torch.sin(delta), torch.cos(delta)
    p = 54                                   # ≥ ceil(28 + κ/2 − 100/(κ + 5)) for every κ < 50
    sn, cn = torch.sin(p * delta), torch.cos(p * delta)
    r = torch.zeros_like(delta)
    v = torch.zeros_like(delta)
    for n in range(p - 1, 0, -1):
        sn, cn = sn * c - cn * s, cn * c + sn * s          # sin(nδ), cos(nδ)
        r = 1.0 / (2.0 * n / k + r)                         # I_n / I_{n−1}
        v = r * (sn / n + v)
    series = (0.5 + delta / TWO_PI + v / math.pi).clamp(0.0, 1.0)
    b = math.sqrt(2.0 / math.pi) / torch.special.i0e(kappa)
    normal = torch.special.ndtr(b * torch.sin(delta / 2.0))
    return torch.where(kappa < 50.0, series, normal)


def mixture_centre(mix: Mixture) -> torch.Tensor:
    """The mean of each dim's marginal (B, D): Σ π_k μ_k for a linear dim; for a circular dim the
    direction of Σ π_k A(κ_k) e^{iμ_k}, A(κ) = I_1(κ)/I_0(κ) (the mean resultant of a von Mises)."""
    w = torch.softmax(mix.logits, dim=-1).unsqueeze(-1)                       # (B, K, 1)
    lin = (w * mix.means).sum(1)
    if not any(mix.circular):
        return lin
    kappa = torch.exp(-mix.log_sigma2)
    a = torch.special.i1e(kappa) / torch.special.i0e(kappa)
    s, c = (w * a * torch.sin(mix.means)).sum(1), (w * a * torch.cos(mix.means)).sum(1)
    circ = torch.remainder(torch.atan2(s, c), TWO_PI)
    return torch.where(circ_mask(mix.circular, lin.device), circ, lin)


def pit_mixture(mix: Mixture, y: torch.Tensor) -> torch.Tensor:
    """PIT of y (B, D) under each dim's marginal of the mixture proposal, exactly -> (B, D).

    Linear dim: Σ_k π_k Φ((y − μ_k)/σ_k). Circular dim: the mass of the counter-clockwise arc from
    the antipode of the marginal's circular mean to y, Σ_k π_k (von Mises arc mass)."""
    w = torch.softmax(mix.logits.double(), dim=-1).unsqueeze(-1)              # (B, K, 1)
    mu, ls2 = mix.means.double(), mix.log_sigma2.double()                     # (B, K, D)
    yk = y.double().unsqueeze(1)                                               # (B, 1, D)
    lin = (w * torch.special.ndtr((yk - mu) * torch.exp(-0.5 * ls2))).sum(1)
    if not any(mix.circular):
        return lin.to(y.dtype)
    kappa = torch.exp(-ls2)
    start = mixture_centre(mix).double().unsqueeze(1) + math.pi                # (B, 1, D): the antipode
    circ = (True,) * mu.shape[-1]
    d_start, d_y = wrap_diff(start - mu, circ), wrap_diff(yk - mu, circ)
    arc = von_mises_cdf(d_y, kappa) - von_mises_cdf(d_start, kappa)
    # going counter-clockwise from the start, the deviation from μ_k grows until μ_k + π, then wraps to −π
    arc = torch.where(d_y >= d_start, arc, arc + 1.0).clamp(0.0, 1.0)
    out = (w * arc).sum(1).clamp(0.0, 1.0)
    return torch.where(circ_mask(mix.circular, y.device), out, lin).to(y.dtype)


def in_central_interval(pit: torch.Tensor, levels: tuple[float, ...] = LEVELS) -> torch.Tensor:
    """Whether y lies in the central interval at each level: pit (N, D) -> (N, L, D) bool."""
    lv = torch.as_tensor(levels, dtype=pit.dtype, device=pit.device).view(1, -1, 1)
    return (pit.unsqueeze(1) - 0.5).abs() <= lv / 2 + 1e-9


def coverage(pit: torch.Tensor, levels: tuple[float, ...] = LEVELS) -> torch.Tensor:
    """Fraction of examples whose central interval holds y, per level and dim: (N, D) -> (L, D)."""
    return in_central_interval(pit, levels).float().mean(0)


def joint_coverage(pit: torch.Tensor, levels: tuple[float, ...] = LEVELS) -> torch.Tensor:
    """Fraction of examples whose per-dim central intervals hold y in every dim: (N, D) -> (L,)
    (the ``coverage`` metric of docs/method.md §6 at each level)."""
    return in_central_interval(pit, levels).all(-1).float().mean(0)


def calibration_error(pit: torch.Tensor, levels: tuple[float, ...] = LEVELS) -> float:
    """Mean over levels of |coverage − level|, the dims pooled: a single figure, 0 when calibrated."""
    cov = coverage(pit.reshape(-1, 1), levels)[:, 0]
    return float((cov - torch.as_tensor(levels, dtype=cov.dtype)).abs().mean())


@torch.no_grad()
def model_pits(model, x: torch.Tensor, y: torch.Tensor, circular: tuple[bool, ...], *, M: int | None,
               grid: torch.Tensor | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """PIT values (B, D) of a batch x (B, ...), y (B, D) for every source the model has: ``prediction``
    (M IS samples; skipped with M None) and ``proposal`` with a learned proposal, ``ebm_grid`` with an
    energy head and a 1-D ``grid`` (G,) (the task's; ebm.metrics computes the density on it)."""
    from . import metrics
    from .predict import predict
    out = {}
    enc = model.encode(x)           # once: the proposal's and the grid's PITs read it (predict encodes its own)
    if model.has_proposal:
        if M is not None:
            pr = predict(model, x, circular, M=M, keep_samples=True, generator=generator)
            out["prediction"] = pit_weighted(pr.samples, pr.weights, y, circular)
        out["proposal"] = pit_mixture(model.propose(enc), y)
    if model.has_energy and grid is not None and y.shape[1] == 1:
        f = metrics.scores_on_grid(model, enc, grid.to(y).unsqueeze(1))
        out["ebm_grid"] = pit_grid(f, grid, y, circular)
    return out
