"""Networks: feature nets, the energy head f(h, y), the mixture proposal head q(y|h).

Single-device code: DDP, devices and data loading are applied from outside.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .circular import circ_mask
from .proposal import Mixture
from .resnet import ResNet, resnet_for


class ToyFeatureNet(nn.Module):
    """x (B, in_dim) -> h (B, hidden): Linear-ReLU-Linear-ReLU (docs/method.md §1).

    Inputs are standardised by buffers ``x_mean``/``x_std`` (identity until ``set_input_stats``),
    so the statistics travel with the weights and a saved model predicts on raw inputs.
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out_dim = hidden
        self.register_buffer("x_mean", torch.zeros(in_dim))
        self.register_buffer("x_std", torch.ones(in_dim))

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.x_mean.copy_(torch.as_tensor(mean).reshape(self.x_mean.shape))
        self.x_std.copy_(torch.as_tensor(std).reshape(self.x_std.shape).clamp_min(1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.x_mean) / self.x_std
        return F.relu(self.fc2(F.relu(self.fc1(x))))


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class EnergyHead(nn.Module):
    """f(h, y): y-embedding MLP, joint layer over [h, e(y)], residual blocks, scalar score.

    The first joint weight is split W = [W_h | W_y] so that W_h·h + b is computed once per example
    and broadcast over the S samples (exactly the concatenated layer; the state dict is the same).
    Circular target dims enter as (cos y, sin y) so that f is periodic in them.
    """

    def __init__(self, feat_dim: int, D: int, circular: tuple[bool, ...], y_embed: list[int],
                 hidden: int, residual_blocks: int):
        super().__init__()
        self.feat_dim = feat_dim
        self.register_buffer("circular", circ_mask(circular), persistent=False)
        self.n_circ = sum(circular)
        self.y_net = _mlp([D + self.n_circ] + list(y_embed))
        self.joint = nn.Linear(feat_dim + y_embed[-1], hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(residual_blocks))
        self.out = nn.Linear(hidden, 1)

    def embed_y(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, S, D) -> e (B, S, y_embed[-1])."""
        if self.n_circ:
            c = y[..., self.circular]
            y = torch.cat([y[..., ~self.circular], torch.cos(c), torch.sin(c)], dim=-1)
        return self.y_net(y)

    def _joint_parts(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The split first joint layer: a = W_h·h + b (B, hidden), once per example, and W_y."""
        W = self.joint.weight
        # Contiguous copies of the two (small) weight blocks: a strided slice makes the big matmul
        # that follows take a slower path (measured ~20 % on the image head).
        return F.linear(h, W[:, : self.feat_dim].contiguous(), self.joint.bias), W[:, self.feat_dim:].contiguous()

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h (B, H), y (B, S, D) -> scores f (B, S)."""
        a, W_y = self._joint_parts(h)
        e = self.embed_y(y)
        if not self.blocks:
            return _JointTail.apply(e, W_y, a, self.out.weight, self.out.bias)
        c = F.linear(e, W_y)                                                   # (B, S, hidden)
        return self._tail(F.relu(c + a.unsqueeze(1)))

    def forward_shared(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h (B, H), y (S, D) the same S points for every example (a task grid) -> scores f (B, S).

        The y-embedding and its joint-layer term W_y·e(y) depend on y alone: computed once for the S
        points instead of B times (B·S·(hidden·E + the y-MLP) multiply-adds saved; for the image head
        that is all but the output layer's). The arithmetic per score is :meth:`forward`'s, in the same order."""
        a, W_y = self._joint_parts(h)
        e = self.embed_y(y)                                                    # (S, E)
        if not self.blocks:         # _JointTail.forward's steps with its (B, S, E) @ W_yᵀ done once, (S, E) @ W_yᵀ
            dt = e.dtype
            z = torch.matmul(e, W_y.to(dt).t()).unsqueeze(0) + a.to(dt).unsqueeze(1)
            z.clamp_(min=0)
            return torch.matmul(z, self.out.weight.to(dt)[0]) + self.out.bias
        return self._tail(F.relu(F.linear(e, W_y).unsqueeze(0) + a.unsqueeze(1)))

    def forward_concat(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The straightforward form: h replicated per sample and concatenated (tests, benchmarks)."""
        e = self.embed_y(y)
        hx = h.unsqueeze(1).expand(-1, y.shape[1], -1)
        return self._tail(F.relu(self.joint(torch.cat([hx, e], dim=-1))))

    def _tail(self, z: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            z = F.relu(blk(z)) + z
        return self.out(z).squeeze(-1)


class _JointTail(torch.autograd.Function):
    """f = w·relu(e W_yᵀ + a) + b for the head without residual blocks, with a hand-written backward.

    Same function and gradients as the autograd composition, with fewer passes over the
    (B, S, hidden) activations: the pre-activation is built and rectified in place, and the
    output layer's backward is a broadcast multiply instead of an outer-product matmul.
    e (B, S, E), W_y (H, E), a (B, H), w (1, H), b (1,) -> f (B, S).
    """

    @staticmethod
    def forward(ctx, e, W_y, a, w, b):
        # Under autocast (optim.precision = "bf16") the y-embedding arrives in bf16: the whole tail then
        # computes in e's dtype, and f comes out fp32 (b is an fp32 parameter). In fp32 the casts are no-ops.
        dt = e.dtype
        W_c, w_c = W_y.to(dt), w.to(dt)
        z = torch.matmul(e, W_c.t())
        z.add_(a.to(dt).unsqueeze(1)).clamp_(min=0)
        f = torch.matmul(z, w_c[0]) + b
        ctx.save_for_backward(e, W_c, z, w_c)
        ctx.dtypes = (W_y.dtype, a.dtype, w.dtype)
        return f

    @staticmethod
    def backward(ctx, gf):
        e, W_y, z, w = ctx.saved_tensors
        W_dtype, a_dtype, w_dtype = ctx.dtypes
        H, E = W_y.shape
        g = gf.to(z.dtype)
        dz = g.unsqueeze(-1) * w[0]
        dz.masked_fill_(z <= 0, 0.0)
        dz2 = dz.reshape(-1, H)
        de = torch.matmul(dz, W_y) if ctx.needs_input_grad[0] else None
        dW_y = (dz2.t() @ e.reshape(-1, E)).to(W_dtype) if ctx.needs_input_grad[1] else None
        da = dz.sum(1).to(a_dtype) if ctx.needs_input_grad[2] else None
        dw = (z.reshape(-1, H).t() @ g.reshape(-1)).unsqueeze(0).to(w_dtype) if ctx.needs_input_grad[3] else None
        db = gf.sum().reshape(1) if ctx.needs_input_grad[4] else None
        return de, dW_y, da, dw, db


class ProposalHead(nn.Module):
    """h (B, H) -> Mixture with K components over D dims: three 2-layer ReLU MLP branches."""

    def __init__(self, feat_dim: int, D: int, K: int, hidden: int, circular: tuple[bool, ...],
                 log_sigma2_min: float, log_sigma2_max: float):
        super().__init__()
        self.D, self.K, self.circular = D, K, circular
        self.lo, self.hi = log_sigma2_min, log_sigma2_max
        self.mean = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, K * D))
        self.log_sigma2 = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, K * D))
        self.logits = nn.Sequential(nn.Linear(feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, K))

    def forward(self, h: torch.Tensor) -> Mixture:
        B = h.shape[0]
        means = self.mean(h).view(B, self.K, self.D)
        ls2 = self.log_sigma2(h).view(B, self.K, self.D).clamp(self.lo, self.hi)
        return Mixture(means, ls2, self.logits(h), self.circular)


class Encoded(NamedTuple):
    """Features for the energy head and for the proposal (the same tensor in a joint model)."""
    h_energy: torch.Tensor | None
    h_proposal: torch.Tensor | None


class EBMRegressor(nn.Module):
    """Feature net + (optional) energy head + (optional) proposal head.

    The loss is not computed here: ``encode``, ``score`` and ``propose`` return
    features, scores and proposal parameters; ``ebm.steps`` combines them.
    """

    def __init__(self, feature_net: nn.Module, energy: EnergyHead | None, proposal: ProposalHead | None,
                 detach_proposal_features: bool):
        super().__init__()
        self.feature_net = feature_net
        self.energy_head = energy
        self.proposal_head = proposal
        self.detach_proposal_features = detach_proposal_features

    @property
    def has_energy(self) -> bool:
        return self.energy_head is not None

    @property
    def has_proposal(self) -> bool:
        return self.proposal_head is not None

    def encode(self, x: torch.Tensor, freeze_backbone: bool = False) -> Encoded:
        if freeze_backbone:
            with torch.no_grad():       # same values; no activations kept for a backward that never comes
                h = self.feature_net(x)
        else:
            h = self.feature_net(x)
        return Encoded(h if self.has_energy else None, h if self.has_proposal else None)

    def score(self, enc: Encoded, y: torch.Tensor) -> torch.Tensor:
        """y (B, S, D) -> f (B, S)."""
        return self.energy_head(enc.h_energy, y)

    def score_shared(self, enc: Encoded, y: torch.Tensor) -> torch.Tensor:
        """y (S, D), the same points for every example (a grid) -> f (B, S): ``score`` of them, cheaper."""
        return self.energy_head.forward_shared(enc.h_energy, y)

    def propose(self, enc: Encoded) -> Mixture:
        h = enc.h_proposal
        return self.proposal_head(h.detach() if self.detach_proposal_features else h)


class TeacherPair(nn.Module):
    """MDN with an EBM teacher (docs/method.md §4.2): two separate networks, updated by one Adam with two parameter groups from one backward pass (the same update as EBM step then MDN step; optim.grad_clip, if on, clips both together)."""

    def __init__(self, ebm: EBMRegressor, mdn: EBMRegressor):
        super().__init__()
        self.ebm, self.mdn = ebm, mdn

    has_energy = True
    has_proposal = True

    def encode(self, x: torch.Tensor, freeze_backbone: bool = False) -> Encoded:
        return Encoded(self.ebm.encode(x, freeze_backbone).h_energy, self.mdn.encode(x, freeze_backbone).h_proposal)

    def score(self, enc: Encoded, y: torch.Tensor) -> torch.Tensor:
        return self.ebm.score(enc, y)

    def score_shared(self, enc: Encoded, y: torch.Tensor) -> torch.Tensor:
        return self.ebm.score_shared(enc, y)

    def propose(self, enc: Encoded) -> Mixture:
        return self.mdn.propose(enc)

    def ebm_and_mdn(self) -> tuple[EBMRegressor, EBMRegressor]:
        return self.ebm, self.mdn

    def param_groups(self) -> list[dict]:
        # Two Adams over disjoint parameters equal one Adam with two groups (Adam is per-parameter).
        return [{"params": list(self.ebm.parameters()), "name": "ebm"},
                {"params": list(self.mdn.parameters()), "name": "mdn"}]


def _feature_net(cfg: Config, x_shape: tuple[int, ...]) -> nn.Module:
    fc = cfg.features
    if fc.kind == "toy_mlp":
        if len(x_shape) != 1:
            raise ValueError(f"features.kind = 'toy_mlp' needs vector inputs, task has x_shape {x_shape}")
        return ToyFeatureNet(x_shape[0], fc.hidden)
    if len(x_shape) != 3:
        raise ValueError(f"features.kind = {fc.kind!r} needs image inputs (C, H, W), task has x_shape {x_shape}")
    in_ch = fc.in_channels or x_shape[0]
    return resnet_for(fc.kind, in_ch, fc.width)


def _single(cfg: Config, x_shape, D, circular, energy: bool, proposal: bool, detach: bool) -> EBMRegressor:
    feat = _feature_net(cfg, x_shape)
    H = feat.out_dim
    e = p = None
    if energy:
        ec = cfg.energy
        e = EnergyHead(H, D, circular, ec.y_embed, ec.hidden, ec.residual_blocks)
    if proposal:
        pc = cfg.proposal
        p = ProposalHead(H, D, pc.K, pc.hidden or H, circular, pc.log_sigma2_min, pc.log_sigma2_max)
    return EBMRegressor(feat, e, p, detach_proposal_features=detach)


def build_model(cfg: Config, x_shape: tuple[int, ...], D: int, circular: tuple[bool, ...]) -> nn.Module:
    """The network the method needs, initialised from the current torch RNG state."""
    m = cfg.method.name
    if m == "ebm_learned_proposal":
        return _single(cfg, x_shape, D, circular, energy=True, proposal=True, detach=True)
    if m in ("nce_fixed", "nce_plus", "ml_is"):
        return _single(cfg, x_shape, D, circular, energy=True, proposal=False, detach=True)
    if m == "mdn":
        return _single(cfg, x_shape, D, circular, energy=False, proposal=True, detach=False)
    if m == "mdn_ebm_teacher":
        ebm = _single(cfg, x_shape, D, circular, energy=True, proposal=False, detach=True)
        mdn = _single(cfg, x_shape, D, circular, energy=False, proposal=True, detach=False)
        return TeacherPair(ebm, mdn)
    raise ValueError(f"unknown method {m!r}")


__all__ = ["ToyFeatureNet", "EnergyHead", "ProposalHead", "EBMRegressor", "TeacherPair", "Encoded",
           "build_model", "ResNet"]
