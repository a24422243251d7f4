"""``ebm results``: markdown tables of an MLflow experiment's runs (front end of
:mod:`pipelines.driver.results`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.driver.results import collect, download_figures, render, select


def _results(args: argparse.Namespace) -> int:
    from pipelines import tracking
    from pipelines.cli import EXIT_USAGE, UsageError, check_dir_target, check_file_target
    if args.out != "-":
        check_file_target(args.out, "--out")
    check_dir_target(args.figures, "--figures")
    uri = tracking.resolve_uri(args.tracking_uri or None)
    try:
        tracking.check_reachable(uri, write=False)       # reading never creates a store
    except tracking.TrackingError as e:
        print(f"ebm results: {e}", file=sys.stderr)
        return EXIT_USAGE
    if tracking.open_client(uri).get_experiment_by_name(args.experiment) is None:
        raise UsageError(f"no experiment {args.experiment!r} in {uri}")
    groups = select(collect(uri, args.experiment), args.groups)
    if not any(g.runs for g in groups):
        which = f" in groups matching {' or '.join(args.groups)}" if args.groups else ""
        raise UsageError(f"experiment {args.experiment!r} has no finished runs tagged ebm.group{which} "
                         f"(ebm train --local tags them); nothing written")
    import shlex
    command = shlex.join(["ebm", "results", args.experiment, *[a for p in args.groups for a in ("--groups", p)]])
    text = render(groups, args.experiment, uri, command)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"{args.out}: {sum(1 for g in groups if g.runs)} groups, {sum(len(g.runs) for g in groups)} runs")
    if args.figures:
        for p in download_figures(uri, groups, args.figures):
            print(p)
    return 0


def add_results_command(sub) -> None:
    from pipelines.cli import EPILOG
    rs = sub.add_parser("results", help="markdown tables of an MLflow experiment's runs, grouped by ebm.group",
                        epilog=EPILOG)
    rs.add_argument("experiment", help="MLflow experiment name")
    rs.add_argument("--out", required=True, help="markdown file to write ('-' for stdout)")
    rs.add_argument("--tracking-uri", default="", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)")
    rs.add_argument("--figures", default="", metavar="DIR",
                    help="also copy each selected group's density plot (lowest seed) here as <group>.png")
    rs.add_argument("--groups", action="append", default=[], metavar="GLOB",
                    help="only groups whose name matches this pattern (repeatable), e.g. 'toy2/full_*'")
    rs.set_defaults(func=_results)
