"""ebm tune on a real local Ray (2 CPUs + the TRAIN_DRIVER resource) with a real SQLite MLflow store."""
import os

import pandas as pd
import pytest

from ebm.config import Config

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# toy 2's fixed split, IS NLL only (no 8192-point grid): each epoch is about a second
OVERRIDES = ['task.name="toy2"', "task.n_train=0", "task.n_val=0", "task.n_test=0", "eval.grid_nll=false",
             "eval.every=1", "sampler.M_train=32", "sampler.refine_steps=0"]


@pytest.fixture(scope="module")
def ray_tune():
    import ray

    from pipelines.driver.train_job import state_api_pinned
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # state_api_pinned: early-stopped trials' placement groups are freed even if another local Ray runs
    ray.init(num_cpus=2, resources={"TRAIN_DRIVER": 2}, _node_ip_address="127.0.0.1",
             object_store_memory=200 * 1024 * 1024, log_to_driver=False, **state_api_pinned())
    yield
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)


def _cfg(*extra):
    return Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"), OVERRIDES + list(extra))


def _sweep(tmp_path, name, space, cfg=None, **kw):
    from pipelines.driver.tune import check_space, run_sweep
    cfg = cfg or _cfg()
    return run_sweep(cfg, name=name, space=check_space(space, cfg), storage_path=str(tmp_path / "runs"),
                     tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", num_workers=1, cpus_per_worker=0.5,
                     max_concurrent=2, **kw)


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_asha_sweep_nests_trials_logs_the_best_and_registers_one_version(ray_tune, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.serve import registry, serving
    s = _sweep(tmp_path, "asha", {"proposal.K": {"grid": [1, 2, 4, 8]}},
               opts={"scheduler": "asha", "grace_period": 1, "reduction_factor": 2}, register_name="toy2-ebm")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    c = MlflowClient(uri)
    parent = c.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["scheduler"] == "asha"
    assert parent.data.params["space.proposal.K"] == '{"grid": [1, 2, 4, 8]}'
    kids = _children(c, parent.info.run_id)
    assert len(kids) == 4 and len({k.info.run_name for k in kids}) == 4
    assert {k.info.status for k in kids} <= {"FINISHED", "KILLED"}            # ASHA-stopped ones are KILLED
    assert s["compute"]["epochs_total"] <= 4 * 3
    finished = [k for k in kids if k.info.status == "FINISHED"]
    best = min(finished, key=lambda k: k.data.metrics["val_nll"])
    assert parent.data.tags["ebm.best_run_id"] == best.info.run_id
    assert parent.data.tags["best.proposal.K"] == best.data.params["proposal.K"]
    assert parent.data.metrics["best_val_nll"] == pytest.approx(best.data.metrics["val_nll"])
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/results.csv", "sweep/val_nll_vs_K_M.png", "sweep/best_config.toml"}
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="sweep/results.csv",
                                                            tracking_uri=uri, dst_path=str(tmp_path / "dl")))
    assert sorted(table["proposal.K"]) == [1, 2, 4, 8]
    # exactly one registered version, from the best run, tagged both ways
    versions = c.search_model_versions("name = 'toy2-ebm'")
    assert len(versions) == 1 and versions[0].tags["source_run_id"] == best.info.run_id
    assert c.get_model_version_by_alias("toy2-ebm", "champion").version == versions[0].version
    assert c.get_run(best.info.run_id).data.tags[registry.REGISTERED_TAG] == "toy2-ebm/1"
    # the pyfunc loaded by alias predicts what the in-process model predicts
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/toy2-ebm@champion")
    rows = pd.DataFrame({"x": [0.05, 0.4, 0.9], "y": [1.0, -2.0, 3.0]})
    params = {"quantiles": [0.1, 0.5, 0.9], "interval_level": 0.8, "M": 128, "seed": 3}
    got = model.predict(rows, params=params)
    p = serving.from_state(registry.checkpoint_state(uri, best.info.run_id))
    want = serving.predict_rows(p, serving.inputs_tensor(p, rows["x"].tolist()), rows["y"].tolist(), M=128,
                                quantiles=[0.1, 0.5, 0.9], interval_level=0.8, seed=3)
    for col in ("mode", "mean", "std", "q0.1", "q0.5", "q0.9", "interval_lo", "interval_hi", "log_p"):
        assert got[col].tolist() == pytest.approx(want[col], rel=1e-6, abs=1e-6), col


