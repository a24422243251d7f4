"""The driver of a training job: validate -> MLflow run -> Ray -> TorchTrainer -> report -> clean up."""
from __future__ import annotations

import os
import signal
import sys
import time

from ebm.config import Config
from pipelines.driver import runs


def ray_init(address: str | None, num_cpus: int | None = None, resources: dict | None = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``, set inside a submitted job), else start a local
    Ray on 127.0.0.1; returns whether we started it (and so must shut it down)."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's and Ray Train's INFO lines (resource requests, worker-group start, every report) are for
    # debugging Ray; the console keeps WARNING and above unless EBM_LOG_LEVEL says otherwise (-v)
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level=log_level())
    if address:
        ray.init(address=address, log_to_driver=True, logging_config=logging_config)
        return False
    # Token auth stays on as Ray 2.60 sets it up, without its warning.
    import logging
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray 2.60 turns _node_ip_address="127.0.0.1" into the host's IP (services.resolve_ip_for_localhost)
    # and then binds GCS, raylets, workers and agents on all interfaces; with ENABLE_RAY_CLUSTER off it
    # keeps 127.0.0.1 and every server binds 127.0.0.1 (a single-node Ray: no other node can join it).
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False                  # this process: ray is already imported
    # The raylet prestarts one idle Python worker per CPU for the first driver; none of them can serve
    # this job (its runtime env, and the env of every Train/Tune actor, differs from theirs), so they
    # only burn CPU while the job starts (2 processes importing Ray on a 2-core machine).
    inherited = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_prestart_worker_first_driver": "0"}
    previous = {k: os.environ.get(k) for k in inherited}
    os.environ.update(inherited)                              # the processes ray.init starts (they inherit it)
    try:
        _init_local(ray, num_cpus, resources, logging_config)
    finally:                                                  # not for whatever this process starts later
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


def _init_local(ray, num_cpus, resources, logging_config) -> None:
    ray.init(num_cpus=num_cpus or os.cpu_count(), resources=resources, _node_ip_address="127.0.0.1",
             _temp_dir=os.environ.get("EBM_RAY_TMPDIR") or None, object_store_memory=256 * 1024 * 1024,
             log_to_driver=True, configure_logging=True, logging_level=log_level(), logging_config=logging_config,
             **state_api_pinned())


def log_level() -> str:
    """The console's level for Ray's own logs: ``$EBM_LOG_LEVEL``, else WARNING."""
    return os.environ.get("EBM_LOG_LEVEL", "WARNING").upper()


def state_api_pinned() -> dict:
    """``ray.init`` arguments that start the dashboard (on 127.0.0.1, a known port) and point every
    process of the job at it through ``RAY_API_SERVER_ADDRESS``. Ray Train's placement-group cleaner
    polls the dashboard's state API; left to auto-detect the cluster it dies with "Found multiple
    active Ray instances" when another local Ray runs on the machine, and the placement groups of
    dead controllers leak (seen: an ASHA sweep hung with 2 CPUs held by 2 stopped trials)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    os.environ["RAY_API_SERVER_ADDRESS"] = url       # this driver's own state-API calls
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": url}}}


def default_cpus_per_worker(num_workers: int, use_gpu: bool) -> float:
    """1 CPU per worker, less on a small machine so that Ray Data's read tasks and the driver fit."""
    return 1.0 if use_gpu else max(0.5, min(1.0, (os.cpu_count() or 2) / max(num_workers, 1) - 0.5))


