"""Progress bars for long work on the user's console (ingest, prediction over a dataset, sweeps):
one home so every command behaves the same way.

tqdm (the field's standard) draws the bar with rate and ETA on stderr. It is off with ``-q``
($EBM_QUIET=1) and when stderr is not a terminal (logs, CI, a submitted job's output: a bar redrawn
with carriage returns is noise there), unless $EBM_PROGRESS=1 forces it on (or 0 off).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def enabled() -> bool:
    forced = os.environ.get("EBM_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("EBM_QUIET") == "1":
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(iterable: Iterable[T] | None = None, *, total: int | float | None = None, desc: str = "",
        unit: str = "it", unit_scale: bool = False):
    """A tqdm bar over ``iterable`` (or a manual one: ``with bar(total=n) as b: b.update(k)``);
    disabled (a no-op with the same interface) when :func:`enabled` says so."""
    from tqdm import tqdm      # not tqdm.auto: its notebook bar needs ipywidgets
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                disable=not enabled(), dynamic_ncols=True, leave=False)
