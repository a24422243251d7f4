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
import os
from dataclasses import dataclass, field
from typing import Callable

from ebm import checkpoint
from ebm.config import Config, ConfigError
from ebm.loop import TrainingFailed, usable
from ebm.tasks import TaskSpec

STOP_REASON_TAG = "ebm.stop_reason"
CONFIG_CHANGE_TAG = "ebm.config_change"


def storage_root(storage: str | None) -> str:
    """``--storage``, else ``$EBM_STORAGE_PATH``, else ``./runs``; a local path made absolute (workers
    run elsewhere), a URI (``s3://…``) kept as it is."""
    from pipelines import storage as fs
    return fs.absolute(storage or os.environ.get("EBM_STORAGE_PATH") or "runs")


def checkpoint_dirs(storage: str, name: str) -> list[str]:
    """The run's checkpoint directories (local paths, or URIs under remote storage), oldest first (Ray's
    and the local runtime's names sort by time)."""
    import pyarrow.fs
    from pipelines import storage as fs
    infos = fs.list_dir(fs.join(storage, name))
    return sorted(fs.uri_of(storage, i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory
                  and i.base_name.startswith("checkpoint_"))


def prune(storage: str, name: str, keep: int) -> None:
    """Keep the run's newest ``keep`` checkpoints. Ray Train prunes only the checkpoints it registered;
    one a worker uploaded just before it was killed is never registered, and would stay forever."""
    from pipelines import storage as fs
    for d in checkpoint_dirs(storage, name)[:-keep]:
        fs.delete_dir(d)


def latest_checkpoint(storage: str, name: str) -> tuple[str, dict] | None:
    """The newest checkpoint of the run that loads (a half-written newer one is passed over), as
    (its directory — a local path, or a URI under remote storage —, its state)."""
    import io
    from pipelines import storage as fs
    for d in reversed(checkpoint_dirs(storage, name)):
        try:
            state = checkpoint.loads(io.BytesIO(fs.read_bytes(fs.join(d, checkpoint.CKPT_FILE))), where=d)
        except (checkpoint.CheckpointError, OSError, ValueError):
            continue
        return d, state
    return None


# Keys a resumed run cannot change, even with --allow-config-change: the weights would not load, or
# they would be trained on another task.
FIXED_ON_RESUME = ("task.", "features.", "energy.", "proposal.K", "proposal.hidden", "method.name")


def config_changes(old: Config, new: Config) -> dict[str, list]:
    """{key: [old, new]} of flat keys that differ (optim.epochs among them: raising it is how a finished
    run continues, and needs no --allow-config-change)."""
    a, b = old.to_flat(), new.to_flat()
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


@dataclass
class Plan:
    """What a run name means under its storage: a new run, or a resume from ``state`` (in
    ``checkpoint_dir``) with ``changes`` to its config; ``finalize_only`` when the run trained all its
    epochs but was stopped before it was marked FINISHED."""
    state: dict | None = None
    checkpoint_dir: str | None = None
    changes: dict = field(default_factory=dict)
    finalize_only: bool = False


def plan(cfg: Config, task, name: str, storage: str, resume: bool, allow_config_change: bool = False,
         finished: Callable[[], bool] = lambda: False) -> Plan:
    """Check ``name`` against what ``storage`` holds. ``task``: the task the data defines now;
    ``finished()``: whether the run's MLflow run ended FINISHED. ConfigError says what to do instead."""
    if not resume:
        if checkpoint_dirs(storage, name):
            raise ConfigError(f"run {name!r} already exists under {storage}: continue it with --resume {name}, "
                              f"or give another --name")
        return Plan()
    found = latest_checkpoint(storage, name)
    if found is None:
        raise ConfigError(f"--resume {name}: no checkpoint of a run of that name under {storage}")
    d, state = found
    if state["task"] != task.to_dict():
        was = TaskSpec.from_dict(state["task"])
        raise ConfigError(f"--resume {name}: the run was trained on task {was.name!r} (targets {list(was.target_names)}, "
                          f"inputs {list(was.x_shape)}), the data now defines {task.name!r} (targets "
                          f"{list(task.target_names)}, inputs {list(task.x_shape)}) or a different grid or σ's")
    changes = config_changes(Config.from_dict(state["config"]), cfg)
    fixed = sorted(k for k in changes if k.startswith(FIXED_ON_RESUME) and k != "task.data_dir")
    other = {k: v for k, v in changes.items() if k != "optim.epochs"}
    if fixed:
        raise ConfigError(f"--resume {name}: {', '.join(fixed)} cannot change on a resumed run (the model or its "
                          f"task would change); start a new run")
    if other and not allow_config_change:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in other.items())
        raise ConfigError(f"--resume {name}: the config differs from the run's ({listed}); resume with the "
                          f"run's config, or pass --allow-config-change to continue with the new values")
    if any(k.startswith("eval.") or k == "sampler.M_eval" for k in changes):
        state = {**state, "best": None}      # validation figures under other settings do not compare
    if state["epoch"] + 1 >= cfg.optim.epochs:
        if state["epoch"] + 1 == cfg.optim.epochs and not finished():
            return Plan(state, d, changes, finalize_only=True)
        raise ConfigError(f"--resume {name}: the run finished its {state['epoch'] + 1} epochs; raise optim.epochs "
                          f"(--set optim.epochs=N) to continue it")
    return Plan(state, d, changes)


