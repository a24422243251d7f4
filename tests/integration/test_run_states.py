"""Honest run states and --resume rules, on `ebm train --local` (one process, a real SQLite store,
the debug config: seconds). The Ray path shares the rules (pipelines.driver.runs) and the loop."""
import pytest

from pipelines.cli import main

pytestmark = pytest.mark.integration
FAST = ["--set", "task.n_train=128", "--set", "task.n_val=64", "--set", "task.n_test=64", "--set", "eval.every=1",
        "--threads", "1"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("EBM_STORAGE_PATH", raising=False)
    from mlflow.tracking import MlflowClient
    return lambda: MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")


def _runs(client, name):
    exp = client.get_experiment_by_name("ebm").experiment_id
    return client.search_runs([exp], filter_string=f"tags.`ebm.run_name` = '{name}'")


def test_a_diverged_run_fails_with_its_reason_and_cannot_be_registered(store, capsys):
    assert main(["train", "debug", "--local", "--name", "wild", "--set", "optim.lr=1e6", *FAST]) == 1
    err = capsys.readouterr().err
    assert "training failed" in err and ("non-finite" in err or "no successful step" in err), err
    (run,) = _runs(store(), "wild")
    assert run.info.status == "FAILED" and run.data.tags["ebm.stop_reason"]
    assert "test_nll" not in run.data.metrics
    assert main(["register", "--run", run.info.run_id, "--name", "wild-model"]) == 2
    assert "FAILED, not FINISHED" in capsys.readouterr().err


def test_resume_rules(store, capsys):
    c = store()
    assert main(["train", "debug", "--local", "--resume", "nobody", *FAST]) == 2
    assert "--resume nobody: no checkpoint of a run of that name" in capsys.readouterr().err
    assert main(["train", "debug", "--local", "--name", "r", "--set", "optim.epochs=2", *FAST]) == 0
    # the same name again is refused, never silently continued or duplicated
    assert main(["train", "debug", "--local", "--name", "r", "--set", "optim.epochs=2", *FAST]) == 2
    assert "already exists" in capsys.readouterr().err
    # a finished run: refused unless its epochs are raised
    assert main(["train", "debug", "--local", "--resume", "r", "--set", "optim.epochs=2", *FAST]) == 2
    assert "finished its 2 epochs; raise optim.epochs" in capsys.readouterr().err
    # a changed --set is refused, naming the key and both values
    assert main(["train", "debug", "--local", "--resume", "r", "--set", "optim.epochs=3", "--set", "optim.lr=0.005",
                 *FAST]) == 2
    assert "optim.lr: 0.01 -> 0.005" in capsys.readouterr().err
    (run,) = _runs(c, "r")
    assert run.info.status == "FINISHED"
    # raised epochs continue the same MLflow run
    assert main(["train", "debug", "--local", "--resume", "r", "--set", "optim.epochs=3", *FAST]) == 0
    (again,) = _runs(c, "r")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2]
    # its training time counts both attempts: the checkpoints carry the time so far on, epoch by epoch
    elapsed = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "elapsed_s"), key=lambda m: m.step)]
    assert len(elapsed) == 3 and elapsed[0] < elapsed[1] < elapsed[2]
    assert again.data.metrics["train_time_s"] > max(elapsed[1], run.data.metrics["train_time_s"] - 1e-9)
    assert again.data.metrics["train_cpu_s"] > run.data.metrics["train_cpu_s"]
    # MLflow keeps the first value of a param; the epochs the run now trains for are its tag, which
    # the results tables read over the param
    assert again.data.params["optim.epochs"] == "2" and again.data.tags["ebm.param.optim.epochs"] == "3"
    from pipelines.driver.results import RunRecord
    assert RunRecord.from_mlflow(again, "ebm").params["optim.epochs"] == "3"
    # a config change with --allow-config-change goes through and is recorded on the run
    assert main(["train", "debug", "--local", "--resume", "r", "--set", "optim.epochs=4", "--set", "optim.lr=0.005",
                 "--allow-config-change", *FAST]) == 0
    (again,) = _runs(c, "r")
    assert '"optim.lr": [0.01, 0.005]' in again.data.tags["ebm.config_change.3"]      # after 3 epochs
    assert RunRecord.from_mlflow(again, "ebm").params["optim.lr"] == "0.005"
    from pipelines.driver.results import lr_schedule
    assert lr_schedule(RunRecord.from_mlflow(again, "ebm")) == "0.01, 0.005 after 3"
    # and the new lr is the one the optimiser stepped with (restoring its state must not bring back 0.01)
    import glob

    from ebm import checkpoint
    state = checkpoint.load(sorted(glob.glob("runs/r/checkpoint_*/checkpoint.pt"))[-1])
    assert state["epoch"] == 3 and {g["lr"] for g in state["optimizer"]["param_groups"]} == {0.005}
    assert again.data.tags["ebm.param.optim.lr"] == "0.005" and again.data.tags["ebm.param.optim.epochs"] == "4"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [0, 1, 2, 3]


