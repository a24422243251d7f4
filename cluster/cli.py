"""``ebm submit`` and ``ebm jobs``: the ``ebm`` command's cluster subcommands.

This package stands apart: it submits the ``ebm`` command as a string (as ``ray job submit -- python
train.py`` does) and imports neither ``ebm`` nor ``pipelines``; ``pipelines.cli`` adds these
subcommands to the ``ebm`` parser.
"""
from __future__ import annotations

import argparse
import os
import sys


DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _address(args) -> tuple[str, str]:
    """(address, where it came from): --address, then $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS."""
    if args.address:
        return args.address, "--address"
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    return DEFAULT_ADDRESS, "the default address"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _names(paths: list[str], n: int = 12) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _report(working_dir: str):
    def report(s) -> None:
        print(f"uploading {s.n_files} files ({_mib(s.total_bytes)}) from {os.path.abspath(working_dir)}", flush=True)
        if s.left_out:
            print(f"left out as likely secrets: {_names(s.left_out)} (send one with --allow-secrets PATTERN)",
                  flush=True)
        if s.allowed:
            print(f"sending likely secrets (--allow-secrets): {_names(s.allowed)}", flush=True)
    return report


def _submit(args) -> int:
    from cluster import jobs
    cmd = list(args.command_)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    address, sid = "", None
    try:
        address, source = _address(args)
        address = jobs.check_address(address, source)
        sid = jobs.submit(address, cmd, working_dir=args.working_dir,
                          excludes=list(jobs.DEFAULT_EXCLUDES) + args.exclude, allow_secrets=args.allow_secrets,
                          max_upload=int(args.max_upload_mb * 2**20), storage=args.storage, shared_fs=args.shared_fs,
                          submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                          report=_report(args.working_dir))
        print(f"submitted {sid} to {address}", flush=True)
        if args.no_wait:
            return 0
        status = jobs.follow(address, sid)
    except jobs.SubmitError as e:
        print(f"ebm submit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if sid is None:
            print("ebm submit: interrupted; nothing was submitted", file=sys.stderr)
            return 130
        print(f"ebm submit: stopped following; job {sid} keeps running (ebm jobs logs {sid} --follow, "
              f"ebm jobs stop {sid})", file=sys.stderr)
        return 130
    print(f"job {sid}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _jobs(args) -> int:
    from cluster import jobs
    try:
        address, source = _address(args)
        address = jobs.check_address(address, source)
        if args.action == "list":
            for j in sorted(jobs.list_jobs(address), key=lambda j: j.start_time or 0):
                print(f"{j.submission_id}\t{j.status}\t{j.entrypoint}")
            return 0
        if not args.id:
            print(f"ebm jobs {args.action}: give a submission id", file=sys.stderr)
            return 2
        if args.action == "status":
            info = jobs.status(address, args.id)
            print(f"{args.id}\t{info.status}\t{info.message or ''}")
        elif args.action == "logs":
            if args.follow:
                status = jobs.follow(address, args.id)
                print(f"job {args.id}: {status}")
            else:
                print(jobs.logs(address, args.id), end="")
        elif args.action == "stop":
            stopped, status = jobs.stop(address, args.id)
            print(f"stop requested for {args.id}" if stopped
                  else f"job {args.id} already ended ({status}); nothing to stop")
    except jobs.SubmitError as e:
        print(f"ebm jobs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ebm jobs: interrupted; job {args.id} is not affected", file=sys.stderr)
        return 130
    return 0


def add_cluster_commands(sub) -> None:
    sp = sub.add_parser("submit", help="run an ebm command as a job on a Ray cluster",
                        description="ebm submit [options] -- ebm train CONFIG ...")
    sp.add_argument("--address", default="",
                    help=f"job server URL (default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    sp.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                    help="also leave out (gitignore syntax, relative to the working dir; repeatable)")
    sp.add_argument("--allow-secrets", action="append", default=[], metavar="PATTERN",
                    help="send the likely secrets matching PATTERN anyway (gitignore syntax, relative to the working "
                         "dir; repeatable); a pattern that matches no likely secret is refused")
    sp.add_argument("--max-upload-mb", type=float, default=100.0, help="refuse larger uploads before sending")
    sp.add_argument("--storage", default="", help="checkpoint storage for the job (s3://..., or a shared path)")
    sp.add_argument("--shared-fs", action="store_true", help="the local --storage path is shared by every node")
    sp.add_argument("--submission-id", default=None, help="letters, digits, '_', '.', '-'; must be new")
    sp.add_argument("--entrypoint-num-cpus", type=float, default=None)
    sp.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    sp.add_argument("command_", nargs=argparse.REMAINDER, metavar="-- COMMAND")
    sp.set_defaults(func=_submit)
    jp = sub.add_parser("jobs", help="list, inspect, follow or stop cluster jobs")
    jp.add_argument("action", choices=("list", "status", "logs", "stop"))
    jp.add_argument("id", nargs="?", default="")
    jp.add_argument("--address", default="")
    jp.add_argument("--follow", action="store_true", help="with logs: follow until the job ends")
    jp.set_defaults(func=_jobs)
