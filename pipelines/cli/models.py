"""``ebm register``, ``ebm predict`` and ``ebm evaluate``: registered models from the command line."""
from __future__ import annotations

import sys

OUT_SUFFIXES = (".csv", ".parquet", ".json")


def _registry():
    """:mod:`pipelines.serve.registry`, imported without the UserWarnings MLflow emits on defining a
    PythonModel (about the type hints of its ``predict``): not the user's concern, and they would come
    before the one line of an error."""
    import warnings
    with warnings.catch_warnings(record=True):      # recorded and dropped: MLflow resets the filters itself
        from pipelines.serve import registry
    return registry


def _uri(args, write: bool) -> str:
    """The tracking (and registry) URI, checked: a command that only reads needs an existing store and
    never creates one (resolving the default ``sqlite:///mlruns.db`` would)."""
    from pipelines import tracking
    uri = tracking.resolve_uri(args.tracking_uri or None)
    tracking.check_reachable(uri, write=write)
    import mlflow
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _register(args) -> int:
    import mlflow.exceptions

    from pipelines import tracking
    from pipelines.cli import EXIT_USAGE, one_line
    registry = _registry()
    try:
        uri = _uri(args, write=False)                # an existing store: registering never creates one
        tracking.check_reachable(uri, write=True)
        run_id = args.run or (registry.run_by_name(uri, args.run_name) if args.run_name else None)
        out = registry.register(uri, args.name, run_id=run_id, best_of=args.best_of or None, alias=args.alias or None)
    except (registry.RegistryError, tracking.TrackingError, mlflow.exceptions.MlflowException) as e:
        print(f"ebm register: {one_line(e)}", file=sys.stderr)      # MlflowException: an unknown run id
        return EXIT_USAGE
    print(f"registered {out['name']} version {out['version']} from run {out['run_id']}: {out['model_uri']}")
    return 0


def _load(args):
    """The model behind ``args.model_uri``; an unknown model (or store) is a UsageError. Only a
    ``models:/`` or ``runs:/`` URI needs the tracking store."""
    from pipelines import tracking
    from pipelines.cli import UsageError, one_line
    load_predictor = _registry().load_predictor
    model = args.model_uri
    try:
        if model.startswith(("models:/", "runs:/")):
            _uri(args, write=False)
        return load_predictor(model)
    except tracking.TrackingError as e:
        raise UsageError(f"cannot load model {model!r}: {e}") from None
    except Exception as e:      # MlflowException (unknown name/alias), OSError (missing path)
        raise UsageError(f"cannot load model {model!r}: {one_line(e)}") from None


def _floats(text: str, flag: str) -> list[float]:
    from pipelines.cli import UsageError
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None


def _check_input(path: str, flag: str) -> None:
    """A local input must exist (checked before the model loads); a URI is left to the reader."""
    from pathlib import Path

    from pipelines.cli import UsageError
    if "://" not in path and not Path(path).exists():
        raise UsageError(f"{flag} {path}: no such file or directory")


def _predict(args) -> int:
    from pipelines.cli import UsageError, check_file_target
    from pipelines.serve import model_eval, serving
    # everything that can be checked without the model is checked before it loads and predicts
    if args.out != "-":
        check_file_target(args.out, "--out", OUT_SUFFIXES)
    if args.limit < 0:
        raise UsageError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    quantiles = _floats(args.quantiles, "--quantiles")
    _check_input(args.input, "--input")
    p = _load(args)
    try:
        ids, values, y = model_eval.read_inputs(args.input, p, args.split)
        if args.limit:
            ids, values, y = ids[:args.limit], values[:args.limit], (y[:args.limit] if y is not None else None)
        x = serving.inputs_tensor(p, values, ids)
        out = serving.predict_rows(p, x, y if args.log_density else None, M=args.M,
                                   quantiles=quantiles, interval_level=args.interval_level,
                                   refine_steps=args.refine_steps, return_samples=args.return_samples, seed=args.seed)
        if args.out == "-":
            import json
            print(json.dumps([dict(zip(["id", *out], row)) for row in zip(ids, *out.values())], indent=1))
            return 0
        path = model_eval.write_table({"id": ids, **out}, args.out)
    except serving.InputError as e:
        print(f"ebm predict: {e}", file=sys.stderr)
        return 2
    print(f"{len(ids)} predictions -> {path}")
    return 0


def _evaluate(args) -> int:
    from pipelines.cli import UsageError, check_dir_target
    from pipelines.data import DatasetError
    from pipelines.serve import model_eval, serving
    check_dir_target(args.out, "--out")
    if args.M is not None and args.M < 1:
        raise UsageError(f"--M must be >= 1 (default: the model's sampler.M_eval), got {args.M}")
    if args.examples < 1:
        raise UsageError(f"--examples must be >= 1, got {args.examples}")
    _check_input(args.data, "--data")
    p = _load(args)
    run_id = None if args.no_log else _source_run(args.model_uri)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="ebm-evaluate-") as tmp:
        out_dir = args.out or (tmp if run_id else None)      # without --out the files go to the run only
        try:
            m = model_eval.evaluate_dataset(p, args.data, args.split, out_dir, args.M, args.seed, args.examples)
        except (serving.InputError, DatasetError) as e:
            print(f"ebm evaluate: {e}", file=sys.stderr)
            return 2
        for k in ("nll", "grid_nll", "is_nll", "mae_mode", "mae_mean", "crps", "coverage", "calibration_error", "kl"):
            if k in m:
                print(f"{args.split} {k}: {m[k]:.4f}")
        _print_calibration(m.get("calibration", {}))
        if args.out:
            print(f"metrics.json, calibration.json, calibration.png and densities.png in {args.out}")
        if run_id:
            _log_to_run(args, run_id, out_dir)
    return 0


