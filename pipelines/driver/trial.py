"""A 1-worker Tune trial trained in the trial's own process: no nested ``TorchTrainer``, no Train
controller or worker group to start (what a trial used to pay before its first step).

The trial runs the production worker function (:func:`pipelines.worker.loop.worker_loop`) with a
:class:`TrialRuntime` in place of Ray Train's: rank 0 of 1, checkpoints in Ray Train's layout under
the sweep's train storage (``STORAGE/<sweep>-train/<sweep>-<trial id>/checkpoint_*``, the format of
:mod:`ebm.checkpoint`, the newest two kept), each epoch's metrics and density plot logged to the
trial's MLflow run from this process, and every report passed to Tune (``val_nll`` each epoch for
ASHA). A rerun of the trial (``--resume`` of an errored one, or Tune's retry after a crash) continues
from its newest checkpoint there — the same place a ``TorchTrainer`` trial resumes from, so either
kind of trial can continue the other's.
"""
from __future__ import annotations

from pipelines.driver.local import LocalRuntime


class TrialRuntime(LocalRuntime):
    """:class:`pipelines.driver.local.LocalRuntime` (checkpoints to ``run_dir``, epochs to MLflow)
    that also reports every epoch to Tune; with :meth:`restored` and :meth:`report_failure` for the
    worker function."""

    def __init__(self, run_dir: str, uri: str, run_id: str, keep: int = 2, use_gpu: bool = False):
        import torch

        from pipelines import tracking
        super().__init__(run_dir, lambda row, plots: tracking.log_epoch(uri, run_id, row, str(plots)), keep=keep)
        self.uri, self.run_id = uri, run_id
        # the trial holds the GPU Tune gave it (its CUDA_VISIBLE_DEVICES): the first visible one
        self.device = torch.device("cuda:0" if use_gpu else "cpu")
        self.grad_comm = "fp32"         # one rank: nothing to communicate

    def dataset_shard(self, name: str):
        raise NotImplementedError("a 1-worker trial reads its Parquet rows itself (ray_data is off in sweeps)")

    def restored(self) -> dict | None:
        from pipelines import storage
        from pipelines.driver import runs
        found = runs.latest_checkpoint(storage.parent(self.run_dir), storage.name(self.run_dir))
        if found is None:
            return None
        self.last_dir = found[0]
        return found[1]

    def report(self, row: dict, state: dict | None, model) -> None:
        import ray.tune
        super().report(row, state, model)
        ray.tune.report({k: float(v) for k, v in row.items()})

    def report_failure(self, row: dict) -> None:
        import ray.tune

        from pipelines import tracking
        from pipelines.driver import runs
        from pipelines.worker.loop import FAILURE_KEY
        tracking.set_tag(self.uri, self.run_id, runs.STOP_REASON_TAG, str(row[FAILURE_KEY])[:5000])
        ray.tune.report(row)


def train_in_process(cfg, *, name: str, uri: str, run_id: str, job: dict) -> dict:
    """Train the trial ``name`` here; returns its last metrics (raises TrainingFailed, tagging the
    reason, for a run that did not train — :func:`pipelines.driver.runs.finish`)."""
    from pipelines import storage as fs
    from pipelines.driver import runs
    from pipelines.driver.train_job import worker_config
    from pipelines.worker import loop
    rt = TrialRuntime(fs.join(job["train_storage"], name), uri, run_id, use_gpu=job["use_gpu"])
    last = loop.worker_loop(worker_config(cfg, threads=job["threads"], data_meta=job.get("data_meta")), rt)
    return runs.finish(uri, run_id, last, rt.last_dir, cfg.optim.epochs)
