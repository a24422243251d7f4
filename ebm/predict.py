"""Stand-alone prediction by importance sampling with the learned proposal (docs/method.md §5).

y⁽ᵐ⁾ ~ q(·|x), log w_m = f(x, y⁽ᵐ⁾) − log q(y⁽ᵐ⁾|x), w̃ = softmax(log w). No initial estimate is
needed. For an MDN (no energy head) the weights are uniform over its own samples.
Circular dims: the mean is the weighted circular mean; spreads and quantiles are taken on the
samples unwrapped to (mean − π, mean + π].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .circular import TWO_PI, circ_mask, wrap, wrap_diff
from .losses import ess_fraction, log_partition_is


@dataclass
class Prediction:
    """Per-example summaries. B examples, D dims, Q quantile levels, M samples."""

    mode: torch.Tensor                  # (B, D)
    mean: torch.Tensor                  # (B, D)
    std: torch.Tensor                   # (B, D)
    quantiles: torch.Tensor             # (B, Q, D) at ``levels``
    levels: tuple[float, ...]
    interval: torch.Tensor              # (B, 2, D) central interval at ``interval_level``
    interval_level: float
    ess: torch.Tensor                   # (B,) effective sample size / M
    log_z: torch.Tensor | None = None   # (B,) IS estimate of log Z(x) (EBMs only)
    samples: torch.Tensor | None = None  # (B, M, D)
    weights: torch.Tensor | None = None  # (B, M), sum to 1
    extra: dict = field(default_factory=dict)


def weighted_mean(y: torch.Tensor, w: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """y (B, M, D), w (B, M) -> (B, D); circular dims by atan2 of the weighted resultant."""
    lin = (w.unsqueeze(-1) * y).sum(1)
    if not any(circular):
        return lin
    s = (w.unsqueeze(-1) * torch.sin(y)).sum(1)
    c = (w.unsqueeze(-1) * torch.cos(y)).sum(1)
    circ = torch.remainder(torch.atan2(s, c), TWO_PI)
    return torch.where(circ_mask(circular, y.device), circ, lin)


def weighted_quantiles(y: torch.Tensor, w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantiles of weighted samples per dim: y (B, M, D), w (B, M), levels (Q,) -> (B, Q, D).

    Inverse of the weighted empirical CDF with mid-point plotting positions, linearly interpolated.
    """
    B, M, D = y.shape
    ys, order = torch.sort(y, dim=1)
    ws = torch.gather(w.unsqueeze(-1).expand(B, M, D), 1, order)
    cdf = torch.cumsum(ws, dim=1) - 0.5 * ws                                  # (B, M, D)
    q = levels.to(y.dtype).view(1, -1, 1).expand(B, -1, D).contiguous()      # (B, Q, D)
    cdf_t = cdf.transpose(1, 2).contiguous()                                   # (B, D, M)
    idx = torch.searchsorted(cdf_t, q.transpose(1, 2).contiguous()).transpose(1, 2)  # (B, Q, D)
    hi = idx.clamp(max=M - 1)
    lo = (idx - 1).clamp(min=0)
    c_lo, c_hi = torch.gather(cdf, 1, lo), torch.gather(cdf, 1, hi)
    y_lo, y_hi = torch.gather(ys, 1, lo), torch.gather(ys, 1, hi)
    t = ((q - c_lo) / (c_hi - c_lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    return y_lo + t * (y_hi - y_lo)


def summarize(samples: torch.Tensor, log_w: torch.Tensor, circular: tuple[bool, ...],
              levels: tuple[float, ...], interval_level: float) -> dict[str, torch.Tensor]:
    """Mean, std, quantiles, central interval, ESS of weighted samples (B, M, D) / log_w (B, M)."""
    w = torch.softmax(log_w, dim=1)
    mean = weighted_mean(samples, w, circular)
    centred = wrap_diff(samples - mean.unsqueeze(1), circular)                # (B, M, D)
    std = torch.sqrt((w.unsqueeze(-1) * centred ** 2).sum(1))
    alpha = (1.0 - interval_level) / 2.0
    lv = torch.tensor(list(levels) + [alpha, 1.0 - alpha], device=samples.device)
    qs = weighted_quantiles(centred, w, lv) + mean.unsqueeze(1)
    qs = wrap(qs, circular)
    ess = ess_fraction(log_w)
    return {"mean": mean, "std": std, "quantiles": qs[:, : len(levels)], "interval": qs[:, len(levels):],
            "weights": w, "ess": ess}


def refine_mode(model, enc, y0: torch.Tensor, step: torch.Tensor, n_steps: int,
                circular: tuple[bool, ...]) -> torch.Tensor:
    """Gradient ascent on f from y0 (B, D) with a per-example, per-dim step (B, D); a step that does
    not increase f is rejected and that example's step halved (ECCV'20 refinement)."""
    y = y0.clone()
    with torch.no_grad():
        f = model.score(enc, y.unsqueeze(1))[:, 0]
    step = step.clone()
    for _ in range(n_steps):
        with torch.enable_grad():
            yg = y.detach().requires_grad_(True)
            g = torch.autograd.grad(model.score(enc, yg.unsqueeze(1)).sum(), yg)[0]
        with torch.no_grad():
            cand = y + step * g
            cand = wrap(cand, circular)
            f_new = model.score(enc, cand.unsqueeze(1))[:, 0]
            better = f_new > f
            y = torch.where(better.unsqueeze(1), cand, y)
            f = torch.where(better, f_new, f)
            step = torch.where(better.unsqueeze(1), step, 0.5 * step)
    return y


@torch.no_grad()
def predict(model, x: torch.Tensor, circular: tuple[bool, ...], M: int = 1024,
            levels: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95), interval_level: float = 0.9,
            refine_steps: int = 0, keep_samples: bool = False,
            generator: torch.Generator | None = None) -> Prediction:
    """Predictive summaries for x (B, ...). The model must have a proposal (not the fixed-proposal
    baselines, which need the true y to place their noise — docs/method.md §4.4)."""
    if not model.has_proposal:
        raise ValueError("this model has no learned proposal (fixed-proposal baselines need y_i to place "
                         "their noise and cannot predict without an initial estimate)")
    enc = model.encode(x)
    mix = model.propose(enc)
    ys = mix.sample(M, generator)                                             # (B, M, D)
    logq = mix.log_prob(ys)
    if model.has_energy:
        f = model.score(enc, ys)
        log_w = f - logq
        log_z = log_partition_is(f, logq)
        key = f
    else:
        log_w = torch.zeros_like(logq)
        log_z = None
        key = logq
    s = summarize(ys, log_w, circular, levels, interval_level)
    best = key.argmax(dim=1)
    mode = ys[torch.arange(ys.shape[0]), best]                                # (B, D)
    if refine_steps and model.has_energy:
        mode = refine_mode(model, enc, mode, 0.1 * s["std"] ** 2 + 1e-12, refine_steps, circular)
    return Prediction(mode=mode, mean=s["mean"], std=s["std"], quantiles=s["quantiles"], levels=tuple(levels),
                      interval=s["interval"], interval_level=interval_level, ess=s["ess"], log_z=log_z,
                      samples=ys if keep_samples else None, weights=s["weights"] if keep_samples else None)


@torch.no_grad()
def log_density(model, x: torch.Tensor, y: torch.Tensor, M: int = 1024,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """log p(y|x) at given y (B, S, D) -> (B, S): f(y) − log Ẑ for an EBM (IS with the proposal),
    log q(y|x) for an MDN."""
    enc = model.encode(x)
    if not model.has_energy:
        return model.propose(enc).log_prob(y)
    mix = model.propose(enc)
    ys = mix.sample(M, generator)
    log_z = log_partition_is(model.score(enc, ys), mix.log_prob(ys))
    return model.score(enc, y) - log_z.unsqueeze(1)
