"""``ebm predict`` over a Parquet input on Ray Data, and the Parquet output both paths write.

The Ray Data path (``ebm predict --workers N``), streaming from end to end::

    units    the driver reads the input's Parquet footers (a dataset split's shards or one file, a
             local path or a URI, through :mod:`pipelines.storage`) and lists its row groups, each
             with the index of its first row in the input
    read     a map_batches task per row group: its rows with their index (``row``), ``id`` (the
             input's, else ``row <i>`` as the single-process path names them), input and y columns
    predict  map_batches with :class:`BatchPredictor` on a fixed pool of N actors
             (``ActorPoolStrategy(size=N)``; ``num_cpus`` / ``num_gpus`` per actor): the model is
             rebuilt once per actor from the weights the driver loaded; each batch goes through
             :func:`pipelines.serve.serving.predict_rows` with the rows' indices
    write    ``write_parquet`` into a hidden staging prefix beside ``--out``
    publish  the driver streams the parts, in row order, into one Parquet file under a temporary
             name, then renames it into place (object storage: copies it server-side); the staging
             prefix is removed whatever happens, so a failure leaves nothing under ``--out``

Ray Data's ``read_parquet`` is not used: it gives no row position, and the IS draws are seeded
per row by its index in the input (serving's :func:`~pipelines.serve.serving.row_generators`), which
is what makes this path's numbers those of the single-process path, the Python API and the pyfunc.
Memory is bounded by Ray Data's streaming backpressure (a few row groups in flight per operator, the
object store's budget), the actors' chunking (``EBM_SERVE_CHUNK_MB``) and one output row group on
the driver. Ray Data's own progress bar shows on a terminal and is off with ``-q``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.serve import serving
from pipelines.serve.serving import InputError

ROW = "row"                 # the row's index in the input (the Ray path's parts; not in the output)
OUTPUT_ROW_GROUP = 4096


# --- the output both paths write -------------------------------------------------------------------

def output_schema(p: serving.Predictor, prm: serving.Params, log_p: bool) -> pa.Schema:
    """The predictions' Parquet schema: ``id`` then the columns of :func:`serving.predict_rows`
    (float64 for D = 1, lists of D for D > 1)."""
    num = pa.float64() if p.task.D == 1 else pa.list_(pa.float64())
    names = ["mode", "mean", "std", *map(serving.quantile_column, prm.quantiles), "interval_lo", "interval_hi"]
    fields = [pa.field("id", pa.string())] + [pa.field(n, num) for n in names] + [pa.field("ess", pa.float64())]
    if log_p:
        fields.append(pa.field("log_p", pa.float64()))
    if prm.return_samples:
        fields += [pa.field("samples", pa.list_(num)), pa.field("weights", pa.list_(pa.float64()))]
    return pa.schema(fields)


def output_table(ids: list[str], out: dict[str, list], schema: pa.Schema) -> pa.Table:
    """``predict_rows``' columns (and the ids) as a table of ``schema``."""
    cols = {"id": ids, **out}
    return pa.table([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def check_output(out: str, overwrite: bool, flag: str = "--out") -> None:
    """An existing output is replaced only with ``overwrite``; a directory never."""
    if storage.is_uri(out) and not out.lower().endswith(".parquet"):
        raise InputError(f"{flag} {out}: the file must end in .parquet")
    try:
        found = storage.info(out)
    except storage.StorageError as e:
        raise InputError(str(e)) from None
    import pyarrow.fs as pafs
    if found.type == pafs.FileType.Directory:
        raise InputError(f"{flag} {out}: is a directory, not a file")
    if found.type != pafs.FileType.NotFound and not overwrite:
        raise InputError(f"{flag} {out}: exists; pass --overwrite to replace it")


def _sibling(out: str, kind: str) -> str:
    """A hidden name beside ``out`` (``.NAME.<kind>-<random>``)."""
    return storage.join(storage.parent(out), f".{storage.name(out)}.{kind}-{os.urandom(4).hex()}")


def publish_parquet(out: str, schema: pa.Schema, tables: Iterable[pa.Table]) -> int:
    """Stream ``tables`` into one Parquet file at ``out`` (a local path or a URI) under a temporary
    name beside it, then move it into place: a failure (or Ctrl-C) midway leaves the old ``out``, or
    nothing, there. Returns the rows written."""
    out = storage.absolute(out)
    tmp = _sibling(out, "tmp")
    fs, path = storage.resolve(tmp)
    if not storage.is_uri(out):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    n = 0
    try:
        with pq.ParquetWriter(path, schema, filesystem=fs) as w:
            for t in tables:
                w.write_table(t.select(schema.names).cast(schema), row_group_size=OUTPUT_ROW_GROUP)
                n += t.num_rows
        _, final = storage.resolve(out)
        if storage.is_uri(out):         # no rename on object storage: a server-side copy appears whole
            fs.copy_file(path, final)
        else:
            os.replace(path, final)
    except OSError as e:
        raise storage.StorageError(f"{out}: cannot write ({e})") from None
    finally:
        storage.delete_file(tmp)
    return n


# --- the input, planned on the driver --------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """The input as row groups: ``units`` [{path, row_group, first, take}], ``rows`` in all."""
    units: list[dict]
    rows: int
    columns: list[str]          # read from each row group
    has_id: bool
    has_y: bool


def input_files(loc: str, split: str) -> list[str]:
    """A dataset directory's split shards, or one Parquet file (local paths or URIs)."""
    from pipelines.data.layout import METADATA_FILE, DatasetError, read_metadata, shard_paths
    try:
        if storage.is_dir(loc):
            if not storage.is_file(storage.join(loc, METADATA_FILE)):
                raise InputError(f"{loc}: not a dataset directory (no {METADATA_FILE}); --workers reads a Parquet "
                                 "file or a dataset (an image folder: predict without --workers)")
            return shard_paths(loc, read_metadata(loc), split)
        if storage.is_file(loc):
            return [loc]
    except (storage.StorageError, DatasetError) as e:
        raise InputError(str(e)) from None
    raise InputError(f"{loc}: no such file or directory")


def plan(p: serving.Predictor, files: list[str], want_y: bool, limit: int = 0) -> Plan:
    """Footers only: every file's row groups, checked to hold the model's input column."""
    from pipelines.data.layout import open_parquet
    col = p.input_column
    units, first, has_id, has_y = [], 0, True, True
    for f in files:
        try:
            with open_parquet(f) as pf:
                names, md = pf.schema_arrow.names, pf.metadata
        except Exception as e:      # pyarrow raises several types for what is not Parquet
            raise InputError(f"{f}: not a readable Parquet file: {str(e).splitlines()[0] if str(e) else e}") from None
        if col not in names:
            raise InputError(f"{f}: no column {col!r} (columns: {names}); the model takes "
                             f"{'encoded images' if p.is_image else 'vector inputs x'}")
        has_id, has_y = has_id and "id" in names, has_y and "y" in names
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            take = n if not limit else min(n, limit - first)
            if take > 0:
                units.append({"path": f, "row_group": g, "first": first, "take": take})
            first += take
    if want_y and not has_y:
        raise InputError(f"--log-density: the input has no y column ({files[0]})")
    columns = [col] + (["id"] if has_id else []) + (["y"] if want_y else [])
    return Plan(units, first, columns, has_id, want_y)


def read_units(units: pa.Table, columns: list[str], has_id: bool) -> pa.Table:
    """map_batches body: row groups -> their rows with ``row`` (index in the input) and ``id``."""
    from pipelines.data.layout import open_parquet
    parts = []
    for u in units.to_pylist():
        with open_parquet(u["path"]) as pf:
            t = pf.read_row_group(u["row_group"], columns=columns).slice(0, u["take"])
        rows = np.arange(u["first"], u["first"] + t.num_rows, dtype=np.int64)
        ids = t.column("id").cast(pa.string()) if has_id else pa.array([f"row {i}" for i in rows], pa.string())
        cols = {ROW: pa.array(rows), "id": ids, **{c: t.column(c) for c in columns if c != "id"}}
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)


# --- the actors ------------------------------------------------------------------------------------

def predictor_state(p: serving.Predictor) -> dict:
    """What an actor rebuilds the model from (:func:`serving.from_state`): weights, config, task."""
    return {"model": {k: v.detach().cpu() for k, v in p.model.state_dict().items()}, "config": p.cfg.to_dict(),
            "task": p.task.to_dict(), "epoch": 0}


class BatchPredictor:
    """Ray Data's callable class: the model is built once per actor; each call predicts a batch of
    rows (a pyarrow table from :func:`read_units`) by :func:`serving.predict_rows` with their indices."""

    def __init__(self, state: Any, params: dict, limits: dict, log_density: bool, use_gpu: bool, threads: int):
        import torch
        torch.set_num_threads(max(1, int(threads)))
        if isinstance(state, list):     # [ObjectRef]: the weights from the object store (the args stay small)
            import ray
            state = ray.get(state[0])
        self.p = serving.from_state(state)
        if use_gpu:
            self.p.model.to("cuda")
        self.params, self.limits, self.log_density = params, serving.Limits(**limits), log_density
        prm = serving.Params(**params)
        self.schema = output_schema(self.p, prm, log_density).append(pa.field(ROW, pa.int64()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        p = self.p
        ids = batch.column("id").to_pylist()
        rows = batch.column(ROW).to_pylist()
        x = serving.inputs_tensor(p, batch.column(p.input_column).to_pylist(), ids)
        y = batch.column("y").to_pylist() if self.log_density else None
        out = serving.predict_rows(p, x, y, **self.params, limits=self.limits, ids=ids, rows=rows)
        return output_table(ids, {**out, ROW: rows}, self.schema)


# --- the Ray Data job ------------------------------------------------------------------------------

def predict_on_ray(p: serving.Predictor, src: str, out: str, *, split: str, prm: serving.Params,
                   limits: serving.Limits, log_density: bool, limit: int = 0, workers: int = 2,
                   use_gpu: bool = False, cpus_per_worker: float = 1.0, batch_size: int = 256,
                   address: str | None = None) -> tuple[int, np.ndarray]:
    """Predict every row of ``src`` (a dataset split or a Parquet file) on ``workers`` Ray Data actors
    and publish one Parquet file at ``out`` (see the module docstring). Returns the rows written and
    their ``ess`` column (float32, 4 bytes a row, read as the rows are published: what
    :func:`serving.few_samples` needs, as on the single-process path). A local Ray is started (and shut
    down) unless one is running or ``address`` names a cluster."""
    files = input_files(src, split)
    pl = plan(p, files, log_density, limit)
    if not pl.units:
        raise InputError(f"{src}: no rows to predict")
    import ray

    from pipelines.driver.train_job import ray_init
    started = ray_init(address)
    staging = _sibling(storage.absolute(out), "parts")
    try:
        _check_resources(ray.cluster_resources(), workers, cpus_per_worker, use_gpu)
        fs, path = storage.resolve(staging)
        failure = _write(_pipeline(p, pl, prm, limits, log_density, workers, use_gpu, cpus_per_worker, batch_size),
                         path, fs)
        if failure is not None:
            raise failure
        schema = output_schema(p, prm, log_density)
        ess: list[np.ndarray] = []

        def tap(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
            for t in tables:
                ess.append(t.column("ess").to_numpy().astype(np.float32))
                yield t
        n = publish_parquet(out, schema, tap(_in_row_order(staging, pl.rows)))
    finally:
        storage.delete_dir(staging)
        if started:
            ray.shutdown()
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)      # set by ray_init for the Ray it started
    return n, (np.concatenate(ess) if ess else np.empty(0, np.float32))


def _write(ds, path: str, fs) -> BaseException | None:
    """Run the pipeline into ``path``; the user's error if it failed (see :func:`_cause`). Ray Data
    releases a run's actors by reference counting: the dataset and a failure's frames are dropped and
    collected here, so that a Ray that stays up gets their CPUs back sooner."""
    failure = None
    try:
        with _remote_args_allowed():
            ds.write_parquet(path, filesystem=fs, ray_remote_args={"num_cpus": 0})
    except Exception as e:
        failure = _cause(e)
        if failure is e:
            return e
    del ds
    gc.collect()
    return failure


def _check_resources(have: dict, workers: int, cpus: float, use_gpu: bool) -> None:
    """A fixed pool of actors the cluster cannot hold would wait, not fail: say so before starting."""
    need = {"CPU": workers * cpus, **({"GPU": float(workers)} if use_gpu else {})}
    for res, n in need.items():
        if have.get(res, 0.0) < n:
            raise InputError(f"--workers {workers} needs {n:g} {res}s ({'one GPU' if res == 'GPU' else f'{cpus:g} CPUs'}"
                             f" per actor), the Ray cluster has {have.get(res, 0.0):g}: lower --workers"
                             + (" or --cpus-per-worker" if res == "CPU" else ", or drop --use-gpu"))


def _pipeline(p, pl: Plan, prm, limits, log_density, workers, use_gpu, cpus_per_worker, batch_size):
    import ray
    import ray.data

    _quiet_ray_data()
    units = ray.data.from_items(pl.units, override_num_blocks=max(1, min(len(pl.units), 4 * workers)))
    # reading and writing are light next to the model: they hold no CPU, the actors hold them all
    rows = units.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=0,
                             compute=ray.data.TaskPoolStrategy(size=max(2, workers)),
                             fn_kwargs={"columns": pl.columns, "has_id": pl.has_id})
    with _remote_args_allowed():
        return rows.map_batches(
            BatchPredictor, batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
            num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs={"state": [ray.put(predictor_state(p))], "params": prm.as_kwargs(),
                                   "limits": dataclasses.asdict(limits), "log_density": log_density,
                                   "use_gpu": use_gpu, "threads": max(1, int(cpus_per_worker))},
            # no restarts: an actor that dies (out of memory, a lost node) fails the job, whose output is all
            # or nothing; restartable actors would each print Ray's warning about their arguments (ray#53727)
            max_restarts=0, udf_modifying_row_count=False)


@contextlib.contextmanager
def _remote_args_allowed():
    """Ray 2.60 deprecates passing remote args by keyword (``max_restarts``, a write's ``num_cpus``)
    but has no named parameter for them yet: its warning is not the user's concern."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        yield


def _quiet_ray_data() -> None:
    """Ray Data on the console as the rest of the project: its one progress bar on a terminal (none
    with -q or in a log), its INFO lines (execution started / finished, sink written) only at
    $EBM_LOG_LEVEL (-v); they stay in the session's ray-data.log."""
    import logging

    import ray.data
    from ray.util.debug import log_once

    from pipelines import progress
    from pipelines.driver.train_job import log_level
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True         # the parts come out in row order
    ctx.enable_progress_bars = progress.enabled()
    ctx.enable_operator_progress_bars = False           # one bar for the job, not one per operator
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True             # an actor's InputError reaches the driver as itself
    if not ctx.enable_progress_bars:
        log_once("ray_data_progress_manager_disabled")   # its "Progress bars disabled" warning: we chose so
    for h in logging.getLogger("ray.data").handlers:
        if h.name == "console":
            h.setLevel(log_level())
            if not any(isinstance(f, _NoErrors) for f in h.filters):
                h.addFilter(_NoErrors())


class _NoErrors:
    """Ray Data's ERROR records are about the failure the command reports itself, in one line (they
    stay in ray-data.log); at -vv they show."""

    def filter(self, record) -> bool:
        from pipelines.driver.train_job import log_level
        return record.levelno < 40 or log_level() == "DEBUG"


def _in_row_order(staging: str, total: int) -> Iterator[pa.Table]:
    """The staged parts' rows in input order. Each part holds a run of consecutive rows (Ray Data
    kept the order); they are checked to tile 0..total-1 exactly."""
    import pyarrow.fs as pafs
    from pipelines.data.layout import open_parquet
    parts = []
    for i in storage.list_dir(staging, recursive=True):
        if i.type == pafs.FileType.File and i.path.endswith(".parquet"):
            loc = storage.uri_of(staging, i.path)
            with open_parquet(loc) as pf:
                r = pf.read(columns=[ROW]).column(ROW).to_numpy()
            if len(r):
                if not (np.diff(r) == 1).all():
                    raise RuntimeError(f"{loc}: the rows of a part are not consecutive (Ray Data's order was lost)")
                parts.append((int(r[0]), int(r[-1]), loc))
    parts.sort()
    expect = 0
    for lo, hi, _ in parts:
        if lo != expect:
            raise RuntimeError(f"the predictions hold rows up to {expect - 1}, then {lo}: rows are "
                               f"{'missing' if lo > expect else 'repeated'}")
        expect = hi + 1
    if expect != total:
        raise RuntimeError(f"the predictions hold {expect} rows, the input {total}")
    for _, _, loc in parts:
        with open_parquet(loc) as pf:
            for b in pf.iter_batches(batch_size=OUTPUT_ROW_GROUP):
                yield pa.Table.from_batches([b])


def _cause(e: BaseException) -> BaseException:
    """The user's error behind Ray's wrapping (an InputError or DatasetError raised in an actor or a
    task reaches the driver as RayTaskError(InputError), whose ``cause`` is the original), else ``e``."""
    from pipelines.data.layout import DatasetError
    seen = e
    while seen is not None:
        for err in (getattr(seen, "cause", None), seen):
            if isinstance(err, (InputError, DatasetError)) and not hasattr(err, "cause"):
                return InputError(str(err).strip().splitlines()[0])     # without what Ray appends
        seen = getattr(seen, "cause", None) or seen.__cause__ or seen.__context__
    return e