def test_an_errored_trial_resumes_from_its_checkpoint_without_duplicate_runs(ray_tune, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import faults
    faults.register_by_value()
    # trial _00000's Train workers fail once as epoch 1 starts (fault injection lives in tests/faults.py)
    monkeypatch.setattr("pipelines.driver.tune.train_trial", faults.trial_with_faults(
        {"fail_at_epoch": 1, "fail_marker": str(tmp_path / "fired")}, trial_suffix="_00000"))
    first = _sweep(tmp_path, "res", {"proposal.K": {"grid": [1, 2]}}, opts={"scheduler": "fifo"},
                   max_failures=0)
    monkeypatch.undo()
    assert first["errors"] == 1 and (tmp_path / "fired").exists()
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    parent = first["parent_run_id"]
    assert c.get_run(parent).info.status == "FAILED"
    before = {k.data.tags["ebm.trial_id"]: k for k in _children(c, parent)}
    failed = next(t for t in before if t.endswith("_00000"))
    done = next(t for t in before if t != failed)
    assert before[failed].info.status == "FAILED" and before[done].info.status == "FINISHED"

    from pipelines.driver.tune import run_sweep
    again = run_sweep(None, name="res", resume=True, storage_path=str(tmp_path / "runs"),
                      tracking_uri=f"sqlite:///{tmp_path}/mlruns.db", num_workers=1, cpus_per_worker=0.5)
    assert again["errors"] == 0 and again["parent_run_id"] == parent
    after = {k.data.tags["ebm.trial_id"]: k for k in _children(c, parent)}
    assert set(after) == set(before)                                         # no duplicate child runs
    assert {t: k.info.run_id for t, k in after.items()} == {t: k.info.run_id for t, k in before.items()}
    assert after[failed].info.status == "FINISHED" and c.get_run(parent).info.status == "FINISHED"
    # the errored trial continued from its epoch-0 checkpoint: one loss per epoch, the resumed
    # attempt starting at epoch 1; the finished trial was not rerun
    rid = after[failed].info.run_id
    assert [m.step for m in c.get_metric_history(rid, "train_loss")] == [0, 1, 2]
    assert [m.value for m in c.get_metric_history(rid, "first_epoch")] == [0.0, 1.0, 1.0]
    assert len(c.get_metric_history(after[done].info.run_id, "train_loss")) == 3
    assert "test_nll" in c.get_run(rid).data.metrics


def test_a_one_worker_trial_trains_in_its_own_process_with_the_numbers_of_a_ray_train_trial(ray_tune, tmp_path):
    """The same seed and config: a trial trained in the Tune trial's process and one trained by a
    nested 1-worker TorchTrainer log the same metrics, checkpoints and plots."""
    from mlflow.tracking import MlflowClient

    from ebm import checkpoint
    from pipelines.driver import runs
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    cfg = _cfg("optim.epochs=2")
    got = {}
    for mode, in_process in (("tune-in-process", True), ("tune-ray-train", False)):
        s = _sweep(tmp_path, mode, {"proposal.K": {"grid": [2]}}, cfg=cfg, opts={"scheduler": "fifo"},
                   in_process=in_process)
        assert s["errors"] == 0
        (kid,) = _children(c, s["parent_run_id"])
        assert kid.info.status == "FINISHED" and kid.data.tags["ebm.mode"] == mode
        history = {k: [(m.step, m.value) for m in c.get_metric_history(kid.info.run_id, k)]
                   for k in kid.data.metrics if not k.endswith(("_s", "_frac"))}
        assert [step for step, _ in history["train_loss"]] == [0, 1] and "test_nll" in history
        assert {a.path for a in c.list_artifacts(kid.info.run_id)} >= {"checkpoint", "plots"}
        dirs = runs.checkpoint_dirs(str(tmp_path / "runs" / f"{mode}-train"), kid.info.run_name)
        assert len(dirs) == 2 and checkpoint.load(dirs[-1])["epoch"] == 1
        got[mode] = history
    assert got["tune-in-process"] == got["tune-ray-train"]


def test_an_in_process_trial_that_cannot_train_fails_with_its_reason(ray_tune, tmp_path, monkeypatch):
    """The failure report of the worker function (FAILURE_KEY) reaches the trial's MLflow run and
    Tune: from epoch 2 on every batch has NaN targets, so the run stops at 20 non-finite steps in a row."""
    from mlflow.tracking import MlflowClient

    import faults
    faults.register_by_value()
    monkeypatch.setattr("pipelines.driver.tune.train_trial", faults.trial_with_faults(
        {"nan_rank": 0, "nan_from_epoch": 1}, trial_suffix="_00000"))
    s = _sweep(tmp_path, "nan", {"proposal.K": {"grid": [2]}}, opts={"scheduler": "fifo"}, max_failures=0)
    assert s["errors"] == 1 and s["rows"][0]["status"] == "ERROR"
    c = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    (kid,) = _children(c, s["parent_run_id"])
    assert kid.info.status == "FAILED" and kid.data.tags["ebm.mode"] == "tune-in-process"
    assert "non-finite losses in a row (at epoch 2)" in kid.data.tags["ebm.stop_reason"]
    assert [m.step for m in c.get_metric_history(kid.info.run_id, "train_loss")] == [0]
    assert "test_nll" not in kid.data.metrics