def _print_calibration(cal: dict) -> None:
    """One line per source: coverage of the 50/80/90/95% central intervals (dims pooled)."""
    from ebm.calibration import SOURCES
    shown = (0.5, 0.8, 0.9, 0.95)
    for k in sorted(cal, key=lambda k: SOURCES.index(k) if k in SOURCES else len(SOURCES)):
        cov = dict(zip(cal[k]["levels"], cal[k]["coverage"]))
        print(f"coverage of the {'/'.join(f'{lv:.0%}'[:-1] for lv in shown)}% intervals, {k}: "
              + " / ".join(f"{cov[lv]:.3f}" for lv in shown if lv in cov))


def _source_run(model_uri: str) -> str | None:
    """The MLflow run a ``runs:/`` or ``models:/`` model was logged in (None for a file or directory)."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/")[0] or None
    if model_uri.startswith("models:/"):
        import mlflow
        return mlflow.models.get_model_info(model_uri).run_id or None
    return None


def _log_to_run(args, run_id: str, out_dir: str) -> None:
    """The evaluation's files as artifacts of the model's run, under evaluate/<dataset>_<split>/; a store
    that refuses them costs a warning, not the evaluation."""
    from pipelines import storage, tracking
    from pipelines.cli import one_line
    where = f"evaluate/{storage.name(str(args.data).rstrip('/'))}_{args.split}"
    try:
        tracking.log_artifacts(tracking.resolve_uri(args.tracking_uri or None), run_id, out_dir, where)
    except Exception as e:      # read-only store, deleted run: the figures are still in --out
        print(f"ebm evaluate: warning: not logged to MLflow run {run_id}: {one_line(e)}", file=sys.stderr)
        return
    print(f"logged to MLflow run {run_id}: {where}/")


def add_model_commands(subparsers) -> None:
    """Register ``register``, ``predict`` and ``evaluate`` on the ``ebm`` parser."""
    def common(ap):
        ap.add_argument("--tracking-uri", default="", help="MLflow URI (default $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlruns.db); also the registry")

    from pipelines.cli import EPILOG
    rg = subparsers.add_parser("register", help="register a run's model (or a sweep's best) as an MLflow pyfunc",
                               epilog=EPILOG)
    src = rg.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", default="", metavar="RUN_ID", help="a finished training run")
    src.add_argument("--run-name", default="", metavar="NAME", help="the latest finished run of that name (ebm train --name)")
    src.add_argument("--best-of", default="", metavar="PARENT_RUN_ID", help="the best child run of an ebm tune sweep")
    rg.add_argument("--name", required=True, help="registered model name")
    rg.add_argument("--alias", default="champion", help="alias to point at the new version ('' = none)")
    common(rg)
    rg.set_defaults(func=_register)

    pr = subparsers.add_parser("predict", help="predictive distributions for an image folder or Parquet inputs",
                               epilog=EPILOG)
    pr.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a path")
    pr.add_argument("--input", required=True, help="image folder, Parquet file, or dataset directory")
    pr.add_argument("--split", default="test", help="with a dataset directory: the split to read")
    pr.add_argument("--out", required=True, help="FILE.csv | FILE.parquet | FILE.json, or - to print JSON")
    pr.add_argument("--limit", type=int, default=0, help="only the first N inputs")
    pr.add_argument("--quantiles", default="0.05,0.25,0.5,0.75,0.95", help="comma-separated levels")
    # the flags are the pyfunc's parameter names (M, interval_level, refine_steps, return_samples, seed)
    pr.add_argument("--interval-level", "--level", dest="interval_level", type=float, default=None,
                    help="central interval level (default: the model's config)")
    pr.add_argument("--M", type=int, default=None, help="proposal samples per example (default: sampler.M_eval)")
    pr.add_argument("--refine-steps", type=int, default=None, help="mode refinement steps (default: the config's)")
    pr.add_argument("--log-density", action="store_true", help="add log p(y|x) at the input's y column")
    pr.add_argument("--return-samples", "--samples", dest="return_samples", action="store_true",
                    help="add the weighted samples")
    pr.add_argument("--seed", type=int, default=0)
    common(pr)
    pr.set_defaults(func=_predict)

    ev = subparsers.add_parser("evaluate", help="test NLL, MAE, CRPS, coverage, a calibration figure and predicted "
                               "densities on a dataset", epilog=EPILOG)
    ev.add_argument("model_uri")
    ev.add_argument("--data", required=True, help="dataset directory (ebm data ingest)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--out", default="", help="directory for metrics.json, calibration.json, calibration.png "
                    "(PIT histogram, coverage against the nominal level) and densities.png")
    ev.add_argument("--M", type=int, default=None, help="proposal samples (default: sampler.M_eval)")
    ev.add_argument("--examples", type=int, default=4, help="examples drawn in densities.png (the split's first)")
    ev.add_argument("--no-log", action="store_true", help="do not log the files to the model's MLflow run "
                    "(default: a runs:/ or models:/ model's run gets them under evaluate/<dataset>_<split>/)")
    ev.add_argument("--seed", type=int, default=0)
    common(ev)
    ev.set_defaults(func=_evaluate)
