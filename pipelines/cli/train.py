"""``ebm train``: one training run on Ray Train (default) or in this process (``--local``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from ebm.config import Config, ConfigError
    from ebm.loop import TrainingFailed
    from pipelines import tracking
    from pipelines.configs import resolve_config
    from pipelines.data import DatasetError
    from pipelines.storage import StorageError
    try:       # the whole config (and the dataset, below) is checked before Ray or MLflow is touched
        cfg = Config.from_toml(resolve_config(args.config), args.set)
        _check_flags(args)
    except ConfigError as e:
        print(f"ebm: invalid config: {e}", file=sys.stderr)
        return 2
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
                          num_workers=args.num_workers, use_gpu=args.use_gpu, address=args.address or None,
                          storage_path=args.storage or None, max_failures=args.max_failures,
                          tracking_uri=args.tracking_uri or None, experiment=args.experiment,
                          threads=args.threads or 1, ray_data=args.ray_data, verify_data=args.verify_data,
                          placement=args.placement)
    except (tracking.TrackingError, ConfigError, DatasetError, StorageError) as e:
        print(f"ebm: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"ebm: training failed: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        if name:
            print(f"ebm: interrupted; resume with: ebm train {args.config} --resume {name}"
                  + (" --local" if args.local else ""), file=sys.stderr)
        return 130
    print(f"run name {name} (resume with --resume {name})")
    print_summary(metrics, tracking.resolve_uri(args.tracking_uri or None))
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that only mean something on one path are refused on the other, not ignored."""
    from ebm.config import ConfigError
    if not args.local:
        given = [f for f, v in (("--seeds", args.seeds != 1), ("--no-track", args.no_track), ("--group", args.group),
                                ("--out", args.out)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --local runs only")
    else:
        given = [f for f, v in (("--num-workers", args.num_workers != 2), ("--use-gpu", args.use_gpu),
                                ("--ray-data", args.ray_data), ("--address", args.address),
                                ("--max-failures", args.max_failures != 1), ("--placement", args.placement != "PACK"))
                 if v]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to Ray Train runs only, not --local")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    if args.resume and (args.name and args.name != args.resume):
        raise ConfigError("give --resume NAME or --name NAME, not both")
    if args.resume and args.seeds > 1:
        raise ConfigError("--resume continues one run: resume each seed's run by its name")
    if args.allow_config_change and not args.resume:
        raise ConfigError("--allow-config-change goes with --resume")


def add_train_command(sub) -> None:
    tr = sub.add_parser("train", help="train a model from a config file",
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
    ray.add_argument("--address", default="", help="Ray cluster address (default: start a local Ray)")
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
