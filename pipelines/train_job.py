"""The driver of a training job: validate -> MLflow run -> Ray -> TorchTrainer -> report -> clean up."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from ebm.config import Config


def _ray_init(address: str | None, num_cpus: int | None) -> bool:
    """Connect to ``address`` or start a local Ray on 127.0.0.1; returns whether we started it."""
    import ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # The dashboard (bound to 127.0.0.1) serves the state API that Ray Train's clean-up polls.
    ray.init(num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1", _temp_dir=os.environ.get("EBM_RAY_TMPDIR") or None,
             object_store_memory=256 * 1024 * 1024, log_to_driver=True, configure_logging=True,
             logging_level="WARNING")
    return True


def run_job(cfg: Config, *, name: str, num_workers: int = 2, use_gpu: bool = False, address: str | None = None,
            storage_path: str | None = None, max_failures: int = 0, keep: int = 3, tracking_uri: str | None = None,
            experiment: str = "ebm", cpus_per_worker: float = 0.0, threads: int = 1,
            test_hooks: dict | None = None) -> dict:
    """Run the job; returns the last reported metrics (test metrics included). Raises on failure,
    after marking the MLflow run FAILED (or KILLED on Ctrl-C / SIGTERM)."""
    from pipelines import tracking
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)                                   # fail fast, before Ray starts
    storage_path = storage_path or os.environ.get("EBM_STORAGE_PATH") or str(Path("runs").resolve())
    import ray
    import torch
    tags = {"git_sha": tracking.git_sha(), "seed": str(cfg.seed), "torch": torch.__version__,
            "ray": ray.__version__, "task": cfg.task.name, "method": cfg.method.name,
            "data_fingerprint": cfg.task.data_dir or f"synthetic:{cfg.task.name}:seed{cfg.task.seed}"}
    run_id = tracking.start_run(uri, experiment, name, cfg.to_flat(), tags, cfg.to_toml())
    status = "FAILED"
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    started = False
    try:
        started = _ray_init(address, None)
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from pipelines.distributed import worker_loop
        cpus = cpus_per_worker or (1.0 if use_gpu else max(0.5, min(1.0, (os.cpu_count() or 2) / max(num_workers, 1) - 0.5)))
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"cfg": cfg.to_flat(), "threads": threads, "test_hooks": test_hooks,
                               "mlflow": {"uri": uri, "run_id": run_id}},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus}),
            run_config=RunConfig(name=name, storage_path=storage_path,
                                 # without Train's print patch each progress line reaches the driver once
                                 worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=keep,
                                                                    checkpoint_score_attribute="val_nll",
                                                                    checkpoint_score_order="min")))
        t0 = time.perf_counter()
        result = trainer.fit()
        metrics = dict(result.metrics or {})
        metrics["job_time_s"] = time.perf_counter() - t0
        if result.checkpoint is not None:
            from mlflow.tracking import MlflowClient
            with result.checkpoint.as_directory() as d:
                MlflowClient(uri).log_artifacts(run_id, d, "checkpoint")
        tracking.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if k.startswith("test_")},
                             step=cfg.optim.epochs)
        status = "FINISHED"
        metrics["mlflow_run_id"] = run_id
        return metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        tracking.end_run(uri, run_id, status)
        if started:
            ray.shutdown()


def print_summary(metrics: dict, uri: str, out=sys.stdout) -> None:
    keys = [k for k in ("test_nll", "test_grid_nll", "test_is_nll", "test_kl", "test_mae_mode", "test_mae_mean",
                        "test_crps", "test_coverage") if k in metrics]
    for k in keys:
        print(f"test {k[5:]}: {metrics[k]:.4f}", file=out)
    print(f"MLflow run {metrics.get('mlflow_run_id')} in {uri}", file=out)
    if uri.startswith("sqlite:///"):
        print(f"open it with: mlflow ui --backend-store-uri {uri}", file=out)
