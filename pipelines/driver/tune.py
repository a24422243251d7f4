"""``ebm tune``: Ray Tune over the training job, one MLflow parent run per sweep.

Each trial is one training job through the worker function of ``ebm train``
(:func:`pipelines.worker.loop.worker_loop`), run by the function trainable :func:`train_trial`. A
1-worker trial runs it in the trial's own process (:mod:`pipelines.driver.trial`): no nested Train
controller and worker group to start, so a short trial no longer pays tens of seconds before its
first step. A multi-worker trial builds the same ``TorchTrainer`` as ``ebm train`` and forwards its
reports to Tune with ``TuneReportCallback`` (Ray 2.60: ``Tuner(trainer)`` is gone); its trial driver
holds a sliver of a ``TRAIN_DRIVER`` custom resource instead of a CPU (with 2 CPUs a driver at 1 CPU
plus its workers never fit). Either way the trial's checkpoints live under
``STORAGE/<sweep>-train/<sweep>-<trial id>`` and its MLflow child run is named ``<sweep>-<trial id>``,
so a resumed sweep (``--resume``) that reruns an errored trial continues from its latest checkpoint
and reopens the same MLflow run — no duplicates — while finished trials are not rerun
(``Tuner.restore``). ``--max-failures``: restarts of a multi-worker trial's worker group, or
retries of a 1-worker trial by Tune (from its latest checkpoint).

Search-space file (TOML)::

    [space]                                   # keys are flat config keys (ebm.config)
    "proposal.K" = {grid = [1, 2, 4, 8, 16]}  # every value (a grid axis)
    "sampler.M_train" = {choice = [64, 256, 1024, 2048]}   # one at random per sample
    "sampler.M_eval" = {grid = [256, 1024]}
    "optim.lr" = {loguniform = [1e-4, 1e-2]}  # also: uniform = [lo, hi], randint = [lo, hi), value = v
    "method.name" = {choice = ["ebm_learned_proposal", "mdn"]}

    [tune]                                    # optional; command-line flags win
    scheduler = "asha"                        # or "fifo"
    num_samples = 1                           # repeats of the grid (random keys re-drawn)
    metric = "val_nll"
    grace_period = 1                          # ASHA: epochs before the first cut
    reduction_factor = 2
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ebm.config import Config, ConfigError, read_toml

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint", "value")
TUNE_KEYS = {"scheduler": str, "num_samples": int, "metric": str, "mode": str, "grace_period": int,
             "reduction_factor": int}
SPEC_FILE = "ebm_sweep.json"


def load_space(path: str | Path, base: Config) -> tuple[dict, dict]:
    """Parse and check a space file against ``base``: every key exists and every value (or both ends
    of a range) makes a valid config. Returns (space {key: {kind: arg}}, tune options)."""
    d = read_toml(path, "space file")
    bad = sorted(set(d) - {"space", "tune"})
    if bad or not isinstance(d.get("space", {}), dict):
        raise ConfigError(f"{path}: only [space] and [tune] tables are allowed, got {bad or d.get('space')!r}")
    opts = d.get("tune", {})
    for k, v in opts.items():
        if k not in TUNE_KEYS or not isinstance(v, TUNE_KEYS[k]):
            raise ConfigError(f"{path}: [tune] {k} = {v!r}: known keys {sorted(TUNE_KEYS)} (with their types)")
    return check_space(d.get("space", {}), base, str(path)), opts


def check_space(space: dict, base: Config, where: str = "space") -> dict:
    flat = base.to_flat()
    for key, spec in space.items():
        if key not in flat:
            raise ConfigError(f"{where}: unknown config key {key!r}; known: {sorted(flat)}")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS):
            raise ConfigError(f"{where}: {key} must be one of {{kind = ...}} with kind in {SPACE_KINDS}, got {spec!r}")
        kind, arg = next(iter(spec.items()))
        if kind in ("grid", "choice"):
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}: {key}.{kind} must be a non-empty list, got {arg!r}")
            values = arg
        elif kind == "value":
            values = [arg]
        else:
            if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)
                    and arg[0] < arg[1]):
                raise ConfigError(f"{where}: {key}.{kind} must be [lo, hi] with lo < hi, got {arg!r}")
            if kind == "loguniform" and arg[0] <= 0:
                raise ConfigError(f"{where}: {key}.loguniform needs lo > 0, got {arg!r}")
            values = [arg[0], arg[1] - 1] if kind == "randint" else arg
        for v in values:
            try:
                Config.from_flat({**flat, key: v})
            except ConfigError as e:
                raise ConfigError(f"{where}: {key} = {v!r} is not a valid value: {e}") from None
    return space


def param_space(space: dict) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice, "value": lambda v: v,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](arg) for key, spec in space.items() for kind, arg in spec.items()}


def train_trial(config: dict, job: dict) -> None:
    """One trial = one training job. ``config``: the sampled flat config keys; ``job``: the sweep's
    constants (base config, MLflow, storage, resources, ``in_process``: train here rather than in a
    nested ``TorchTrainer``)."""
    import ray.tune

    from pipelines import tracking
    from pipelines.driver import runs
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = Config.from_flat({**job["cfg"], **config})
    name = f"{job['sweep']}-{trial_id}"
    uri = job["uri"]
    tags = {**job["tags"], "mlflow.parentRunId": job["parent_run_id"], "ebm.sweep": job["sweep"],
            "ebm.trial_id": trial_id, "seed": str(cfg.seed), "task": cfg.task.name, "method": cfg.method.name,
            "ebm.mode": "tune-in-process" if job.get("in_process") else "tune-ray-train"}
    # a rerun of an errored trial (a resumed sweep) continues from its checkpoint and reopens its MLflow run
    run_id = tracking.start_run(uri, job["experiment"], name, cfg.to_flat(), tags, cfg.to_toml(), reopen=True)
    runs.reopened(uri, run_id, runs.Plan())
    status = "FAILED"
    try:
        if job.get("in_process"):
            from pipelines.driver.trial import train_in_process
            train_in_process(cfg, name=name, uri=uri, run_id=run_id, job=job)
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            from pipelines.driver.train_job import build_trainer, finish_run, tracking_callback
            trainer = build_trainer(cfg, name=name, storage_path=job["train_storage"], num_workers=job["num_workers"],
                                    use_gpu=job["use_gpu"], cpus=job["cpus_per_worker"], threads=job["threads"],
                                    max_failures=job["max_failures"], keep=2, data_meta=job.get("data_meta"),
                                    callbacks=[tracking_callback(uri, run_id), TuneReportCallback()])
            finish_run(trainer.fit(), cfg, uri, run_id)
            runs.prune(job["train_storage"], name, 2)
        status = "FINISHED"
    except SystemExit:          # Tune stopping the trial (ASHA) at a report; tune_report closes the run
        status = "KILLED"
        raise
    except Exception as e:
        tracking.set_tag(uri, run_id, runs.STOP_REASON_TAG, str(e)[:5000])
        raise
    finally:
        tracking.end_run(uri, run_id, status)


def trial_resources(job: dict) -> dict:
    """A 1-worker trial in its own process holds its worker's resources; a multi-worker trial's
    driver holds a sliver of ``TRAIN_DRIVER`` (or of a CPU) and its Train workers the rest."""
    if job["in_process"]:
        return {"CPU": job["cpus_per_worker"], **({"GPU": 1} if job["use_gpu"] else {})}
    return _driver_resources()


def _driver_resources() -> dict:
    import ray
    return {"TRAIN_DRIVER": 0.01} if ray.cluster_resources().get("TRAIN_DRIVER") else {"CPU": 0.01}


def run_sweep(cfg: Config | None, *, name: str, space: dict | None = None, opts: dict | None = None,
              seeds: int = 0, resume: bool = False, storage_path: str | None = None, tracking_uri: str | None = None,
              experiment: str = "ebm", num_workers: int = 1, cpus_per_worker: float = 0.0, use_gpu: bool = False,
              threads: int = 1, max_concurrent: int = 1, max_failures: int = 1, address: str | None = None,
              register_name: str = "", alias: str = "champion", in_process: bool | None = None,
              out=None) -> dict:
    """Run (or resume) the sweep ``name``; returns the summary logged on the parent run.
    ``in_process``: train each trial in its own process (default: when ``num_workers == 1``); False
    keeps a nested 1-worker ``TorchTrainer`` (what every trial did before; benchmarks compare them)."""
    out = out or sys.stdout          # at call time: a default bound at import would keep a replaced stream
    from pipelines import tracking
    from pipelines.driver import tune_report
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    from pipelines import storage as fs
    from pipelines.driver import runs
    storage = runs.storage_root(storage_path)
    spec_path = fs.join(storage, name, SPEC_FILE)
    if resume:
        if not fs.is_file(spec_path):
            raise ConfigError(f"no sweep {name!r} to resume under {storage} ({spec_path} missing)")
        spec = json.loads(fs.read_bytes(spec_path))
    else:
        if fs.exists(spec_path):
            raise ConfigError(f"sweep {name!r} already exists under {storage}; resume it with --resume {name}")
        spec = {**_make_spec(cfg, space or {}, opts or {}, seeds), "name": name}
    from pipelines.worker.data import prepare_dataset
    base, task, identity = prepare_dataset(Config.from_flat(spec["cfg"]))    # a bad data_dir fails before Ray
    if spec.setdefault("data_fingerprint", identity.fingerprint) != identity.fingerprint:
        raise ConfigError(f"sweep {name!r} started on data {spec['data_fingerprint']}, {base.task.data_dir or base.task.name} "
                          f"is now {identity.fingerprint}: the dataset changed; start a new sweep")
    spec["cfg"] = base.to_flat()
    cpus = cpus_per_worker or (1.0 if use_gpu else 0.5)
    params = {"scheduler": spec["scheduler"], "metric": spec["metric"], "mode": spec["mode"],
              "num_samples": spec["num_samples"], "seeds": spec["seeds"], "num_workers": num_workers,
              "cpus_per_worker": cpus, **{f"space.{k}": json.dumps(v) for k, v in spec["space"].items()}}
    if spec["scheduler"] == "asha":
        params.update(grace_period=spec["grace_period"], reduction_factor=spec["reduction_factor"])
    if spec.get("parent_run_id"):       # a resumed sweep keeps its parent run, even a finished one
        parent = spec["parent_run_id"]
        tracking.open_client(uri).update_run(parent, status="RUNNING")
    else:
        parent = tracking.start_run(uri, experiment, name, params,
                                    {"ebm.kind": "sweep", "git_sha": tracking.git_sha(), "task": task.name,
                                     **tracking.package_versions()}, base.to_toml())
        spec["parent_run_id"] = parent
    job = {"cfg": spec["cfg"], "sweep": name, "uri": uri, "experiment": experiment, "parent_run_id": parent,
           "tags": {"git_sha": tracking.git_sha(), **identity.tags(), **tracking.package_versions()},
           "data_meta": identity.meta, "train_storage": fs.join(storage, f"{name}-train"), "num_workers": num_workers, "cpus_per_worker": cpus,
           "use_gpu": use_gpu, "threads": threads, "max_failures": max_failures,
           "in_process": num_workers == 1 if in_process is None else bool(in_process)}
    if job["in_process"] and num_workers != 1:
        raise ConfigError(f"a trial runs in its own process only with 1 worker, got num_workers={num_workers}")
    status, started = "FAILED", False
    import signal
    import threading
    previous_int = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        import ray
        from ray import tune
        from pipelines.driver.train_job import ray_init
        # TRAIN_DRIVER: the trial drivers' resource (see the module docstring)
        started = ray_init(address, resources={"TRAIN_DRIVER": 4})
        trainable = tune.with_resources(tune.with_parameters(train_trial, job=job), trial_resources(job))
        # an in-process trial is retried by Tune (a multi-worker trial's worker group by Ray Train)
        failure = tune.FailureConfig(max_failures=max_failures if job["in_process"] else 0)
        if resume:
            tuner = tune.Tuner.restore(fs.join(storage, name), trainable, resume_unfinished=True, resume_errored=True)
        else:
            fs.write_bytes(spec_path, json.dumps(spec, indent=1).encode())
            tuner = tune.Tuner(trainable, param_space=param_space(spec["space"]),
                               tune_config=tune.TuneConfig(metric=spec["metric"], mode=spec["mode"],
                                                           scheduler=_scheduler(spec, base),
                                                           num_samples=spec["num_samples"],
                                                           max_concurrent_trials=max_concurrent),
                               run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                                         failure_config=failure))
        t0 = time.perf_counter()
        grid = tuner.fit()
        summary = tune_report.finish(uri, parent, grid, spec, base, fs.join(storage, f"{name}-train"),
                                     time.perf_counter() - t0, out=out)
        if register_name and summary.get("best_run_id") and not summary["errors"]:
            from pipelines.serve import registry
            summary["registered"] = registry.register(uri, register_name, run_id=summary["best_run_id"], alias=alias)
            tracking.set_tag(uri, parent, "ebm.registered_model",
                             f"{register_name}/{summary['registered']['version']}")
            print(f"registered {summary['registered']['model_uri']} (version {summary['registered']['version']})",
                  file=out)
        status = "FINISHED" if not summary["errors"] else "FAILED"
        summary["parent_run_id"] = parent
        return summary
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)     # Tune/Train leave their own SIGINT handler behind
        tracking.end_run(uri, parent, status)
        if started:
            ray.shutdown()
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _make_spec(cfg: Config, space: dict, opts: dict, seeds: int) -> dict:
    if seeds:
        if space:
            raise ConfigError("--seeds runs one config under N seeds: give no search space with it")
        space = {"seed": {"grid": [cfg.seed + i for i in range(seeds)]}}
        opts = {**opts, "scheduler": "fifo"}        # every seed runs to the end (the reporting protocol)
    if not space:
        raise ConfigError("the search space is empty: give --space FILE or --seeds N")
    scheduler = opts.get("scheduler", "asha")
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"scheduler must be 'asha' or 'fifo', got {scheduler!r}")
    if scheduler == "asha" and cfg.eval.every != 1:
        # ASHA compares trials at every epoch: each report must carry a fresh validation NLL
        cfg = cfg.with_overrides(["eval.every=1"])
    return {"name": "", "cfg": cfg.to_flat(), "space": space, "scheduler": scheduler, "seeds": seeds,
            "num_samples": int(opts.get("num_samples", 1)), "metric": opts.get("metric", "val_nll"),
            "mode": opts.get("mode", "min"), "grace_period": int(opts.get("grace_period", 1)),
            "reduction_factor": int(opts.get("reduction_factor", 2))}


def _scheduler(spec: dict, base: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    if spec["scheduler"] == "fifo":
        return FIFOScheduler()
    # Trials that survive every rung end on their own (stop_last_trials=False): a stop at max_t would
    # kill the trial before it logs its final checkpoint (tune_report.close_runs recovers that case).
    return ASHAScheduler(time_attr="training_iteration", max_t=base.optim.epochs, stop_last_trials=False,
                         grace_period=spec["grace_period"], reduction_factor=spec["reduction_factor"])
