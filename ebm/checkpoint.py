"""The one checkpoint format, written by every training path (``--local``, Ray Train workers, Tune
trials) and read by resume, registration and prediction.

A checkpoint is a directory holding ``checkpoint.pt``: a dict of tensors and plain Python values
only, so it loads with ``torch.load(weights_only=True)`` (no code runs when a file someone else
wrote is read). It describes itself: the config, the task spec, versions, metrics,
the epoch, the optimiser and RNG states to resume, and the selected weights when ``eval.select =
"best_val"``.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 2
CKPT_FILE = "checkpoint.pt"
REQUIRED_KEYS = ("format", "model", "optimizer", "epoch", "config", "task", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, half-written, of another format or lacks a key; the message says which."""


def versions() -> dict[str, str]:
    return {"torch": str(torch.__version__), "numpy": str(np.__version__), "python": platform.python_version()}


def make_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, task: dict, epoch: int,
               metrics: dict, samplers: list[torch.Tensor], best: dict | None, nonfinite_in_row: int) -> dict:
    """The checkpoint dict. ``best``: {"epoch", "val_nll", "model"} of the selected epoch (best_val)."""
    return {"format": FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": int(epoch), "config": config, "task": task, "versions": versions(),
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            "rng": {"torch": torch.get_rng_state(), "samplers": list(samplers)},
            "best": best, "nonfinite_in_row": int(nonfinite_in_row)}


def save(d: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``d/checkpoint.pt`` atomically (temp file + rename)."""
    path = Path(d) / CKPT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(d: str | os.PathLike) -> dict:
    """Load and check a checkpoint directory (or its ``checkpoint.pt``); a missing, half-written or
    foreign file is a :class:`CheckpointError`, never a silently partial state."""
    path = Path(d)
    if path.is_dir():
        path = path / CKPT_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {d} has no {CKPT_FILE} (interrupted write?)")
    return loads(path, where=path)


def loads(f, where) -> dict:
    """:func:`load` of a path or an open binary file (a checkpoint read from object storage)."""
    path = where
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:      # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is unreadable (half-written, or not a checkpoint of this "
                              f"project): {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format {got!r}; this code reads format {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return state


def selected_weights(state: dict) -> dict:
    """The weights to predict with: the best-validation epoch's (``eval.select = "best_val"``), else
    the last epoch's."""
    best = state.get("best")
    return best["model"] if best else state["model"]


def selected_epoch(state: dict) -> int:
    best = state.get("best")
    return int(best["epoch"]) if best else int(state["epoch"])
