"""The ``ebm`` command: parse -> build -> run -> clean up (STYLE.md §9)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config(name: str) -> Path:
    """A path, or the name of a packaged config (``toy2`` -> pipelines/configs/toy2.toml)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if packaged.is_file():
        return packaged
    known = sorted(c.stem for c in CONFIG_DIR.glob("*.toml"))
    raise SystemExit(f"ebm: config {name!r} is neither a file nor a packaged config; packaged: {known}")


def _train(args: argparse.Namespace) -> int:
    from ebm.config import Config, ConfigError
    try:       # the whole config is validated before Ray or MLflow is touched
        cfg = Config.from_toml(resolve_config(args.config), args.set)
    except ConfigError as e:
        print(f"ebm: invalid config: {e}", file=sys.stderr)
        return 2
    if args.local or args.seeds > 1:
        from pipelines.local import train_local
        from pipelines.tracking import TrackingError
        try:
            return train_local(cfg, out=args.out, seeds=args.seeds, track=not args.no_track,
                               tracking_uri=args.tracking_uri or None, experiment=args.experiment,
                               group=args.group or Path(args.config).stem)
        except (TrackingError, ConfigError) as e:
            print(f"ebm: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    from pipelines import tracking
    from pipelines.train_job import NonFiniteStop, print_summary, run_job
    name = args.resume or args.name or f"{cfg.task.name}-{cfg.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        metrics = run_job(cfg, name=name, num_workers=args.num_workers, use_gpu=args.use_gpu,
                          address=args.address or None, storage_path=args.storage or None,
                          max_failures=args.max_failures, tracking_uri=args.tracking_uri or None,
                          experiment=args.experiment, threads=args.threads, ray_data=args.ray_data)
    except (tracking.TrackingError, ConfigError) as e:
        print(f"ebm: {e}", file=sys.stderr)
        return 2
    except NonFiniteStop as e:
        print(f"ebm: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        print(f"ebm: interrupted; resume with: ebm train {args.config} --resume {name}", file=sys.stderr)
        return 130
    print(f"run name {name} (resume with --resume {name})")
    print_summary(metrics, tracking.resolve_uri(args.tracking_uri or None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ebm", description="Energy-based regression with learned proposals.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a config file")
    tr.add_argument("config", help="a TOML config file or a packaged config name (toy2, star, ...)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable)")
    tr.add_argument("--address", default="", help="Ray cluster address (default: start a local Ray)")
    tr.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (DDP ranks)")
    tr.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    tr.add_argument("--ray-data", action="store_true", help="with task.data_dir: stream the train split "
                    "through Ray Data (get_dataset_shard) instead of per-rank pyarrow readers")
    tr.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    tr.add_argument("--name", default="", help="run name (checkpoints and MLflow run)")
    tr.add_argument("--resume", default="", metavar="RUN_NAME", help="continue the named run from its latest checkpoint")
    tr.add_argument("--storage", default="", help="checkpoint storage (default $EBM_STORAGE_PATH or ./runs)")
    tr.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the latest checkpoint")
    tr.add_argument("--tracking-uri", default="", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    tr.add_argument("--experiment", default="ebm", help="MLflow experiment name")
    tr.add_argument("--local", action="store_true", help="train in this process without Ray; one MLflow run per seed")
    tr.add_argument("--no-track", action="store_true", help="with --local: no MLflow runs")
    tr.add_argument("--group", default="", help="with --local: MLflow tag ebm.group that `ebm results` groups "
                    "runs by (default: the config's name)")
    tr.add_argument("--out", default="", help="with --local: directory for checkpoints and a metrics JSON")
    tr.add_argument("--seeds", type=int, default=1, help="with --local: train this many seeds (seed, seed+1, "
                    "...) and report mean ± std of the test metrics")
    tr.set_defaults(func=_train)
    try:
        from pipelines.data.cli import add_data_commands
    except ImportError:
        pass
    else:
        add_data_commands(sub)
    from pipelines.predict_cli import add_model_commands
    from pipelines.tune import add_tune_command
    add_tune_command(sub)
    add_model_commands(sub)
    from pipelines.results import add_results_command
    add_results_command(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