def build_trainer(cfg: Config, *, name: str, storage_path: str, num_workers: int, use_gpu: bool, cpus: float,
                  threads: int, max_failures: int, keep: int, callbacks: list, ray_data: bool = False,
                  max_nonfinite_in_row: int = 20, resume_from: str | None = None, data_meta: dict | None = None,
                  placement: str = "PACK"):
    """The job's ``TorchTrainer`` over :func:`pipelines.worker.loop.worker_loop` (``ebm train`` and
    each ``ebm tune`` trial build it here). ``data_meta``: the dataset metadata the driver fixed, which
    every worker checks what it reads against; ``placement``: Ray's placement strategy for the workers
    (``STRICT_SPREAD``: one worker per node)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.worker import loop
    # No preemption watcher: its actor (restartable, arguments in the object store) makes the controller
    # log an error line at every start (ray#53727), on a cluster too, and it only hands a drain notice to
    # the training function, which ours does not read (it checkpoints every epoch). A preempted worker is
    # still charged to Train's preemption retry budget (RayActorError.preempted). Train passes this
    # variable from the process that builds the trainer (a driver, a Tune trial) to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    datasets = None
    if ray_data and cfg.task.data_dir:
        from pipelines.data.readers import ray_dataset
        datasets = {"train": ray_dataset(cfg.task.data_dir, "train", augment="default", shuffle_files=True)}
    return TorchTrainer(
        loop.worker_loop,
        train_loop_config=worker_config(cfg, threads=threads, ray_data=datasets is not None,
                                        max_nonfinite_in_row=max_nonfinite_in_row, resume_from=resume_from,
                                        data_meta=data_meta),
        datasets=datasets,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus},
                                     placement_strategy=placement),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                             # without Train's print patch each progress line reaches the driver once
                             worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
                             failure_config=FailureConfig(max_failures=max_failures),
                             logging_config=LoggingConfig(log_level=log_level()),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep)))


def worker_config(cfg: Config, *, threads: int, ray_data: bool = False, max_nonfinite_in_row: int = 20,
                  resume_from: str | None = None, data_meta: dict | None = None) -> dict:
    """What :func:`pipelines.worker.loop.worker_loop` is given (Ray's ``train_loop_config``, or the
    argument of an in-process Tune trial's call)."""
    return {"cfg": cfg.to_flat(), "threads": threads, "ray_data": ray_data, "max_nonfinite_in_row": max_nonfinite_in_row,
            "resume_from": resume_from, "data_meta": data_meta, "log_level": log_level(),
            "quiet": os.environ.get("EBM_QUIET") == "1"}


def finish_run(result, cfg: Config, uri: str, run_id: str) -> dict:
    from pipelines import tracking
    from pipelines.worker.loop import FAILURE_KEY
    """After ``trainer.fit()``: :func:`pipelines.driver.runs.finish` on the last report and the final
    checkpoint (raises TrainingFailed, tagging the reason, for a run that did not train)."""
    metrics = dict(result.metrics or {})
    # a failure report carries no checkpoint, so result.metrics is the last good epoch's: the tracking
    # callback tagged the reason on the run
    reason = tracking.open_client(uri).get_run(run_id).data.tags.get(runs.STOP_REASON_TAG)
    if reason:
        metrics[FAILURE_KEY] = reason
    if result.checkpoint is None:
        return runs.finish(uri, run_id, metrics, None, cfg.optim.epochs)
    with result.checkpoint.as_directory() as d:
        return runs.finish(uri, run_id, metrics, d, cfg.optim.epochs)


def tracking_callback(uri: str, run_id: str):
    """A Ray Train callback that logs each epoch's metrics and density plot to MLflow. It runs in the
    Train controller, on the driver's node, so a ``sqlite:///`` store there is the one the driver opened
    and workers never talk to MLflow."""
    import tempfile

    import pyarrow.fs
    from ray.train import UserCallback

    from pipelines import tracking
    from pipelines.worker.loop import FAILURE_KEY, PLOTS_DIR

    class EpochLogger(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0] if metrics else {}
            if FAILURE_KEY in row:
                tracking.set_tag(uri, run_id, runs.STOP_REASON_TAG, str(row[FAILURE_KEY])[:5000])
                return
            if "epoch" not in row:
                return
            if checkpoint is None:
                tracking.log_epoch(uri, run_id, row)
                return
            # only the plots are fetched (not the weights) when the checkpoint is in object storage
            with tempfile.TemporaryDirectory(prefix="ebm-plots-") as d:
                try:
                    pyarrow.fs.copy_files(f"{checkpoint.path}/{PLOTS_DIR}", d, source_filesystem=checkpoint.filesystem)
                except FileNotFoundError:       # an epoch without validation has no plot
                    pass
                tracking.log_epoch(uri, run_id, row, d)

    return EpochLogger()


def run_job(cfg: Config, *, name: str, resume: bool = False, allow_config_change: bool = False, num_workers: int = 2,
            use_gpu: bool = False, address: str | None = None, storage_path: str | None = None, max_failures: int = 0,
            keep: int = 2, tracking_uri: str | None = None, experiment: str = "ebm", cpus_per_worker: float = 0.0,
            threads: int = 1, ray_data: bool = False, max_nonfinite_in_row: int = 20, verify_data: bool = False,
            placement: str = "PACK") -> dict:
    """Run the job; returns the last reported metrics (test metrics included). Raises on failure,
    after marking the MLflow run FAILED (or KILLED on Ctrl-C / SIGTERM)."""
    from pipelines import tracking
    from pipelines.worker.data import prepare_dataset
    cfg, task, identity = prepare_dataset(cfg, verify_data)         # a bad data_dir fails before Ray starts
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)                                   # fail fast, before Ray starts
    storage_path = runs.storage_root(storage_path)
    plan = runs.plan(cfg, task, name, storage_path, resume, allow_config_change, runs.finished_in(uri, name))
    import ray

    def open_run() -> str:
        tags = {"git_sha": tracking.git_sha(), "seed": str(cfg.seed), "task": task.name, "method": cfg.method.name,
                **identity.tags(), "ebm.mode": "ray", **tracking.package_versions()}
        run_id = tracking.start_run(uri, experiment, name, cfg.to_flat(), tags, cfg.to_toml(), reopen=resume)
        runs.reopened(uri, run_id, plan)
        return run_id

    status = "FAILED"
    previous, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    started = False
    run_id = None
    # The MLflow run (importing MLflow, maybe creating the store) is created on a thread while Ray
    # starts: both are start-up the first training step waits for, and they do not depend on each other
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1, thread_name_prefix="ebm-mlflow-run")
    opening = pool.submit(open_run)
    try:
        if plan.finalize_only:       # stopped after its last checkpoint, before it was marked FINISHED
            run_id = opening.result()
            metrics = runs.finish(uri, run_id, dict(plan.state["metrics"]), plan.checkpoint_dir, cfg.optim.epochs)
            status = "FINISHED"
            return {**metrics, "mlflow_run_id": run_id}
        started = ray_init(address)
        signal.signal(signal.SIGTERM, on_term)      # after ray.init, which installs its own crash handler
        run_id = opening.result()
        trainer = build_trainer(cfg, name=name, storage_path=storage_path, num_workers=num_workers, use_gpu=use_gpu,
                                cpus=cpus_per_worker or default_cpus_per_worker(num_workers, use_gpu),
                                threads=threads, max_failures=max_failures, keep=keep,
                                callbacks=[tracking_callback(uri, run_id)], ray_data=ray_data,
                                max_nonfinite_in_row=max_nonfinite_in_row,
                                resume_from=plan.checkpoint_dir, data_meta=identity.meta, placement=placement)
        t0 = time.perf_counter()
        metrics = finish_run(trainer.fit(), cfg, uri, run_id)
        runs.prune(storage_path, name, keep)
        metrics["job_time_s"] = time.perf_counter() - t0
        status = "FINISHED"
        metrics["mlflow_run_id"] = run_id
        return metrics
    except (KeyboardInterrupt, SystemExit):     # SIGTERM, or Ctrl-C through Train's own abort handler
        status = "KILLED"
        raise
    except Exception as e:
        if run_id is None and opening.exception() is None:     # waits for the run being created
            run_id = opening.result()
        if run_id is not None:
            tracking.set_tag(uri, run_id, runs.STOP_REASON_TAG, str(e)[:5000])
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Ray Train's fit() leaves its own SIGINT handler behind (it would call the ended run's controller
        # and start a new Ray on the next Ctrl-C in this process: a notebook, a test session)
        signal.signal(signal.SIGINT, previous_int)
        pool.shutdown(wait=True)            # an interrupted start still ends the run it created
        if run_id is None and opening.exception() is None:
            run_id = opening.result()
        if run_id is not None:
            tracking.end_run(uri, run_id, status)
        if started:
            ray.shutdown()
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)      # set by ray_init for the Ray it started


def print_summary(metrics: dict, uri: str, out=None) -> None:
    out = out or sys.stdout          # at call time: a default bound at import would keep a replaced stream
    keys = [k for k in ("test_nll", "test_grid_nll", "test_is_nll", "test_kl", "test_mae_mode", "test_mae_mean",
                        "test_crps", "test_coverage") if k in metrics]
    for k in keys:
        print(f"test {k[5:]}: {metrics[k]:.4f}", file=out)
    print(f"MLflow run {metrics.get('mlflow_run_id')} in {uri}", file=out)
    if uri.startswith("sqlite:///"):
        print(f"open it with: mlflow ui --backend-store-uri {uri}", file=out)