def default_stamp() -> str:
    """The time part of a default run name: to the second, plus a random suffix so that two runs
    started in the same second never share a name (and each other's checkpoints)."""
    import secrets
    import time
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def finished_in(uri: str | None, name: str) -> Callable[[], bool]:
    """Whether the latest MLflow run named ``name`` ended FINISHED (for :func:`plan`)."""
    def check() -> bool:
        if not uri:
            return False
        from pipelines import tracking
        run = tracking.latest_run(uri, name)
        return run is not None and run.info.status == "FINISHED"
    return check


def reopened(uri: str, run_id: str, plan: Plan) -> None:
    """A run (re)starting: the reason an earlier attempt stopped no longer holds; the config changes of
    a resume (raised epochs, what ``--allow-config-change`` let through) are recorded as
    ``ebm.config_change.<N>`` (N = the epochs trained before them, so that every resume's changes are
    kept: a step decay's schedule), and every param the run now trains with under another value is
    tagged ``ebm.param.<key>`` (MLflow params cannot change)."""
    from pipelines import tracking
    client = tracking.open_client(uri)
    if STOP_REASON_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, STOP_REASON_TAG)
    if plan.changes and plan.state is not None:
        tracking.set_tag(uri, run_id, f"{CONFIG_CHANGE_TAG}.{plan.state['epoch'] + 1}",
                         json.dumps(plan.changes)[:5000])
    for k, (_, new) in plan.changes.items():
        tracking.set_tag(uri, run_id, tracking.PARAM_TAG_PREFIX + k, str(new)[:5000])


def config_history(tags: dict) -> list[tuple[int | None, dict]]:
    """A run's recorded config changes, oldest first: [(epochs trained before them, {key: [old, new]})].
    Runs recorded before the changes were keyed by epoch hold one ``ebm.config_change`` (the last
    resume's); its epoch is the old ``optim.epochs`` when that changed (a finished run continued), else
    unknown (None)."""
    out = []
    for k, v in tags.items():
        if k == CONFIG_CHANGE_TAG or k.startswith(CONFIG_CHANGE_TAG + "."):
            ch = json.loads(v)
            at = (int(k.rsplit(".", 1)[1]) if k != CONFIG_CHANGE_TAG else
                  (int(ch["optim.epochs"][0]) if "optim.epochs" in ch else None))
            out.append((at, ch))
    return sorted(out, key=lambda t: (t[0] is None, t[0] or 0))


def finish(uri: str | None, run_id: str | None, last: dict, checkpoint_dir: str | None, epochs: int) -> dict:
    """After training: a run that did not train or whose test metrics are not finite raises
    :class:`TrainingFailed` (tagging the reason); else its final checkpoint and test metrics are
    logged. Returns the last metrics."""
    from pipelines import tracking
    reason = last.get("failure")
    if not reason and "test_nll" in last and not usable(last["test_nll"]):
        reason = f"test NLL is {last['test_nll']!r}: the model is not usable (diverged?)"
    if not reason and int(last.get("epoch", -1)) != epochs - 1:
        reason = f"training stopped after epoch {int(last.get('epoch', -1)) + 1} of {epochs}"
    if reason:
        if uri:
            tracking.set_tag(uri, run_id, STOP_REASON_TAG, str(reason)[:5000])
        raise TrainingFailed(str(reason))
    if not uri:
        return last
    if checkpoint_dir is not None and "://" in str(checkpoint_dir):
        import tempfile

        from pipelines import storage as fs
        with tempfile.TemporaryDirectory(prefix="ebm-ckpt-") as d:     # MLflow logs local files; removed after
            fs.download_dir(str(checkpoint_dir), d)
            tracking.log_artifacts(uri, run_id, d, "checkpoint")
    elif checkpoint_dir is not None:
        tracking.log_artifacts(uri, run_id, str(checkpoint_dir), "checkpoint")
    tracking.log_metrics(uri, run_id, {k: v for k, v in last.items() if k.startswith("test_") or k == "selected_epoch"},
                         step=epochs)
    return last

