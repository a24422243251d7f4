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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default="sqlite:///results/mlruns.db")
    ap.add_argument("--experiment", default="paper-claims")
    ap.add_argument("--groups", nargs="+", required=True, help="ebm.group glob patterns")
    ap.add_argument("--epochs", type=int, required=True, help="the runs' new length")
    ap.add_argument("--set", dest="changes", action="append", default=[], metavar="KEY=VALUE",
                    help="a config change for the added epochs (e.g. optim.lr=1e-4: a step decay), recorded on the run")
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--logs", default="results/logs", help="queue N's training output goes to LOGS/extend.qN.log")
    args = ap.parse_args()

    import fnmatch

    from pipelines import tracking
    from pipelines.driver.results import GROUP_TAG, fetch_records
    uri = tracking.resolve_uri(args.tracking_uri)
    try:
        check_changes(args.changes)
    except ValueError as e:
        ap.error(str(e))
    todo, skipped = [], 0
    # FINISHED runs shorter than N, and runs an earlier extension left KILLED or FAILED (their
    # ebm.param.optim.epochs tag already says N: they are continued from their latest checkpoint)
    records = [r for r in fetch_records(uri, args.experiment) if r.status in ("FINISHED", "KILLED", "FAILED")
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
