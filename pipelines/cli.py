"""The ``ebm`` command: parse -> build -> run -> clean up (STYLE.md §9)."""
from __future__ import annotations

import argparse
import json
import sys
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
    try:
        cfg = Config.from_toml(resolve_config(args.config), args.set)
    except ConfigError as e:
        print(f"ebm: invalid config: {e}", file=sys.stderr)
        return 2
    from pipelines.local import train_local
    return train_local(cfg, out=args.out, seeds=args.seeds)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ebm", description="Energy-based regression with learned proposals.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a config file")
    tr.add_argument("config", help="a TOML config file or a packaged config name (toy2, star, ...)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (repeatable)")
    tr.add_argument("--out", default="", help="directory for the final checkpoint and metrics JSON")
    tr.add_argument("--seeds", type=int, default=1, help="train this many seeds (seed, seed+1, ...) and "
                    "report mean ± std of the test metrics")
    tr.set_defaults(func=_train)
    try:
        from pipelines.data.cli import add_data_commands
    except ImportError:
        pass
    else:
        add_data_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
