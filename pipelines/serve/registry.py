"""Trained models in the MLflow model registry, as pyfunc models that rebuild themselves.

``register`` takes a training run (or the best child run of a sweep), turns its final checkpoint
into a pyfunc model logged in that run — weights, config, task and input shape in ``model.pt``,
the config as ``config.toml``, the ``ebm`` and ``pipelines`` source as code paths, the pyfunc as a model from code
(:mod:`pipelines.serve.pyfunc_model`: nothing is pickled), a signature with
parameters and an input example — registers one new version, points an alias at it (aliases, not
the deprecated stages) and tags both the version and the source run with each other.

Load it anywhere with ``mlflow.pyfunc.load_model("models:/NAME@ALIAS")``; its ``predict`` is
:func:`pipelines.serve.serving.predict_rows` on a DataFrame (see that module for columns and params).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.exceptions
import numpy as np
import pandas as pd
import torch

from pipelines import tracking
from pipelines.serve import serving

BEST_RUN_TAG = "ebm.best_run_id"         # set by ``ebm tune`` on the sweep's parent run
REGISTERED_TAG = "ebm.registered_model"  # set on the source run: "NAME/VERSION"
MODEL_NAME = "model"                     # the logged model's name inside the run
MODEL_CODE = str(Path(__file__).with_name("pyfunc_model.py"))   # the pyfunc, as a model from code


class RegistryError(RuntimeError):
    pass


class BadInput(serving.InputError, mlflow.exceptions.MlflowException):
    """An InputError that ``mlflow models serve`` turns into HTTP 400 carrying its message (any other
    exception becomes a generic "unexpected error" there)."""

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
        mlflow.exceptions.MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


class EBMPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: DataFrame in (``image`` bytes or ``x``; optional ``y``), DataFrame out.

    Limits (:class:`pipelines.serve.serving.Limits`) are read from the ``EBM_SERVE_*`` environment
    variables when the model is loaded; a request over them is refused before any decoding or sampling.
    """

    def load_context(self, context):
        self.limits = serving.Limits.from_env()         # a malformed EBM_SERVE_* fails the load, naming it
        self.predictor = serving.load_file(context.artifacts["model"])
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))

    def predict(self, context, model_input, params=None):
        try:
            return self._predict(model_input, dict(params or {}))
        except serving.InputError as e:
            raise BadInput(str(e)) from None

    def _predict(self, model_input, params: dict):
        p = self.predictor
        lim = getattr(self, "limits", None) or serving.Limits.from_env()
        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        col = p.input_column
        if col not in df.columns:
            what = "encoded PNG/JPEG bytes" if p.is_image else f"x values ({p.task.x_shape[0]} per row)"
            raise serving.InputError(f"the input needs a column {col!r} of {what}; got columns {list(df.columns)}")
        # every bound is checked before any image is decoded or any sample drawn
        n = len(df)
        if n > lim.max_rows:
            raise serving.InputError(f"{n} rows in one request, over the serving limit of {lim.max_rows} "
                                     f"({serving.Limits.ENV['max_rows']}): send them in smaller requests")
        prm = serving.check_params(p, M=params.get("M"), quantiles=params.get("quantiles"),
                                   interval_level=params.get("interval_level"), refine_steps=params.get("refine_steps"),
                                   return_samples=params.get("return_samples", False), seed=params.get("seed", 0),
                                   limits=lim)
        y = list(df["y"]) if "y" in df.columns else None      # per row: a null y gives a null log_p
        passes = 2 if y is not None and not all(serving.is_missing(v) for v in y) else 1   # log_p: M more each
        if n * prm.M * passes > lim.max_samples:
            raise serving.InputError(f"{n} rows x M = {prm.M}{' x 2 (log_p)' if passes == 2 else ''} is "
                                     f"{n * prm.M * passes} proposal samples in one request, over the serving limit "
                                     f"of {lim.max_samples} ({serving.Limits.ENV['max_samples']}): lower M or send "
                                     f"fewer rows per request")
        x = serving.inputs_tensor(p, list(df[col]))
        out = serving.predict_rows(p, x, y, **prm.as_kwargs(), limits=lim)
        frame = pd.DataFrame(out)
        if "log_p" in out and any(v is None for v in out["log_p"]):
            frame["log_p"] = pd.Series(out["log_p"], dtype=object)   # None, so JSON carries null (not NaN)
        return frame


