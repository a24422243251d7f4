"""Continue finished runs to more epochs: each FINISHED run of the matching groups that trained fewer
than ``--epochs`` epochs is resumed from its last checkpoint with ``ebm train ... --resume RUN_NAME --set
optim.epochs=N`` — the run's own recorded command (tag ``ebm.command``) for its one seed, so the config
is the run's and only the epochs change. The same MLflow run continues (its validation curve goes on,
``eval.select = "best_val"`` keeps its best epoch so far, the tag ``ebm.param.optim.epochs`` says the new
length). Issue 16: an image cell whose best validation epoch sits in the last fifth was still improving.

Runs are split over ``--queues`` queues (one process each, one torch thread, nice 19; queue N's output
in ``results/logs/extend.qN.log``), in the order of the groups and seeds; a FINISHED run already at ``--epochs`` is skipped and a run an earlier extension
left KILLED or FAILED is continued from its latest checkpoint, so the same command picks up after an
interruption (until then the export lists such a run as unfinished). Needs the runs' checkpoints (``./runs``, where ``results/run_cells.sh`` trained them).

    results/run_issue16.sh extend 60 'star/conv_*'          # in its own niced session, then exported
    .venv/bin/python results/extend_runs.py --epochs 45 --set optim.lr=1e-4 --groups 'star/conv_*' --dry-run

``--set KEY=VALUE`` changes the config for the added epochs (a step decay of the learning rate, say);
the resumed run records the change (tags ``ebm.config_change.<epochs before it>`` and ``ebm.param.<key>``; the tables show the lr schedule).

``--interrupted`` (no ``--epochs``): continue the runs of the groups that an interruption stopped — KILLED
ones, and RUNNING ones no process of this machine trains any more (their trainer was ended with the
session or the machine; they are marked KILLED first) — each to its own recorded length and config,
unless a FINISHED run of the same group and seed exists. It refuses while an ``ebm train`` of those
groups runs here (the store is this machine's). ``results/run_issue16.sh BATCH`` starts with it. A run
stopped before its first checkpoint was written has nothing to continue from: it is left KILLED (the
export lists it as unfinished) and named, and the batch trains its seed again as a new run.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def check_changes(changes: list[str]) -> None:
    """ValueError unless every change is KEY=VALUE for a key the extension may change."""
    for c in changes:
        if "=" not in c or c.split("=", 1)[0] in ("seed", "optim.epochs"):
            raise ValueError(f"--set {c}: expected KEY=VALUE for a key other than seed and optim.epochs "
                             "(the run's seed is kept; --epochs sets the length)")


def resume_command(command: str, run_name: str, seed: str, epochs: int, changes: list[str] = ()) -> list[str]:
    """A run's recorded ``ebm train ... --seeds K --set seed=S0 ...`` for its one seed, resumed to ``epochs``;
    ``changes`` (KEY=VALUE, e.g. ``optim.lr=1e-4`` for a step decay) replace the recorded values and are
    let through by ``--allow-config-change`` (the run records them: ebm.config_change, ebm.param.<key>)."""
    check_changes(changes)
    words = shlex.split(command)
    if words[:2] != ["ebm", "train"] or "--local" not in words:
        raise ValueError(f"not an `ebm train --local` command: {command}")
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w.split("=", 1)[0] in ("--seeds", "--resume", "--name"):
            i += 1 if "=" in w else 2
            continue
        if w.startswith("--set="):
            w, words[i + 1:i + 1] = "--set", [w[len("--set="):]]
        if w == "--set" and i + 1 < len(words):
            key = words[i + 1].split("=", 1)[0]
            if key in {c.split("=", 1)[0] for c in changes}:
                pass                                    # replaced by the change, added below
            elif key == "seed":
                out += ["--set", f"seed={seed}"]
            elif key == "optim.epochs":
                out += ["--set", f"optim.epochs={epochs}"]
            else:
                out += words[i:i + 2]
            i += 2
            continue
        out.append(w)
        i += 1
    if not any(a.startswith("optim.epochs=") for a in out):
        out += ["--set", f"optim.epochs={epochs}"]
    if not any(a.startswith("seed=") for a in out):
        out += ["--set", f"seed={seed}"]
    for c in changes:
        out += ["--set", c]
    return out + (["--allow-config-change"] if changes else []) + ["--resume", run_name]


def live_trainers(groups: list[str]) -> list[tuple[int, str]]:
    """(pid, command line) of the ``ebm train`` processes on this machine whose ``--group`` matches one
    of ``groups`` (glob patterns), or that resume a run of such a group (``--resume GROUP-...``)."""
    import fnmatch
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "train" not in argv or not any(a.endswith("ebm") for a in argv[:3]):
            continue
        names = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--group", "--resume")]
        if any(fnmatch.fnmatchcase(n.rsplit("-seed", 1)[0], p) or fnmatch.fnmatchcase(n, p) for n in names for p in groups):
            found.append((int(d.name), " ".join(argv).strip()))
    return found


def interrupted(records: list, groups: list[str]) -> tuple[list, list]:
    """-> (runs to continue: KILLED or RUNNING runs of ``groups`` with no FINISHED run of the same group
    and seed, RUNNING ones among them to be marked KILLED first). Each is continued to its own recorded
    length with its recorded values (the ``ebm.param.<key>`` tags of earlier resumes)."""
    import fnmatch

    from pipelines.driver.results import GROUP_TAG
    ours = [r for r in records if any(fnmatch.fnmatchcase(r.tags.get(GROUP_TAG, ""), p) for p in groups)]
    done = {(r.tags[GROUP_TAG], r.params.get("seed")) for r in ours if r.status == "FINISHED"}
    todo = [r for r in ours if r.status in ("KILLED", "RUNNING") and (r.tags[GROUP_TAG], r.params.get("seed")) not in done]
    return todo, [r for r in todo if r.status == "RUNNING"]


def checkpoint_root(command: str) -> str:
    """Where the run of a recorded ``ebm train`` command keeps its checkpoints: its ``--storage`` as the
    CLI's own parser reads it, resolved by the trainer's rule (``storage_root``: else $EBM_STORAGE_PATH,
    else ``./runs``) from the repository root, where the queues run it."""
    import contextlib

    from pipelines.cli import build_parser
    from pipelines.driver.runs import storage_root
    args, _ = build_parser().parse_known_args(shlex.split(command)[1:])
    with contextlib.chdir(ROOT):
        return storage_root(getattr(args, "storage", "") or None)


def recorded_changes(r) -> list[str]:
    """KEY=VALUE for every value an earlier resume changed (tags ``ebm.param.<key>``), epochs aside."""
    from pipelines.tracking import PARAM_TAG_PREFIX
    return [f"{k[len(PARAM_TAG_PREFIX):]}={v}" for k, v in sorted(r.tags.items())
            if k.startswith(PARAM_TAG_PREFIX) and k != PARAM_TAG_PREFIX + "optim.epochs"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///results/mlruns.db")
    ap.add_argument("--experiment", default="paper-claims")
    ap.add_argument("--groups", nargs="+", required=True, help="ebm.group glob patterns")
    ap.add_argument("--epochs", type=int, help="the runs' new length")
    ap.add_argument("--interrupted", action="store_true",
                    help="continue the runs an interruption stopped, each to its own length (no --epochs)")
    ap.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                    help="a config change for the added epochs (e.g. optim.lr=1e-4: a step decay), recorded on the run")
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--logs", default="results/logs", help="queue N's training output goes to LOGS/extend.qN.log")
    args = ap.parse_args()
    args.groups = list(dict.fromkeys(args.groups))          # a batch's two queues may name the same task

    import fnmatch

    from pipelines import tracking
    from pipelines.driver.results import GROUP_TAG, fetch_records
    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        check_changes(args.changes)
    except ValueError as e:
        ap.error(str(e))
    if args.interrupted == (args.epochs is not None) or (args.interrupted and args.changes):
        ap.error("give --epochs N (with --set changes), or --interrupted alone")
    if args.interrupted:
        return continue_interrupted(args, uri)
    todo, skipped = [], 0
    # FINISHED runs shorter than N, and runs an earlier extension left KILLED or FAILED (their
    # ebm.param.optim.epochs tag already says N: they are continued from their latest checkpoint)
    records = [r for r in fetch_records(uri, args.experiment, missing_ok=True) if r.status in ("FINISHED", "KILLED", "FAILED")
               and any(fnmatch.fnmatchcase(r.tags.get(GROUP_TAG, ""), p) for p in args.groups)]
    for r in sorted(records, key=lambda r: (r.tags[GROUP_TAG], int(r.params.get("seed", "0")))):
        finished = r.status == "FINISHED" and int(r.params.get("optim.epochs", "0")) >= args.epochs
        if r.status == "FINISHED" and finished:
            skipped += 1
            continue
        if r.status != "FINISHED" and "ebm.param.optim.epochs" not in r.tags:
            continue                  # a run that failed before any extension: not this script's to continue
        cmd = resume_command(r.tags["ebm.command"], r.tags["ebm.run_name"], r.params["seed"], args.epochs, args.changes)
        todo.append((f"{r.tags[GROUP_TAG]} seed {r.params['seed']}" + ("" if r.status == "FINISHED"
                                                                       else f" ({r.status}, continued)"), cmd))
    print(f"{len(todo)} runs to continue to {args.epochs} epochs ({skipped} already there) in "
          f"{', '.join(args.groups)}", flush=True)
    return run_queues(args, todo)


def continue_interrupted(args, uri: str) -> int:
    from pipelines import tracking
    from pipelines.driver.results import GROUP_TAG, fetch_records
    from pipelines.driver.runs import STOP_REASON_TAG, latest_checkpoint
    live = live_trainers(args.groups)
    if live:
        print(f"an ebm train of {', '.join(args.groups)} runs on this machine (pid {live[0][0]}: {live[0][1][:200]}): "
              "its runs are not interrupted; nothing done")
        return 1
    todo, orphans = interrupted(fetch_records(uri, args.experiment, missing_ok=True), args.groups)
    # a run stopped before its first checkpoint was written has nothing to continue from
    bare = {r.run_id for r in todo
            if latest_checkpoint(checkpoint_root(r.tags["ebm.command"]), r.tags["ebm.run_name"]) is None}
    if orphans and not args.dry_run:
        c = tracking.open_client(uri)
        for r in orphans:
            c.set_tag(r.run_id, STOP_REASON_TAG, "interrupted: RUNNING with no trainer left on this machine (the "
                      "session or the machine ended); " + ("stopped before its first checkpoint, its seed trained "
                      "again as a new run" if r.run_id in bare else "continued from its latest checkpoint"))
            c.set_terminated(r.run_id, "KILLED")
    items, fresh = [], []
    for r in sorted(todo, key=lambda r: (r.tags[GROUP_TAG], int(r.params.get("seed", "0")))):
        if r.run_id in bare:
            fresh.append(f"{r.tags[GROUP_TAG]} seed {r.params['seed']} ({r.tags['ebm.run_name']})")
            continue
        items.append((f"{r.tags[GROUP_TAG]} seed {r.params['seed']} ({r.status}, continued to {r.params['optim.epochs']})",
                      resume_command(r.tags["ebm.command"], r.tags["ebm.run_name"], r.params["seed"],
                                     int(r.params["optim.epochs"]), recorded_changes(r))))
    print(f"{len(items)} interrupted runs to continue in {', '.join(args.groups)} ({len(orphans)} left RUNNING "
          f"{'would be' if args.dry_run else 'were'} marked KILLED)", flush=True)
    for what in fresh:
        print(f"{what}: stopped before its first checkpoint, nothing to continue from; left KILLED, "
              "its seed is trained again as a new run", flush=True)
    return run_queues(args, items)


def run_queues(args, todo: list) -> int:
    """Run the (description, command) items over ``args.queues`` queues; 1 if any failed."""
    if args.dry_run or not todo:
        for what, cmd in todo:
            print(f"{what}: {shlex.join(cmd)}")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ebm = str(Path(sys.executable).parent / "ebm")
    failed = []

    logs = ROOT / args.logs
    logs.mkdir(parents=True, exist_ok=True)

    def queue(n, items):
        with open(logs / f"extend.q{n}.log", "a") as log:
            for what, cmd in items:
                for out in (sys.stdout, log):
                    print(f"=== {what}: {shlex.join(cmd)}", file=out, flush=True)
                rc = subprocess.run(["nice", "-n", "19", ebm, *cmd[1:]], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT).returncode
                for out in (sys.stdout, log):
                    print(f"=== {what}: rc={rc}", file=out, flush=True)
                if rc:
                    failed.append(what)

    threads = [threading.Thread(target=queue, args=(q + 1, todo[q::args.queues])) for q in range(args.queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
