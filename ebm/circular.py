"""Circular target dims (angles on [0, 2π)): the one home of the period, the mask and the wraps."""
from __future__ import annotations

import math

import torch

TWO_PI = 2.0 * math.pi


def circ_mask(circular: tuple[bool, ...], device=None) -> torch.Tensor:
    """Per-dim flags -> bool (D,) on ``device``."""
    return torch.tensor(tuple(circular), dtype=torch.bool, device=device)


def wrap(y: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """Values (..., D) with circular dims mapped to [0, 2π)."""
    if not any(circular):
        return y
    return torch.where(circ_mask(circular, y.device), torch.remainder(y, TWO_PI), y)


def wrap_diff(d: torch.Tensor, circular: tuple[bool, ...]) -> torch.Tensor:
    """Differences (..., D) with circular dims mapped to (−π, π]."""
    if not any(circular):
        return d
    wrapped = d - TWO_PI * torch.round(d / TWO_PI)
    return torch.where(circ_mask(circular, d.device), wrapped, d)
