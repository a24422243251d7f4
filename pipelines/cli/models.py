"""``ebm register``, ``ebm predict`` and ``ebm evaluate``: registered models from the command line."""
from __future__ import annotations

import os
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
    """The model behind ``args.model_uri``: a registry or run URI, an MLflow model directory, a
    checkpoint (directory or file), a ``model.pt`` or a run's directory, local or a URI, as
    :func:`pipelines.api.load` takes them (weights read with ``weights_only=True``). An unknown model
    (or store) is a UsageError; only a ``models:/`` or ``runs:/`` URI needs the tracking store, which
    is read and never created."""
    from pipelines import api
    from pipelines.cli import UsageError, one_line
    try:
        return api.load(args.model_uri, tracking_uri=args.tracking_uri or None).predictor
    except Exception as e:      # SourceError (nothing there), TrackingError, MlflowException, OSError
        raise UsageError(f"cannot load model {args.model_uri!r}: {one_line(e)}") from None


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
    from pipelines import storage
    from pipelines.cli import UsageError, check_file_target
    from pipelines.serve import batch, model_eval, serving
    # everything that can be checked without the model is checked before it loads and predicts
    if args.limit < 0:
        raise UsageError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0 (0 = in this process), got {args.workers}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.cpus_per_worker > 0:
        raise UsageError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.workers == 0 and (args.use_gpu or args.ray_address):
        raise UsageError(f"{'--use-gpu' if args.use_gpu else '--ray-address'} applies to the Ray Data path: "
                         "add --workers N")
    _check_input(args.input, "--input")
    if args.out != "-":
        if args.workers and not args.out.lower().endswith(".parquet"):
            raise UsageError(f"--out {args.out}: --workers writes Parquet: the file must end in .parquet")
        if storage.is_uri(args.out):
            try:
                batch.check_output(args.out, args.overwrite)
            except serving.InputError as e:
                raise UsageError(str(e)) from None
        else:
            check_file_target(args.out, "--out", OUT_SUFFIXES)
            if os.path.exists(args.out) and not args.overwrite:
                raise UsageError(f"--out {args.out}: exists; pass --overwrite to replace it")
    elif args.workers:
        raise UsageError("--out -: --workers writes a Parquet file, not JSON to stdout")
    quantiles = _floats(args.quantiles, "--quantiles")
    p = _load(args)
    try:
        lim = serving.Limits.from_env()

        def params():
            return serving.check_params(p, M=args.M, quantiles=quantiles, interval_level=args.interval_level,
                                        refine_steps=args.refine_steps, return_samples=args.return_samples,
                                        seed=args.seed, limits=lim)
        if args.workers:
            prm = params()
            n, ess = batch.predict_on_ray(p, args.input, args.out, split=args.split, prm=prm, limits=lim,
                                          log_density=args.log_density, limit=args.limit, workers=args.workers,
                                          use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
                                          batch_size=args.batch_size, address=args.ray_address or None)
            _warn_few_samples(ess, prm, lim)
            print(f"{n} predictions -> {args.out}")
            return 0
        ids, values, y = model_eval.read_inputs(args.input, p, args.split)
        if args.limit:
            ids, values, y = ids[:args.limit], values[:args.limit], (y[:args.limit] if y is not None else None)
        prm = params()
        out = _predict_in_process(p, ids, values, y if args.log_density else None, prm, lim, args.batch_size)
        _warn_few_samples(out.get("ess", []), prm, lim)
        if args.out == "-":
            import json
            print(json.dumps([dict(zip(["id", *out], row)) for row in zip(ids, *out.values())], indent=1))
            return 0
        if args.out.lower().endswith(".parquet"):
            schema = batch.output_schema(p, prm, "log_p" in out)
            batch.publish_parquet(args.out, schema, [batch.output_table(ids, out, schema)])
            path = args.out
        else:
            path = model_eval.write_table({"id": ids, **out}, args.out)
    except serving.InputError as e:
        print(f"ebm predict: {e}", file=sys.stderr)
        return 2
    except storage.StorageError as e:
        print(f"ebm predict: {e}", file=sys.stderr)
        return 1
    print(f"{len(ids)} predictions -> {path}")
    return 0


def _warn_few_samples(ess, prm, lim) -> None:
    """Either path's rows' ESS / M -> :func:`serving.few_samples`'s warning on stderr, if any."""
    from pipelines.serve import serving
    if warning := serving.few_samples(ess, prm, lim):
        print(f"ebm predict: warning: {warning}", file=sys.stderr)


def _predict_in_process(p, ids, values, y, prm, lim, block: int) -> dict[str, list]:
    """The single-process path: blocks of rows through :func:`serving.predict_rows` with their row
    indices (the numbers do not depend on the blocks), under a progress bar."""
    from pipelines import progress
    from pipelines.serve import serving
    out: dict[str, list] = {}
    with progress.bar(total=len(ids), desc="predict", unit="rows") as bar:
        for s in range(0, max(len(ids), 1), block):
            x = serving.inputs_tensor(p, values[s:s + block], ids[s:s + block])
            part = serving.predict_rows(p, x, y[s:s + block] if y is not None else None, **prm.as_kwargs(),
                                        limits=lim, ids=ids[s:s + block], rows=range(s, s + x.shape[0]))
            for k, v in part.items():
                out.setdefault(k, []).extend(v)
            bar.update(x.shape[0])
    return out


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
    run_id = None if args.no_log else _source_run(args)
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


def _source_run(args) -> str | None:
    """The MLflow run a ``runs:/`` or ``models:/`` model was logged in (None for a file or directory),
    read from the command's store (``--tracking-uri``, $MLFLOW_TRACKING_URI or the project's default)."""
    model_uri = args.model_uri
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/")[0] or None
    if model_uri.startswith("models:/"):
        import mlflow
        _uri(args, write=False)     # MLflow's own default store is not the project's
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
    pr.add_argument("model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint "
                    "(directory or file), model.pt or run directory (a local path or a URI)")
    pr.add_argument("--input", required=True, help="image folder, image file, Parquet file, or dataset directory (a local path "
                    "or a URI such as s3://bucket/data)")
    pr.add_argument("--split", default="test", help="with a dataset directory: the split to read")
    pr.add_argument("--out", required=True, help="FILE.csv | FILE.parquet | FILE.json (a local path; Parquet also "
                    "a URI such as s3://bucket/preds.parquet), or - to print JSON")
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
    pr.add_argument("--seed", type=int, default=0,
                    help="the IS draws of each row are seeded by (seed, the row's index in the input): the same "
                         "numbers in this process, with --workers, from the Python API and the model server")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ray = pr.add_argument_group("Ray Data (large Parquet inputs)", "--workers N predicts a Parquet file or dataset "
                                "split on N Ray Data actors (the model loaded once per actor), streaming the rows "
                                "with bounded memory into one Parquet --out; the output is the same as without it. "
                                "Without --workers the input is read into this process (small inputs; image "
                                "folders, CSV/JSON out). Starting Ray costs ~10 s: worth it from ~10k images")
    ray.add_argument("--workers", type=int, default=0, metavar="N", help="Ray Data actors (0 = in this process)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per actor (and its torch threads)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    ray.add_argument("--batch-size", type=int, default=256, help="rows per actor call (and per progress step)")
    ray.add_argument("--ray-address", default="", help="a running Ray cluster (default: $RAY_ADDRESS, else a local "
                     "Ray on 127.0.0.1)")
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
