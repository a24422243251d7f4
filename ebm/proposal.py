"""The mixture proposal q(y|x): log-density in log space and ancestral sampling.

K components with diagonal covariance over D target dims; the weights are shared across dims.
Linear dims are Gaussian; circular dims (angles on [0, 2π)) are von Mises with concentration
κ = 1/σ², so the same head outputs (mean, log σ²) parameterise both and the von Mises tends to the
Gaussian as κ grows. Everything is computed in log space (logsumexp over components); the reference
code's exp-then-log overflows for far-away samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .circular import TWO_PI

_LOG_2PI = math.log(TWO_PI)


@dataclass
class Mixture:
    """Parameters of a batch of mixtures.

    means: (B, K, D); log_sigma2: (B, K, D); logits: (B, K) (unnormalised weights);
    circular: per-dim flags, length D.
    """

    means: torch.Tensor
    log_sigma2: torch.Tensor
    logits: torch.Tensor
    circular: tuple[bool, ...]

    @property
    def K(self) -> int:
        return self.logits.shape[-1]

    def detach(self) -> "Mixture":
        return Mixture(self.means.detach(), self.log_sigma2.detach(), self.logits.detach(), self.circular)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """log q(y|x) for y of shape (B, S, D) -> (B, S)."""
        return mixture_log_prob(self, y)

    def sample(self, M: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """M ancestral samples per example -> (B, M, D), detached."""
        return mixture_sample(self, M, generator)


def _log_i0(kappa: torch.Tensor) -> torch.Tensor:
    # log I0(κ) = log(i0e(κ)) + κ: no overflow for large κ.
    return torch.log(torch.special.i0e(kappa)) + kappa


def component_log_prob(mix: Mixture, y: torch.Tensor) -> torch.Tensor:
    """Per-component log densities summed over dims: y (B, S, D) -> (B, S, K)."""
    mu = mix.means.unsqueeze(1)                      # (B, 1, K, D)
    ls2 = mix.log_sigma2.unsqueeze(1)                # (B, 1, K, D)
    diff = y.unsqueeze(2) - mu                       # (B, S, K, D)
    inv_var = torch.exp(-ls2)
    lin = -0.5 * (diff * diff * inv_var + ls2 + _LOG_2PI)
    if any(mix.circular):
        circ = torch.tensor(mix.circular, device=y.device)
        kappa = inv_var
        vm = kappa * torch.cos(diff) - _LOG_2PI - _log_i0(kappa)
        lin = torch.where(circ, vm, lin)
    return lin.sum(-1)


def mixture_log_prob(mix: Mixture, y: torch.Tensor) -> torch.Tensor:
    """log Σ_k π_k Π_d N(y_d; μ_kd, σ²_kd) in log space: y (B, S, D) -> (B, S)."""
    log_w = torch.log_softmax(mix.logits, dim=-1).unsqueeze(1)    # (B, 1, K)
    return torch.logsumexp(component_log_prob(mix, y) + log_w, dim=-1)


class NonFiniteProposal(FloatingPointError):
    """The mixture to sample from has non-finite weights (a diverged network)."""


@torch.no_grad()
def mixture_sample(mix: Mixture, M: int, generator=None) -> torch.Tensor:
    """Ancestral sampling: component by weight, then per-dim Gaussian / von Mises. -> (B, M, D).

    ``generator``: one ``torch.Generator`` for the batch, or a sequence of B (one per row: row i's
    samples are those of that row alone with its generator, whatever the rest of the batch)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        gens, B = list(generator), mix.means.shape[0]
        if len(gens) != B:
            raise ValueError(f"{len(gens)} generators for a batch of {B} rows")
        rows = [mixture_sample(Mixture(mix.means[i:i + 1], mix.log_sigma2[i:i + 1], mix.logits[i:i + 1], mix.circular),
                               M, g) for i, g in enumerate(gens)]
        return torch.cat(rows) if rows else mix.means.new_zeros((0, M, mix.means.shape[-1]))
    B, K, D = mix.means.shape
    probs = torch.softmax(mix.logits.float(), dim=-1)
    try:
        comp = torch.multinomial(probs, M, replacement=True, generator=generator)  # (B, M)
    except RuntimeError as e:       # NaN/inf weights: the proposal (or what feeds it) diverged
        raise NonFiniteProposal(f"the proposal's mixture weights are not finite ({e})") from None
    idx = comp.unsqueeze(-1).expand(B, M, D)
    mu = torch.gather(mix.means, 1, idx)
    ls2 = torch.gather(mix.log_sigma2, 1, idx)
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    y = mu + torch.exp(0.5 * ls2) * eps
    if any(mix.circular):
        circ = torch.tensor(mix.circular, device=mu.device)
        vm = sample_von_mises(mu, torch.exp(-ls2), generator)
        y = torch.where(circ, vm, y)
    return y


