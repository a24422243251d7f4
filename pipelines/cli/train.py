"""``ebm train``: one training run on Ray Train (default) or in this process (``--local``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from ebm.config import Config, ConfigError
    from ebm.loop import TrainingFailed
    from pipelines import tracking
    from pipelines.cli import EXIT_FAILED, EXIT_USAGE, UsageError, one_line
    from pipelines.configs import resolve_config
    from pipelines.data import DatasetError
    from pipelines.data.layout import DatasetChanged
    from pipelines.storage import StorageError
    try:       # the whole config (and the dataset, below) is checked before Ray or MLflow is touched
        cfg = Config.from_toml(resolve_config(args.config), args.set)
        _check_flags(args)
    except (ConfigError, UsageError) as e:
        print(f"ebm: invalid config: {e}" if isinstance(e, ConfigError) else f"ebm train: {e}", file=sys.stderr)
        return EXIT_USAGE
    name = args.resume or args.name
    try:
        if args.local:
            from pipelines.driver.local import train_local
            train_local(cfg, name=name, seeds=args.seeds, resume=bool(args.resume),
                        allow_config_change=args.allow_config_change, storage=args.storage or None,
                        track=not args.no_track, tracking_uri=args.tracking_uri or None, experiment=args.experiment,
                        group=args.group or Path(args.config).stem, threads=args.threads, out=args.out,
                        verify_data=args.verify_data)
            return 0
        from pipelines.driver.train_job import print_summary, run_job
        from pipelines.driver.runs import default_stamp
        name = name or f"{cfg.task.name}-{cfg.method.name}-{default_stamp()}"
        metrics = run_job(cfg, name=name, resume=bool(args.resume), allow_config_change=args.allow_config_change,
                          num_workers=args.num_workers, use_gpu=args.use_gpu, address=args.ray_address or None,
                          storage_path=args.storage or None, max_failures=args.max_failures,
                          tracking_uri=args.tracking_uri or None, experiment=args.experiment,
                          threads=args.threads or 1, ray_data=args.ray_data, verify_data=args.verify_data,
                          placement=args.placement)
    except (TrainingFailed, DatasetChanged) as e:      # DatasetChanged: the data changed under a running run
        print(f"ebm: training failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, SystemExit):
        if name:
            print(f"ebm: interrupted; resume with: ebm train {args.config} --resume {name}"
                  + (" --local" if args.local else ""), file=sys.stderr)
        return 130
    except (tracking.TrackingError, ConfigError, DatasetError, StorageError, OSError) as e:
        if _in_training(e):      # found by the running loop (a shard unreadable mid-run, a checkpoint write)
            print(f"ebm: training failed: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
            return EXIT_FAILED
        print(f"ebm: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if not (_in_training(e) or type(e).__module__.startswith("ray.")):
            raise           # a defect before training: its traceback is the report
        # the run is marked FAILED with the full message as its ebm.stop_reason tag
        print(f"ebm: training failed: {_root_cause(e)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"run name {name} (resume with --resume {name})")
    print_summary(metrics, tracking.resolve_uri(args.tracking_uri or None))
    return 0


def _in_training(e: BaseException) -> bool:
    """Whether ``e`` was raised inside the training loop (so the run started and failed), rather than by
    a check before training."""
    import traceback

    from ebm import loop
    codes = {loop.train.__code__, loop.run_epoch.__code__}
    return any(frame.f_code in codes for frame, _ in traceback.walk_tb(e.__traceback__))


def _root_cause(e: BaseException) -> str:
    """One line for an unexpected error of a run: a Ray error's last line names the worker's exception
    (Ray puts the worker's traceback in the message); otherwise the exception type and first line."""
    from pipelines.cli import one_line
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if type(e).__module__.startswith("ray.") and lines:
        return lines[-1]
    return f"{type(e).__name__}: {one_line(e)}"


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that only mean something on one path are refused on the other, not ignored; values that
    cannot work are refused before anything starts."""
    from ebm.config import ConfigError
    from pipelines.cli import check_dir_target, check_run_name, check_storage
    if not args.local:
        given = [f for f, v in (("--seeds", args.seeds != 1), ("--no-track", args.no_track), ("--group", args.group),
                                ("--out", args.out)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --local runs only")
    else:
        given = [f for f, v in (("--num-workers", args.num_workers != 2), ("--use-gpu", args.use_gpu),
                                ("--ray-data", args.ray_data), ("--ray-address", args.ray_address),
                                ("--max-failures", args.max_failures != 1), ("--placement", args.placement != "PACK"))
                 if v]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to Ray Train runs only, not --local")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    for flag, value, low in (("--threads", args.threads, 0), ("--num-workers", args.num_workers, 1),
                             ("--max-failures", args.max_failures, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.resume and (args.name and args.name != args.resume):
        raise ConfigError("give --resume NAME or --name NAME, not both")
    if args.resume and args.seeds > 1:
        raise ConfigError("--resume continues one run: resume each seed's run by its name")
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change goes with --resume")
    check_run_name(args.name, "--name")
    check_run_name(args.resume, "--resume")
    check_run_name(args.group, "--group")       # the default run names of --seeds N start with the group
    check_storage(args.storage)
    check_dir_target(args.out, "--out")


def add_train_command(sub) -> None:
    from pipelines.cli import EPILOG
    tr = sub.add_parser("train", help="train a model from a config file", epilog=EPILOG,
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("config", help="a TOML config file or a packaged config name (toy2, star, ...)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable)")
    tr.add_argument("--name", default="", help="run name (checkpoints and MLflow run; default: task-method-time)")
    tr.add_argument("--resume", default="", metavar="RUN_NAME",
                    help="continue the named run from its latest checkpoint (a finished run: raise optim.epochs)")
    tr.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: continue although --set values differ from the run's (tagged on the run)")
    tr.add_argument("--storage", default="", help="checkpoint storage, a local path or a URI such as s3://bucket/runs "
                    "(default $EBM_STORAGE_PATH or ./runs)")
    tr.add_argument("--verify-data", action="store_true", help="re-hash every row of task.data_dir against its "
                    "fingerprint before training (default: check metadata and shard footers only)")
    tr.add_argument("--threads", type=int, default=0, help="torch threads per process (default: 1 per Ray "
                    "worker; torch's default with --local)")
    tr.add_argument("--tracking-uri", default="", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    tr.add_argument("--experiment", default="ebm", help="MLflow experiment name")
    ray = tr.add_argument_group("Ray Train runs (the default)")
    ray.add_argument("--ray-address", default="", help="the Ray cluster to run on, as ray.init takes it (HOST:PORT "
                     "or auto; default $RAY_ADDRESS, else start a local Ray). `ebm submit --address` is the job server")
    ray.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    ray.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ray.add_argument("--ray-data", action="store_true", help="with task.data_dir: stream the train split "
                     "through Ray Data (get_dataset_shard) instead of per-rank pyarrow readers")
    ray.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the latest checkpoint")
    ray.add_argument("--placement", default="PACK", choices=("PACK", "SPREAD", "STRICT_SPREAD"),
                     help="Ray placement of the workers: STRICT_SPREAD puts each on its own node")
    local = tr.add_argument_group("--local runs (one process, no Ray)")
    local.add_argument("--local", action="store_true", help="train in this process without Ray")
    local.add_argument("--seeds", type=int, default=1, help="train this many seeds (seed, seed+1, ...), one run "
                       "each, and report mean ± std of the test metrics")
    local.add_argument("--no-track", action="store_true", help="no MLflow runs")
    local.add_argument("--group", default="", help="MLflow tag ebm.group that `ebm results` groups runs by "
                       "(default: the config's name)")
    local.add_argument("--out", default="", help="directory for a summary JSON of the seeds' test metrics")
    tr.set_defaults(func=_train)
