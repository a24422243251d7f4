"""Run states shared by every training path (``--local`` and Ray Train): where a run's checkpoints
live, what ``--resume`` may continue, and how a run ends.

A run ``NAME`` keeps its checkpoints in ``STORAGE/NAME/checkpoint_*`` (Ray Train's layout; the local
runtime writes the same). Rules (issue 11):

- a new run whose name already has checkpoints is refused (it would silently continue the old one);
- ``--resume`` of a name with no checkpoint is refused; of a finished run too, unless
  ``optim.epochs`` was raised, and then the same run continues;
- ``--resume`` with a config that differs from the checkpoint's (other than ``optim.epochs``) is
  refused listing the keys, unless ``allow_config_change`` (the change is then tagged on the run);
- a run ends FINISHED only if it trained and its test metrics are finite; otherwise FAILED with the
  reason as the tag ``ebm.stop_reason``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ebm import checkpoint
from ebm.config import Config, ConfigError
from ebm.loop import TrainingFailed

STOP_REASON_TAG = "ebm.stop_reason"
CONFIG_CHANGE_TAG = "ebm.config_change"


def storage_root(storage: str | None) -> str:
    return str(Path(storage or os.environ.get("EBM_STORAGE_PATH") or "runs").resolve())


def checkpoint_dirs(storage: str, name: str) -> list[Path]:
    """The run's checkpoint directories, oldest first (names sort by time)."""
    root = Path(storage) / name
    return sorted(p for p in root.glob("checkpoint_*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(storage: str, name: str) -> tuple[Path, dict] | None:
    """The newest checkpoint of the run that loads (a half-written newer one is passed over)."""
    for d in reversed(checkpoint_dirs(storage, name)):
        try:
            return d, checkpoint.load(d)
        except checkpoint.CheckpointError:
            continue
    return None


def config_changes(old: Config, new: Config) -> dict[str, list]:
    """{key: [old, new]} of flat keys that differ, ignoring optim.epochs (raising it is how a finished
    run continues)."""
    a, b = old.to_flat(), new.to_flat()
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if k != "optim.epochs" and a.get(k) != b.get(k)}


def plan(cfg: Config, name: str, storage: str, resume: bool, allow_config_change: bool = False
         ) -> tuple[dict | None, Path | None, dict]:
    """Check ``name`` against what ``storage`` holds -> (checkpoint state to resume from, its
    directory, config changes). ConfigError says what to do instead."""
    found = latest_checkpoint(storage, name)
    if not resume:
        if found or checkpoint_dirs(storage, name):
            raise ConfigError(f"run {name!r} already exists under {storage}: continue it with --resume {name}, "
                              f"or give another --name")
        return None, None, {}
    if found is None:
        raise ConfigError(f"--resume {name}: no checkpoint of a run of that name under {storage}")
    d, state = found
    changes = config_changes(Config.from_dict(state["config"]), cfg)
    if changes and not allow_config_change:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())
        raise ConfigError(f"--resume {name}: the config differs from the run's ({listed}); resume with the "
                          f"run's config, or pass --allow-config-change to continue with the new values")
    if state["epoch"] + 1 >= cfg.optim.epochs:
        raise ConfigError(f"--resume {name}: the run finished its {state['epoch'] + 1} epochs; raise optim.epochs "
                          f"(--set optim.epochs=N) to continue it")
    return state, d, changes


def reopened(uri: str, run_id: str, changes: dict) -> None:
    """A run (re)starting: the reason an earlier attempt stopped no longer holds; a config change
    that ``--allow-config-change`` let through is recorded (MLflow params cannot change)."""
    from pipelines import tracking
    client = tracking.open_client(uri)
    if STOP_REASON_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, STOP_REASON_TAG)
    if changes:
        tracking.set_tag(uri, run_id, CONFIG_CHANGE_TAG, json.dumps(changes)[:5000])


def finish(uri: str | None, run_id: str | None, last: dict, checkpoint_dir: str | None, epochs: int) -> dict:
    """After training: a run that did not train or whose test metrics are not finite raises
    :class:`TrainingFailed` (tagging the reason); else its final checkpoint and test metrics are
    logged. Returns the last metrics."""
    from pipelines import tracking
    reason = last.get("failure")
    if not reason and "test_nll" in last and not _finite(last["test_nll"]):
        reason = f"test NLL is {last['test_nll']!r}: the model is not usable (diverged?)"
    if not reason and int(last.get("epoch", -1)) != epochs - 1:
        reason = f"training stopped after epoch {int(last.get('epoch', -1)) + 1} of {epochs}"
    if reason:
        if uri:
            tracking.set_tag(uri, run_id, STOP_REASON_TAG, str(reason)[:5000])
        raise TrainingFailed(str(reason))
    if not uri:
        return last
    if checkpoint_dir is not None:
        tracking.log_artifacts(uri, run_id, str(checkpoint_dir), "checkpoint")
    tracking.log_metrics(uri, run_id, {k: v for k, v in last.items() if k.startswith("test_") or k == "selected_epoch"},
                         step=epochs)
    return last


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < 1e29
