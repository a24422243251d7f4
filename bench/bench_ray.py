"""Ray Train overhead benchmark (issues 4 and 15). Prints, in one run:

1. train examples/s of one epoch in the plain single-process loop (``ebm.loop.fit``) and of the same
   epoch inside a 1-worker Ray Train job (DDP wrapper, all-reduced NaN check, per-epoch report and
   checkpoint), both with 1 torch thread, and their ratio (goal <= 1.05);
2. the same for 2 workers with 1 thread each, and the speed-up over 1 worker;
3. the start-up of ``ebm train CONFIG --num-workers 1`` as a user runs it (a fresh process that starts
   its own local Ray): from the process's launch to the first training step, goal <= 10 s, split
   into phases by timestamps. The command runs under a tracing driver (``--trace-driver``, this file)
   that wraps the driver's steps and the worker function from outside — no timing code in
   ``pipelines/``. Skip it with ``--no-startup``. With ``--startup-cluster`` also the start-up of two
   jobs in a row on an already-running Ray (a loopback head started beforehand, as a user's cluster
   is): ``ebm train ... --ray-address HOST:PORT``, the case of a job sent to a real cluster.

Throughput is measured over the last of ``--epochs`` epochs (the first warms up), training steps
only (``run_epoch``'s examples/s; evaluation and checkpoint writing are reported separately as the
whole job's wall time). Usage: ``python bench/bench_ray.py [--n-train 4096] [--config demo]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.time()     # the tracing driver's first timestamp (before any heavy import)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cfg(args):
    from ebm.config import Config
    from pipelines.configs import resolve_config
    return Config.from_toml(resolve_config(args.config), [
        f"task.n_train={args.n_train}", "task.n_val=64", "task.n_test=64", f"optim.epochs={args.epochs}",
        f"sampler.M_train={args.m_train}", f"eval.every={args.epochs}", "eval.grid_nll=false"] + args.set)


def plain(cfg) -> tuple[float, float]:
    import torch

    from ebm.loop import fit
    from pipelines.worker.runtime import tune_malloc
    tune_malloc()           # as train_local and every Ray worker do
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = fit(cfg)
    return res.history[-1]["examples_per_s"], time.perf_counter() - t0


def ray_job(cfg, workers: int, tmp: str) -> tuple[float, float]:
    from pipelines.driver.train_job import run_job
    t0 = time.perf_counter()
    m = run_job(cfg, name=f"bench-{workers}w-{time.time_ns()}", num_workers=workers, storage_path=f"{tmp}/runs",
                tracking_uri=f"sqlite:///{tmp}/mlruns.db", cpus_per_worker=1.0, threads=1)
    return m["examples_per_s"], time.perf_counter() - t0


def _process_start() -> float:
    """This process's start (wall clock) from /proc: Linux only, which this bench is run on."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    return boot + start / ticks


