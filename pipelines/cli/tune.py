"""``ebm tune``: the sweep's front end (:mod:`pipelines.driver.tune` runs it)."""
from __future__ import annotations

import sys
import time

from ebm.config import Config, ConfigError
from pipelines.configs import resolve_config
from pipelines.driver.tune import load_space, run_sweep


def _tune(args) -> int:
    from pipelines import tracking
    from pipelines.cli import EXIT_USAGE, one_line
    from pipelines.data import DatasetError
    from pipelines.storage import StorageError
    name = args.resume or args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        _check_flags(args)
        cfg = space = opts = None
        if not args.resume:
            if not args.config:
                raise ConfigError("give a CONFIG (or --resume NAME)")
            cfg = Config.from_toml(resolve_config(args.config), args.set)
            space, opts = load_space(args.space, cfg) if args.space else ({}, {})
            if args.scheduler:
                opts["scheduler"] = args.scheduler
            if args.num_samples:
                opts["num_samples"] = args.num_samples
            _check_opts(opts, args.space)
        summary = run_sweep(cfg, name=name, space=space, opts=opts, seeds=args.seeds, resume=bool(args.resume),
                            storage_path=args.storage or None, tracking_uri=args.tracking_uri or None,
                            experiment=args.experiment, num_workers=args.num_workers,
                            cpus_per_worker=args.cpus_per_worker, threads=args.threads,
                            max_concurrent=args.max_concurrent, max_failures=args.max_failures,
                            address=args.ray_address or None, register_name=args.register, alias=args.alias)
    except (ConfigError, tracking.TrackingError, DatasetError, StorageError) as e:
        print(f"ebm tune: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, SystemExit):
        print(f"ebm tune: interrupted; resume with: ebm tune --resume {name}", file=sys.stderr)
        return 130
    print(f"sweep {name}: parent MLflow run {summary['parent_run_id']} (resume with --resume {name})")
    return 1 if summary["errors"] else 0


def _check_flags(args) -> None:
    """Values that cannot work are refused before Ray or MLflow is touched."""
    from pipelines.cli import check_run_name, check_storage
    for flag, value, low in (("--seeds", args.seeds, 0), ("--num-samples", args.num_samples, 0),
                             ("--num-workers", args.num_workers, 1), ("--threads", args.threads, 1),
                             ("--max-concurrent", args.max_concurrent, 1), ("--max-failures", args.max_failures, 0),
                             ("--cpus-per-worker", args.cpus_per_worker, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.resume and (args.name and args.name != args.resume):
        raise ConfigError("give --resume NAME or --name NAME, not both")
    if args.resume and (args.config or args.space or args.set or args.seeds):
        raise ConfigError("--resume continues the sweep as it was started: give no CONFIG, --space, --set or --seeds")
    check_run_name(args.name, "--name")
    check_run_name(args.resume, "--resume")
    check_storage(args.storage)


def _check_opts(opts: dict, where: str) -> None:
    """The [tune] options Ray would only reject once Ray has started (or silently accept: no samples)."""
    where = where or "the command line"
    if opts.get("mode", "min") not in ("min", "max"):
        raise ConfigError(f"{where}: [tune] mode must be 'min' or 'max', got {opts['mode']!r}")
    for key, low in (("num_samples", 1), ("grace_period", 1), ("reduction_factor", 2)):
        if key in opts and opts[key] < low:
            raise ConfigError(f"{where}: [tune] {key} must be >= {low}, got {opts[key]!r}")


def add_tune_command(subparsers) -> None:
    from pipelines.cli import EPILOG
    tu = subparsers.add_parser("tune", help="Ray Tune sweep (ASHA on val NLL) or a multi-seed run, tracked in MLflow",
                               epilog=EPILOG)
    tu.add_argument("config", nargs="?", default="", help="TOML config or packaged config name (not with --resume)")
    tu.add_argument("--space", default="", help="search-space TOML (see pipelines/driver/tune.py)")
    tu.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the base config")
    tu.add_argument("--num-samples", type=int, default=0, help="samples of the space (default: [tune] or 1)")
    tu.add_argument("--scheduler", choices=("asha", "fifo"), default="", help="default: [tune] or asha")
    tu.add_argument("--seeds", type=int, default=0, help="run the config under N seeds; mean ± std and best-5")
    tu.add_argument("--resume", default="", metavar="NAME", help="continue the named sweep")
    tu.add_argument("--name", default="", help="sweep name (Tune experiment and MLflow parent run)")
    tu.add_argument("--register", default="", metavar="MODEL_NAME", help="register the best trial's model")
    tu.add_argument("--alias", default="champion", help="alias for --register")
    tu.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per trial")
    tu.add_argument("--cpus-per-worker", type=float, default=0.0, help="CPUs per worker (default 0.5, GPU runs 1)")
    tu.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    tu.add_argument("--max-concurrent", type=int, default=1, help="trials at once (1 on a 2-core machine)")
    tu.add_argument("--max-failures", type=int, default=1,
                    help="retries per trial: of a 1-worker trial by Tune, of a multi-worker trial's worker group by Ray Train")
    tu.add_argument("--ray-address", default="", help="the Ray cluster to run on, as ray.init takes it (HOST:PORT "
                    "or auto; default $RAY_ADDRESS, else start a local Ray). `ebm submit --address` is the job server")
    tu.add_argument("--storage", default="", help="Tune and checkpoint storage (default $EBM_STORAGE_PATH or ./runs)")
    tu.add_argument("--tracking-uri", default="", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    tu.add_argument("--experiment", default="ebm", help="MLflow experiment name")
    tu.set_defaults(func=_tune)
