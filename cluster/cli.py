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


def _address(args) -> str:
    return args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _submit(args) -> int:
    from cluster import jobs
    cmd = list(args.command_)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        sid = jobs.submit(_address(args), cmd, working_dir=args.working_dir,
                          excludes=list(jobs.DEFAULT_EXCLUDES) + args.exclude,
                          max_upload=int(args.max_upload_mb * 2**20), storage=args.storage, shared_fs=args.shared_fs,
                          submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus)
    except jobs.SubmitError as e:
        print(f"ebm submit: {e}", file=sys.stderr)
        return 2
    print(f"submitted {sid} to {_address(args)}", flush=True)
    if args.no_wait:
        return 0
    status = jobs.follow(_address(args), sid)
    print(f"job {sid}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _jobs(args) -> int:
    from cluster import jobs
    try:
        c = jobs.client(_address(args))
    except jobs.SubmitError as e:
        print(f"ebm jobs: {e}", file=sys.stderr)
        return 2
    if args.action == "list":
        for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id}\t{j.status}\t{j.entrypoint}")
        return 0
    if not args.id:
        print(f"ebm jobs {args.action}: give a submission id", file=sys.stderr)
        return 2
    if args.action == "status":
        info = c.get_job_info(args.id)
        print(f"{args.id}\t{info.status}\t{info.message or ''}")
    elif args.action == "logs":
        if args.follow:
            status = jobs.follow(_address(args), args.id)
            print(f"job {args.id}: {status}")
        else:
            print(c.get_job_logs(args.id), end="")
    elif args.action == "stop":
        print(f"stop requested: {c.stop_job(args.id)}")
    return 0


def add_cluster_commands(sub) -> None:
    sp = sub.add_parser("submit", help="run an ebm command as a job on a Ray cluster",
                        description="ebm submit [options] -- ebm train CONFIG ...")
    sp.add_argument("--address", default="", help=f"job server URL (default $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    sp.add_argument("--working-dir", default=".", help="uploaded as the job's working directory")
    sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="also leave out (repeatable)")
    sp.add_argument("--max-upload-mb", type=float, default=100.0, help="refuse larger uploads before sending")
    sp.add_argument("--storage", default="", help="checkpoint storage for the job (s3://..., or a shared path)")
    sp.add_argument("--shared-fs", action="store_true", help="the local --storage path is shared by every node")
    sp.add_argument("--submission-id", default=None)
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