def _tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and all its descendants, the
    reaped ones included (their parents' cutime/cstime): the Ray processes a driver starts are its
    descendants, so this is the job's CPU, which the machine's other load does not inflate."""
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(d.name)] = (int(f[1]), sum(int(v) for v in f[11:15]))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def _mark(path: str, name: str, t: float | None = None) -> None:
    root = int(os.environ.get("EBM_BENCH_DRIVER_PID", os.getpid()))
    cpu = None if t is not None else _tree_cpu_s(root)
    with open(path, "a") as f:
        f.write(json.dumps({"name": name, "t": time.time() if t is None else t, "cpu": cpu, "pid": os.getpid()}) + "\n")


def _timed(path: str, name: str, fn):
    def wrapper(*a, **kw):
        _mark(path, f"{name} start")
        try:
            return fn(*a, **kw)
        finally:
            _mark(path, f"{name} end")
    return wrapper


def _traced_worker(path: str):
    """The production worker function, marking its process's start, its entry, data ready and the
    first batch handed to the first step (pickled by value: this file is __main__)."""
    def worker(config: dict, runtime=None):
        _mark(path, "worker process started", _process_start())
        _mark(path, "worker function entered")
        import pipelines.worker.data as wd
        from pipelines.worker.loop import train_worker
        original = wd.for_rank

        def for_rank(*a, **kw):
            data = original(*a, **kw)
            _mark(path, "worker data ready")
            inner, seen = data.train_epoch, []

            def first_marked(epoch, seed):
                for i, batch in enumerate(inner(epoch, seed)):
                    if not seen:
                        seen.append(1)
                        _mark(path, "first training step")
                    yield batch
            data.train_epoch = first_marked
            return data
        wd.for_rank = for_rank
        return train_worker(config, runtime)
    return worker


def trace_driver(path: str, argv: list[str]) -> int:
    """``ebm ARGV`` in this process with the driver's steps timed (see the module docstring)."""
    os.environ["EBM_BENCH_DRIVER_PID"] = str(os.getpid())     # inherited by Ray's processes: the tree's root
    _mark(path, "driver process started", _process_start())
    _mark(path, "bench module loaded", T_PROCESS)
    from pipelines import cli
    _mark(path, "ebm CLI imported")
    import pipelines.driver.train_job as tj
    import pipelines.tracking as tracking
    import pipelines.worker.data as wd
    import pipelines.worker.loop as loop
    _mark(path, "driver modules imported")
    tj.ray_init = _timed(path, "ray.init", tj.ray_init)
    wd.prepare_dataset = _timed(path, "prepare_dataset", wd.prepare_dataset)
    tracking.check_reachable = _timed(path, "MLflow check", tracking.check_reachable)
    tracking.start_run = _timed(path, "MLflow run created", tracking.start_run)
    loop.worker_loop = _traced_worker(path)
    build = tj.build_trainer

    def build_trainer(*a, **kw):
        _mark(path, "build_trainer start")
        trainer = build(*a, **kw)
        _mark(path, "build_trainer end")
        trainer.fit = _timed(path, "trainer.fit", trainer.fit)
        return trainer
    tj.build_trainer = build_trainer
    return cli.main(argv)


def startup(args, tmp: str, address: str = "", env: dict | None = None,
            tag: str = "") -> list[tuple[str, float, float | None]]:
    """Run ``ebm train`` under the tracing driver (on the Ray at ``address``, else its own local Ray);
    -> [(event, seconds since launch, CPU seconds the job's processes had used by then)]. On a running
    cluster Ray's processes are the cluster's, not the driver's descendants: no CPU column there."""
    trace = f"{tmp}/trace{tag}.jsonl"
    cmd = [sys.executable, __file__, "--trace-driver", trace, "--", "-q", "train", args.config,
           "--num-workers", "1", "--threads", "1", "--storage", f"{tmp}/runs-startup",
           "--tracking-uri", f"sqlite:///{tmp}/startup.db"] + (["--ray-address", address] if address else [])
    for o in [f"task.n_train={args.n_train}", "task.n_val=64", "task.n_test=64", "optim.epochs=1",
              f"sampler.M_train={args.m_train}", "eval.grid_nll=false"] + args.set:
        cmd += ["--set", o]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    events = [json.loads(line) for line in Path(trace).read_text().splitlines()]
    return [(e["name"], e["t"] - t0, None if address else e["cpu"]) for e in sorted(events, key=lambda e: e["t"])]


def startup_on_cluster(args, tmp: str) -> list[list[tuple[str, float, float | None]]]:
    """Two traced jobs in a row on a Ray head started beforehand (tests/clusterlab.py's loopback head,
    stopped by its pid afterwards)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import clusterlab
    with clusterlab.loopback_head(Path(tmp)) as head:
        return [startup(args, tmp, head["gcs"], head["env"], tag=f"-cluster{i}") for i in (1, 2)]


def main() -> None:
    if "--trace-driver" in sys.argv:
        i = sys.argv.index("--trace-driver")
        sys.exit(trace_driver(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="debug")
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--m-train", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--no-startup", action="store_true", help="skip the ebm train start-up trace")
    ap.add_argument("--startup-only", action="store_true", help="only the ebm train start-up trace")
    ap.add_argument("--startup-cluster", action="store_true",
                    help="also trace the start-up of two jobs on an already-running Ray head")
    args = ap.parse_args()
    cfg = _cfg(args)
    events, cluster = [], []
    if not args.no_startup:
        with tempfile.TemporaryDirectory() as tmp:
            events = startup(args, tmp)
        if args.startup_cluster:
            with tempfile.TemporaryDirectory() as tmp:
                cluster = startup_on_cluster(args, tmp)
    if args.startup_only:
        _print_startup(args, events, cluster)
        return
    import ray
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             object_store_memory=200 * 1024 ** 2, log_to_driver=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            p_rate, p_wall = plain(cfg)
            r1, w1 = ray_job(cfg, 1, tmp)
            r2, w2 = ray_job(cfg, 2, tmp)
    finally:
        ray.shutdown()
    print(f"config {args.config}: n_train {args.n_train}, M_train {args.m_train}, batch {cfg.optim.batch_size}, "
          f"{args.epochs} epochs; last epoch's training steps, 1 torch thread per process")
    print(f"plain loop          {p_rate:9.0f} ex/s   (whole fit {p_wall:.1f} s)")
    print(f"Ray Train, 1 worker {r1:9.0f} ex/s   (whole job {w1:.1f} s incl. start-up, eval, checkpoints)")
    print(f"Ray Train, 2 workers{r2:9.0f} ex/s   (whole job {w2:.1f} s)")
    print(f"1-worker epoch time / plain epoch time: {p_rate / r1:.3f}x (goal <= 1.05)")
    print(f"2 workers vs 1 worker speed-up: {r2 / r1:.2f}x")
    _print_startup(args, events, cluster)


def _first_step(events) -> tuple[float, float | None]:
    return next(((t, cpu) for name, t, cpu in events if name == "first training step"), (float("nan"), None))


def _print_startup(args, events, cluster=()) -> None:
    if events:
        print(f"start-up of `ebm train {args.config} --num-workers 1` (its own local Ray): wall seconds since "
              f"launch, and CPU seconds used by the job's processes by then (the machine's other load inflates "
              f"the first, hardly the second)")
        for name, t, cpu in events:
            print(f"  {t:7.2f} s  " + (f"{cpu:7.2f} CPU-s" if cpu is not None else " " * 13) + f"  {name}")
        t, cpu = _first_step(events)
        print(f"launch -> first training step: {t:.1f} s wall, {cpu or float('nan'):.1f} CPU-s (goal <= 10 s wall)")
    for i, ev in enumerate(cluster, 1):
        print(f"start-up of job {i} of 2 on an already-running Ray (`--ray-address`; wall seconds since launch):")
        for name, t, _ in ev:
            print(f"  {t:7.2f} s  {name}")
    if cluster:
        firsts = [_first_step(ev)[0] for ev in [events, *cluster] if ev]
        print("launch -> first training step: " + " | ".join(
            f"{w} {t:.1f} s" for w, t in zip((["own local Ray"] if events else []) + ["cluster job 1", "cluster job 2"],
                                             firsts)) + " (goal <= 10 s wall)")


if __name__ == "__main__":
    main()
