"""`ebm train --local` writes one MLflow run per seed to a real SQLite store (debug config, seconds)."""
import socket
import time

import pytest

from pipelines import cli
from pipelines.driver import local

pytestmark = pytest.mark.integration

FAST = ["--set", "optim.epochs=2", "--set", "eval.every=1", "--set", "task.n_train=128", "--set", "task.n_val=64",
        "--set", "task.n_test=64"]


def _runs(uri, experiment="e"):
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c, sorted(c.search_runs([exp.experiment_id]), key=lambda r: r.data.tags["seed"])


def test_each_seed_is_one_finished_run_with_tags_metrics_and_plot(tmp_path, monkeypatch):
    import torch
    torch.set_num_threads(1)
    uri = f"sqlite:///{tmp_path}/m.db"
    argv = ["train", "debug", "--local", "--seeds", "2", "--tracking-uri", uri, "--experiment", "e",
            "--group", "dbg/learned", *FAST]
    monkeypatch.setattr("sys.argv", ["/some/where/ebm", *argv])
    assert cli.main(argv) == 0
    c, runs = _runs(uri)
    assert [r.data.tags["seed"] for r in runs] == ["0", "1"]
    for r in runs:
        t = r.data.tags
        assert r.info.status == "FINISHED"
        assert t["ebm.group"] == "dbg/learned" and t["task"] == "toy1" and t["method"] == "ebm_learned_proposal"
        assert t["ebm.command"] == "ebm " + " ".join(argv)
        assert t["data_fingerprint"].startswith("synthetic:toy1") and t["git_sha"] and "version.torch" in t
        assert r.data.params["optim.epochs"] == "2" and r.data.params["seed"] == t["seed"]
        assert {"test_nll", "test_kl", "test_is_nll", "test_crps", "test_coverage", "train_time_s", "train_cpu_s"} <= set(r.data.metrics)
        assert [m.step for m in c.get_metric_history(r.info.run_id, "train_loss")] == [0, 1]
        assert [a.path for a in c.list_artifacts(r.info.run_id, "plots")] == ["plots/density_epoch000.png",
                                                                          "plots/density_epoch001.png"]
        assert {a.path for a in c.list_artifacts(r.info.run_id, "checkpoint")} >= {"checkpoint/checkpoint.pt"}
    assert runs[0].data.metrics["test_nll"] != runs[1].data.metrics["test_nll"]     # different seeds


def test_no_track_opens_no_store(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(local, "train", boom)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["train", "debug", "--local", "--no-track"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_fails_before_training(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    assert cli.main(["train", "debug", "--local", "--tracking-uri", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr()
    assert "unreachable" in err.err and "epoch" not in err.out
    assert time.monotonic() - t < 15


@pytest.mark.parametrize("exc, status, rc", [(KeyboardInterrupt, "KILLED", 130), (RuntimeError, "FAILED", None)])
def test_an_interrupted_or_failed_seed_ends_its_run_with_that_status(tmp_path, monkeypatch, exc, status, rc):
    def boom(*a, **k):
        raise exc("stop")
    monkeypatch.setattr(local, "train", boom)
    uri = f"sqlite:///{tmp_path}/m.db"
    argv = ["train", "debug", "--local", "--tracking-uri", uri, "--experiment", "e"]
    if rc is None:
        with pytest.raises(RuntimeError):
            cli.main(argv)
    else:
        assert cli.main(argv) == rc
    _, runs = _runs(uri)
    assert [r.info.status for r in runs] == [status]
    assert runs[0].data.tags["ebm.group"] == "debug"            # the config's name without --group


def test_local_trains_on_a_parquet_dataset_and_tags_its_fingerprint(tmp_path, monkeypatch, capsys):
    import torch
    from pipelines.data.ingest import ingest
    torch.set_num_threads(1)
    meta = ingest("synthetic", "star", tmp_path / "star", size=16, n={"train": 64, "val": 16, "test": 16},
                  progress=False)
    uri = f"sqlite:///{tmp_path}/m.db"
    argv = ["train", "star", "--local", "--tracking-uri", uri, "--experiment", "e",
            "--set", f"task.data_dir={tmp_path / 'star'}", "--set", "optim.epochs=1", "--set", "eval.every=1",
            "--set", "features.width=4", "--set", "sampler.M_train=16", "--set", "sampler.M_eval=64"]
    monkeypatch.setattr("sys.argv", ["ebm", *argv])
    assert cli.main(argv) == 0
    assert "train 64 / val 16 / test 16" in capsys.readouterr().out
    c, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["data_fingerprint"] == meta["fingerprint"]
    assert {"test_nll", "test_kl", "test_mae_mean"} <= set(runs[0].data.metrics)   # star's aux (k, θ_r) gives KL


def test_local_refuses_a_bad_dataset_before_training(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "star", "--local", "--no-track", "--set", f"task.data_dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr()
    assert "task.data_dir" in err.err and "epoch" not in err.out
