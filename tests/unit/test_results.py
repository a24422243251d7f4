"""`ebm results`: grouping and mean ± std over a real SQLite MLflow store holding a few fake runs, the
compact export, Welch's decided claims with known answers, and the page rebuilt from a template."""
import json
import math
import re
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
    from pipelines.tracking import open_client
    uri = f"sqlite:///{tmp_path}/m.db"
    c = open_client(uri)
    e = c.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    for seed, nll in enumerate([1.0, 2.0, 3.0]):
        _run(c, e, "toyX/a", seed, {"test_nll": nll, "test_kl": 0.1 * (seed + 1), "train_time_s": 10.0})
    _run(c, e, "toyX/a", 3, {"test_nll": 100.0}, status="FAILED")           # left out, counted
    _run(c, e, "toyX/b", 0, {"test_nll": 5.0}, epochs="20", command="ebm train y")
    _run(c, e, "toyX/b", 1, {"test_nll": 7.0}, epochs="30", command="ebm train z")
    _run(c, e, "toyY/c", 0, {"test_nll": 0.5, "test_crps": 0.25}, task="toyY")
    _run(c, e, "", 0, {"test_nll": 9.0})                                   # no group tag: not a table row
    return uri


def test_groups_hold_finished_runs_only_and_aggregate_mean_and_sample_std(store):
    groups = {g.name: g for g in results.collect(store, "exp")}
    assert sorted(groups) == ["toyX/a", "toyX/b", "toyY/c"]
    a = groups["toyX/a"]
    assert len(a.runs) == 3 and a.unfinished == 1
    assert results.mean_std(a.values("test_nll")) == (2.0, statistics.stdev([1.0, 2.0, 3.0]))
    b = groups["toyX/b"]            # one run at 20 epochs, one at 30: the row pools the longer protocol
    assert b.param("optim.epochs") == "30" and b.commands() == ["ebm train z"]
    assert [r.params["optim.epochs"] for r in b.other_protocol] == ["20"]


def test_markdown_has_a_table_per_task_with_only_the_columns_present(store):
    text = results.render(results.collect(store, "exp"), "exp", store)
    x, y = text.split("### toyX")[1].split("### toyY")
    assert "| `toyX/a` | 3 | m | 4 | 75 | 128 | 2.000 ± 1.000 | 0.200 ± 0.100 | 10.0 ± 0.0 |" in x
    assert "| `toyX/b` | 1 | m | 4 | 30 | 128 | 7.000 ± 0.000 | — | — |" in x
    assert "left out, at another protocol than the row's: seed(s) 0 at 20 epochs):" in x
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
    from pipelines.tracking import open_client
    uri = f"sqlite:///{tmp_path}/m.db"
    c = open_client(uri)
    e = c.create_experiment("exp", artifact_location=(tmp_path / "art").as_uri())
    for group in ("t/a", "t/b"):
        for seed in (1, 0):
            r = c.create_run(e, tags={"seed": str(seed), "task": "t", "ebm.group": group})
            (tmp_path / "density.png").write_bytes(f"{group} {seed}".encode())
            c.log_artifact(r.info.run_id, str(tmp_path / "density.png"), "plots")
            c.set_terminated(r.info.run_id)
    out = results.download_figures(uri, results.select(results.collect(uri, "exp"), ["*/a"]), str(tmp_path / "figs"))
    assert [p.name for p in out] == ["t_a.png"] and out[0].read_bytes() == b"t/a 0"


# --- decided claims: Welch's t with known answers ---------------------------------------------------

def test_the_lr_column_shows_a_step_decay_recorded_by_resumes():
    def rec(tags, lr="0.001"):
        return results.RunRecord("r", "e", "FINISHED", {"optim.lr": lr}, {}, tags)
    assert results.lr_schedule(rec({})) == "0.001"
    # two resumes, each with its own epoch-keyed change (the second also raised epochs only)
    two = rec({"ebm.config_change.30": json.dumps({"optim.epochs": [30, 45], "optim.lr": [0.001, 0.0001]}),
               "ebm.config_change.45": json.dumps({"optim.epochs": [45, 60], "optim.lr": [0.0001, 1e-05]}),
               "ebm.config_change.50": json.dumps({"optim.epochs": [60, 70]})}, lr="1e-05")
    assert results.lr_schedule(two) == "0.001, 0.0001 after 30, 1e-05 after 45"
    # a run recorded before the changes were keyed by epoch: the old optim.epochs says when, if it changed
    assert results.lr_schedule(rec({"ebm.config_change": json.dumps({"optim.epochs": [30, 45], "optim.lr": [0.001, 0.0001]})},
                                   lr="0.0001")) == "0.001, 0.0001 after 30"
    assert results.lr_schedule(rec({"ebm.config_change": json.dumps({"optim.lr": [0.001, 0.0005]})})) == "0.001, 0.0005 after ?"
    g = results.Group("toyX/a", "toyX", [rec({}), two])
    assert g.param("optim.lr") == "mixed: 0.001/0.001, 0.0001 after 30, 1e-05 after 45"


