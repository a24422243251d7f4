"""One ``train_step(model, batch, cfg) -> (loss, metrics)`` for every method.

The same function runs on one CPU in a unit test and inside every Ray worker; the loop around it
only orchestrates (backward, optimiser, NaN policy). ``metrics`` holds detached 0-dim tensors on the
step's device: the loop sums them there and reads them once per epoch (no host sync per step).

Precision (``optim.precision = "bf16"``): the feature net and the energy head run under
``torch.autocast(bfloat16)``; their outputs are cast back to fp32 before anything else, so the
proposal head, the log-space mixture densities, logsumexp, log Ẑ and every loss are fp32.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import losses
from .config import Config
from .circular import wrap
from .nets import Encoded
from .proposal import fixed_gmm_log_prob, fixed_gmm_sample


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 runs natively: assumed on accelerators; on a CPU only with AVX512-BF16 or AMX-BF16
    (Linux's flags), else torch emulates it and it is slower than fp32 (measured on a CPU without them:
    the image step at 0.40x fp32's speed, bench/bench_step.py)."""
    if device.type != "cpu":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True        # not Linux: no way to tell, no warning
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(cfg: Config, device_type: str):
    """The autocast region of ``optim.precision`` (a no-op context for fp32)."""
    if cfg.optim.precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


def _encode(model, x, cfg: Config, epoch: int) -> Encoded:
    """Features in the run's precision, returned as fp32 (the proposal head and its densities run in fp32)."""
    with autocast(cfg, x.device.type):
        enc = model.encode(x, freeze_backbone=epoch < cfg.schedule.freeze_backbone_epochs)
    return Encoded(_fp32(enc.h_energy), _fp32(enc.h_proposal))


def _score(model, enc: Encoded, y: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Energy scores (B, S) in the run's precision, returned as fp32 for the losses."""
    with autocast(cfg, y.device.type):
        f = model.score(enc, y)
    return _fp32(f)


def _metrics(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in values.items()}


def _learned_proposal(model, x, y, cfg: Config, epoch: int, generator, circular):
    enc = _encode(model, x, cfg, epoch)
    mix = model.propose(enc)
    if epoch < cfg.schedule.proposal_warmup_epochs:
        nll = losses.mdn_nll(mix.log_prob(y.unsqueeze(1))[:, 0])
        return nll, _metrics(loss=nll, mdn_nll=nll)
    M = cfg.sampler.M_train
    y_all = torch.cat([y.unsqueeze(1), mix.sample(M, generator)], dim=1)     # (B, 1+M, D)
    logq = mix.log_prob(y_all)                                                # (B, 1+M), φ attached
    f = _score(model, enc, y_all, cfg)                                        # (B, 1+M)
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
    return loss, _metrics(loss=loss, nce=nce, log_z=kl, mdn_nll=nll_q, is_nll=is_nll, ess=ess)


def _fixed_proposal(model, x, y, cfg: Config, epoch: int, generator, circular, sigmas):
    """NCE / NCE+ / ML-IS with the hand-designed 2-component mixture centred on y_i."""
    name = cfg.method.name
    enc = _encode(model, x, cfg, epoch)
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
    f = _score(model, enc, torch.cat([y0, y_s], dim=1), cfg)
    if name == "ml_is":
        loss = losses.ml_is_loss(f[:, 0], f[:, 1:], logq_s)
    else:
        loss = losses.nce_loss(f[:, 0], f[:, 1:], logq_0, logq_s)
    return loss, _metrics(loss=loss)


def _mdn(model, x, y, cfg: Config, epoch: int, generator, circular):
    enc = _encode(model, x, cfg, epoch)
    nll = losses.mdn_nll(model.propose(enc).log_prob(y.unsqueeze(1))[:, 0])
    return nll, _metrics(loss=nll, mdn_nll=nll)


def train_step(model, batch: tuple[torch.Tensor, torch.Tensor], cfg: Config, *, epoch: int = 0,
               circular: tuple[bool, ...] | None = None, fixed_sigmas: tuple[float, ...] | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (fp32, 0-dim) and detached 0-dim metric tensors for one batch. x (B, ...), y (B, D).

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


def frozen_modules(model, cfg: Config, epoch: int) -> list[torch.nn.Module]:
    """The sub-networks that get no gradient from :func:`train_step` in ``epoch``'s phase (docs/method.md
    §4): the feature nets while ``schedule.freeze_backbone_epochs`` lasts; during
    ``schedule.proposal_warmup_epochs`` of the learned-proposal methods, everything the proposal's NLL
    does not reach (the energy side, and a feature net the proposal sees only detached). The loop sets
    their ``requires_grad`` to False for the phase, so a data-parallel wrapper built then neither waits
    for nor communicates their (zero) gradients."""
    nets = list(model.ebm_and_mdn()) if hasattr(model, "ebm_and_mdn") else [model]
    frozen: list[torch.nn.Module] = []
    if epoch < cfg.schedule.freeze_backbone_epochs:
        frozen += [m.feature_net for m in nets]
    if epoch < cfg.schedule.proposal_warmup_epochs and cfg.method.name in ("ebm_learned_proposal", "mdn_ebm_teacher"):
        for m in nets:
            if m.has_energy:
                frozen.append(m.energy_head)
            if not m.has_proposal or m.detach_proposal_features:
                frozen.append(m.feature_net)
    out: list[torch.nn.Module] = []
    for m in frozen:
        if not any(m is o for o in out):
            out.append(m)
    return out


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
