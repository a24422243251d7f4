"""The Python API, for notebooks: train a model, load one, predict with it, look at its density.

A facade over the same code as the ``ebm`` commands (training: :mod:`pipelines.driver`; prediction:
:mod:`pipelines.serve.serving`), so a model gives the same numbers here, from ``ebm predict``, from
the registered pyfunc and over HTTP, for the same inputs and seed. Runnable examples:
``docs/python_api.md``.

``train(config, *, overrides=None, data_dir=None, name=None, local=True, num_workers=2, storage=None,
tracking_uri=None, seed=None) -> Model``
    Train one run and return its model, rebuilt from the run's final checkpoint. ``config``: a TOML
    file, a packaged config name (``"debug"``, ``"star"``, ...) or an ``ebm.config.Config``;
    ``overrides``: ``{"optim.epochs": 2}`` or ``["optim.epochs=2"]`` (as ``--set``). ``local``: the
    loop in this process (``ebm train --local``); ``False``: Ray Train with ``num_workers`` DDP ranks
    (a local Ray is started if none is running). Checkpoints go to ``storage/NAME`` (default
    ``$EBM_STORAGE_PATH`` or ``./runs``), the MLflow run to ``tracking_uri`` (default
    ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``).
``load(source=None, *, run=None, storage=None, tracking_uri=None) -> Model``
    ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID[/PATH]`` (only the weights file
    is downloaded, and read with ``weights_only=True``: no pickled code runs), a checkpoint directory,
    a ``checkpoint.pt`` or ``model.pt`` file, a run's directory under the storage (each a local path
    or a URI such as ``s3://…``), or ``load(run="NAME", storage=...)``: the run's latest checkpoint.
``register(model, name, *, alias="champion", tracking_uri=None) -> str``
    Register a trained model's run in the MLflow registry (``ebm register --run``); returns its URI.
``Model``
    ``.task`` (``ebm.tasks.TaskSpec``), ``.config`` (``ebm.config.Config``), ``.run_name``,
    ``.run_id``, ``.metrics`` (the run's ``test_*`` metrics), ``.source``, ``.predictor``.
    ``.predict(inputs, *, M=None, quantiles=None, interval_level=None, refine_steps=None, seed=0,
    return_samples=False, y=None) -> pandas.DataFrame``: one row per input (mode, mean, std, one column
    per quantile, interval_lo/hi, ess; ``log_p`` with ``y``; ``samples``/``weights`` on request;
    columns as in :mod:`pipelines.serve.serving`). ``None`` means the model's config (``sampler.M_eval``,
    ``eval.interval_level``, ``sampler.refine_steps``); quantiles default to 0.05, 0.25, 0.5, 0.75, 0.95.
    ``.density(x_one, grid=None, *, dim=0, proposal=False) -> (y, density)``: p(y|x) normalised on
    the task's grid by quadrature, as the test grid NLL is (a model without an energy head, or
    ``proposal=True``: the proposal's exact q(y|x)); for D > 1 the marginal of target dim ``dim``.
    ``.plot(x_one, y_true=None, ax=None, *, dim=0) -> matplotlib.figure.Figure``: EBM and proposal
    densities (and the true one where the task knows it from x), the label, the input image.

Inputs (``predict``; ``density`` and ``plot`` take one of them): a vector model takes a numpy array
or tensor (N, d) (or (N,) when d = 1), or a list of numbers / lists; an image model uint8 arrays or
tensors (N, C, H, W), (N, H, W, C) or, grey, (N, H, W), or a list of encoded PNG/JPEG bytes, PIL
images or image file paths; both a DataFrame with the pyfunc's columns (``x`` or ``image``, optional
``y``), or one path to an image folder, a Parquet file or a dataset directory (as ``ebm predict
--input``; the index is then the ids). Images are taken exactly as they are: no resizing, no
conversion of the channel count. Errors: ``ebm.config.ConfigError`` (a bad config or override),
``serving.InputError`` (a bad input or parameter; names the row), :class:`SourceError` (nothing to
load there), ``ebm.loop.TrainingFailed`` (the run failed); all but the last are ValueErrors.
"""
from __future__ import annotations

import io
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ebm.config import Config, ConfigError
from ebm.metrics import marginal_density
from pipelines.serve import serving
from pipelines.serve.serving import InputError