def test_the_diagnosis_table_shows_diagnosed_runs_and_names_stale_ones():
    from pipelines.driver.results_page import diag_metrics, diagnosis_table
    m = {"selected_epoch": 28.0, "diag_epoch": 28.0, **diag_metrics("ebm_grid", [0.4, 0.7, 0.84, 0.93]),
         **diag_metrics("prediction", [0.41, 0.71, 0.85, 0.92], M=64, ess=0.77),
         **diag_metrics("prediction", [0.42, 0.72, 0.86, 0.93], M=1024, ess=0.76)}
    fresh = results.RunRecord("a", "e", "FINISHED", {"optim.epochs": "30"}, m, {"seed": "0"})
    moved = results.RunRecord("b", "e", "FINISHED", {"optim.epochs": "45"}, {**m, "selected_epoch": 31.0}, {"seed": "1"})
    never = results.RunRecord("c", "e", "FINISHED", {}, {"selected_epoch": 3.0}, {"seed": "2"})
    text = diagnosis_table([results.Group("star/x", "star", [never, moved, fresh])])
    assert text.splitlines()[2:5] == [
        "| `star/x` seed 0 (selected epoch 28; 30 epochs) | ebm_grid |  |  | 0.400 | 0.700 | 0.840 | 0.930 |",
        "|  | prediction | 64 | 0.770 | 0.410 | 0.710 | 0.850 | 0.920 |",
        "|  | prediction | 1024 | 0.760 | 0.420 | 0.720 | 0.860 | 0.930 |"]
    assert "`star/x` seed 1 (diagnosed at epoch 28, now selects 31)" in text and "seed 2" not in text
    assert "no run of these groups was diagnosed" in diagnosis_table([results.Group("star/y", "star", [never])])


def test_the_convergence_trend_is_taken_at_the_final_learning_rate():
    from pipelines.driver.results_page import convergence_table
    # 30 flat epochs at lr 1e-3, then 15 flat ones lower after a step decay: the fifth before the last
    # (epochs 27-35) straddles the drop; at the final lr the curve is flat
    curve = [[e, 1.0 if e < 30 else 0.8] for e in range(45)]
    decayed = {"ebm.config_change.30": json.dumps({"optim.epochs": [30, 45], "optim.lr": [0.001, 0.0001]})}
    rec = results.RunRecord("r", "e", "FINISHED", {"optim.epochs": "45"}, {}, decayed, {"val_nll": curve})
    row = convergence_table([results.Group("star/d", "star", [rec])]).splitlines()[2]
    assert row.endswith("| 0.000 ± 0.000 |"), row
    undecayed = results.RunRecord("r", "e", "FINISHED", {"optim.epochs": "45"}, {}, {}, {"val_nll": curve})
    row = convergence_table([results.Group("star/d", "star", [undecayed])]).splitlines()[2]
    assert row.endswith("| -0.067 ± 0.000 |"), row            # the drop, read as still improving


