"""One ``train_step(model, batch, cfg) -> (loss, metrics)`` for every method.

The same function runs on one CPU in a unit test and inside every Ray worker; the loop around it
only orchestrates (backward, optimiser, NaN policy). ``metrics`` holds detached floats.
"""
from __future__ import annotations

import math

import torch

from . import losses
from .config import Config
from .circular import wrap
from .proposal import fixed_gmm_log_prob, fixed_gmm_sample


def _learned_proposal(model, x, y, cfg: Config, epoch: int, generator, circular):
    freeze = epoch < cfg.schedule.freeze_backbone_epochs
    enc = model.encode(x, freeze_backbone=freeze)
    mix = model.propose(enc)
    if epoch < cfg.schedule.proposal_warmup_epochs:
        nll = losses.mdn_nll(mix.log_prob(y.unsqueeze(1))[:, 0])
        return nll, {"loss": nll.item(), "mdn_nll": nll.item()}
    M = cfg.sampler.M_train
    y_all = torch.cat([y.unsqueeze(1), mix.sample(M, generator)], dim=1)     # (B, 1+M, D)
    logq = mix.log_prob(y_all)                                                # (B, 1+M), φ attached
    f = model.score(enc, y_all)                                               # (B, 1+M)
    nce = losses.nce_loss(f[:, 0], f[:, 1:], logq[:, 0], logq[:, 1:])
    log_z = losses.log_partition_is(f[:, 1:].detach(), logq[:, 1:])
    kl = log_z.mean()                                                         # = proposal_kl_loss
    is_teacher = cfg.method.name == "mdn_ebm_teacher"
    nll_q = losses.mdn_nll(logq[:, 0])
    if is_teacher:
        a = cfg.method.teacher_nll_weight
        loss = nce + (1.0 - a) * kl + a * nll_q
    else:
        loss = nce + cfg.method.kl_weight * kl
    with torch.no_grad():
        ess = losses.ess_fraction(f[:, 1:] - logq[:, 1:]).mean()
        is_nll = (log_z - f[:, 0]).mean()
    return loss, {"loss": loss.item(), "nce": nce.item(), "log_z": kl.item(), "mdn_nll": nll_q.item(),
                  "is_nll": is_nll.item(), "ess": ess.item()}


def _fixed_proposal(model, x, y, cfg: Config, epoch: int, generator, circular, sigmas):
    """NCE / NCE+ / ML-IS with the hand-designed 2-component mixture centred on y_i."""
    name = cfg.method.name
    enc = model.encode(x, freeze_backbone=epoch < cfg.schedule.freeze_backbone_epochs)
    B, D = y.shape
    M = cfg.sampler.M_train
    sig = torch.as_tensor(sigmas, dtype=y.dtype, device=y.device)
    eps = fixed_gmm_sample((B, M), D, sig, generator)                          # (B, M, D)
    y_s = wrap(y.unsqueeze(1) + eps, circular)
    logq_s = fixed_gmm_log_prob(eps, sig, circular)                            # (B, M), wrapped on circular dims
    if name == "nce_plus":
        eps0 = cfg.method.nce_plus_beta * fixed_gmm_sample((B, 1), D, sig, generator)
        y0 = wrap(y.unsqueeze(1) + eps0, circular)
        logq_0 = fixed_gmm_log_prob(eps0, sig, circular)[:, 0]
    else:
        y0 = y.unsqueeze(1)
        logq_0 = fixed_gmm_log_prob(torch.zeros_like(y0), sig, circular)[:, 0]
    f = model.score(enc, torch.cat([y0, y_s], dim=1))
    if name == "ml_is":
        loss = losses.ml_is_loss(f[:, 0], f[:, 1:], logq_s)
    else:
        loss = losses.nce_loss(f[:, 0], f[:, 1:], logq_0, logq_s)
    return loss, {"loss": loss.item()}


def _mdn(model, x, y, cfg: Config, epoch: int, generator, circular):
    enc = model.encode(x, freeze_backbone=epoch < cfg.schedule.freeze_backbone_epochs)
    nll = losses.mdn_nll(model.propose(enc).log_prob(y.unsqueeze(1))[:, 0])
    return nll, {"loss": nll.item(), "mdn_nll": nll.item()}


def train_step(model, batch: tuple[torch.Tensor, torch.Tensor], cfg: Config, *, epoch: int = 0,
               circular: tuple[bool, ...] | None = None, fixed_sigmas: tuple[float, ...] | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and detached metrics for one batch. x (B, ...), y (B, D).

    ``circular`` flags target dims that are angles; ``fixed_sigmas`` are the hand-designed
    proposal's σ's for the fixed-proposal baselines (cfg.method.fixed_sigmas wins when set).
    """
    x, y = batch
    circular = tuple(circular) if circular is not None else (False,) * y.shape[1]
    name = cfg.method.name
    if name in ("ebm_learned_proposal", "mdn_ebm_teacher"):
        return _learned_proposal(model, x, y, cfg, epoch, generator, circular)
    if name == "mdn":
        return _mdn(model, x, y, cfg, epoch, generator, circular)
    sigmas = cfg.method.fixed_sigmas or fixed_sigmas
    if not sigmas:
        raise ValueError(f"method {name!r} needs method.fixed_sigmas or the task's fixed σ's")
    return _fixed_proposal(model, x, y, cfg, epoch, generator, circular, sigmas)


def is_finite(loss: torch.Tensor) -> bool:
    return bool(torch.isfinite(loss).all()) and not math.isnan(loss.item())


class StepModule(torch.nn.Module):
    """``train_step`` as a module's forward, so a data-parallel wrapper (DDP) that only hooks
    ``forward`` sees the whole step: ``StepModule(model, cfg, ...)(x, y, epoch) -> (loss, metrics)``."""

    def __init__(self, model: torch.nn.Module, cfg: Config, circular: tuple[bool, ...],
                 fixed_sigmas: tuple[float, ...] | None, generator: torch.Generator | None = None):
        super().__init__()
        self.model = model
        self.cfg, self.circular, self.fixed_sigmas, self.generator = cfg, circular, fixed_sigmas, generator

    def forward(self, x: torch.Tensor, y: torch.Tensor, epoch: int = 0):
        return train_step(self.model, (x, y), self.cfg, epoch=epoch, circular=self.circular,
                          fixed_sigmas=self.fixed_sigmas, generator=self.generator)
