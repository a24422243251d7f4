"""Regression tasks: their specs (target dim, evaluation grid, baseline σ's) and data generators.

Specs follow docs/method.md §4.4–§4.6 and §6; generators §7. Arrays are numpy: toy inputs x float32 (N, 1),
images uint8 (N, C, H, W), targets y float32 (N, D). Circular target dims live on [0, 2π).

Conventions:
- Rotation angles are counter-clockwise as an image is displayed (row index growing downwards);
  the star renderer (:mod:`ebm.star`) and :func:`rotate_with_circular_mask` agree on this.
- True log-densities are ``-inf`` (never a large finite number) where the density is zero, so
  ``exp`` gives exactly 0 and a KL computed with 0·log 0 = 0 is exact.
"""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .circular import TWO_PI
from .star import KAPPA, make_star, render_star, star_true_log_density, wrap_float32

__all__ = [
    "TaskSpec", "TASKS", "get_task", "make_toy1", "toy1_true_log_density", "load_toy1_reference",
    "load_toy2_reference", "make_toy2", "toy2_true_log_density", "bayes_nll", "render_star", "make_star", "star_true_log_density",
    "rotate_with_circular_mask", "make_fashion_rotation", "read_idx", "make_synthetic", "KAPPA",
]



@dataclass(frozen=True)
class TaskSpec:
    """What the rest of the code needs to know about a task, independent of where data comes from.

    Built from a dataset's metadata (:func:`task_from_metadata`) wherever a dataset is used; the
    built-in entries of :data:`TASKS` are only the defaults that ingest and the generators write."""
    name: str
    D: int                               # target dimension
    x_shape: tuple[int, ...]             # (d,) for vector inputs, (C, H, W) for images
    circular: tuple[bool, ...]           # per target dim; circular dims live on [0, 2π)
    grid_lo: tuple[float, ...]           # evaluation grid per target dim (docs/method.md §6)
    grid_hi: tuple[float, ...]
    grid_n: tuple[int, ...]
    fixed_sigmas: tuple                  # hand-designed NCE proposal σ's (docs/method.md §4.4, §7): 2 floats, or 2
    ml_is_sigmas: tuple                  # tuples of D floats (per dim); ML-IS proposal σ's likewise
    units: tuple[str, ...]               # per target dim: "years", "degrees", "radians", "count", ""
    has_true_density: bool
    target_names: tuple[str, ...] = ()   # per target dim; default "y" (D = 1) or "y0".."y{D-1}"
    augment: str = ""                    # train-time augmentation of the streaming readers ("" = none)
    norm_mean: tuple[float, ...] = ()    # images: x = (u8 / 255 − mean[c]) / std[c]; default image_norm(C)
    norm_std: tuple[float, ...] = ()

    def __post_init__(self):
        units = (self.units,) * self.D if isinstance(self.units, str) else tuple(self.units)
        names = tuple(self.target_names) or (("y",) if self.D == 1 else tuple(f"y{d}" for d in range(self.D)))
        object.__setattr__(self, "units", units)
        object.__setattr__(self, "target_names", names)
        for key in ("x_shape", "circular", "grid_lo", "grid_hi", "grid_n", "norm_mean", "norm_std"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        for key in ("fixed_sigmas", "ml_is_sigmas"):
            object.__setattr__(self, key, tuple(tuple(float(v) for v in s) if isinstance(s, (list, tuple)) else float(s)
                                                for s in getattr(self, key)))
        if self.is_image and not self.norm_mean:
            mean, std = image_norm(self.x_shape[0])
            object.__setattr__(self, "norm_mean", mean)
            object.__setattr__(self, "norm_std", std)
        if not 1 <= self.D <= MAX_D:
            raise ValueError(f"task {self.name}: D = {self.D}; targets of 1 to {MAX_D} dims are supported")
        per_dim = {"circular": self.circular, "grid_lo": self.grid_lo, "grid_hi": self.grid_hi,
                   "grid_n": self.grid_n, "units": self.units, "target_names": self.target_names}
        for key, val in per_dim.items():
            if len(val) != self.D:
                raise ValueError(f"task {self.name}: {key} has {len(val)} entries, D = {self.D}")
        if len(set(self.target_names)) != self.D:
            raise ValueError(f"task {self.name}: target names {list(self.target_names)} are not distinct")
        for d in range(self.D):
            if self.grid_n[d] < 2 or not self.grid_hi[d] > self.grid_lo[d]:
                raise ValueError(f"task {self.name}: dim {d} grid needs n >= 2 and hi > lo")
            if self.circular[d] and (self.grid_lo[d] != 0.0 or self.grid_hi[d] != TWO_PI):
                raise ValueError(f"task {self.name}: circular dim {d} must span [0, 2π)")
        for key in ("fixed_sigmas", "ml_is_sigmas"):
            pair = getattr(self, key)
            flat = [v for s in pair for v in (s if isinstance(s, tuple) else (s,))]
            shapes = {len(s) if isinstance(s, tuple) else 0 for s in pair}
            if len(pair) != 2 or min(flat) <= 0 or shapes - {0, self.D} or len(shapes) != 1:
                raise ValueError(f"task {self.name}: {key} must be two positive σ's, or two lists of D = {self.D}")

    @property
    def is_image(self) -> bool:
        return len(self.x_shape) == 3

    def grid(self) -> list[np.ndarray]:
        """Per-dim 1-D float64 grids (grid_n[d],). Linear dims include both end points (as the
        reference evaluation does); circular dims are [0, 2π) without the end point."""
        return [np.linspace(lo, hi, n, endpoint=not circ)
                for lo, hi, n, circ in zip(self.grid_lo, self.grid_hi, self.grid_n, self.circular)]

    def cell_volume(self) -> float:
        """Product over dims of the grid spacing: Δ in −log p = −f(y) + logsumexp f + log Δ."""
        vol = 1.0
        for lo, hi, n, circ in zip(self.grid_lo, self.grid_hi, self.grid_n, self.circular):
            vol *= (hi - lo) / (n if circ else n - 1)
        return vol

    def to_dict(self) -> dict:
        """Plain lists and numbers (a checkpoint stores it; :meth:`from_dict` rebuilds the spec)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def image_norm(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The default image normalisation: ImageNet statistics for RGB (docs/method.md §1), 0.5 / 0.5 for grey."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * channels, (0.5,) * channels


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_D = 3       # grid quadrature is exact enough and affordable up to 3 target dims (docs/method.md §6)


def _linear(name, D, x_shape, lo, hi, n, sigmas, units, ml_is=None, true_density=False) -> TaskSpec:
    return TaskSpec(name, D, x_shape, (False,) * D, (lo,) * D, (hi,) * D, (n,) * D, sigmas,
                    ml_is or sigmas, units, true_density)


def _circular(name, x_shape, n, true_density) -> TaskSpec:
    # No paper σ's exist for angle targets. 0.05 rad sits below the star's VM noise
    # (κ = 50 ⇒ std ≈ 0.14 rad), 0.8 rad reaches across the arm spacing 2π/k, mirroring the
    # narrow/wide pairs of docs/method.md §7. ML-IS reuses them, as for the other image tasks.
    return TaskSpec(name, 1, x_shape, (True,), (0.0,), (TWO_PI,), (n,), (0.05, 0.8), (0.05, 0.8),
                    "radians", true_density)


# Image tasks' ML-IS σ's: the paper gives ML-IS σ's for the toys only, so the NCE pair is reused.
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _linear("toy1", 1, (1,), -3.0, 3.0, 2048, (0.1, 0.8), "", ml_is=(0.2, 1.6), true_density=True),
    _linear("toy2", 1, (1,), -12.5, 12.5, 8192, (0.4, 3.2), "", ml_is=(0.2, 1.6)),
    _circular("star", (1, 64, 64), 1024, true_density=True),
    _circular("fashion_rotation", (1, 28, 28), 1024, true_density=False),
    _linear("steering", 1, (3, 64, 64), -100.0, 100.0, 20000, (1.0, 40.0), "degrees"),
    _linear("age", 1, (3, 64, 64), 1.0, 60.0, 5900, (0.1, 20.0), "years"),
    _linear("cell", 1, (1, 64, 64), 1.0, 200.0, 19900, (1.0, 40.0), "count"),
    _linear("headpose", 3, (3, 64, 64), -80.0, 80.0, 30, (1.0, 10.0), "degrees"),
)}


GENERATED = ("toy1", "toy2", "star")     # tasks whose data the code generates (no dataset needed)


def get_task(name: str) -> TaskSpec:
    """The built-in defaults of a known task; ValueError naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def task_metadata(spec: TaskSpec) -> dict:
    """The target description a dataset's metadata holds (the inverse of :func:`task_from_metadata`
    for these keys; ingest adds the input, augmentation and split keys)."""
    return dict(task=spec.name, D=spec.D, units=list(spec.units), target_names=list(spec.target_names),
                circular=list(spec.circular),
                grid={"lo": list(spec.grid_lo), "hi": list(spec.grid_hi), "n": list(spec.grid_n)},
                fixed_sigmas=list(spec.fixed_sigmas), ml_is_sigmas=list(spec.ml_is_sigmas))


def input_shape(meta: dict) -> tuple[int, ...]:
    """A dataset's per-example input shape from its metadata: (C, H, W) or (d,)."""
    inp = meta["input"]
    shape = (inp["channels"], inp["height"], inp["width"]) if inp["kind"] == "image" else (inp["dim"],)
    return tuple(int(s) for s in shape)


def task_from_metadata(meta: dict) -> TaskSpec:
    """The task a dataset defines, from its metadata (``_dataset.json``): target dims and names,
    units, circular dims, grid, σ's, input shape, augmentation. No lookup by name: any task name
    works. The exact density is known only for the built-in generators' own data."""
    try:
        grid = meta["grid"]
        generated = (meta.get("source") or {}).get("format") == "synthetic"
        return TaskSpec(
            name=str(meta["task"]), D=int(meta["D"]), x_shape=input_shape(meta),
            circular=tuple(bool(c) for c in meta["circular"]),
            grid_lo=tuple(float(v) for v in grid["lo"]), grid_hi=tuple(float(v) for v in grid["hi"]),
            grid_n=tuple(int(v) for v in grid["n"]),
            fixed_sigmas=tuple(meta["fixed_sigmas"]),
            ml_is_sigmas=tuple(meta.get("ml_is_sigmas") or meta["fixed_sigmas"]),
            units=meta.get("units", ""), has_true_density=generated and TASKS[meta["task"]].has_true_density
            if meta["task"] in TASKS else False,
            target_names=tuple(meta.get("target_names") or ()),
            augment=str((meta.get("augment") or {}).get("train", "")),
            norm_mean=tuple((meta.get("normalisation") or {}).get("mean") or ()),
            norm_std=tuple((meta.get("normalisation") or {}).get("std") or ()))
    except (KeyError, TypeError) as e:
        raise ValueError(f"dataset metadata lacks or mangles {e} (needed to define the task)") from None


TOY1_MIX_P, TOY1_MIX_SIGMA, TOY1_LOGNORMAL_SIGMA = 0.8, 0.075, 0.25


def make_toy1(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Toy 1 (docs/method.md §7) -> x float32 (n, 1) ~ U(−3, 3), y float32 (n, 1).

    x < 0: y ~ 0.8 N(sin x, 0.075²) + 0.2 N(−sin x, 0.075²); x >= 0: y = LogNormal(0, 0.25) − 1.
    """
    rng = np.random.default_rng(seed)
    # The reference stores x as float32 before drawing y; do the same so the density of the
    # stored x is the density y was drawn from.
    x = rng.uniform(-3.0, 3.0, n).astype(np.float32).astype(np.float64)
    sign = np.where(rng.random(n) < TOY1_MIX_P, 1.0, -1.0)
    z = rng.standard_normal(n)
    y = np.where(x < 0, sign * np.sin(x) + TOY1_MIX_SIGMA * z, np.exp(TOY1_LOGNORMAL_SIGMA * z) - 1.0)
    return x.astype(np.float32)[:, None], y.astype(np.float32)[:, None]


def _normal_logpdf(y: np.ndarray, mu: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    return -0.5 * ((y - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(TWO_PI)


def _density_args(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x -> float64 (N,); y (G,) (one grid for every x) or (N, G) (per x) -> float64 (N, G)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64)
    if y.ndim <= 1:
        return x, np.broadcast_to(y.reshape(1, -1), (x.shape[0], y.size))
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows for {x.shape[0]} inputs x")
    return x, y.reshape(x.shape[0], -1)


def toy1_true_log_density(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact log p(y|x) of toy 1: x (N,) (or (N, 1)), y (G,) for every x or (N, G) -> float64 (N, G).

    For x >= 0 the density is the lognormal pdf at y + 1, which is zero (log = -inf) for y <= −1.
    """
    x, y = _density_args(x, y)
    x = x[:, None]
    s = np.sin(x)
    mix = np.logaddexp(math.log(TOY1_MIX_P) + _normal_logpdf(y, s, TOY1_MIX_SIGMA),
                       math.log(1.0 - TOY1_MIX_P) + _normal_logpdf(y, -s, TOY1_MIX_SIGMA))
    z = y + 1.0
    log_z = np.log(np.where(z > 0, z, 1.0))
    lognormal = np.where(z > 0, _normal_logpdf(log_z, 0.0, TOY1_LOGNORMAL_SIGMA) - log_z, -np.inf)
    return np.where(x < 0, mix, lognormal)


def _reference_csv(shared_dir: str | os.PathLike, filename: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float32 (N, 1) each from a CSV with header x,y; shared_dir may be the data dir or
    its parent (``../shared`` holding ``data/``)."""
    candidates = [os.path.join(shared_dir, filename), os.path.join(shared_dir, "data", filename)]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(f"reference data {filename} not found; looked for {' and '.join(candidates)}")
    with open(path) as f:
        header = [h.strip() for h in f.readline().split(",")]
    if "x" not in header or "y" not in header:
        raise ValueError(f"{path}: expected columns x,y, got header {header}")
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    cols = data[:, [header.index("x"), header.index("y")]].astype(np.float32)
    return cols[:, :1].copy(), cols[:, 1:].copy()


def load_toy1_reference(shared_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The paper's toy-1 training draw: {"train": (x (2000, 1), y (2000, 1))} float32."""
    return {"train": _reference_csv(shared_dir, "toy1_train.csv")}


def load_toy2_reference(shared_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The paper's toy-2 split: {"train", "val", "test"} -> (x (N, 1), y (N, 1)) float32."""
    return {s: _reference_csv(shared_dir, f"toy2_{s}.csv") for s in ("train", "val", "test")}


# Toy 2's four zones, in index order (docs/method.md §7): x = index / 3799 fixes the zone and, in
# the Gaussian and uniform zones, the draw's own parameters.
TOY2_SIZE = 1000
TOY2_N_ASYM, TOY2_N_SYM, TOY2_N_UNIF, TOY2_N_MULTI = 8 * TOY2_SIZE // 10, TOY2_SIZE, TOY2_SIZE // 2, 3 * (TOY2_SIZE // 2)
TOY2_N = TOY2_N_ASYM + TOY2_N_SYM + TOY2_N_UNIF + TOY2_N_MULTI          # 3800
TOY2_MULTI = ((8.0, 0.5), (1.0, 3.0), (-4.5, 1.5))                      # U(lo, lo + width), one third each


def _toy2_sym_means() -> np.ndarray:
    return 3 * np.cos(np.linspace(0, 5, num=TOY2_N_SYM)) - 2


def _toy2_unif_bounds() -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(-2, -4.5, num=TOY2_N_UNIF), np.linspace(-0.5, 9.0, num=TOY2_N_UNIF)


def make_toy2() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Toy 2, draw for draw the reference generator (legacy ``np.random.seed(41)`` stream, here a
    private RandomState so global numpy state is untouched). Splits train 1710 / val 190 /
    test 1900 -> (x (N, 1), y (N, 1)) float32, x in [0, 1]."""
    rs = np.random.RandomState(41)
    # Every call below, including its argument form, fixes which draws each zone consumes.
    asym = rs.beta(0.5, 1, TOY2_N_ASYM) * 5 + 0.5
    rs.shuffle(asym)
    mean = _toy2_sym_means()
    sym = mean + rs.normal(scale=np.abs(mean) / 4, size=TOY2_N_SYM)
    unif = [rs.uniform(low=i, high=j) for i, j in zip(*_toy2_unif_bounds())]
    multi = np.concatenate([lo + rs.uniform(size=TOY2_N_MULTI // 3) * width for lo, width in TOY2_MULTI])
    rs.shuffle(multi)
    y = np.concatenate([asym, sym, np.asarray(unif), multi])[:, None]
    x = np.arange(y.shape[0], dtype=np.float64)[:, None]
    x = x / x.max()
    order = np.arange(y.shape[0])
    rs.shuffle(order)
    x, y = x[order], y[order]
    n_test = x.shape[0] // 2
    n_val = (x.shape[0] - n_test) // 10
    bounds = {"test": (0, n_test), "val": (n_test, n_test + n_val), "train": (n_test + n_val, x.shape[0])}
    return {s: (x[a:b].astype(np.float32), y[a:b].astype(np.float32)) for s, (a, b) in bounds.items()}


def toy2_true_log_density(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact log p(y|x) of toy 2's generator: x (N,) or (N, 1), y (G,) for every x or (N, G) -> float64 (N, G).

    x must be a toy-2 input, index / 3799; the index picks the zone (docs/method.md §7):
    5·Beta(0.5, 1) + 0.5; N(m_j, (|m_j|/4)²); U(a_j, b_j); one third each of U(8, 8.5), U(1, 4),
    U(−4.5, −3) (a position of a shuffled zone has the zone's draw distribution as its marginal).
    ``-inf`` outside the support; ``+inf`` at y = 0.5 exactly, the Beta zone's singular end.
    """
    x, y = _density_args(x, y)
    pos = x * (TOY2_N - 1)
    idx = np.rint(pos).astype(np.int64)
    if x.size and (np.abs(pos - idx).max() > 1e-3 or idx.min() < 0 or idx.max() >= TOY2_N):
        raise ValueError(f"x is not a toy-2 input (index / {TOY2_N - 1} for an index 0..{TOY2_N - 1})")
    out = np.full(y.shape, -np.inf)
    ends = np.cumsum([0, TOY2_N_ASYM, TOY2_N_SYM, TOY2_N_UNIF, TOY2_N_MULTI])
    rows = [(idx >= a) & (idx < b) for a, b in zip(ends[:-1], ends[1:])]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (y[rows[0]] - 0.5) / 5.0                     # Beta(0.5, 1): density ½ u^(−½) on (0, 1]
        out[rows[0]] = np.where((u >= 0) & (u <= 1), math.log(0.5) - 0.5 * np.log(u) - math.log(5.0), -np.inf)
    m = _toy2_sym_means()[idx[rows[1]] - ends[1]][:, None]
    out[rows[1]] = _normal_logpdf(y[rows[1]], m, np.abs(m) / 4.0)
    a, b = (v[idx[rows[2]] - ends[2]][:, None] for v in _toy2_unif_bounds())
    yu = y[rows[2]]
    out[rows[2]] = np.where((yu >= a) & (yu <= b), -np.log(b - a), -np.inf)
    ym = y[rows[3]]
    dens = sum(((ym >= lo) & (ym <= lo + w)) / (3.0 * w) for lo, w in TOY2_MULTI)
    with np.errstate(divide="ignore"):
        out[rows[3]] = np.log(dens)
    return out


def bayes_nll(name: str, split: str = "test", seed: int = 0) -> float:
    """The floor: mean −log p_true(y_i|x_i) over a generated split, the test NLL no model beats in
    expectation (toy 1 with data seed ``seed``; toy 2's fixed split ignores it)."""
    if name == "toy2":
        x, y = make_toy2()[split]
        lp = toy2_true_log_density(x, y)
    elif name == "toy1":
        x, y, _ = make_synthetic("toy1", seed)[split]
        lp = toy1_true_log_density(x, y)
    else:
        raise ValueError(f"no exact density for task {name!r}; the floor is known for toy1 and toy2")
    return float(-np.mean(lp))


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or plain, as a native-endian array of its stored shape."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX data is {len(raw)} bytes, shape {shape} needs {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _circle_mask(h: int, w: int) -> torch.Tensor:
    """True at pixels whose centre lies in the circle inscribed in the frame -> bool (h, w)."""
    r = torch.arange(h, dtype=torch.float64) + 0.5 - h / 2.0
    c = torch.arange(w, dtype=torch.float64) + 0.5 - w / 2.0
    return (r[:, None] ** 2 + c[None, :] ** 2) <= (min(h, w) / 2.0) ** 2


def rotate_with_circular_mask(images: np.ndarray, angles: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Rotate each image counter-clockwise (as displayed) by its angle, bilinearly.

    images: uint8 (N, H, H); angles: (N,) radians. Returns uint8 (N, 1, H, H). Pixels outside
    the inscribed circle are zeroed before rotating (so no corner content is rotated in) and after
    (so the frame's corners are identical for every angle and leak nothing about it).
    """
    images = np.asarray(images)
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    if images.ndim != 3 or images.dtype != np.uint8 or angles.shape[0] != images.shape[0]:
        raise ValueError(f"need uint8 images (N, H, W) and angles (N,), got {images.dtype} "
                         f"{images.shape} and {angles.shape}")
    n, h, w = images.shape
    if h != w:
        # affine_grid's normalised coordinates would shear a non-square frame when rotating.
        raise ValueError(f"images must be square to rotate, got {h}x{w}")
    mask = _circle_mask(h, w)
    out = np.empty((n, 1, h, w), dtype=np.uint8)
    for s in range(0, n, chunk):
        img = torch.from_numpy(images[s:s + chunk]).to(torch.float32).unsqueeze(1) * mask
        a = torch.from_numpy(angles[s:s + chunk])
        cos, sin = torch.cos(a), torch.sin(a)
        # affine_grid maps output to input coordinates with y pointing down; this matrix is the
        # inverse of a counter-clockwise on-screen rotation in those coordinates.
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(a)], -1),
                             torch.stack([sin, cos, torch.zeros_like(a)], -1)], 1).to(torch.float32)
        grid = F.affine_grid(theta, list(img.shape), align_corners=False)
        rot = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[s:s + chunk] = (rot * mask).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def make_fashion_rotation(images: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotated-image angle regression: images uint8 (N, H, W) -> (uint8 (N, 1, H, W),
    y float32 (N, 1) ~ U[0, 2π), the counter-clockwise rotation applied)."""
    rng = np.random.default_rng(seed)
    y = wrap_float32(rng.uniform(0.0, TWO_PI, len(images)))
    return rotate_with_circular_mask(images, y.astype(np.float64)), y[:, None]


SYNTHETIC_DEFAULT_N = {"toy1": {"train": 2000, "val": 200, "test": 2000},
                       "star": {"train": 4000, "val": 500, "test": 1000}}
SPLITS = ("train", "val", "test")


def _split_seed(seed: int, split: str) -> int:
    """Train uses the seed itself (so make_synthetic agrees with make_toy1/make_star); val and test
    get independent streams spawned from it."""
    if split == "train":
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split),)).generate_state(1)[0])


def make_synthetic(name: str, seed: int, n: dict[str, int] | None = None, size: int | None = None
                   ) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """Train/val/test splits of a generated task -> {split: (x, y (N, D) float32, aux)}.

    toy1: sizes 2000/200/2000 by default. toy2: the fixed reference split (seed ignored; n may
    only restate its sizes). star: 4000/500/1000 images of side ``size`` (default 64), aux holds
    "k" and "theta_r". n overrides sizes per split; 0 or a missing key keeps the default.
    """
    if name not in ("toy1", "toy2", "star"):
        get_task(name)
        raise ValueError(f"task {name!r} is not synthetic; generated tasks: toy1, toy2, star")
    n = dict(n or {})
    unknown = set(n) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)} in n; splits are {SPLITS}")
    if size and name != "star":
        raise ValueError(f"task {name!r} has no image size (got size={size})")
    if name == "toy2":
        data = make_toy2()
        for s, m in n.items():
            if m and m != len(data[s][0]):
                raise ValueError(f"toy2 is a fixed split: {s} has {len(data[s][0])} points, asked {m}")
        return {s: (x, y, {}) for s, (x, y) in data.items()}
    sizes = {s: n.get(s) or SYNTHETIC_DEFAULT_N[name][s] for s in SPLITS}
    if name == "toy1":
        return {s: (*make_toy1(sizes[s], _split_seed(seed, s)), {}) for s in SPLITS}
    return {s: make_star(sizes[s], _split_seed(seed, s), size=size or 64) for s in SPLITS}
