"""MLflow tracking for training jobs: one run per job, written from the driver's side only.

The tracking URI comes from ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
default ``sqlite:///mlruns.db`` (artifacts in ``./mlruns-artifacts``). An unreachable server fails
fast, before any training starts. Writers: the driver (run, params, config, final checkpoint, status)
and the Ray Train controller on the driver's node (per-epoch metrics and plots); never the workers.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_URI = "sqlite:///mlruns.db"
RUN_NAME_TAG = "ebm.run_name"
# MLflow params cannot change: a resumed run records each param it now trains with under another value
# (optim.epochs raised to continue it, or a change --allow-config-change let through) as the tag
# ebm.param.<key> (pipelines.driver.runs.reopened), and readers of runs (pipelines.driver.results) take
# those tags over the params
PARAM_TAG_PREFIX = "ebm.param."


def _quiet_store_logs() -> None:
    """MLflow logs at INFO each time it creates or migrates a SQLite store (and alembic with it), and
    draws download bars for artifacts a command fetches: not something a user acts on. Kept unless $EBM_LOG_LEVEL asks for INFO or DEBUG (``-v``)."""
    import logging
    level = getattr(logging, os.environ.get("EBM_LOG_LEVEL", "WARNING").upper(), logging.WARNING)
    # mlflow.pyfunc: "Validating input example against model signature" at every register
    for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.pyfunc"):
        logging.getLogger(name).setLevel(level)
    # MLflow draws a tqdm bar for every artifact download (register, predict from the registry); on a
    # log or a pipe it is a run of carriage returns. The user's own setting wins.
    if level > logging.INFO:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


_quiet_store_logs()


class TrackingError(RuntimeError):
    pass


def resolve_uri(uri: str | None = None) -> str:
    """The URI to use; a relative SQLite path is made absolute, since Ray workers run elsewhere."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0, write: bool = True) -> None:
    """Fail fast: an HTTP server must answer /health. A SQLite store must be a database file, or a
    file SQLite may create; with ``write`` (a command that logs or registers) both the file and its
    directory must be writable (SQLite writes a journal beside the file); without it (a command that
    only reads) the file must already exist, so that reading never creates a store as a side effect."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered /health with {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e}); start it, or unset "
                                f"MLFLOW_TRACKING_URI to use the local {DEFAULT_URI}") from e
    elif (f := sqlite_file(uri)) is not None:
        d = f.parent
        if f.is_dir():
            raise TrackingError(f"MLflow store {uri}: {f} is a directory, not a SQLite file")
        if f.exists():
            if not _is_sqlite(f):
                raise TrackingError(f"MLflow store {uri}: {f} is not a SQLite database")
            if not os.access(f, os.R_OK):
                raise TrackingError(f"MLflow store {uri}: {f} is not readable")
        elif not write:
            raise TrackingError(f"no MLflow store at {f} (nothing was tracked there; give --tracking-uri or set "
                                f"MLFLOW_TRACKING_URI)")
        if write:
            if f.exists() and not os.access(f, os.W_OK):
                raise TrackingError(f"MLflow store {uri}: {f} is read-only; make it writable or give another "
                                    f"--tracking-uri")
            if not d.is_dir() or not os.access(d, os.W_OK):
                raise TrackingError(f"MLflow store {uri}: directory {d} does not exist or is not writable")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store (absolute); None for any other kind of URI."""
    return Path(uri[len("sqlite:///"):]).resolve() if uri.startswith("sqlite:///") else None


def _is_sqlite(f: Path) -> bool:
    """An empty file (SQLite makes it a database) or one with SQLite's header."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return True         # unreadable: reported as such by the caller
    return head in (b"", b"SQLite format 3\x00")


def filter_value(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter. MLflow's parser strips the quotes and
    never unescapes, so a value is quoted with the quote character it does not contain; one with both
    cannot be written (TrackingError)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r} contains both ' and \": MLflow cannot search for it; use another name")


def _sqlite_dir(uri: str) -> Path | None:
    """The directory of a SQLite store's file; None for any other kind of URI."""
    f = sqlite_file(uri)
    return f.parent if f is not None else None


def _artifact_location(uri: str) -> str | None:
    d = _sqlite_dir(uri)
    return (d / "mlruns-artifacts").as_uri() if d is not None else None


