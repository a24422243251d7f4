"""The ``ebm`` command: parse -> build -> run -> clean up (STYLE.md §9). Front ends only: each
subcommand's module parses its flags and calls the driver, data, serving or cluster code."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from cluster.cli import add_cluster_commands
    from pipelines.cli.data import add_data_commands
    from pipelines.cli.models import add_model_commands
    from pipelines.cli.results import add_results_command
    from pipelines.cli.train import add_train_command
    from pipelines.cli.tune import add_tune_command
    ap = argparse.ArgumentParser(prog="ebm", description="Energy-based regression with learned proposals.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    add_data_commands(sub)
    add_tune_command(sub)
    add_model_commands(sub)
    add_results_command(sub)
    add_cluster_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