def test_flags_of_the_other_path_are_refused_not_ignored(store, capsys):
    assert main(["train", "debug", "--seeds", "2"]) == 2
    assert "--seeds apply to --local runs only" in capsys.readouterr().err
    assert main(["train", "debug", "--local", "--num-workers", "4"]) == 2
    assert "--num-workers apply to Ray Train runs only" in capsys.readouterr().err


def test_a_typo_in_the_task_is_one_line_before_anything_starts(store, capsys, tmp_path):
    assert main(["train", "debug", "--set", 'task.name="tyo1"']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task.name must name a generated task" in err
    assert not (tmp_path / "mlruns.db").exists() and not (tmp_path / "runs").exists()


def test_resume_refuses_a_changed_model_or_task_even_when_changes_are_allowed(store, capsys, tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    with open(tmp_path / "t.csv", "w") as f:
        f.write("x,a,b\n" + "".join(f"{v:.4f},{3 * v:.4f},{v + 1:.4f}\n" for v in rng.uniform(-1, 1, 300)))

    def ingest(*extra):
        assert main(["data", "ingest", "table", "t.csv", "--task", "tab", "--targets", "a,b", "--out", "d",
                     "--quiet", "--overwrite", *extra]) == 0
    ingest()
    assert main(["train", "debug", "--local", "--name", "m", "--set", "task.data_dir=d", "--set", "optim.epochs=1",
                 *FAST]) == 0
    capsys.readouterr()
    assert main(["train", "debug", "--local", "--resume", "m", "--set", "task.data_dir=d", "--set", "optim.epochs=2",
                 "--set", "proposal.K=3", "--allow-config-change", *FAST]) == 2
    assert "proposal.K cannot change on a resumed run" in capsys.readouterr().err
    ingest("--grid", "a=-4:4:64")             # the same rows, another evaluation grid: another task spec
    assert main(["train", "debug", "--local", "--resume", "m", "--set", "task.data_dir=d", "--set", "optim.epochs=2",
                 *FAST]) == 2
    assert "the data now defines 'tab'" in capsys.readouterr().err


def test_a_run_stopped_after_its_last_checkpoint_is_finalised_by_resume(store, capsys):
    c = store()
    assert main(["train", "debug", "--local", "--name", "k", "--set", "optim.epochs=2", *FAST]) == 0
    (run,) = _runs(c, "k")
    # as if the process had died between the last checkpoint and marking the run FINISHED
    c.set_terminated(run.info.run_id, "KILLED")
    assert main(["register", "--run", run.info.run_id, "--name", "k-model"]) == 2
    assert main(["train", "debug", "--local", "--resume", "k", "--set", "optim.epochs=2", *FAST]) == 0
    (again,) = _runs(c, "k")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [0, 1]    # nothing retrained
    assert main(["register", "--run", run.info.run_id, "--name", "k-model"]) == 0