__all__ = ["train", "load", "register", "Model", "SourceError", "InputError", "ConfigError"]


class SourceError(ValueError):
    """``load`` was given something that is not a model of this project; the message names it."""


@dataclass
class Model:
    """A trained model (wraps :class:`pipelines.serve.serving.Predictor`) and where it came from."""
    predictor: serving.Predictor
    source: str = ""
    run_name: str | None = None
    run_id: str | None = None
    metrics: dict = field(default_factory=dict)
    tracking_uri: str | None = None

    @property
    def task(self):
        return self.predictor.task

    @property
    def config(self) -> Config:
        return self.predictor.cfg

    def __repr__(self) -> str:
        t = self.task
        shape = "x".join(map(str, t.x_shape))
        return (f"Model(task={t.name!r}, inputs={'image ' if t.is_image else 'x '}{shape}, targets="
                f"{list(t.target_names)}, method={self.config.method.name!r}, run_name={self.run_name!r}, "
                f"source={self.source!r})")

    def predict(self, inputs: Any, *, M: int | None = None, quantiles=None, interval_level: float | None = None,
                refine_steps: int | None = None, seed: int = 0, return_samples: bool = False, y=None):
        """Predictive summaries per input as a DataFrame (see the module docstring for inputs and
        columns). ``y`` (a value per input, or None per input): adds ``log_p`` = log p(y|x).
        Deterministic given ``seed``: :func:`serving.predict_rows`, as ``ebm predict`` and the pyfunc."""
        import pandas as pd
        p = self.predictor
        prm = serving.check_params(p, M=M, quantiles=quantiles, interval_level=interval_level,
                                   refine_steps=refine_steps, return_samples=return_samples, seed=seed)
        x, index, y_in = _batch(p, inputs)
        if y is not None and y_in is not None:
            raise InputError("y is given twice: as the argument and as the input's y column")
        y = y_in if y is None else y
        if y is not None:
            y = list(np.asarray(y)) if isinstance(y, (np.ndarray, torch.Tensor)) else list(y)
        out = serving.predict_rows(p, x, y, **prm.as_kwargs())
        frame = pd.DataFrame(out, index=pd.Index(index, name="id") if index is not None else None)
        if "log_p" in out and any(v is None for v in out["log_p"]):
            frame["log_p"] = pd.Series(out["log_p"], dtype=object, index=frame.index)  # as the pyfunc
        return frame

    def density(self, x_one: Any, grid=None, *, dim: int = 0, proposal: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(y, p(y|x)) for one input, float64 arrays. ``grid``: the y values (default: the task's grid
        of dim ``dim``). The EBM's density is exp(f(x, y)) / Ẑ with Ẑ the quadrature of exp f over the
        task's whole grid (docs/method.md §6, grid NLL), so on the task grid it is softmax(f) / Δ; for
        D > 1 the other dims are summed out over their task grids. ``proposal`` (and a model without
        an energy head, e.g. an MDN): the proposal's q(y|x), exact for D = 1."""
        p, task = self.predictor, self.task
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 <= dim < task.D:
            raise InputError(f"dim must be a target dim from 0 to {task.D - 1} ({', '.join(task.target_names)}), "
                             f"got {dim!r}")
        if proposal and not p.model.has_proposal:
            raise InputError(f"proposal=True: this model ({self.config.method.name}) has no learned proposal")
        y_grid = _grid(grid, task, dim)
        return y_grid.astype(np.float64), marginal_density(p.model, p.task, _one(p, x_one), None if grid is None else y_grid, dim,
                                                    p.model.has_energy and not proposal)

    def plot(self, x_one: Any, y_true: float | None = None, ax=None, *, dim: int = 0):
        """The densities of one input on the task's grid (a panel of the training plots,
        :func:`pipelines.plots.density_figure`); draws into ``ax`` if given; returns the Figure."""
        plots = _plots()
        import matplotlib.pyplot as plt
        p, task = self.predictor, self.task
        x = _one(p, x_one)
        curves = {}
        if p.model.has_energy:
            y, curves["EBM"] = self.density(x_one, dim=dim)
        if p.model.has_proposal:
            y, curves["proposal q"] = self.density(x_one, dim=dim, proposal=True)
        if task.D == 1:
            grid = torch.as_tensor(task.grid()[0], dtype=torch.float32)
            lp = plots.true_log_density(task, x, {}, grid)       # known from x alone: toy 1
            if lp is not None:
                curves["true"] = (torch.softmax(lp, dim=1)[0] / task.cell_volume()).double().numpy()
        own = ax is None
        if own:
            _, ax = plt.subplots(figsize=(4.6, 3.4))
        for (label, dens), style in zip(curves.items(), ("-", "--", ":")):
            ax.plot(y, dens, style, label=label)
        if y_true is not None:
            ax.axvline(float(y_true), color="k", lw=0.8, label="label")
        if p.is_image:     # the input in the top-right corner, above the curves
            top = max(float(np.max(d)) for d in curves.values())
            ax.set_ylim(0, top / 0.6)
            inset = ax.inset_axes((0.78, 0.62, 0.2, 0.35))
            inset.imshow(plots._display_image(x[0], task), cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
            inset.set_axis_off()
        name, unit = task.target_names[dim], task.units[dim]
        ax.set_xlabel(f"{name} ({unit})" if unit else name)
        ax.set_ylabel(f"p({name} | x)" + (" (marginal)" if task.D > 1 else ""))
        ax.set_title(f"{task.name}" + (f" — {self.run_name}" if self.run_name else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        if own:
            ax.figure.tight_layout()
        return ax.figure


# --- training --------------------------------------------------------------------------------------

def train(config: Any, *, overrides: dict | list[str] | None = None, data_dir: str | os.PathLike | None = None,
          name: str | None = None, local: bool = True, num_workers: int = 2, storage: str | None = None,
          tracking_uri: str | None = None, seed: int | None = None) -> Model:
    """Train one run (see the module docstring) and return its model; ``model.metrics`` holds its
    test metrics. ``data_dir``: a Parquet dataset (``task.data_dir``); ``seed``: the run's seed.
    Raises ConfigError before anything runs, TrainingFailed if the run failed (marked FAILED in
    MLflow with the reason)."""
    from pipelines import tracking
    from pipelines.driver import runs
    cfg = _config(config, overrides, data_dir, seed)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ConfigError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if local and num_workers != 2:
        raise ConfigError("num_workers applies to Ray Train runs (local=False) only")
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"name must be a non-empty string, got {name!r}")
    root = runs.storage_root(storage)
    uri = tracking.resolve_uri(tracking_uri)
    _plots()        # imported here so that the epochs' plots do not switch a notebook's matplotlib backend
    if local:
        from pipelines.driver.local import train_local
        given = (("data_dir", data_dir), ("name", name), ("seed", seed))    # the run's ebm.command tag
        shown = "<ebm.config.Config>" if isinstance(config, Config) else repr(str(config))   # its params are logged
        command = f"pipelines.api.train({shown}, overrides={overrides!r}" + \
            "".join(f", {k}={v!r}" for k, v in given if v is not None) + ")"
        (res,) = train_local(cfg, name=name or "", storage=root, tracking_uri=uri, command=command)
        name, run_id = res["run_name"], res["mlflow_run_id"]
    else:
        from pipelines.driver.runs import default_stamp
        from pipelines.driver.train_job import run_job
        name = name or f"{cfg.task.name}-{cfg.method.name}-{default_stamp()}"
        res = run_job(cfg, name=name, num_workers=num_workers, storage_path=root, tracking_uri=uri)
        run_id = res.get("mlflow_run_id")
    found = runs.latest_checkpoint(root, name)
    if found is None:
        raise SourceError(f"run {name!r} finished but no checkpoint of it loads under {root}")
    d, state = found
    return Model(serving.from_state(state), source=d, run_name=name, run_id=run_id, tracking_uri=uri,
                 metrics={k: v for k, v in res.items() if k.startswith("test_")})


def _config(config: Any, overrides, data_dir, seed) -> Config:
    from ebm.config import _toml_value
    from pipelines.configs import resolve_config
    if overrides is None:
        sets = []
    elif isinstance(overrides, dict):
        bad = [k for k in overrides if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"overrides keys must be 'section.key' strings, got {bad!r}")
        sets = [f"{k}={_toml_value(str(v) if isinstance(v, os.PathLike) else v)}" for k, v in overrides.items()]
    elif isinstance(overrides, (list, tuple)) and all(isinstance(s, str) for s in overrides):
        sets = list(overrides)
    else:
        raise ConfigError(f"overrides must be a dict {{'section.key': value}} or a list of 'section.key=value' "
                          f"strings, got {overrides!r}")
    if data_dir is not None:
        sets.append(f"task.data_dir={_toml_value(str(data_dir))}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        sets.append(f"seed={seed}")
    if isinstance(config, Config):
        return config.with_overrides(sets)
    if isinstance(config, (str, os.PathLike)):
        return Config.from_toml(resolve_config(str(config)), sets)
    raise ConfigError(f"config must be a TOML file, a packaged config name or an ebm.config.Config, got "
                      f"{type(config).__name__}")


def register(model: Model | str, name: str, *, alias: str | None = "champion", tracking_uri: str | None = None) -> str:
    """Register the run behind ``model`` (a Model from :func:`train`, or a run id) as ``name`` in the
    MLflow registry, as ``ebm register --run`` does (a new version, ``alias`` pointed at it); returns
    the model URI (``models:/NAME@ALIAS``). The store: ``tracking_uri``, else the model's own."""
    from pipelines import tracking
    from pipelines.serve import registry
    run_id = model.run_id if isinstance(model, Model) else model
    if not isinstance(run_id, str) or not run_id:
        raise SourceError(f"cannot register {model!r}: it has no MLflow run (train it with tracking, or load it "
                          "from runs:/ or models:/)")
    uri = tracking.resolve_uri(tracking_uri or (model.tracking_uri if isinstance(model, Model) else None))
    return registry.register(uri, name, run_id=run_id, alias=alias)["model_uri"]


# --- loading ---------------------------------------------------------------------------------------

def load(source: str | os.PathLike | None = None, *, run: str | None = None, storage: str | None = None,
         tracking_uri: str | None = None) -> Model:
    """The model at ``source`` (see the module docstring), or the latest checkpoint of the run named
    ``run`` under ``storage``; ``tracking_uri``: the MLflow store of a ``models:/`` or ``runs:/`` source
    (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlruns.db``). :class:`SourceError` names what is
    not there or not a model."""
    from pipelines import storage as fs
    from pipelines.driver import runs
    if (source is None) == (run is None):
        raise SourceError("give a source (a model URI or a path) or run=NAME, one of the two")
    if run is not None:
        root = runs.storage_root(storage)
        found = runs.latest_checkpoint(root, run)
        if found is None:
            raise SourceError(f"run {run!r}: no checkpoint of a run of that name under {root}")
        d, state = found
        return Model(serving.from_state(state), source=d, run_name=run, metrics=_test_metrics(state))
    if storage is not None:
        raise SourceError("storage goes with run=NAME (a source names its own location)")
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise SourceError(f"cannot load a model from {type(source).__name__} {source!r}: give a models:/ or runs:/ "
                          "URI, a checkpoint or model file or directory, or run=NAME")
    src = str(source)
    if src.startswith(("models:/", "runs:/")):
        return _load_mlflow(src, tracking_uri)
    try:
        return _load_location(fs.absolute(src) if not fs.is_uri(src) else src, src)
    except fs.StorageError as e:
        raise SourceError(f"{src}: {e}") from None


def _load_location(loc: str, src: str) -> Model:
    from ebm import checkpoint
    from pipelines import storage as fs
    from pipelines.driver import runs
    if fs.is_dir(loc):
        if fs.is_file(fs.join(loc, checkpoint.CKPT_FILE)):
            loc = fs.join(loc, checkpoint.CKPT_FILE)
        elif fs.is_file(fs.join(loc, "MLmodel")):      # a pyfunc directory (e.g. `mlflow artifacts download`)
            with tempfile.TemporaryDirectory() as d:
                Path(d, "MLmodel").write_bytes(fs.read_bytes(fs.join(loc, "MLmodel")))
                return _model_file(fs.join(loc, _pyfunc_weights(Path(d, "MLmodel"), src)), src)
        elif runs.checkpoint_dirs(fs.parent(loc), fs.name(loc)):     # a run's directory under the storage
            found = runs.latest_checkpoint(fs.parent(loc), fs.name(loc))
            if found is None:
                raise SourceError(f"{src}: a run directory, but none of its checkpoints loads")
            return Model(serving.from_state(found[1]), source=found[0], run_name=fs.name(loc),
                         metrics=_test_metrics(found[1]))
        else:
            raise SourceError(f"{src}: a directory, but not a checkpoint (no {checkpoint.CKPT_FILE}), a run's "
                              "directory (no checkpoint_* in it) or an MLflow model (no MLmodel)")
    elif not fs.is_file(loc):
        raise SourceError(f"{src}: no such file or directory")
    if fs.name(loc) != checkpoint.CKPT_FILE:
        return _model_file(loc, src)
    try:
        state = checkpoint.loads(io.BytesIO(fs.read_bytes(loc)), where=src)
    except checkpoint.CheckpointError as e:
        raise SourceError(str(e)) from None
    parent = fs.name(fs.parent(loc))
    run_name = fs.name(fs.parent(fs.parent(loc))) if parent.startswith("checkpoint_") else None
    return Model(serving.from_state(state), source=src, run_name=run_name, metrics=_test_metrics(state))


def _model_file(loc: str, src: str) -> Model:
    """A (slim or full) weights file by :func:`serving.load_file` (``weights_only=True``)."""
    from pipelines import storage as fs
    try:
        if fs.is_uri(loc):
            with tempfile.TemporaryDirectory() as d:
                local = Path(d) / serving.MODEL_FILE
                local.write_bytes(fs.read_bytes(loc))
                p = serving.load_file(local)
        else:
            p = serving.load_file(loc)
    except InputError as e:
        raise SourceError(f"{src}: {str(e).split(': ', 1)[-1]}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{src}: not a model file of this project ({type(e).__name__}: {e})") from None
    return Model(p, source=src)


def _pyfunc_weights(mlmodel: Path, src: str) -> str:
    """The weights' path inside a pyfunc model directory, from its MLmodel file."""
    from mlflow.models import Model as MLmodel
    try:
        return MLmodel.load(str(mlmodel)).flavors["python_function"]["artifacts"]["model"]["path"]
    except (KeyError, TypeError) as e:
        raise SourceError(f"{src}: an MLflow model, but not one of this project (no {e} in its MLmodel)") from None


def _load_mlflow(src: str, tracking_uri: str | None) -> Model:
    """Resolve a ``models:/`` or ``runs:/`` URI with a client of the given store (MLflow's own URI
    resolution would use its process-wide registry URI), download only the weights file."""
    import mlflow
    import mlflow.exceptions
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from pipelines import tracking
    uri = tracking.resolve_uri(tracking_uri)
    try:
        tracking.check_reachable(uri, write=False)       # reading never creates a store
    except tracking.TrackingError as e:
        raise SourceError(f"cannot load {src!r}: {e}") from None
    client = tracking.open_client(uri)
    try:
        if src.startswith("models:/"):
            parts = get_model_name_and_version(client, src)
            if len(parts) == 1:                           # models:/m-<id>, a logged model
                logged = client.get_logged_model(parts[0])
                loc, run_id = logged.artifact_location, logged.source_run_id
            else:
                loc = client.get_model_version_download_uri(*parts)
                run_id = client.get_model_version(*parts).run_id
        else:
            run_id, path = RunsArtifactRepository.parse_runs_uri(src)
            loc, run_id = _run_location(client, run_id, path or "model"), run_id
        with tempfile.TemporaryDirectory() as d:
            try:
                mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{loc}/MLmodel", dst_path=d,
                                                              tracking_uri=uri)
            except (mlflow.exceptions.MlflowException, OSError):
                return _run_checkpoint(src, loc, uri, run_id, client, d)
            weights = mlflow.artifacts.download_artifacts(artifact_uri=f"{loc}/{_pyfunc_weights(Path(mlmodel), src)}",
                                                          dst_path=d, tracking_uri=uri)
            model = _model_file(weights, src)
    except mlflow.exceptions.MlflowException as e:
        raise SourceError(f"cannot load {src!r} from {uri}: {str(e).splitlines()[0]}") from None
    return _with_run(model, client, run_id, uri)


def _run_location(client, run_id: str, path: str) -> str:
    """``runs:/RUN_ID/PATH``: the model logged by the run under the name PATH's first part (MLflow 3
    keeps logged models apart from the run's artifacts), else the run's artifact PATH."""
    from pipelines import tracking
    name, _, rest = path.partition("/")
    run = client.get_run(run_id)
    try:
        found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                            filter_string=f"name = {tracking.filter_value(name)}")
    except tracking.TrackingError:
        found = []
    for m in found:
        if m.source_run_id == run_id:
            return m.artifact_location.rstrip("/") + (f"/{rest}" if rest else "")
    return f"{run.info.artifact_uri.rstrip('/')}/{path}"


def _run_checkpoint(src, loc, uri, run_id, client, d) -> Model:
    """A run's checkpoint artifact (``runs:/RUN_ID/checkpoint``)."""
    import mlflow
    import mlflow.exceptions
    from ebm import checkpoint
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{loc}/{checkpoint.CKPT_FILE}", dst_path=d,
                                                    tracking_uri=uri)
    except (mlflow.exceptions.MlflowException, OSError):
        raise SourceError(f"{src}: neither an MLflow model (no MLmodel) nor a checkpoint (no "
                          f"{checkpoint.CKPT_FILE}) in {uri}") from None
    try:
        state = checkpoint.load(local)
    except checkpoint.CheckpointError as e:
        raise SourceError(f"{src}: {e}") from None
    return _with_run(Model(serving.from_state(state), source=src), client, run_id, uri)


def _with_run(model: Model, client, run_id: str | None, uri: str) -> Model:
    """The MLflow run's name and test metrics on a model loaded from the store."""
    import mlflow.exceptions
    model.run_id, model.tracking_uri = run_id, uri
    if run_id:
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:      # the source run was deleted: the weights still load
            return model
        model.run_name = run.info.run_name
        model.metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    return model


def _test_metrics(state: dict) -> dict:
    return {k: v for k, v in (state.get("metrics") or {}).items() if k.startswith("test_")}


# --- inputs ----------------------------------------------------------------------------------------

def _batch(p: serving.Predictor, inputs: Any) -> tuple[torch.Tensor, list | None, list | None]:
    """(model input batch, index or None, y column or None) from any input form of the module docstring."""
    import pandas as pd
    if isinstance(inputs, pd.DataFrame):
        col = p.input_column
        if col not in inputs.columns:
            raise InputError(f"the DataFrame needs a column {col!r} (the pyfunc's input); got {list(inputs.columns)}")
        y = list(inputs["y"]) if "y" in inputs.columns else None
        return serving.inputs_tensor(p, list(inputs[col])), None, y
    if isinstance(inputs, (str, os.PathLike)):
        from pipelines.serve import model_eval
        if p.is_image and Path(str(inputs)).suffix.lower() in model_eval.IMAGE_SUFFIXES:
            return _images(p, [inputs]), None, None
        ids, values, _ = model_eval.read_inputs(str(inputs), p)       # a folder, Parquet file or dataset
        return serving.inputs_tensor(p, values, ids), ids, None
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.detach().cpu().numpy()
    if p.is_image:
        if isinstance(inputs, np.ndarray):
            return _image_array(p, inputs), None, None
        if isinstance(inputs, (list, tuple)):
            return _images(p, list(inputs)), None, None
    elif isinstance(inputs, (np.ndarray, list, tuple)):
        if isinstance(inputs, np.ndarray) and inputs.ndim > 2:
            raise InputError(f"x has shape {inputs.shape}: the model takes (N, {p.task.x_shape[0]}) vectors")
        return serving.inputs_tensor(p, list(inputs)), None, None
    what = ("uint8 arrays (N, C, H, W), or a list of image bytes, PIL images or file paths" if p.is_image
            else f"an array (N, {p.task.x_shape[0]}) or a list of x values")
    raise InputError(f"inputs of type {type(inputs).__name__}: the model takes {what}, a DataFrame or a path")


def _image_array(p: serving.Predictor, a: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W), (N, H, W, C) or grey (N, H, W) -> the normalised batch, by the same
    :func:`ebm.data.to_inputs` as decoded images (:func:`serving.inputs_tensor`)."""
    from ebm.data import to_inputs
    C, H, W = p.task.x_shape
    forms = f"(N, {C}, {H}, {W}) or (N, {H}, {W}, {C})" + (f" or (N, {H}, {W})" if C == 1 else "")
    if a.dtype != np.uint8:
        raise InputError(f"images as arrays must be uint8 (0-255; the model normalises them), got {a.dtype}")
    if a.ndim == 4 and a.shape[1:] == (C, H, W):
        pass
    elif a.ndim == 4 and a.shape[1:] == (H, W, C):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim == 3 and C == 1 and a.shape[1:] == (H, W):
        a = a[:, None]
    else:
        raise InputError(f"images of shape {a.shape}: the model takes {forms} uint8 arrays (a batch; one "
                         f"image as a batch of one: a[None])")
    return to_inputs(np.ascontiguousarray(a), p.task)


def _images(p: serving.Predictor, items: list) -> torch.Tensor:
    """A list of encoded bytes, PIL images, file paths (or uint8 arrays, one image each)."""
    if items and all(isinstance(v, (np.ndarray, torch.Tensor)) for v in items):
        return _image_array(p, np.stack([np.asarray(v) for v in items]))
    encoded, ids = [], []
    for i, v in enumerate(items):
        where = f"row {i}"
        if isinstance(v, (str, os.PathLike)):
            from pipelines import storage as fs
            where = f"row {i} ({v})"
            try:
                v = fs.read_bytes(str(v))
            except (FileNotFoundError, IsADirectoryError, fs.StorageError) as e:
                raise InputError(f"{where}: cannot read the image file ({e.strerror or e}"
                                 if isinstance(e, OSError) else f"{where}: {e}") from None
        elif _is_pil(v):
            buf = io.BytesIO()
            try:
                v.save(buf, format="PNG")       # lossless: decoded by the one decoder, as a file would be
            except (OSError, ValueError) as e:
                raise InputError(f"{where}: a PIL image of mode {v.mode} ({e}); 8-bit grey or RGB expected") from None
            v = buf.getvalue()
        elif not isinstance(v, (bytes, bytearray, memoryview)):
            raise InputError(f"{where}: an image must be encoded PNG/JPEG bytes, a PIL image or a file path (or "
                             f"the whole batch one uint8 array), got {type(v).__name__}")
        encoded.append(v)
        ids.append(where)
    return serving.inputs_tensor(p, encoded, ids)


def _is_pil(v: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(v, pil.Image)


def _one(p: serving.Predictor, x_one: Any) -> torch.Tensor:
    """One input (any single form of :meth:`Model.predict`) -> a batch of one."""
    if isinstance(x_one, torch.Tensor):
        x_one = x_one.detach().cpu().numpy()
    if isinstance(x_one, np.ndarray) and p.is_image:
        batch = x_one if x_one.ndim == 4 else x_one[None]
    elif p.is_image:
        batch = [x_one]
    else:
        a = np.asarray(x_one, dtype=object)
        batch = [x_one] if a.ndim <= 1 else x_one
    x, _, _ = _batch(p, batch)
    if x.shape[0] != 1:
        raise InputError(f"one input expected, got {x.shape[0]}")
    return x


# --- densities -------------------------------------------------------------------------------------

def _grid(grid: Any, task, dim: int) -> np.ndarray:
    if grid is None:
        return task.grid()[dim]
    g = np.asarray(grid, dtype=np.float64) if not isinstance(grid, torch.Tensor) else grid.double().numpy()
    if g.ndim != 1 or g.size == 0 or not np.isfinite(g).all():
        raise InputError(f"grid must be a non-empty 1-D array of finite y values of dim {dim}, got shape {g.shape}")
    return g


@torch.no_grad()
def _plots():
    """:mod:`pipelines.plots`, imported without letting its ``matplotlib.use("Agg")`` replace the
    backend a notebook chose (inline figures would stop showing)."""
    if "pipelines.plots" in sys.modules:
        return sys.modules["pipelines.plots"]
    import matplotlib
    before = matplotlib.rcParams._get_backend_or_none() if hasattr(matplotlib.rcParams, "_get_backend_or_none") \
        else None
    from pipelines import plots
    if before and before.lower() != "agg":
        try:
            matplotlib.use(before)
        except (ImportError, ValueError):
            pass
    return plots
