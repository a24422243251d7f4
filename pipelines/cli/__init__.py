"""The ``ebm`` command: parse -> build -> run -> clean up. Front ends only: each
subcommand's module parses its flags and calls the driver, data, serving or cluster code.

Exit codes, the same for every subcommand: 0 done; 1 a run that failed (training failed, a sweep with
errored trials); 2 a usage, config or data error, reported in one line before anything runs or is
written; 130 interrupted (Ctrl-C or SIGTERM). The checks below are shared by several front ends."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EPILOG = ("exit codes: 0 done; 1 a run that failed (training failed, a sweep with errored trials); 2 a usage, "
          "config or data error, found before anything runs or is written; 130 interrupted (Ctrl-C or SIGTERM)")


class UsageError(ValueError):
    """A command-line value that cannot work, found before anything runs (exit 2)."""


def check_run_name(name: str, flag: str = "--name") -> None:
    """A run, sweep or group name becomes a path under the storage and an MLflow tag that searches filter
    on: relative, without empty, ``.`` or ``..`` parts (which would leave the storage), backslashes or
    control characters, and not with both quote characters."""
    if not name:
        return
    parts = name.split("/")
    if (any(p in ("", ".", "..") for p in parts) or "\\" in name or len(name) > 200
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise UsageError(f"{flag} {name!r}: a name is a relative path of at most 200 characters, without empty, '.' "
                         "or '..' parts, backslashes or control characters")
    if "'" in name and '"' in name:
        raise UsageError(f"{flag} {name!r}: a name may contain ' or \", not both (MLflow cannot search for it)")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_dir_target(path: str, flag: str) -> None:
    """``path`` is a local directory that will be made (with its parents) or written into: it is not a
    file, and the nearest part of it that exists is a writable directory. URIs are left to the store."""
    if not path or "://" in path:
        return
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {base} is not writable")


def check_storage(storage: str) -> None:
    """The checkpoint storage (``--storage``, else ``$EBM_STORAGE_PATH``, else ``./runs``) can be made or
    written into: a file there would fail the run at its first checkpoint, after an epoch of training."""
    env = os.environ.get("EBM_STORAGE_PATH", "")
    check_dir_target(storage or env or "runs", "--storage" if storage else "$EBM_STORAGE_PATH" if env else
                     "the default storage")


def check_file_target(path: str, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """``path`` is a local file that will be written (its folder made if need be): a known suffix, not a
    directory, and its folder can be made or written into."""
    p = Path(path).expanduser()
    if suffixes and p.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: the file must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}"
                         if len(suffixes) > 1 else f"{flag} {path}: the file must end in {suffixes[0]}")
    if p.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{flag} {path}: is not writable")
    check_dir_target(str(p.absolute().parent), flag)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (the first non-empty line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    from cluster.cli import add_cluster_commands
    from pipelines.cli.data import add_data_commands
    from pipelines.cli.models import add_model_commands
    from pipelines.cli.results import add_results_command
    from pipelines.cli.train import add_train_command
    from pipelines.cli.tune import add_tune_command
    ap = argparse.ArgumentParser(prog="ebm", description="Energy-based regression with learned proposals.",
                                 epilog=EPILOG)
    ap.add_argument("--version", action="version", version=version_line())
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="more output: Ray's, Ray Train's and MLflow's INFO lines (-vv: DEBUG); anywhere before --")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="only errors and results: no progress or per-epoch lines; anywhere before --")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_command(sub)
    add_data_commands(sub)
    add_tune_command(sub)
    add_model_commands(sub)
    add_results_command(sub)
    add_cluster_commands(sub)
    return ap


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    """``env`` set for the length of one command (main() also runs in-process, e.g. from tests)."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while a command runs, so that every command stops the way it
    does on Ctrl-C (runs marked KILLED, temporary files removed) and exits 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def version_line() -> str:
    from importlib import metadata

    def v(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"
    return (f"ebm {v('ebm-proposals')} (torch {v('torch')}, ray {v('ray')}, mlflow {v('mlflow')}, "
            f"pyarrow {v('pyarrow')}, python {sys.version.split()[0]})")


def _verbosity(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """-v/-vv/--verbose and -q/--quiet anywhere before ``--`` (the rest belongs to a submitted command)
    set the console's level for every layer ($EBM_LOG_LEVEL, $EBM_QUIET); -> (argv without them, the
    environment to set). ``data ingest --quiet`` keeps its own meaning (no progress) as well."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    verbose = sum(2 if a == "-vv" else 1 for a in head if a in ("-v", "-vv", "--verbose"))
    quiet = any(a in ("-q", "--quiet") for a in head)
    if verbose and quiet:
        raise UsageError("give -v or -q, not both")
    env = {}
    if verbose:
        env["EBM_LOG_LEVEL"] = "DEBUG" if verbose > 1 else "INFO"
    if quiet:
        env.update(EBM_LOG_LEVEL="ERROR", EBM_QUIET="1")
    keep = [a for a in head if a not in ("-v", "-vv", "--verbose", "-q")]
    if "--quiet" in keep and keep[:2] != ["data", "ingest"]:
        keep.remove("--quiet")
    return keep + tail, env


def quiet() -> bool:
    """-q: no progress or per-epoch lines."""
    return os.environ.get("EBM_QUIET") == "1"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pipelines._packages import clash
    problem = clash()
    if problem:
        print(f"ebm: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        argv, env = _verbosity(argv)
    except UsageError as e:
        print(f"ebm: {e}", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)       # a usage error: argparse exits 2
    with _sigterm_as_interrupt(), _environ(env):
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"ebm {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except UsageError as e:
            print(f"ebm {args.command}: {e}", file=sys.stderr)
            return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