def input_example(p: serving.Predictor) -> pd.DataFrame:
    """Two rows the model accepts: mid-grey images of the right shape, or two x values."""
    if p.is_image:
        from pipelines.data.ingest import encode_png
        C, H, W = p.task.x_shape
        img = np.full((C, H, W), 128, dtype=np.uint8)
        return pd.DataFrame({"image": [encode_png(img), encode_png(img)]})
    d = p.task.x_shape[0]
    return pd.DataFrame({"x": [-1.0, 0.5] if d == 1 else [[-1.0] * d, [0.5] * d]})


def signature(p: serving.Predictor, example: pd.DataFrame):
    from mlflow.models.signature import ModelSignature, infer_signature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array
    num = "double" if p.task.D == 1 else Array("double")
    xcol = ColSpec("binary", "image") if p.is_image else ColSpec("double" if p.task.x_shape[0] == 1 else Array("double"), "x")
    inputs = Schema([xcol, ColSpec(num, "y", required=False)])
    c = p.cfg
    params = ParamSchema([
        ParamSpec("M", "long", int(c.sampler.M_eval)),
        ParamSpec("quantiles", "double", list(serving.DEFAULT_LEVELS), shape=(-1,)),
        ParamSpec("interval_level", "double", float(c.eval.interval_level)),
        ParamSpec("refine_steps", "long", int(c.sampler.refine_steps)),
        ParamSpec("return_samples", "boolean", False),
        ParamSpec("seed", "long", 0)])
    out = pd.DataFrame(serving.predict_rows(p, serving.inputs_tensor(p, list(example[p.input_column])), M=16))
    return ModelSignature(inputs=inputs, outputs=infer_signature(example, out).outputs, params=params)


def _code_copy(dst: Path) -> list[str]:
    """The ``ebm`` and ``pipelines`` packages (sources only) as code paths of the model."""
    import ebm
    import pipelines
    out = []
    for pkg in (ebm, pipelines):
        src = Path(pkg.__file__).parent
        target = dst / src.name
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(target))
    return out


def _requirements(image: bool = True) -> list[str]:
    """The registered model's pip requirements, each resolvable from the public package index: the
    installed version's public part, so a local label is dropped (``torch 2.13.0+cpu`` ->
    ``torch==2.13.0``, which PEP 440 lets the CPU build from the PyTorch index and PyPI's CUDA build
    both satisfy, so a GPU host gets a GPU torch); a pre- or dev release (not on the public index) as a
    lower bound. Pillow only for image models (vector models never decode an image)."""
    from importlib import metadata

    from packaging.version import InvalidVersion, Version
    reqs = []
    for pkg in ("torch", "numpy", "pandas", "pillow", "mlflow"):
        if pkg == "pillow" and not image:
            continue
        try:
            v = Version(metadata.version(pkg))
        except metadata.PackageNotFoundError:
            continue
        except InvalidVersion:          # not PEP 440: leave the pin to the environment
            reqs.append(pkg)
            continue
        reqs.append(f"{pkg}>={v.public}" if v.is_prerelease or v.is_devrelease else f"{pkg}=={v.public}")
    return reqs


def checkpoint_state(uri: str, run_id: str) -> dict:
    """The final checkpoint a training run logged under ``checkpoint/``."""
    from ebm import checkpoint
    client = tracking.open_client(uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    if "checkpoint" not in names:
        raise RegistryError(f"run {run_id} has no 'checkpoint' artifact (did it finish? artifacts: {sorted(names)})")
    with tempfile.TemporaryDirectory() as d:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=d,
                                                    tracking_uri=uri)
        try:
            return checkpoint.load(local)
        except checkpoint.CheckpointError as e:
            raise RegistryError(f"run {run_id}: {e}") from None


