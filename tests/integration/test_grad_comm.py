"""DDP gradient communication in bf16 (``optim.grad_comm``) on a real local Ray, 2 workers on gloo."""
import os

import pytest
import torch

from ebm.config import Config

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _final(tmp_path, name):
    from ebm import checkpoint
    from pipelines.driver import runs
    return checkpoint.load(runs.checkpoint_dirs(str(tmp_path / "runs"), name)[-1])


def test_a_two_worker_run_with_bf16_gradients_trains_and_keeps_the_ranks_in_sync(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.driver.train_job import run_job
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    got = {}
    for comm in ("fp32", "bf16"):
        cfg = Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"), [f'optim.grad_comm="{comm}"'])
        m = run_job(cfg, name=comm, num_workers=2, storage_path=str(tmp_path / "runs"), tracking_uri=uri,
                    cpus_per_worker=0.5)
        c = MlflowClient(uri)
        run = c.get_run(m["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params["optim.grad_comm"] == comm
        loss = [x.value for x in c.get_metric_history(run.info.run_id, "train_loss")]
        spread = [x.value for x in c.get_metric_history(run.info.run_id, "param_spread_across_ranks")]
        assert len(loss) == 3 and loss[-1] < loss[0]                 # it trains
        assert spread == [0.0, 0.0, 0.0]                             # every rank holds the same weights
        got[comm] = (loss, _final(tmp_path, comm)["model"])
    # the hook is in the path: bf16-rounded gradient sums move the weights elsewhere than fp32's do,
    # by a little (the losses agree to a few per cent)
    fp32, bf16 = got["fp32"][1], got["bf16"][1]
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)
    assert got["bf16"][0][-1] == pytest.approx(got["fp32"][0][-1], rel=0.05)
