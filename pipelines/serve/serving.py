"""A trained model as a predictor of full predictive distributions, independent of MLflow.

The same code answers in-process calls, the MLflow pyfunc (:mod:`pipelines.serve.registry`), ``ebm
predict`` and ``mlflow models serve``, so all four give the same numbers for the same rows and seed.

Inputs, one row per example:
    images: encoded PNG/JPEG bytes, exactly the model's (C, H, W): a wrong size, a wrong number of
            channels or bytes that are not an image are an :class:`InputError` naming the row.
    vectors (toys): x as a float (d = 1) or a flat list of d floats, in raw units (the net
            standardises); finite and within float32's range, else an :class:`InputError` naming the
            row. An input the network maps to a non-finite output (or log_p) is one too.
    y (optional): a float (D = 1) or a list of D floats: adds log p(y|x) to the output. Per row: a
            row whose y is null (None, or NaN for D = 1) gets ``log_p`` None; the others their value.

Outputs per example (``D = 1``: scalars; ``D > 1``: lists of D): mode (refined when
``refine_steps`` > 0), mean, std, one column ``q<level>`` per requested quantile, ``interval_lo`` /
``interval_hi`` (central interval at ``interval_level``), ``ess`` (effective sample size / M),
optionally ``log_p`` and ``samples`` (M × D) with ``weights`` (M).

Parameters are checked before any work (:func:`check_params`): M an integer in [1, max_M], each
quantile and the interval level strictly inside (0, 1), quantiles distinct, refine_steps in
[0, max_refine_steps], seed in [0, 2^63), return_samples a bool with M <= max_return_samples. The
bounds are :class:`Limits` (environment variables ``EBM_SERVE_*``; see docs/tune_and_serving.md).
Rows are processed in chunks sized so that the energy head's activations, (rows, 1 + M, hidden)
floats, stay within ``Limits.chunk_mb``.

Seeding: every row draws its IS samples from its own generators, seeded from (``seed``, the row's
index in the input, stream) — stream 0 for the predictions, 1 for ``log_p`` (:func:`row_generators`).
A row's numbers therefore depend on the seed, its index and its own input only: not on the chunk
size, the other rows of the request, the number of processes or which Ray Data actor computed it
(``ebm predict --workers N``, :mod:`pipelines.serve.batch`). Row indices count from 0 in each call
(a request, a file, a dataset split); ``rows`` gives them explicitly.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ebm.config import Config
from ebm.nets import build_model
from ebm.predict import log_density, predict
from ebm.data import to_inputs
from ebm.tasks import TaskSpec

DEFAULT_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
MODEL_FILE = "model.pt"
FLOAT32_MAX = float(np.finfo(np.float32).max)
SEED_MAX = 2 ** 63 - 1


class InputError(ValueError):
    """An input row the model cannot take; the message names the row and what is wrong."""


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one prediction call's memory and time bounded (defaults justified in
    docs/tune_and_serving.md). The per-row bounds (M, returned samples, refine steps, quantiles)
    and the chunk size apply everywhere; ``max_rows`` and ``max_samples`` bound one request to the
    pyfunc / HTTP server (``ebm predict`` reads whole files, chunked)."""
    max_M: int = 16384              # proposal samples per row
    max_return_samples: int = 1024  # M when the samples are returned (return_samples)
    max_refine_steps: int = 100     # mode refinement steps
    max_quantiles: int = 64         # quantile levels per request
    max_rows: int = 1024            # rows per request (pyfunc / HTTP)
    max_samples: int = 1 << 21      # rows × M (× 2 with log_p) per request (pyfunc / HTTP): its compute time
    chunk_mb: int = 256             # estimated activation memory of one chunk of rows

    ENV = {"max_M": "EBM_SERVE_MAX_M", "max_return_samples": "EBM_SERVE_MAX_RETURN_SAMPLES",
           "max_refine_steps": "EBM_SERVE_MAX_REFINE_STEPS", "max_quantiles": "EBM_SERVE_MAX_QUANTILES",
           "max_rows": "EBM_SERVE_MAX_ROWS", "max_samples": "EBM_SERVE_MAX_SAMPLES", "chunk_mb": "EBM_SERVE_CHUNK_MB"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Limits":
        """The defaults, each overridden by its ``EBM_SERVE_*`` variable (a positive integer; anything
        else is a ValueError naming the variable)."""
        environ = os.environ if environ is None else environ
        kw = {}
        for f in fields(cls):
            var = cls.ENV[f.name]
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                v = int(raw)
            except ValueError:
                v = 0
            if v < 1:
                raise ValueError(f"{var}={raw!r}: must be a positive integer (default {f.default})")
            kw[f.name] = v
        return cls(**kw)


@dataclass(frozen=True)
class Params:
    """Checked prediction parameters (:func:`check_params`)."""
    M: int
    quantiles: tuple[float, ...]
    interval_level: float
    refine_steps: int
    return_samples: bool
    seed: int

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Predictor:
    model: torch.nn.Module
    cfg: Config
    task: TaskSpec              # x_shape is the trained model's input shape

    @property
    def is_image(self) -> bool:
        return len(self.task.x_shape) == 3

    @property
    def input_column(self) -> str:
        return "image" if self.is_image else "x"


def slim_state(state: dict) -> dict:
    """What a registered model needs from a training checkpoint (:mod:`ebm.checkpoint`): the selected
    weights (best validation epoch, or the last), config, task spec, versions, metrics and epochs —
    no optimiser, no RNG states. Plain tensors and values: it loads with ``weights_only=True``."""
    from ebm import checkpoint
    return {"format": state.get("format"), "model": checkpoint.selected_weights(state), "config": state["config"],
            "task": state["task"], "versions": state.get("versions", {}), "metrics": state.get("metrics", {}),
            "epoch": state.get("epoch"), "selected_epoch": checkpoint.selected_epoch(state)}


def from_state(state: dict) -> Predictor:
    """Rebuild the network from a (slim or full) checkpoint dict: no source edits, no dataset needed
    (the task spec travels with the weights)."""
    s = slim_state(state)
    cfg = Config.from_dict(s["config"])
    task = TaskSpec.from_dict(s["task"])
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    model.load_state_dict(s["model"])
    model.eval()
    return Predictor(model, cfg, task)


def load_file(path: str | Path) -> Predictor:
    """A predictor from a saved (slim or full) checkpoint file, loaded with ``weights_only=True``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a model file of this project ({str(e).splitlines()[0]})") from None
    return from_state(state)


def max_image_bytes(shape: tuple[int, int, int]) -> int:
    """The largest encoded image taken for a (C, H, W) model: 8 bytes per pixel value plus 1 MiB of
    headers and metadata (an ICC profile, EXIF) — far above any PNG/JPEG of that size, far below
    what would cost memory."""
    C, H, W = shape
    return 8 * C * H * W + (1 << 20)


def decode_image(data: Any, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """A request's image (bytes, or base64 text as JSON carries it) -> uint8 (C, H, W) by the one
    decoder training uses (:func:`pipelines.data.images.decode_image`): no resizing, no conversion."""
    from pipelines.data.images import ImageError
    from pipelines.data.images import decode_image as decode
    cap = max_image_bytes(shape)
    size = len(data) * 3 // 4 if isinstance(data, str) else len(data) if isinstance(data, (bytes, bytearray)) else \
        memoryview(data).nbytes if isinstance(data, memoryview) else 0
    if size > cap:
        raise InputError(f"{where}: {size} bytes is too large for an encoded {shape[2]}x{shape[1]} image of {shape[0]} "
                         f"channel(s) (at most {cap} bytes)")
    if isinstance(data, str):
        import base64
        import binascii
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: image must be bytes (or base64 text), got text that is not base64") from None
    try:
        return decode(data, shape, where, owner="the model")
    except ImageError as e:
        raise InputError(str(e)) from None


def _null(value: Any) -> bool:
    """None or pandas' NA."""
    pd = sys.modules.get("pandas")
    return value is None or (pd is not None and value is pd.NA)


def is_missing(value: Any) -> bool:
    """A null y cell: None, pandas' NA or a scalar NaN (how pandas holds a null in a float column)."""
    return _null(value) or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _vector(value: Any, d: int, where: str, what: str) -> np.ndarray:
    """A number or a flat list of d numbers, finite and within float32's range -> float64 (d,)."""
    if _null(value):
        raise InputError(f"{where}: {what} is missing (null)")
    try:
        a = np.asarray(value)
        if a.dtype.kind == "O":          # a list holding None or mixed types
            a = a.astype(np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.dtype.kind not in "iuf" or a.ndim > 1:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InputError(f"{where}: {what} must be a number or a flat list of {d} numbers, got {shown}")
    v = a.astype(np.float64).reshape(-1)
    if v.size != d:
        raise InputError(f"{where}: {what} has {v.size} value(s), the model expects {d}")
    if not np.isfinite(v).all():
        raise InputError(f"{where}: {what} is not finite: {v.tolist()}")
    if (np.abs(v) > FLOAT32_MAX).any():
        raise InputError(f"{where}: {what} = {v.tolist()} is outside float32's range (|value| <= {FLOAT32_MAX:.4g})")
    return v


def inputs_tensor(p: Predictor, values: Sequence[Any], ids: Sequence[str] | None = None) -> torch.Tensor:
    """Rows of the input column -> the model's input batch (images normalised as in training, with the
    task's normalisation)."""
    ids = ids if ids is not None else [f"row {i}" for i in range(len(values))]
    if p.is_image:
        imgs = np.stack([decode_image(v, p.task.x_shape, w) for v, w in zip(values, ids)]) if len(values) else \
            np.zeros((0, *p.task.x_shape), dtype=np.uint8)
        return to_inputs(imgs, p.task)
    d = p.task.x_shape[0]
    return torch.as_tensor(np.stack([_vector(v, d, w, "x") for v, w in zip(values, ids)]).astype(np.float32)
                           if len(values) else np.zeros((0, d), np.float32))


def _integer(name: str, value: Any, lo: int, hi: int, limit_var: str | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer from {lo} to {hi}, got {value!r} ({type(value).__name__})")
    v = int(value)
    if v > hi and limit_var:
        raise InputError(f"{name} = {v} is over the serving limit of {hi} ({limit_var})")
    if not lo <= v <= hi:
        raise InputError(f"{name} must be an integer from {lo} to {hi}, got {v}")
    return v


def _level(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number strictly between 0 and 1, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not 0.0 < v < 1.0:
        raise InputError(f"{name} must lie in (0, 1), strictly between 0 and 1; got {v}")
    return v


def check_M(p: Predictor, M: Any, limits: Limits | None = None) -> int:
    """M (proposal samples per row): an integer in [1, ``limits.max_M``]; None = the model's M_eval."""
    lim = limits if limits is not None else Limits.from_env()
    if M is None:
        M = int(p.cfg.sampler.M_eval)
        if M > lim.max_M:
            raise InputError(f"the model's default M (sampler.M_eval = {M}) is over the serving limit of "
                             f"{lim.max_M} ({Limits.ENV['max_M']}): pass M explicitly")
    return _integer("M (proposal samples per row)", M, 1, lim.max_M, Limits.ENV["max_M"])


def check_params(p: Predictor, *, M: Any = None, quantiles: Any = None, interval_level: Any = None,
                 refine_steps: Any = None, return_samples: Any = False, seed: Any = 0,
                 limits: Limits | None = None) -> Params:
    """The prediction parameters checked against the model and ``limits`` (None: the model's default).
    Every bad value is an :class:`InputError` naming the parameter; nothing is clipped or defaulted
    silently (``M = 0`` is an error, not the default)."""
    lim = limits if limits is not None else Limits.from_env()
    M = check_M(p, M, lim)
    if quantiles is None:
        quantiles = DEFAULT_LEVELS
    if isinstance(quantiles, (str, bytes)) or not isinstance(quantiles, (list, tuple, np.ndarray)):
        raise InputError(f"quantiles must be a list of levels strictly between 0 and 1, got {quantiles!r}")
    qs = tuple(_level(f"quantiles[{i}]", q) for i, q in enumerate(quantiles))
    if len(qs) > lim.max_quantiles:
        raise InputError(f"quantiles has {len(qs)} levels, over the limit of {lim.max_quantiles} "
                         f"({Limits.ENV['max_quantiles']})")
    names = [quantile_column(q) for q in qs]
    for i, (q, name) in enumerate(zip(qs, names)):
        if name in ("q0", "q1"):
            raise InputError(f"quantiles[{i}] = {q} is closer to 0 or 1 than the columns' 6 decimals can name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"quantiles must be distinct (one output column each), got {list(qs)}: repeated {dup}")
    level = _level("interval_level", p.cfg.eval.interval_level if interval_level is None else interval_level)
    steps = _integer("refine_steps", p.cfg.sampler.refine_steps if refine_steps is None else refine_steps, 0,
                     lim.max_refine_steps, Limits.ENV["max_refine_steps"])
    if not isinstance(return_samples, (bool, np.bool_)):
        raise InputError(f"return_samples must be true or false, got {return_samples!r}")
    if return_samples and M > lim.max_return_samples:
        raise InputError(f"return_samples with M = {M}: at most {lim.max_return_samples} samples per row are "
                         f"returned ({Limits.ENV['max_return_samples']}); lower M")
    seed = _integer("seed", seed, 0, SEED_MAX)
    return Params(M=M, quantiles=qs, interval_level=level, refine_steps=steps, return_samples=bool(return_samples),
                  seed=seed)


def chunk_rows(p: Predictor, M: int, limits: Limits, batch_size: int = 256) -> int:
    """Rows per chunk so that one chunk's activations stay within ``limits.chunk_mb``: the energy
    head holds about 4·hidden + 2·Σ y_embed floats per (row, sample) (measured: 8.3 KB at
    hidden = 512 with a residual block), the proposal about 8·K·D; times 1 + M samples."""
    e, pc = p.cfg.energy, p.cfg.proposal
    per_sample = 4 * (4 * e.hidden + 2 * sum(e.y_embed) + 8 * pc.K * p.task.D + 32)      # bytes
    return max(1, min(int(batch_size), (limits.chunk_mb << 20) // (per_sample * (1 + M))))


def _targets(y: Sequence[Any], n: int, D: int, ids: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
    """y cells -> (n, D) float32 (0 where a row has none) and which rows have one."""
    y = list(y)
    if len(y) != n:
        raise InputError(f"y has {len(y)} rows but x has {n}")
    vals = np.zeros((n, D), np.float32)
    given = [not is_missing(v) for v in y]
    for i, v in enumerate(y):
        if given[i]:
            vals[i] = _vector(v, D, ids[i], "y")
    return torch.as_tensor(vals), given


def _col(t: torch.Tensor, D: int) -> list:
    """(B, D) -> B scalars (D = 1) or B lists."""
    a = t.detach().cpu().double().numpy()
    return a[:, 0].tolist() if D == 1 else a.tolist()


def _not_finite(bad: Sequence[str]) -> InputError:
    """The error for inputs the model maps to non-finite numbers (far outside its training range)."""
    return InputError(f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: the model's prediction is not finite "
                      f"for this input (far outside the range the model was trained on?)")


def _rows_not_finite(p: Predictor, xb: torch.Tensor, ids: Sequence[str]) -> list[str]:
    """The rows whose features or proposal parameters are not finite."""
    with torch.no_grad():
        enc = p.model.encode(xb)
        mix = p.model.propose(enc)
        parts = [t for t in enc if isinstance(t, torch.Tensor)] + [mix.means, mix.log_sigma2, mix.logits]
        ok = torch.stack([t.reshape(t.shape[0], -1).isfinite().all(1) for t in parts]).all(0)
    return [ids[i] for i in range(len(ids)) if not bool(ok[i])]


def row_seed(seed: int, row: int, stream: int) -> int:
    """The 64-bit seed of one row's generator: (seed, row index, stream) mixed by numpy's SeedSequence
    (nearby rows and seeds get unrelated streams)."""
    a, b = np.random.SeedSequence([int(seed), int(row), int(stream)]).generate_state(2, np.uint32)
    return (int(a) << 32) | int(b)


def row_generators(seed: int, rows: Sequence[int], stream: int, device: torch.device | str = "cpu") \
        -> list[torch.Generator]:
    """One generator per row (:func:`row_seed`), on the device the samples are drawn on."""
    return [torch.Generator(device=device).manual_seed(row_seed(seed, r, stream)) for r in rows]


MIN_TAIL_SAMPLES = 10.0


def few_samples(ess: Sequence[float], prm: Params, limits: Limits | None = None) -> str:
    """A warning when the central intervals rest on too few effective samples, else "". An interval
    at level ℓ is read from the weighted samples' tails of mass (1 − ℓ)/2 each; with ESS × M × (1 − ℓ)/2
    below ~10 effective samples in a tail the weighted quantiles come out too narrow (issue 16: toy 2,
    ESS/M 0.55, 90 % coverage 0.858 at M = 64 vs 0.912 at M = 1024 and 0.922 for the exact grid density).
    ``ess`` is the rows' ESS / M (the ``ess`` column); ``limits`` those ``prm`` was checked with."""
    if not len(ess):
        return ""
    frac = np.asarray(ess, dtype=np.float64)
    tail = frac * prm.M * (1 - prm.interval_level) / 2
    low = int((tail < MIN_TAIL_SAMPLES).sum())
    if low * 10 <= len(tail):                  # a few hard rows are expected; warn when over 10 % are
        return ""
    # the M at which 90 % of the rows (those above the 10th percentile of ESS / M) reach the minimum
    need = int(np.ceil(round(MIN_TAIL_SAMPLES / max(float(np.quantile(frac, 0.1)), 1e-6) / ((1 - prm.interval_level) / 2), 6)))
    cap = (limits or Limits.from_env()).max_M
    advice = (f"raise M (about {need} for 90% of these rows)" if need <= cap else
              f"raise M (up to the limit of {cap}, {Limits.ENV['max_M']}; about {need} would be needed for 90% of "
              f"these rows) or ask for a lower interval level")
    return (f"the {prm.interval_level * 100:g}% intervals of {low} of {len(tail)} rows rest on fewer than "
            f"{MIN_TAIL_SAMPLES:g} effective samples per tail (ESS x M x {(1 - prm.interval_level) / 2:g}; median "
            f"{float(np.median(tail)):.1f} at M = {prm.M}) and come out too narrow: {advice}")


def predict_rows(p: Predictor, x: torch.Tensor, y: Sequence[Any] | None = None, *, M: int | None = None,
                 quantiles: Sequence[float] | None = DEFAULT_LEVELS, interval_level: float | None = None,
                 refine_steps: int | None = None, return_samples: bool = False, seed: int = 0,
                 batch_size: int = 256, limits: Limits | None = None,
                 ids: Sequence[str] | None = None, rows: Sequence[int] | None = None) -> dict[str, list]:
    """Column -> per-example values for inputs x (B, ...) (see the module docstring). Deterministic
    given ``seed`` and each row's index (``rows``, default 0..B-1): per-row generators, one stream for
    the predictions and one for ``log_p``, so neither the chunking nor adding y changes a row's other
    columns. Runs on the model's device. Parameters are checked by :func:`check_params` (``limits``:
    default :meth:`Limits.from_env`)."""
    lim = limits if limits is not None else Limits.from_env()
    prm = check_params(p, M=M, quantiles=quantiles, interval_level=interval_level, refine_steps=refine_steps,
                       return_samples=return_samples, seed=seed, limits=lim)
    M, qs = prm.M, prm.quantiles
    n = x.shape[0]
    ids = list(ids) if ids is not None else [f"row {i}" for i in range(n)]
    rows = list(range(n)) if rows is None else [int(r) for r in rows]
    if len(rows) != n:
        raise ValueError(f"{len(rows)} row indices for {n} rows")
    D, circ = p.task.D, p.task.circular
    device = next(p.model.parameters()).device
    ys, given = _targets(y, n, D, ids) if y is not None else (None, None)
    any_y = ys is not None and any(given)
    step = chunk_rows(p, M, lim, batch_size)
    out: dict[str, list] = {k: [] for k in ["mode", "mean", "std", *map(quantile_column, qs), "interval_lo",
                                             "interval_hi", "ess"]}
    if ys is not None:
        out["log_p"] = []
    if prm.return_samples:
        out["samples"], out["weights"] = [], []

    with torch.no_grad():
        for s in range(0, n, step):
            xb = x[s:s + step].to(device)
            try:
                pr = predict(p.model, xb, circ, M=M, levels=qs, interval_level=prm.interval_level,
                             refine_steps=prm.refine_steps, keep_samples=prm.return_samples,
                             generator=row_generators(prm.seed, rows[s:s + step], 0, device))
            except (RuntimeError, FloatingPointError):   # NaN mixture weights (NonFiniteProposal); else re-raised
                bad = _rows_not_finite(p, xb, ids[s:s + step])
                if not bad:
                    raise
                raise _not_finite(bad) from None
            fin = torch.stack([t.reshape(t.shape[0], -1).isfinite().all(1) for t in
                               (pr.mode, pr.mean, pr.std, pr.quantiles, pr.interval, pr.ess.unsqueeze(1))]).all(0)
            if not bool(fin.all()):
                raise _not_finite([ids[s + i] for i in range(len(fin)) if not bool(fin[i])])
            out["mode"] += _col(pr.mode, D)
            out["mean"] += _col(pr.mean, D)
            out["std"] += _col(pr.std, D)
            for j, q in enumerate(qs):
                out[quantile_column(q)] += _col(pr.quantiles[:, j], D)
            out["interval_lo"] += _col(pr.interval[:, 0], D)
            out["interval_hi"] += _col(pr.interval[:, 1], D)
            out["ess"] += pr.ess.detach().cpu().double().tolist()
            if any_y:
                # every row of the chunk (0 stands in for a missing y): no row's log_p depends on another's y
                lp = log_density(p.model, xb, ys[s:s + step].unsqueeze(1).to(device), M=M,
                                 generator=row_generators(prm.seed, rows[s:s + step], 1, device))[:, 0]
                lp = lp.detach().cpu().double().tolist()
                has_y = given[s:s + step]
                bad = [ids[s + i] for i, (v, has) in enumerate(zip(lp, has_y)) if has and not math.isfinite(v)]
                if bad:
                    raise InputError(f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}: log p(y|x) is not finite "
                                     f"at this y (far outside the range the model was trained on?)")
                out["log_p"] += [v if has else None for v, has in zip(lp, has_y)]
            elif ys is not None:
                out["log_p"] += [None] * xb.shape[0]
            if prm.return_samples:
                smp = pr.samples.detach().cpu().double()
                out["samples"] += smp.numpy().tolist() if D > 1 else smp[..., 0].numpy().tolist()
                out["weights"] += pr.weights.detach().cpu().double().numpy().tolist()
    return out


def quantile_column(q: float) -> str:
    """0.05 -> "q0.05", 0.5 -> "q0.5" (the shortest decimal that names the level)."""
    return "q" + f"{q:.6f}".rstrip("0").rstrip(".")
