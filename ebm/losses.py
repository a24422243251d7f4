"""Losses as pure functions of tensors. B = batch, M = samples.

Gradient routing is part of each definition: which inputs are detached is stated and done here,
so a step function cannot get it wrong.
"""
from __future__ import annotations

import math

import torch


def nce_loss(f_true: torch.Tensor, f_samples: torch.Tensor,
             logq_true: torch.Tensor, logq_samples: torch.Tensor) -> torch.Tensor:
    """NCE with the true label as class 0 (docs/method.md §4.1).

    s_0 = f(y_i) − sg(log q(y_i)), s_m = f(y⁽ᵐ⁾) − sg(log q(y⁽ᵐ⁾)); L = −mean_i[s_0 − logsumexp_m s_m].
    f_true (B,), f_samples (B, M), logq_true (B,), logq_samples (B, M). Never reaches q's parameters.
    """
    s0 = f_true - logq_true.detach()
    s = torch.cat([s0.unsqueeze(1), f_samples - logq_samples.detach()], dim=1)
    return -(s0 - torch.logsumexp(s, dim=1)).mean()


def log_partition_is(f_samples: torch.Tensor, logq_samples: torch.Tensor) -> torch.Tensor:
    """Importance-sampling estimate log Ẑ = logsumexp_m(f − log q) − log M, per example -> (B,)."""
    M = f_samples.shape[1]
    return torch.logsumexp(f_samples - logq_samples, dim=1) - math.log(M)


def ess_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size / M of self-normalised weights: log_w (B, M) -> (B,) in (0, 1]."""
    w = torch.softmax(log_w, dim=1)
    return 1.0 / (w * w).sum(1) / log_w.shape[1]


def proposal_kl_loss(f_samples: torch.Tensor, logq_samples: torch.Tensor) -> torch.Tensor:
    """L_KL(φ) = mean_i log Ẑ_i with f detached: its φ-gradient is the self-normalised IS estimate of
    ∇_φ KL(p_θ ‖ q_φ) (samples held fixed). Never reaches θ or the feature net."""
    return log_partition_is(f_samples.detach(), logq_samples).mean()


def ml_is_loss(f_true: torch.Tensor, f_samples: torch.Tensor, logq_samples: torch.Tensor) -> torch.Tensor:
    """ML with IS (ECCV'20): mean_i(log Ẑ_i − f(y_i)) with a fixed (detached) proposal."""
    return (log_partition_is(f_samples, logq_samples.detach()) - f_true).mean()


def mdn_nll(logq_true: torch.Tensor) -> torch.Tensor:
    """Conventional MDN loss −mean_i log q(y_i|x_i)."""
    return -logq_true.mean()