def test_the_curves_figure_draws_each_cell_mean_band_decay_and_selected_epochs(tmp_path):
    from pipelines.driver.results_page import curve_cells, directive
    decayed = {"ebm.config_change.30": json.dumps({"optim.epochs": [30, 45], "optim.lr": [0.001, 0.0001]})}
    a = results.RunRecord("a", "e", "FINISHED", {}, {"selected_epoch": 31.0}, decayed,
                          {"val_nll": [[e, 1.0 - 0.01 * e] for e in range(45)]})
    b = results.RunRecord("b", "e", "FINISHED", {}, {"selected_epoch": 2.0}, decayed,
                          {"val_nll": [[e, 2.0 - 0.01 * e] for e in range(40)]})        # 5 epochs short
    flat = results.RunRecord("c", "e", "FINISHED", {}, {}, {}, {"val_nll": [[e, 0.5] for e in range(30)]})
    bare = results.RunRecord("d", "e", "FINISHED", {}, {}, {})                          # no curve exported
    cells = curve_cells([results.Group("star/a", "star", [a, b]), results.Group("star/c", "star", [flat]),
                         results.Group("star/d", "star", [bare])], "val_nll")
    assert [c["name"] for c in cells] == ["star/a", "star/c"]
    ab = cells[0]
    assert ab["epochs"] == list(range(45)) and ab["seeds"][:40] == [2] * 40 and ab["seeds"][40:] == [1] * 5
    assert ab["mean"][10] == pytest.approx(1.4) and ab["lo"][10] == pytest.approx(0.9) and ab["hi"][10] == pytest.approx(1.9)
    assert ab["mean"][42] == pytest.approx(0.58)            # only the run that reached epoch 42
    assert ab["lr_changes"] == [30] and ab["selected"] == [(31, pytest.approx(0.69)), (2, pytest.approx(1.98))]
    assert cells[1]["lr_changes"] == [] and cells[1]["selected"] == []
    md = directive("curves", "figs/c.png val_nll star/*", [results.Group("star/a", "star", [a, b])], tmp_path)
    assert md.startswith("![`val_nll` per epoch: star/a](figs/c.png)") and (tmp_path / "figs/c.png").stat().st_size > 10000
    assert "no figure" in directive("curves", "n.png val_kl star/*", [results.Group("star/a", "star", [a])], tmp_path)
    with pytest.raises(ValueError, match="give --out a file"):
        directive("curves", "c.png val_nll star/*", [results.Group("star/a", "star", [a])], None)
    with pytest.raises(ValueError, match="expected FILE METRIC GLOB"):
        directive("curves", "c.png val_nll", [], tmp_path)


def test_a_group_pools_one_protocol_and_names_the_runs_at_another():
    """A batch part-way: seeds 0-1 continued by the step decay to 45 epochs, seed 2 still at 30. The row
    and the claims pool the decayed runs only; seed 2 is named under the table; a claim between a
    decayed cell and one not yet decayed is not computed."""
    from pipelines.driver.results_page import claims_table
    decay = {"ebm.config_change.30": json.dumps({"optim.epochs": [30, 45], "optim.lr": [0.001, 0.0001]})}

    def rec(group, seed, kl, epochs="45", status="FINISHED", tags=decay):
        return results.RunRecord(f"{group}{seed}", "e", status, {"optim.epochs": epochs, "optim.lr": "0.001"},
                                 {"test_kl": kl}, {results.GROUP_TAG: group, "seed": str(seed), "task": "star", **tags})
    runs = [rec("star/a", 0, 0.1), rec("star/a", 1, 0.2), rec("star/a", 2, 9.0, epochs="30", tags={}),
            rec("star/a", 3, 9.0, epochs="30", status="RUNNING", tags={}),
            rec("star/b", 0, 0.3, epochs="30", tags={}), rec("star/b", 1, 0.3, epochs="30", tags={}),
            rec("star/c", 0, 0.1), rec("star/c", 1, 0.3)]
    a, b, c = results.group_runs(runs)
    assert [r.tags["seed"] for r in a.runs] == ["0", "1"] and [r.tags["seed"] for r in a.other_protocol] == ["2"]
    assert a.unfinished == 1 and not b.other_protocol and results.protocol(a.runs[0]) == "45 epochs, lr 0.001, 0.0001 after 30"
    text = results.table([a, b])
    assert "| `star/a` | 2 |" in text and "0.150 ± 0.071" in text and "9.000" not in text
    assert "1 unfinished run(s) left out; left out, at another protocol than the row's: seed(s) 2 at 30 epochs, lr 0.001" in text
    claims = claims_table([a, b, c], "test_kl", [("star/a", "star/b"), ("star/a", "star/c")]).splitlines()
    assert "not compared: A at 45 epochs, lr 0.001, 0.0001 after 30, B at 30 epochs, lr 0.001" in claims[2]
    assert claims[3].startswith("| `star/a` vs `star/c` | 2 | 2 | 0.150 ± 0.071 | 0.200 ± 0.141 |")


