"""A trained model as a predictor of full predictive distributions, independent of MLflow.

The same code answers in-process calls, the MLflow pyfunc (:mod:`pipelines.serve.registry`), ``ebm
predict`` and ``mlflow models serve``, so all four give the same numbers for the same rows and seed.

Inputs, one row per example:
    images: encoded PNG/JPEG bytes, exactly the model's (C, H, W): a wrong size, a wrong number of
            channels or bytes that are not an image are an :class:`InputError` naming the row.
    vectors (toys): x as a float (d = 1) or a list of d floats, in raw units (the net standardises).
    y (optional): a float (D = 1) or a list of D floats: adds log p(y|x) to the output.

Outputs per example (``D = 1``: scalars; ``D > 1``: lists of D): mode (refined when
``refine_steps`` > 0), mean, std, one column ``q<level>`` per requested quantile, ``interval_lo`` /
``interval_hi`` (central interval at ``interval_level``), ``ess`` (effective sample size / M),
optionally ``log_p`` and ``samples`` (M × D) with ``weights`` (M).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ebm.config import Config
from ebm.nets import build_model
from ebm.predict import log_density, predict
from ebm.data import to_inputs
from ebm.tasks import TaskSpec

DEFAULT_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
MODEL_FILE = "model.pt"

class InputError(ValueError):
    """An input row the model cannot take; the message names the row and what is wrong."""


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


def decode_image(data: Any, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """A request's image (bytes, or base64 text as JSON carries it) -> uint8 (C, H, W) by the one
    decoder training uses (:func:`pipelines.data.images.decode_image`): no resizing, no conversion."""
    from pipelines.data.images import ImageError
    from pipelines.data.images import decode_image as decode
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


def _vector(value: Any, d: int, where: str, what: str) -> np.ndarray:
    try:
        v = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} must be a number or a list of {d} numbers, got {value!r}") from None
    if v.size != d:
        raise InputError(f"{where}: {what} has {v.size} value(s), the model expects {d}")
    if not np.isfinite(v).all():
        raise InputError(f"{where}: {what} is not finite: {value!r}")
    return v


def inputs_tensor(p: Predictor, values: Sequence[Any], ids: Sequence[str] | None = None) -> torch.Tensor:
    """Rows of the input column -> the model's input batch (images normalised as in training)."""
    ids = ids if ids is not None else [f"row {i}" for i in range(len(values))]
    if p.is_image:
        imgs = np.stack([decode_image(v, p.task.x_shape, w) for v, w in zip(values, ids)]) if len(values) else \
            np.zeros((0, *p.task.x_shape), dtype=np.uint8)
        return to_inputs(imgs)
    d = p.task.x_shape[0]
    return torch.as_tensor(np.stack([_vector(v, d, w, "x") for v, w in zip(values, ids)]).astype(np.float32)
                           if len(values) else np.zeros((0, d), np.float32))


def _col(t: torch.Tensor, D: int) -> list:
    """(B, D) -> B scalars (D = 1) or B lists."""
    a = t.detach().cpu().double().numpy()
    return a[:, 0].tolist() if D == 1 else a.tolist()


def predict_rows(p: Predictor, x: torch.Tensor, y: Sequence[Any] | None = None, *, M: int | None = None,
                 quantiles: Sequence[float] = DEFAULT_LEVELS, interval_level: float | None = None,
                 refine_steps: int | None = None, return_samples: bool = False, seed: int = 0,
                 batch_size: int = 256) -> dict[str, list]:
    """Column -> per-example values for inputs x (B, ...) (see the module docstring). Deterministic
    given ``seed``: one generator drawn through the batches in order."""
    M = int(M or p.cfg.sampler.M_eval)
    level = float(interval_level if interval_level is not None else p.cfg.eval.interval_level)
    steps = int(p.cfg.sampler.refine_steps if refine_steps is None else refine_steps)
    qs = tuple(float(q) for q in quantiles)
    if not all(0.0 < q < 1.0 for q in qs) or not 0.0 < level < 1.0:
        raise InputError(f"quantiles and interval_level must lie in (0, 1), got {list(qs)} and {level}")
    if M < 1:
        raise InputError(f"M must be >= 1, got {M}")
    D, circ = p.task.D, p.task.circular
    ys = None
    if y is not None:
        ys = torch.as_tensor(np.stack([_vector(v, D, f"row {i}", "y") for i, v in enumerate(y)]).astype(np.float32)
                             if len(y) else np.zeros((0, D), np.float32))
    g = torch.Generator().manual_seed(int(seed))
    out: dict[str, list] = {}

    def put(k, v):
        out.setdefault(k, []).extend(v)

    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            pr = predict(p.model, xb, circ, M=M, levels=qs, interval_level=level, refine_steps=steps,
                         keep_samples=return_samples, generator=g)
            put("mode", _col(pr.mode, D))
            put("mean", _col(pr.mean, D))
            put("std", _col(pr.std, D))
            for j, q in enumerate(qs):
                put(quantile_column(q), _col(pr.quantiles[:, j], D))
            put("interval_lo", _col(pr.interval[:, 0], D))
            put("interval_hi", _col(pr.interval[:, 1], D))
            put("ess", pr.ess.double().tolist())
            if ys is not None:
                lp = log_density(p.model, xb, ys[s:s + batch_size].unsqueeze(1), M=M, generator=g)[:, 0]
                put("log_p", lp.double().tolist())
            if return_samples:
                put("samples", pr.samples.double().numpy().tolist() if D > 1 else pr.samples[..., 0].double().numpy().tolist())
                put("weights", pr.weights.double().numpy().tolist())
    if x.shape[0] == 0:
        for k in ["mode", "mean", "std", *map(quantile_column, qs), "interval_lo", "interval_hi", "ess"]:
            out.setdefault(k, [])
    return out


def quantile_column(q: float) -> str:
    """0.05 -> "q0.05", 0.5 -> "q0.5" (the shortest decimal that names the level)."""
    return "q" + f"{q:.6f}".rstrip("0").rstrip(".")
