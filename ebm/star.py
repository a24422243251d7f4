"""The k-fold star: a synthetic image regression task with an exact p(y|x) (docs/method.md §7).

A filled star with k arms is rendered at angle θ_r = y + η, η ~ VonMises(0, κ). The picture fixes
θ_r only modulo 2π/k, so p(y|x) = (1/k) Σ_j VM(y; θ_r + 2πj/k, κ) exactly.

Angle convention (shared with :func:`ebm.tasks.rotate_with_circular_mask`): φ is the polar angle of
a point about the image centre, measured counter-clockwise as the image is displayed (row index
growing downwards), zero along the +column direction. So θ_r = 0 puts an arm pointing right,
θ_r = π/2 an arm pointing up, and increasing θ_r turns the star counter-clockwise on screen.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .circular import TWO_PI

R_IN = 0.35        # inner / outer radius in half-frame units (ρ = 1 at the middle of an edge)
R_OUT = 0.85
KAPPA = 50.0


def _subsample_polar(size: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """ρ (half-frame units) and φ of the supersampled points -> two float64 (size*s, size*s)."""
    s = supersample
    # Sub-pixel centres at (a + 1/2)/s inside each pixel, so the pattern is symmetric about the
    # image centre and a quarter turn maps sample points onto sample points exactly.
    c = (np.arange(size * s) + 0.5) / s - size / 2.0
    col = c[None, :]
    up = -c[:, None]                     # rows grow downwards; φ is counter-clockwise on screen
    rho = np.hypot(col, up) / (size / 2.0)
    phi = np.arctan2(up, col)
    return rho, phi


def render_star(theta_r, k, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Anti-aliased filled k-fold stars.

    theta_r: float or (N,) radians; k: int or (N,) arm counts >= 1 (broadcast against each other).
    A point is inside iff ρ <= R_IN + (R_OUT − R_IN)·(½ + ½cos(k(φ − θ_r)))²; each pixel is the
    fraction of its supersample × supersample sub-points inside, so the render is deterministic.
    Returns uint8 (N, 1, size, size), 0 = background, 255 = fully inside.
    """
    theta_r, k = np.broadcast_arrays(np.atleast_1d(np.asarray(theta_r, dtype=np.float64)),
                                     np.atleast_1d(np.asarray(k)))
    if theta_r.ndim != 1:
        raise ValueError(f"theta_r and k must be scalars or 1-D, got shape {theta_r.shape}")
    if np.any(k < 1) or np.any(k != np.round(k)):
        raise ValueError("k must be positive integers")
    if size < 2 or supersample < 1:
        raise ValueError(f"need size >= 2 and supersample >= 1, got {size}, {supersample}")
    rho, phi = _subsample_polar(size, supersample)
    # cos(k(φ − θ)) = cos kφ cos kθ + sin kφ sin kθ: the per-pixel trig is tabulated once per k,
    # leaving only multiply-adds per image (the renders dominate data generation time).
    ks = np.unique(k)
    cos_kphi = {int(kk): np.cos(kk * phi) for kk in ks}
    sin_kphi = {int(kk): np.sin(kk * phi) for kk in ks}
    s = supersample
    out = np.empty((theta_r.shape[0], 1, size, size), dtype=np.uint8)
    for i in range(theta_r.shape[0]):
        kk = int(k[i])
        c = cos_kphi[kk] * math.cos(kk * theta_r[i]) + sin_kphi[kk] * math.sin(kk * theta_r[i])
        inside = rho <= R_IN + (R_OUT - R_IN) * (0.5 + 0.5 * c) ** 2
        frac = inside.reshape(size, s, size, s).mean(axis=(1, 3))
        out[i, 0] = np.rint(frac * 255.0).astype(np.uint8)
    return out


def make_star(n: int, seed: int, size: int = 64, kappa: float = KAPPA
              ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """n draws of the k-fold star task.

    y ~ U[0, 2π), k ~ U{1..4}, η ~ VonMises(0, κ), θ_r = (y + η) mod 2π.
    Returns images uint8 (n, 1, size, size), y float32 (n, 1) in [0, 2π), and
    aux {"k": int64 (n,), "theta_r": float64 (n,)} — what :func:`star_true_log_density` needs.
    """
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.0, TWO_PI, n)
    k = rng.integers(1, 5, n)
    eta = rng.vonmises(0.0, kappa, n)
    theta_r = np.mod(y + eta, TWO_PI)
    images = render_star(theta_r, k, size=size)
    return images, wrap_float32(y)[:, None], {"k": k.astype(np.int64), "theta_r": theta_r}


def wrap_float32(angle: np.ndarray) -> np.ndarray:
    """Angles in [0, 2π) as float32 (any shape); values that round up to 2π become 0."""
    a = np.mod(np.asarray(angle, dtype=np.float64), TWO_PI).astype(np.float32)
    # float32(2π) > 2π, so an angle just below 2π can round onto the excluded end point.
    a[a >= np.float32(TWO_PI)] = 0.0
    return a


def log_i0(kappa: float) -> float:
    """log I0(κ), stable for large κ: I0 = i0e(κ)·e^κ."""
    kap = torch.tensor(float(kappa), dtype=torch.float64)
    return float(torch.log(torch.special.i0e(kap)) + kap.abs())


def star_true_log_density(theta_r, k, y_grid, kappa: float = KAPPA) -> np.ndarray:
    """Exact log p(y | image) of the star task.

    theta_r: (N,) render angles; k: (N,) arm counts; y_grid: (G,) angles.
    Returns float64 (N, G): log((1/k) Σ_{j<k} VM(y; θ_r + 2πj/k, κ)), a density w.r.t. dy on the
    circle (it integrates to 1 over any interval of length 2π).
    """
    theta_r = np.asarray(theta_r, dtype=np.float64).reshape(-1)
    k = np.asarray(k).reshape(-1).astype(np.int64)
    y = np.asarray(y_grid, dtype=np.float64).reshape(-1)
    if theta_r.shape != k.shape:
        raise ValueError(f"theta_r {theta_r.shape} and k {k.shape} must match")
    if np.any(k < 1):
        raise ValueError("k must be >= 1")
    j = np.arange(int(k.max()) if k.size else 1)
    mu = theta_r[:, None] + TWO_PI * j[None, :] / k[:, None]              # (N, J)
    terms = kappa * np.cos(y[None, None, :] - mu[:, :, None])              # (N, J, G)
    # Components j >= k do not exist for that row; -inf drops them from the logsumexp.
    terms = np.where((j[None, :] < k[:, None])[:, :, None], terms, -np.inf)
    top = terms.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(terms - top).sum(axis=1))
    return lse - np.log(k)[:, None] - math.log(TWO_PI) - log_i0(kappa)