@torch.no_grad()
def sample_von_mises(loc: torch.Tensor, kappa: torch.Tensor,
                     generator: torch.Generator | None = None, max_rounds: int = 100) -> torch.Tensor:
    """Best–Fisher rejection sampler, vectorised; returns angles in [0, 2π) of loc's shape.

    torch.distributions.VonMises has no generator argument; this one is reproducible per generator.
    Acceptance is ≥ 66% for every κ, so a handful of rounds suffices.
    """
    kappa = kappa.clamp_min(1e-6).double()
    tau = 1.0 + torch.sqrt(1.0 + 4.0 * kappa * kappa)
    rho = (tau - torch.sqrt(2.0 * tau)) / (2.0 * kappa)
    r = (1.0 + rho * rho) / (2.0 * rho)
    out = torch.zeros_like(kappa)
    todo = torch.ones_like(kappa, dtype=torch.bool)
    for _ in range(max_rounds):
        u1, u2, u3 = (torch.rand(kappa.shape, generator=generator, device=kappa.device, dtype=kappa.dtype)
                      for _ in range(3))
        z = torch.cos(math.pi * u1)
        f = (1.0 + r * z) / (r + z)
        c = kappa * (r - f)
        accept = ((c * (2.0 - c) - u2) > 0) | ((torch.log(c / u2) + 1.0 - c) >= 0)
        theta = torch.sign(u3 - 0.5) * torch.acos(f.clamp(-1.0, 1.0))
        take = accept & todo
        out = torch.where(take, theta, out)
        todo = todo & ~accept
        if not bool(todo.any()):
            break
    return torch.remainder(out.to(loc.dtype) + loc, TWO_PI)


def fixed_gmm_log_prob(eps: torch.Tensor, sigmas: torch.Tensor,
                       circular: tuple[bool, ...] | None = None) -> torch.Tensor:
    """Log-density of the hand-designed noise: equal-weight mixture of N(0, diag σ_k²) at eps.

    eps: (..., D); sigmas: (S,) (the same σ in every dim) or (S, D) -> (...). Used by the NCE /
    NCE+ / ML-IS baselines. ``circular`` flags dims whose sample is wrapped onto the circle,
    y = wrap(y_i + eps): there the density of the sample is the wrapped mixture
    q(eps) = (1/S) Σ_k Π_d Σ_j N(eps_d + 2πj; 0, σ_kd²) over the images j of a circular dim
    (docs/method.md §4.4), not the Gaussian density of the unwrapped offset.
    """
    D = eps.shape[-1]
    sig = _per_dim(sigmas, D).to(eps)                                            # (S, D)
    var = sig * sig
    if circular is not None and any(circular):
        circ = torch.tensor(tuple(circular), dtype=torch.bool, device=eps.device)
        e = torch.where(circ, eps - TWO_PI * torch.round(eps / TWO_PI), eps)   # circular dims on [-π, π]
        shifts = TWO_PI * torch.arange(-_wrap_images(sig[:, circ]), _wrap_images(sig[:, circ]) + 1,
                                       dtype=eps.dtype, device=eps.device)      # (J,)
        x = e.unsqueeze(-2).unsqueeze(-1) + torch.where(circ.unsqueeze(-1), shifts, torch.zeros_like(shifts))
        sq = x * x / var.unsqueeze(-1)                                          # (..., S, D, J)
        # linear dims keep their one image (j = 0); a circular dim sums over all of them
        sq = torch.where(circ.unsqueeze(-1), sq, torch.where(shifts == 0, sq, torch.full_like(sq, math.inf)))
        per_dim = torch.logsumexp(-0.5 * sq, dim=-1)                            # (..., S, D)
    else:
        per_dim = -0.5 * eps.unsqueeze(-2) ** 2 / var                           # (..., S, D)
    comp = per_dim.sum(-1) - 0.5 * (torch.log(var).sum(-1) + D * _LOG_2PI)     # (..., S)
    return torch.logsumexp(comp, dim=-1) - math.log(sig.shape[0])


# exp(-40) relative: the first image left out sits at least (2n+1)π from the offset in [-π, π]
_WRAP_TAIL_NATS = 40.0


def _wrap_images(sig_circ: torch.Tensor) -> int:
    """How many images n (j = -n..n) the wrapped normal needs for the largest circular σ: the
    nearest term left out, at distance ≥ (2n+1)π, is below exp(-40) of the Gaussian's peak."""
    smax = float(sig_circ.max())
    return max(1, math.ceil((smax * math.sqrt(2.0 * _WRAP_TAIL_NATS) / math.pi - 1.0) / 2.0))


def _per_dim(sigmas: torch.Tensor, D: int) -> torch.Tensor:
    return sigmas.unsqueeze(-1).expand(-1, D) if sigmas.dim() == 1 else sigmas


def fixed_gmm_sample(shape: tuple[int, ...], D: int, sigmas: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws eps ~ equal-weight mixture of N(0, diag σ_k²), sigmas (S,) or (S, D): -> (*shape, D)."""
    comp = torch.randint(0, sigmas.shape[0], shape, generator=generator, device=sigmas.device)
    eps = torch.randn((*shape, D), generator=generator, device=sigmas.device)
    return eps * _per_dim(sigmas, D)[comp]
