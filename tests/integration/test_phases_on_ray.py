"""A 2-worker Ray Train run (real local Ray, real MLflow) through the frozen-backbone and warm-up phase
boundaries, bf16, accumulating 2 micro-batches: the data-parallel wrapper is rebuilt per phase and the
run trains with identical ranks; MLflow has the new keys as params."""
import os

import pytest

from ebm.config import Config

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_two_workers_through_the_phase_boundaries_train(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.driver.train_job import run_job
    cfg = Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"),
                           ["optim.epochs=3", "schedule.freeze_backbone_epochs=2", "schedule.proposal_warmup_epochs=1",
                            'optim.precision="bf16"', "optim.accumulate=2", "eval.every=1"])
    metrics = run_job(cfg, name="phases", num_workers=2, storage_path=str(tmp_path / "runs"),
                      tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", cpus_per_worker=0.5)
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    run = c.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert (run.data.params["optim.precision"], run.data.params["optim.accumulate"]) == ("bf16", "2")
    spread = [m.value for m in c.get_metric_history(run.info.run_id, "param_spread_across_ranks")]
    assert spread == [0.0, 0.0, 0.0]
    val = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "val_nll"), key=lambda m: m.step)]
    assert len(val) == 3 and val[-1] < val[0]
    # 512 examples / 2 workers / batch 32 = 8 batches per epoch, 2 per optimiser step
    steps = [m.value for m in c.get_metric_history(run.info.run_id, "steps")]
    assert steps == [4.0, 4.0, 4.0]