@contextlib.contextmanager
def _store_lock(uri: str):
    """Hold an exclusive lock on a SQLite store's directory. Opening a new store creates and migrates
    its schema, and two processes doing that at once fail (alembic CircularDependencyError): e.g. two
    ``ebm train --local`` started together on a new mlruns.db. Processes on one host only — a SQLite
    store is not shared across hosts. Not re-entrant: do not nest."""
    f = sqlite_file(uri)
    if f is None or not f.parent.is_dir():     # not SQLite, or MLflow's own error about the path will do
        yield
        return
    fd = os.open(f.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _seed_new_store(f)
        yield
    finally:
        os.close(fd)   # releases the lock


def _seed_new_store(f: Path) -> None:
    """A new SQLite store starts as a copy of an empty store MLflow itself created and migrated once
    per MLflow version on this machine (:func:`_empty_store`): MLflow builds a new store by running
    its ~60 schema migrations, 5 s of every first command in a new folder (and of every test that
    uses a fresh store), where the copy takes milliseconds. The copy has no experiment, so MLflow
    creates its Default experiment on opening it, with this store's artifact root, exactly as in a
    store it created. Without a writable cache MLflow creates the store as before. Called under the
    store's lock."""
    if f.exists():
        return
    template = _empty_store()
    if template is None:
        return
    import shutil
    part = f.with_name(f".{f.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(template, part)
        os.replace(part, f)
    except OSError:
        part.unlink(missing_ok=True)    # MLflow creates the store itself, and reports what is wrong


def _empty_store() -> Path | None:
    """The empty, migrated SQLite store of this MLflow version (created on first use in
    ``$XDG_CACHE_HOME/ebm-proposals``, default ``~/.cache``); None when it cannot be made."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ebm-proposals"
    template = cache / f"mlflow-{package_versions()['version.mlflow']}-empty-store.db"
    if template.is_file():
        return template
    part = cache / f".{template.name}.{os.getpid()}.part"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        from mlflow.store.db.utils import _initialize_tables, _verify_schema, create_sqlalchemy_engine
        engine = create_sqlalchemy_engine(f"sqlite:///{part}")
        try:
            _initialize_tables(engine)
            _verify_schema(engine)
        finally:
            engine.dispose()
        os.replace(part, template)      # whole or not at all; two processes racing write the same store
        return template
    except Exception:                   # a read-only home, a MLflow without these helpers: no template
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
        return None


def open_client(uri: str):
    """An ``MlflowClient`` for ``uri``, opened under the store lock. Every MLflow client of the
    pipelines comes from here."""
    from mlflow.tracking import MlflowClient
    with _store_lock(uri):
        return MlflowClient(uri)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict, config_toml: str,
              reopen: bool = False) -> str:
    """Create the job's MLflow run, or with ``reopen`` (a resumed run) reopen the latest run of that
    name, whatever its status; returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient
    check_reachable(uri)
    with _store_lock(uri):   # also makes get-or-create of the experiment one step
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            experiment, artifact_location=_artifact_location(uri))
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {filter_value(run_name)}",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and reopen:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    run_id = run.info.run_id
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for s in range(0, len(items), 100):
        client.log_batch(run_id, params=items[s:s + 100])
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.toml"
        p.write_text(config_toml)
        client.log_artifact(run_id, str(p))
    del mlflow
    return run_id


def latest_run(uri: str, run_name: str, status: str | None = None):
    """The latest MLflow run named ``run_name`` (``ebm train/tune --name``) in any active
    experiment, of ``status`` if given; None if there is none."""
    from mlflow.entities import ViewType
    client = open_client(uri)
    exps = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    where = f"tags.`{RUN_NAME_TAG}` = {filter_value(run_name)}"
    if status:
        where += f" and attributes.status = '{status}'"
    found = client.search_runs(exps, filter_string=where, order_by=["attributes.start_time DESC"],
                               max_results=1) if exps else []
    return found[0] if found else None


def _retry(fn, *args, attempts: int = 8, **kw):
    """Call ``fn``, retrying while SQLite reports its file locked by another writer (two jobs, or the
    driver and the Train controller, sharing one ``mlruns.db``)."""
    for i in range(attempts):
        try:
            return fn(*args, **kw)
        except Exception as e:   # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.05 * 2 ** i)


def package_versions() -> dict[str, str]:
    """Tags ``version.<package>`` for the libraries a run depends on."""
    from importlib import metadata
    out = {}
    for pkg in ("torch", "ray", "mlflow", "numpy", "pyarrow", "ebm-proposals"):
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def end_run(uri: str, run_id: str, status: str) -> None:
    _retry(open_client(uri).set_terminated, run_id, status=status)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    _retry(open_client(uri).set_tag, run_id, key, value)


def log_artifacts(uri: str, run_id: str, local_dir: str, artifact_path: str) -> None:
    _retry(open_client(uri).log_artifacts, run_id, local_dir, artifact_path)


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    """Finite numeric values of ``metrics`` at ``step``, in batches."""
    import math
    from mlflow.entities import Metric
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    client = open_client(uri)
    for s in range(0, len(items), 500):
        _retry(client.log_batch, run_id, metrics=items[s:s + 500])


def epoch_metrics(row: dict) -> dict:
    """What MLflow gets of an epoch's report: every number but the bookkeeping, and ``val_*`` only
    for an epoch that validated (a carried-forward val_nll is not a new point)."""
    fresh = row.get("validated", 1.0) > 0
    return {k: v for k, v in row.items() if k not in ("epoch", "validated") and isinstance(v, (int, float))
            and (fresh or not k.startswith("val_")) and not k.startswith("test_")}


def log_epoch(uri: str, run_id: str, row: dict, plots_dir: str | None = None) -> None:
    """One epoch of a training run: its metrics at step = epoch, and its density plots if any."""
    log_metrics(uri, run_id, epoch_metrics(row), step=int(row["epoch"]))
    if plots_dir and Path(plots_dir).is_dir() and any(Path(plots_dir).iterdir()):
        log_artifacts(uri, run_id, str(plots_dir), "plots")
