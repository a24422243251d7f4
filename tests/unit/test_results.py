"""`ebm results`: grouping and mean ± std over a real SQLite MLflow store holding a few fake runs."""
import statistics

import pytest

from pipelines import cli
from pipelines.driver import results

pytestmark = pytest.mark.unit


def _run(client, exp_id, group, seed, metrics, status="FINISHED", task="toyX", epochs="75", command="ebm train x"):
    tags = {"seed": str(seed), "task": task, "method": "m"}
    if group:
        tags.update({"ebm.group": group, "ebm.command": command})
    r = client.create_run(exp_id, tags=tags)
    for k, v in {"method.name": "m", "proposal.K": "4", "optim.epochs": epochs, "sampler.M_train": "128"}.items():
        client.log_param(r.info.run_id, k, v)
    for k, v in metrics.items():
        client.log_metric(r.info.run_id, k, v, step=3)
    client.set_terminated(r.info.run_id, status=status)


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/m.db"
    c = MlflowClient(uri)
    e = c.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    for seed, nll in enumerate([1.0, 2.0, 3.0]):
        _run(c, e, "toyX/a", seed, {"test_nll": nll, "test_kl": 0.1 * (seed + 1), "train_time_s": 10.0})
    _run(c, e, "toyX/a", 3, {"test_nll": 100.0}, status="FAILED")           # left out, counted
    _run(c, e, "toyX/b", 0, {"test_nll": 5.0}, epochs="20", command="ebm train y")
    _run(c, e, "toyX/b", 1, {"test_nll": 7.0}, epochs="30", command="ebm train z")
    _run(c, e, "toyY/c", 0, {"test_nll": 0.5, "test_crps": 0.25}, task="toyY")
    _run(c, e, "", 0, {"test_nll": 9.0})                                   # no group tag: not a table row
    return uri


def test_groups_hold_finished_runs_only_and_aggregate_mean_and_population_std(store):
    groups = {g.name: g for g in results.collect(store, "exp")}
    assert sorted(groups) == ["toyX/a", "toyX/b", "toyY/c"]
    a = groups["toyX/a"]
    assert len(a.runs) == 3 and a.unfinished == 1
    assert results.mean_std(a.values("test_nll")) == (2.0, statistics.pstdev([1.0, 2.0, 3.0]))
    assert groups["toyX/b"].param("optim.epochs") == "mixed: 20/30"
    assert groups["toyX/b"].commands() == ["ebm train y", "ebm train z"]


def test_markdown_has_a_table_per_task_with_only_the_columns_present(store):
    text = results.render(results.collect(store, "exp"), "exp", store)
    x, y = text.split("### toyX")[1].split("### toyY")
    assert "| `toyX/a` | 3 | m | 4 | 75 | 128 | 2.000 ± 0.816 | 0.200 ± 0.082 | 10.0 ± 0.0 |" in x
    assert "| `toyX/b` | 2 | m | 4 | mixed: 20/30 | 128 | 6.000 ± 1.000 | — | — |" in x
    assert "KL" in x and "CRPS" not in x and "KL" not in y and "CRPS" in y
    assert "1 unfinished run(s) left out" in x and "`ebm train z`" in x
    assert "9.000" not in text and "100.000" not in text


def test_cli_writes_the_file_for_the_selected_groups(store, tmp_path):
    out = tmp_path / "r.md"
    assert cli.main(["results", "exp", "--out", str(out), "--tracking-uri", store]) == 0
    assert "`toyY/c` | 1 |" in out.read_text()
    assert cli.main(["results", "exp", "--out", str(out), "--tracking-uri", store, "--groups", "toyX/*"]) == 0
    assert "`toyY/c`" not in out.read_text() and "`toyX/b` |" in out.read_text()


def test_figures_are_the_lowest_seed_density_plots_of_the_matching_groups(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/m.db"
    c = MlflowClient(uri)
    e = c.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    for group in ("t/a", "t/b"):
        for seed in (1, 0):
            r = c.create_run(e, tags={"seed": str(seed), "task": "t", "ebm.group": group})
            (tmp_path / "density.png").write_bytes(f"{group} {seed}".encode())
            c.log_artifact(r.info.run_id, str(tmp_path / "density.png"), "plots")
            c.set_terminated(r.info.run_id)
    out = results.download_figures(uri, results.select(results.collect(uri, "exp"), ["*/a"]), str(tmp_path / "figs"))
    assert [p.name for p in out] == ["t_a.png"] and out[0].read_bytes() == b"t/a 0"