def best_child(uri: str, parent_run_id: str, metric: str = "val_nll") -> str:
    """The sweep's best run: the parent's ``ebm.best_run_id`` tag, else its finished child with the
    lowest ``metric``."""
    client = tracking.open_client(uri)
    parent = client.get_run(parent_run_id)
    if parent.data.tags.get(BEST_RUN_TAG):
        return parent.data.tags[BEST_RUN_TAG]
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'",
                              order_by=[f"metrics.{metric} ASC"], max_results=50)
    runs = [r for r in runs if metric in r.data.metrics]
    if not runs:
        raise RegistryError(f"run {parent_run_id} has no finished child run with metric {metric!r}")
    return runs[0].info.run_id


def run_by_name(uri: str, run_name: str) -> str:
    """The latest finished run named ``run_name`` (the ``--name`` of ``ebm train`` / ``ebm tune``)."""
    run = tracking.latest_run(uri, run_name, status="FINISHED")
    if run is None:
        raise RegistryError(f"no finished run named {run_name!r} in {uri}")
    return run.info.run_id


def check_registrable(uri: str, run_id: str) -> None:
    """Only a run that trained to the end is a model: FINISHED, with a finite test NLL."""
    from ebm.loop import usable
    run = tracking.open_client(uri).get_run(run_id)
    if run.info.status != "FINISHED":
        reason = run.data.tags.get("ebm.stop_reason")
        raise RegistryError(f"run {run_id} is {run.info.status}, not FINISHED" + (f" ({reason})" if reason else "")
                            + ": only a run that trained to the end can be registered")
    nll = run.data.metrics.get("test_nll")
    if not usable(nll):
        raise RegistryError(f"run {run_id} has test_nll {nll!r}: only a run with finite test metrics can be registered")


def register(uri: str, name: str, *, run_id: str | None = None, best_of: str | None = None,
             alias: str | None = "champion") -> dict:
    """Log the run's model as pyfunc, register one new version of ``name``, set ``alias``.
    Returns {"name", "version", "run_id", "model_uri"}."""
    if (run_id is None) == (best_of is None):
        raise RegistryError("give exactly one of run_id / best_of")
    run_id = run_id or best_child(uri, best_of)
    check_registrable(uri, run_id)
    state = serving.slim_state(checkpoint_state(uri, run_id))
    p = serving.from_state(state)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = tracking.open_client(uri)
    with tempfile.TemporaryDirectory() as d:
        model_path, cfg_path = Path(d) / serving.MODEL_FILE, Path(d) / "config.toml"
        torch.save(state, model_path)
        cfg_path.write_text(p.cfg.to_toml())
        example = input_example(p)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=MODEL_CODE, artifacts={"model": str(model_path), "config": str(cfg_path)},
                code_paths=_code_copy(Path(d) / "code"), signature=signature(p, example), input_example=example,
                pip_requirements=_requirements(p.is_image),
                metadata={"task": p.task.name, "x_shape": list(p.task.x_shape), "target_names": list(p.task.target_names),
                          "source_run_id": run_id})
    version = _new_version(client, name, info, run_id)
    client.set_model_version_tag(name, version, "source_run_id", run_id)
    client.set_model_version_tag(name, version, "task", p.task.name)
    client.set_tag(run_id, REGISTERED_TAG, f"{name}/{version}")
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "run_id": run_id,
            "model_uri": f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"}


def _new_version(client, name: str, info, run_id: str) -> str:
    """A new version of ``name`` (created when missing) from the logged model, through the client: the
    fluent ``registered_model_name=`` prints "Successfully registered model" / "Created version" lines
    beside the command's own one."""
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    return str(client.create_model_version(name, source=info.model_uri, run_id=run_id, model_id=info.model_id).version)


def load_predictor(model_uri: str) -> serving.Predictor:
    """The in-process Predictor behind a registered pyfunc (``models:/NAME@ALIAS``, ``runs:/...``)."""
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().predictor