def test_welch_matches_the_textbook_example_and_scipy():
    from scipy import stats

    from pipelines.driver.results_page import welch
    # Welch (1947)-style example from the Welch's t-test article (sample 1 / sample 2 of its first example)
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    c = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert c.t == pytest.approx(ref.statistic, rel=1e-12) and c.t == pytest.approx(-2.46, abs=0.005)
    assert c.df == pytest.approx(ref.df, rel=1e-12) and c.df == pytest.approx(24.99, abs=0.005)
    ci = ref.confidence_interval(0.95)
    assert (c.lo, c.hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert c.decision == "beats"                       # lower is better and the interval is below 0
    assert welch(b, a).decision == "worse"


def test_decisions_and_the_matches_bound_by_hand():
    from pipelines.driver.results_page import welch
    # n = 2 each, s² = 2 each: d = −1, se = √2, ν = 2, t_{0.975, 2} = 4.302653 -> X = 1 + 4.302653·√2
    c = welch([1.0, 3.0], [2.0, 4.0])
    assert (c.diff, c.se, c.df) == (pytest.approx(-1.0), pytest.approx(math.sqrt(2)), pytest.approx(2.0))
    assert c.bound == pytest.approx(1 + 4.302653 * math.sqrt(2), abs=1e-5)
    assert c.decision == "matches (difference < 7.085 at 95%)"
    # three seeds each, sd 0.1: d = −1 with se 0.0816, ν = 4 -> resolved both ways
    assert welch([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]).decision == "beats"
    assert welch([2.0, 2.1, 1.9], [1.0, 1.1, 0.9]).decision == "worse"
    assert welch([1.0], [2.0, 3.0]).decision.startswith("undecided")
    same = welch([0.5, 0.5], [0.5, 0.5])
    assert same.decision == "matches (difference < 0.000 at 95%)"


def test_inline_values_quote_the_cells_and_claims_the_tables_print():
    from pipelines.driver.results_page import diag_metrics, render_page, welch

    def rec(seed, nll, epochs="45", **m):
        return results.RunRecord(f"r{seed}", "e", "FINISHED", {"optim.epochs": epochs, "seed": str(seed)},
                                 {"test_nll": nll, **m}, {"seed": str(seed)})
    a = results.Group("img/a", "img", [rec(0, -0.5, selected_epoch=20.0), rec(1, -0.3, selected_epoch=23.0)])
    b = results.Group("img/b", "img", [rec(0, 0.1), rec(1, 0.2), rec(2, 0.4)])
    short = results.Group("img/short", "img", [rec(0, 0.3, epochs="30"), rec(1, 0.2, epochs="30")])
    empty = results.Group("img/empty", "img", [], unfinished=1)
    # a diag_* figure counts only where the diagnosis is of the run's selected epoch (seed 1 moved since)
    diag = results.Group("img/d", "img", [
        rec(0, 0.0, selected_epoch=5.0, diag_epoch=5.0, **diag_metrics("ebm_grid", [0.4, 0.7, 0.81, 0.9])),
        rec(1, 0.0, selected_epoch=9.0, diag_epoch=5.0, **diag_metrics("ebm_grid", [0.4, 0.7, 0.99, 0.9])),
        rec(2, 0.0, selected_epoch=4.0, diag_epoch=4.0, **diag_metrics("ebm_grid", [0.4, 0.7, 0.83, 0.9]))])
    groups = [a, b, short, empty, diag]
    c = welch([-0.5, -0.3], [0.1, 0.2, 0.4])
    page = render_page(
        "A {{=cell test_nll img/a}} (n {{=n test_nll img/a}}, se {{=se:.2f test_nll img/a}}), seeds "
        "{{=range test_nll img/b}}, epoch {{=mean:.0f selected_epoch img/a}}.\n"
        "d {{=diff test_nll img/a vs img/b}} {{=interval test_nll img/a vs img/b}} t {{=t:.1f test_nll img/a vs img/b}}: "
        "{{=decision test_nll img/a vs img/b}}; bound {{=bound test_nll img/b vs img/b}}.\n"
        "{{=mean test_nll img/empty}} {{=n test_nll img/empty}} {{=t test_nll img/a vs img/short}}\n"
        "grid {{=range:.2f diag_coverage_ebm_grid_90 img/d}} of {{=n diag_coverage_ebm_grid_90 img/d}}; "
        "`{{=cell METRIC GROUP}}` as written\n", groups, "n")
    lines = page.splitlines()[1:]
    assert lines[0] == "A −0.400 ± 0.141 (n 2, se 0.10), seeds 0.100 to 0.400, epoch 22."
    bound = welch([0.1, 0.2, 0.4], [0.1, 0.2, 0.4]).bound
    assert c.decision == "beats" and c.t < 0 and bound > 0.3
    assert lines[1] == f"d −0.633 [{c.lo:+.3f}, {c.hi:+.3f}] t {c.t:.1f}: beats; bound {bound:.3f}.".replace("-", "−")
    assert lines[2] == "— 0 (not compared: A at 45 epochs, B at 30 epochs)"
    assert lines[3] == "grid 0.81 to 0.83 of 2; `{{=cell METRIC GROUP}}` as written"
    for bad, why in (("{{=mean test_nll img/typo}}", "no group named `img/typo`"),
                     ("{{=median test_nll img/a}}", "unknown inline value {{=median}}"),
                     ("{{=diff test_nll img/a}}", "expected METRIC A vs B"),
                     ("{{=cell img/a}}", "expected METRIC GROUP"),
                     ("x {{= cell test_nll img/a}}", "not of the form")):
        with pytest.raises(ValueError, match=f"template line 2: .*{re.escape(why)}"):
            render_page("ok\n" + bad + "\n", groups, "n")


def test_floor_values_come_from_the_generators():
    from ebm.tasks import bayes_nll
    from pipelines.driver.results_page import floor_value
    assert floor_value("toy1", "test_kl") == 0.0 and floor_value("star", "test_kl") == 0.0
    assert floor_value("toy2", "test_nll") == bayes_nll("toy2")
    with pytest.raises(ValueError, match="no floor"):
        floor_value("fashion", "test_nll")


# --- the compact export and the page rebuilt from it ------------------------------------------------

def _cells(client, exp_id):
    """A synthetic experiment: two toy-2 cells of 4 seeds with clearly different NLLs, a matching cell,
    per-level coverage on one cell and only the old 90 % coverage on another."""
    nll = {"toy2/p_learned_K4": [1.50, 1.52, 1.48, 1.51], "toy2/p_nce_fixed": [1.70, 1.72, 1.69, 1.71],
           "toy2/p_mdn_K4": [1.49, 1.55, 1.47, 1.53]}
    for group, values in nll.items():
        for seed, v in enumerate(values):
            m = {"test_nll": v, "selected_epoch": 10 + seed, "test_coverage": 0.88}
            if group == "toy2/p_learned_K4":
                m.update(test_coverage_50=0.5, test_coverage_80=0.79, test_coverage_90=0.9, test_coverage_95=0.96)
                # an under-covering proposal: too many PITs in the outer bins (seed 0 more so than the rest)
                m.update({f"test_pit_proposal_{b}": (0.2 if b in (0, 9) else 0.075) if seed else
                          (0.3 if b in (0, 9) else 0.05) for b in range(10)})
            _run(client, exp_id, group, seed, m, task="toy2")
    _run(client, exp_id, "toy2/p_mdn_K4", 9, {"test_nll": 50.0}, status="FAILED", task="toy2")
    # validation curves over 10 epochs: the learned cell's best at epoch 5 (then overfits), nce_fixed's
    # still falling at its last epoch
    for r in client.search_runs([exp_id]):
        group = r.data.tags.get("ebm.group")
        for step in range(10):
            v = {"toy2/p_learned_K4": 1.0 + 0.01 * (step - 5) ** 2, "toy2/p_nce_fixed": 2.0 - 0.05 * step}.get(group)
            if v is not None:
                client.log_metric(r.info.run_id, "val_nll", v, step=step)


TEMPLATE = """# Page

Prose stays as written.

{{table toy2/p_*}}

{{claims test_nll toy2/p_learned_K4 vs toy2/p_nce_fixed; toy2/p_learned_K4 vs toy2/p_mdn_K4; toy2/p_x vs toy2/p_mdn_K4}}

{{floor toy2 test_nll toy2/p_*}}

{{calibration toy2/p_*}}

{{pit toy2/p_*}}

{{pit toy2/p_nce_fixed}}

{{convergence toy2/p_*}}

{{calfigure figs/cal_prediction.png prediction toy2/p_*}}

{{calfigure figs/cal_proposal.png proposal,prediction toy2/p_*}}

{{calfigure figs/none.png ebm_grid toy2/p_*}}

{{table star/*}}
"""


@pytest.fixture(scope="module")
def _exported(tmp_path_factory):
    """The synthetic store and its export, made once per module (~100 MLflow writes)."""
    from pipelines.tracking import open_client
    d = tmp_path_factory.mktemp("exported")
    uri = f"sqlite:///{d}/m.db"
    c = open_client(uri)
    _cells(c, c.create_experiment("exp", artifact_location=(d / "art").as_uri()))
    out = d / "runs.jsonl"
    assert cli.main(["results", "exp", "--tracking-uri", uri, "--export", str(out)]) == 0
    return uri, out


@pytest.fixture
def export(tmp_path, _exported):
    """The store (read only) and a copy of its export of this test's own, which the test may change."""
    import shutil
    uri, src = _exported
    out = tmp_path / "results" / "runs.jsonl"
    out.parent.mkdir()
    shutil.copy(src, out)
    return uri, out


def test_export_is_one_record_per_run_and_reads_back_like_the_store(export):
    uri, path = export
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": results.EXPORT_FORMAT} and len(lines) == 1 + 13
    from_file = {g.name: g for g in results.group_runs(results.read_export(path, "exp"))}
    from_store = {g.name: g for g in results.collect(uri, "exp")}
    assert from_file.keys() == from_store.keys()
    for name, g in from_store.items():
        assert sorted(g.values("test_nll")) == sorted(from_file[name].values("test_nll"))
        assert g.unfinished == from_file[name].unfinished
    assert not any(k.startswith("mlflow.") for line in lines[1:] for k in json.loads(line)["tags"])
    assert results.read_export(path, "other") == []


def test_export_merges_so_an_earlier_batch_survives_its_lost_store(export, tmp_path):
    from pipelines.tracking import open_client
    _, path = export
    uri2 = f"sqlite:///{tmp_path}/m2.db"
    c = open_client(uri2)
    _run(c, c.create_experiment("exp", artifact_location=(tmp_path / "art2").as_uri()), "star/learned_K4", 0,
         {"test_kl": 0.1}, task="star")
    assert cli.main(["results", "exp", "--tracking-uri", uri2, "--export", str(path)]) == 0
    names = {g.name for g in results.group_runs(results.read_export(path))}
    assert names == {"toy2/p_learned_K4", "toy2/p_nce_fixed", "toy2/p_mdn_K4", "star/learned_K4"}
    assert cli.main(["results", "exp", "--tracking-uri", uri2, "--export", str(path)]) == 0
    assert len(path.read_text().splitlines()) == 1 + 14          # the same run again replaces itself


def test_page_is_rebuilt_from_the_export_with_tables_claims_floor_and_calibration(export, tmp_path):
    from ebm.tasks import bayes_nll
    _, path = export
    tpl, page = tmp_path / "T.md", tmp_path / "docs" / "R.md"
    tpl.write_text(TEMPLATE)
    assert cli.main(["results", "exp", "--runs", str(path), "--template", str(tpl), "--out", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("<!-- generated by `ebm results exp --runs ") and "Prose stays as written." in text
    assert "{{" not in text
    assert "| `toy2/p_learned_K4` | 4 | m | 4 | 75 | 128 | 1.502 ± 0.017 |" in text
    assert "selected epoch by seed: 0: 10, 1: 11, 2: 12, 3: 13" in text
    assert "1 unfinished run(s) left out" in text
    claims = [ln for ln in text.splitlines() if ln.startswith("| `toy2/p_")]
    beats = next(ln for ln in claims if "vs `toy2/p_nce_fixed`" in ln)
    assert beats.endswith("| **beats** |") and "| -0.203 |" in beats
    match = next(ln for ln in claims if "`toy2/p_learned_K4` vs `toy2/p_mdn_K4`" in ln)
    assert "**matches (difference < 0.0" in match
    assert "no finished runs in `toy2/p_x`" in text
    floor = bayes_nll("toy2")
    assert "| **floor** (Bayes-optimal test NLL" in text and f"| {floor:.3f} | 0 | — |" in text
    assert f"| `toy2/p_nce_fixed` | 4 | 1.705 ± 0.013 | {1.705 - floor:+.3f} | 0.006 |" in text
    assert "| `toy2/p_learned_K4` | prediction | 4 | 0.500 ± 0.000 | 0.790 ± 0.000 | 0.900 ± 0.000 | 0.960 ± 0.000 |" in text
    # runs that logged only the 90 % interval's coverage fill that column from it
    assert "| `toy2/p_nce_fixed` | prediction | 4 | — | — | 0.880 ± 0.000 | — |" in text
    assert "*(no finished runs yet in groups matching `star/*`)*" in text
    # the PIT histogram: bins averaged over the 4 seeds (0.3, 0.2, 0.2, 0.2 -> 0.225 in the outer bins)
    assert ("| `toy2/p_learned_K4` | proposal | 4 | `█▃▃▃▃▃▃▃▃█` | 0.225 " + "0.069 " * 8 + "0.225 | 0.125 |") in text
    assert "*(no run of these groups logged a PIT histogram" in text
    # trend: mean of epochs 8-9 minus mean of 6-7 (rising 1.125 − 1.025 after its best; still falling −0.100)
    assert "| `toy2/p_learned_K4` | 4 | 75 | 5 [5–5] | 1.000 ± 0.000 | 1.160 ± 0.000 | 0 of 4 | 0.100 ± 0.000 |" in text
    assert "| `toy2/p_nce_fixed` | 4 | 75 | 9 [9–9] | 1.550 ± 0.000 | 1.550 ± 0.000 | 4 of 4 | -0.100 ± 0.000 |" in text
    assert "| `toy2/p_mdn_K4` | 4 | 75 | no `val_nll` curve logged |" in text
    # the calibration figures, written beside the page, of the groups that logged that source
    assert "![calibration of `prediction`: toy2/p_learned_K4, toy2/p_mdn_K4, toy2/p_nce_fixed](figs/cal_prediction.png)" in text
    # a group without the first source is drawn from the next one it logged, named with it
    assert ("![calibration of `proposal` or `prediction`: toy2/p_learned_K4, toy2/p_mdn_K4 (prediction), "
            "toy2/p_nce_fixed (prediction)](figs/cal_proposal.png)") in text
    assert "no run of these groups logged the coverage of `ebm_grid`: no figure" in text
    for f in ("cal_prediction.png", "cal_proposal.png"):
        assert (page.parent / "figs" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (page.parent / "figs" / "none.png").exists()


def test_calibration_figure_draws_seed_means_with_their_95_percent_interval(export):
    from pipelines.driver.results_page import calibration_cells
    _, path = export
    groups = results.group_runs(results.read_export(path, "exp"))
    by = {c["name"]: c for c in calibration_cells(groups, ["proposal"])}
    assert list(by) == ["toy2/p_learned_K4"]
    assert by["toy2/p_learned_K4"]["pit"] == pytest.approx([0.225] + [0.06875] * 8 + [0.225])
    assert by["toy2/p_learned_K4"]["coverage"] == {}
    pred = {c["name"]: c for c in calibration_cells(groups, ["prediction"])}
    assert pred["toy2/p_learned_K4"]["coverage"] == {0.5: (0.5, 0.0), 0.8: (0.79, 0.0), 0.9: (0.9, 0.0),
                                                     0.95: (0.96, 0.0)}
    assert pred["toy2/p_nce_fixed"]["coverage"] == {0.9: (0.88, 0.0)} and pred["toy2/p_nce_fixed"]["pit"] is None
    # a spread over seeds gives the t interval of the mean: 4 seeds at 0.8 and 0.9 alternately
    g = results.group_runs(results.read_export(path, "exp"))
    learned = next(x for x in g if x.name == "toy2/p_learned_K4")
    for r, v in zip(learned.runs, (0.8, 0.9, 0.8, 0.9)):
        r.metrics["test_coverage_90"] = v
    mean, half = {c["name"]: c for c in calibration_cells([learned], ["prediction"])}["toy2/p_learned_K4"]["coverage"][0.9]
    assert mean == pytest.approx(0.85) and half == pytest.approx(3.182446 * 0.057735 / 2, rel=1e-5)


def test_bad_templates_exports_and_flag_mixes_are_usage_errors(export, tmp_path, capsys):
    uri, path = export
    out = str(tmp_path / "r.md")
    tpl = tmp_path / "T.md"
    tpl.write_text("x\n{{claims test_nll a versus b}}\n")
    assert cli.main(["results", "exp", "--runs", str(path), "--template", str(tpl), "--out", out]) == 2
    assert "template line 2" in capsys.readouterr().err
    tpl.write_text("{{tabel toy2/*}}\n")
    assert cli.main(["results", "exp", "--runs", str(path), "--template", str(tpl), "--out", out]) == 2
    assert "unknown directive" in capsys.readouterr().err
    tpl.write_text("{{calfigure f.png bogus toy2/*}}\n")
    assert cli.main(["results", "exp", "--runs", str(path), "--template", str(tpl), "--out", out]) == 2
    assert "unknown source 'bogus'" in capsys.readouterr().err
    tpl.write_text("{{calfigure f.png prediction toy2/*}}\n")
    assert cli.main(["results", "exp", "--runs", str(path), "--template", str(tpl), "--out", "-"]) == 2
    assert "give --out a file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "ebm-runs/1"}\n{"run_id": 1}\n')
    assert cli.main(["results", "exp", "--runs", str(bad), "--out", out]) == 2
    assert "bad.jsonl:2: not a run record" in capsys.readouterr().err
    assert cli.main(["results", "exp", "--runs", str(path), "--tracking-uri", uri, "--out", out]) == 2
    assert cli.main(["results", "exp", "--export", str(path), "--out", out]) == 2
    assert cli.main(["results", "exp", "--tracking-uri", uri]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_the_run_plan_fits_its_batches_and_makes_the_groups_the_page_asks_for():
    import re
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["bash", str(root / "results" / "run_issue16.sh"), "list"], capture_output=True, text=True,
                         check=True).stdout
    hours = [float(h) for h in re.findall(r"\(~([\d.]+) h\)", out)]
    # two queues per batch, each within ~2.75 h on an idle core (the image batches' step decay is half
    # again their 30 epochs); an interrupted batch resumes where it stopped
    assert len(hours) == 10 and max(hours) <= 2.75
    script = (root / "results" / "run_issue16.sh").read_text()
    cells = set(re.search(r'^CELLS="([^"]+)"', script, re.M).group(1).split())
    queues = re.search(r'^QA="([^"]+)"', script, re.M).group(1).split() + \
        re.search(r'^QB="([^"]+)"', script, re.M).group(1).split()
    assert sorted(queues) == sorted(cells)                   # the image batches run every claim cell once
    made = {f"{t}/p20_{c}" for t in ("toy1", "toy2") for c in cells} | \
        {f"{t}/conv_{c}" for t in ("star", "fashion") for c in cells}
    template = (root / "results" / "RESULTS.template.md").read_text()
    asked = {g for line in template.splitlines() if line.startswith("{{claims ")
             for g in re.findall(r"[A-Za-z0-9]+/[A-Za-z0-9_]+", line)}
    assert asked and asked <= made, sorted(asked - made)
    # a chain checks every batch name before it runs any
    bad = subprocess.run(["bash", str(root / "results" / "run_issue16.sh"), "chain", "star_b", "star_c"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown batch star_c" in bad.stderr and "chain: batch" not in bad.stdout


def test_a_finished_run_is_continued_with_its_own_command_for_its_one_seed():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "results" / "extend_runs.py"
    spec = importlib.util.spec_from_file_location("extend_runs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cmd = ("ebm train star --local --seeds 5 --experiment paper-claims --tracking-uri sqlite:///results/mlruns.db "
           "--group star/conv_learned_K4 --set seed=0 --set method.name=ebm_learned_proposal --set optim.epochs=30 "
           "--set 'task.data_dir=data/my dir'")
    assert mod.resume_command(cmd, "star/conv_learned_K4-seed3-x", "3", 60) == [
        "ebm", "train", "star", "--local", "--experiment", "paper-claims", "--tracking-uri",
        "sqlite:///results/mlruns.db", "--group", "star/conv_learned_K4", "--set", "seed=3", "--set",
        "method.name=ebm_learned_proposal", "--set", "optim.epochs=60", "--set", "task.data_dir=data/my dir",
        "--resume", "star/conv_learned_K4-seed3-x"]
    # a command without the keys gets them; a command that is not a local training is refused
    assert mod.resume_command("ebm train toy2 --local", "r", "1", 5)[-6:] == [
        "--set", "optim.epochs=5", "--set", "seed=1", "--resume", "r"]
    # a change for the added epochs replaces the recorded value and is let through explicitly
    assert mod.resume_command(cmd, "r", "3", 45, ["optim.lr=1e-4", "method.name=mdn"])[-13:] == [
        "--set", "seed=3", "--set", "optim.epochs=45", "--set", "task.data_dir=data/my dir",
        "--set", "optim.lr=1e-4", "--set", "method.name=mdn", "--allow-config-change", "--resume", "r"]
    with pytest.raises(ValueError, match="a key other than seed and optim.epochs"):
        mod.resume_command(cmd, "r", "3", 45, ["optim.epochs=99"])
    with pytest.raises(ValueError, match="not an `ebm train --local` command"):
        mod.resume_command("ebm train toy2 --num-workers 2", "r", "1", 5)
