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
    # a config change with --allow-config-change goes through and is recorded on the run
    assert main(["train", "debug", "--local", "--resume", "r", "--set", "optim.epochs=4", "--set", "optim.lr=0.005",
                 "--allow-config-change", *FAST]) == 0
    (again,) = _runs(c, "r")
    assert '"optim.lr": [0.01, 0.005]' in again.data.tags["ebm.config_change"]
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
