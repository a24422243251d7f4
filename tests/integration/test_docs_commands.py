"""Every shell command of the README and docs/*.md is run by a test, or is listed here with where it is
covered or why it cannot run here. A new or changed command fails the first test until it is run or
listed; an entry whose command left the docs fails it too.

The second test runs the commands marked RUN, as written, in one fresh folder set up as a user's
(``.venv`` linked to this venv, the venv's bin first on PATH, MLflow's default ``./mlruns.db``), with
the files the commands name made beforehand: one tiny star-image model trained with ``--local`` and
shared by every command that needs one, its dataset, a folder of images and a manifest.
docs/your_data.md is run, block by block, by tests/integration/test_your_data.py."""
from __future__ import annotations

import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from doc_shell import ROOT, SHELL, blocks, commands, documents, user_env

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
TUTORIAL = ("docs/your_data.md",
            "tests/integration/test_your_data.py::test_the_your_data_tutorial_runs_as_written_a_circular_and_a_linear_target")


@dataclass(frozen=True)
class ByTest:
    """Run in this form by the named test (``path::function``); the function's source holds each token."""
    test: str
    tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class NotHere:
    """Cannot run in a test, for the reason given."""
    reason: str


RUN = "run by test_the_runnable_commands_run_as_written, here"
SAME = "the same command in docs/your_data.md, which test_your_data runs"
DEMO = ByTest("Makefile::demo", ("data ingest synthetic star", "train demo", "register", "predict"))
CLOUD = NotHere("needs an AWS account and a real cluster; rehearsed on one machine by tests/integration/test_rehearsal.py")
IT = "tests/integration/"
RESUME = ByTest(IT + "test_run_states.py::test_resume_rules", ("--resume", "optim.epochs"))
TUNE = ByTest(IT + "test_tune.py::test_asha_sweep_nests_trials_logs_the_best_and_registers_one_version", ("_sweep",))
SEED_SWEEP = ByTest(IT + "test_docs_commands.py::test_a_seed_sweep_is_registered_by_best_of", ("--seeds", "--best-of"))
SEEDS = ByTest(IT + "test_local_tracking.py::test_each_seed_is_one_finished_run_with_tags_metrics_and_plot",
               ("--seeds", "--group"))
RESULTS = ByTest(IT + "test_hardening_cli.py::test_results_reads_only_and_refuses_empty_input", ("results", "--groups"))
PREDICT_AT_SCALE = ByTest(IT + "test_predict_at_scale.py::test_a_dataset_on_s3_predicts_to_s3_with_the_same_numbers",
                          ("--workers", "s3://", "ckpt"))
SERVE = ByTest(IT + "test_your_data.py::run_tutorial", ("mlflow models serve", "/ping"))
REGISTRY = ByTest(IT + "test_registry.py::test_mlflow_models_serve_answers_http_with_the_same_numbers", ("serve",))
PAPER = NotHere("the paper-claims reproduction: hours of CPU per table (docs/RESULTS.md); "
                "its commands are ebm train --local --seeds and ebm results, run by the tests named for the README")

DIAGNOSE = ByTest(IT + "test_results_scripts.py::test_diagnose_and_extend_finished_runs", ("diagnose_coverage.py", "--seeds"))
DIAGNOSE_DATA = ByTest(IT + "test_results_scripts.py::test_a_run_on_a_dataset_is_diagnosed_on_that_datasets_test_split",
                       ("diagnose_coverage.py", "task.data_dir"))

# key (doc_shell.Command.key) -> how it is covered. Keep NotHere short and honest.
COVERED: dict[str, object] = {
    # README.md
    "make demo": DEMO,
    "make test": NotHere("the whole test suite, of which this test is part"),
    ".venv/bin/ebm train toy2": ByTest(IT + "test_train_job.py::_run", ("num_workers=2",)),
    ".venv/bin/ebm train my.toml --set proposal.K=16 --set sampler.M_train=256": RUN,
    ".venv/bin/ebm train star --set task.data_dir=data/star32": DEMO,
    ".venv/bin/ebm train toy2 --name t2 ... ; ebm train toy2 --resume t2": RESUME,
    ".venv/bin/ebm train toy2 --resume t2 --set optim.epochs=100": RESUME,
    ".venv/bin/ebm train toy2 --local --seeds 5 --out runs/toy2": SEEDS,
    ".venv/bin/ebm train fashion --local --set task.data_dir=data/fashion4k":
        ByTest(IT + "test_local_tracking.py::test_local_trains_on_a_parquet_dataset_and_tags_its_fingerprint",
               ("--local", "task.data_dir")),
    ".venv/bin/ebm results paper-claims --out results.md [--groups toy2/*] [--figures docs/figures]": RESULTS,
    ".venv/bin/ebm results paper-claims --export results/runs.jsonl": ByTest("tests/unit/test_results.py::_exported",
                                                                            ("--export",)),
    "make results": ByTest("tests/unit/test_results.py::test_page_is_rebuilt_from_the_export_with_tables_claims_"
                           "floor_and_calibration", ("--runs", "--template")),
    ".venv/bin/ebm tune toy2 --space space.toml --name k-sweep": TUNE,
    ".venv/bin/ebm tune toy2 --seeds 20 --name toy2-20seeds": SEED_SWEEP,
    ".venv/bin/ebm tune --resume k-sweep": ByTest(
        IT + "test_tune.py::test_an_errored_trial_resumes_from_its_checkpoint_without_duplicate_runs", ("resume",)),
    ".venv/bin/ebm register --best-of PARENT_RUN_ID --name toy2-ebm": SEED_SWEEP,
    ".venv/bin/ebm predict models:/toy2-ebm@champion --input DIR|FILE.parquet --out pred.csv":
        ByTest(IT + "test_registry.py::test_ebm_predict_on_images_and_clear_errors_for_bad_inputs", ("predict", "--input")),
    ".venv/bin/ebm predict models:/toy2-ebm@champion --input s3://bucket/data --out s3://bucket/pred.parquet --workers 4":
        PREDICT_AT_SCALE,
    ".venv/bin/ebm evaluate models:/toy2-ebm@champion --data data/toy2": ByTest(
        IT + "test_registry.py::test_ebm_evaluate_and_predict_on_a_parquet_dataset", ("evaluate", "--data")),
    "mlflow models serve -m models:/toy2-ebm@champion --env-manager local -h 127.0.0.1 -p 5001": REGISTRY,
    ".venv/bin/ebm data ingest folder_csv photos --task dials --targets angle,size --circular angle:360 --units size=px "
    "--out data/dials": SAME,
    ".venv/bin/ebm data inspect data/dials --sheet sheet.png": SAME,
    ".venv/bin/ebm train dials.toml --name dials-ray --set optim.epochs=12 --set optim.batch_size=8": SAME,
    ".venv/bin/ebm train dials.toml --local --threads 1 --name dials-local": SAME,
    ".venv/bin/ebm register --run-name dials-local --name dials-model": SAME,
    ".venv/bin/ebm predict models:/dials-model@champion --input photos --M 256 --seed 3 --out pred.json": SAME,
    ".venv/bin/ebm data ingest synthetic star --size 32 --n-train 2000 --n-val 300 --n-test 500 --out data/star32": RUN,
    ".venv/bin/ebm data ingest fashion_rotation --out data/fashion": ByTest(
        IT + "test_data_formats.py::test_fashion_subsets_are_seeded_samples_of_the_full_ingest", ("fashion_rotation",)),
    ".venv/bin/ebm data ingest fashion_rotation --out data/fashion4k --n-train 4000 --n-val 500 --n-test 1000": ByTest(
        IT + "test_data_formats.py::test_fashion_subsets_are_seeded_samples_of_the_full_ingest", ("n={",)),
    ".venv/bin/ebm data ingest ccgan_h5 SteeringAngle_64x64.h5 --out data/steering": ByTest(
        IT + "test_data_formats.py::test_roundtrip_plain_reader", ("case",)),
    ".venv/bin/ebm data ingest biwi BIWI/ --out data/biwi": ByTest(IT + "test_data_formats.py::test_roundtrip_plain_reader"),
    ".venv/bin/ebm data ingest cell200 Cell200/ --out data/cell": ByTest(IT + "test_data_formats.py::test_roundtrip_plain_reader"),
    ".venv/bin/ebm data ingest folder_csv images/ --manifest labels.csv --out data/mine": RUN,
    ".venv/bin/ebm data inspect data/star32 --sheet sheet.png --verify": RUN,
    "ray up ray_cluster.yaml": CLOUD,
    "ray dashboard ray_cluster.yaml &": CLOUD,
    ".venv/bin/ebm submit --storage s3://YOUR-BUCKET/ebm/runs -- ebm train star --set "
    "task.data_dir=s3://YOUR-BUCKET/ebm/data/star32 --num-workers 8 --use-gpu": ByTest(
        IT + "test_rehearsal.py::test_two_nodes_s3_and_an_mlflow_server_survive_a_killed_worker", ("submit", "--storage")),
    ".venv/bin/ebm jobs list | status ID | logs ID [--follow] | stop ID": ByTest(
        IT + "test_cluster_jobs.py::test_submit_a_training_job_and_follow_it_to_its_mlflow_run", ("jobs",)),
    # docs/RESULTS.md
    "OMP_NUM_THREADS=1 nice -n 19 .venv/bin/ebm train toy2 --local --seeds 5 --experiment paper-claims --tracking-uri "
    "sqlite:///results/mlruns.db --group toy2/full_learned_K4 --set method.name=ebm_learned_proposal --set "
    "proposal.K=4 --set optim.epochs=75 --set sampler.M_train=1024": PAPER,
    "ALL=learned_K4 nce_fixed mdn_K4 teacher_K4 mdn_K8 teacher_K8 learned_K1 learned_K16": PAPER,
    "PREFIX=full_ results/run_cells.sh toy2 75 1024 $ALL": PAPER,
    "results/run_cells.sh toy2 20 128 $ALL": PAPER,
    "PREFIX=full_ results/run_cells.sh toy1 75 1024 $ALL": PAPER,
    "results/run_cells.sh toy1 20 128 $ALL": PAPER,
    "results/run_cells.sh star 10 256 $ALL": PAPER,
    "TASK=fashion EXTRA=--set task.data_dir=data/fashion4k results/run_cells.sh fashion 10 256 $ALL": PAPER,
    "for g in toy2/full_* toy2/[!f]* toy1/full_* toy1/[!f]* star/* fashion/*; do": PAPER,
    ".venv/bin/ebm results paper-claims --tracking-uri sqlite:///results/mlruns.db --groups $g --out - --figures /tmp/figs":
        RESULTS,
    "done": PAPER,
    ".venv/bin/python results/diagnose_coverage.py --groups star/conv_learned_K4 star/conv_nce_fixed": DIAGNOSE,
    ".venv/bin/python results/diagnose_coverage.py --groups toy1/p20_learned_K4 toy2/p20_learned_K4 --seeds 0 1":
        DIAGNOSE,
    ".venv/bin/python results/diagnose_coverage.py --groups fashion/conv_learned_K4 fashion/conv_nce_fixed --seeds 1 2 3 4 5 6 7 8 9":
        DIAGNOSE_DATA,
    # docs/scaling.md
    "ray up ray_cluster.yaml && ray dashboard ray_cluster.yaml &": CLOUD,
    "ssh -L 5000:127.0.0.1:5000 ubuntu@HEAD &": CLOUD,
    "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000": CLOUD,
    "ebm data ingest folder_csv images/ --manifest labels.csv --out s3://YOUR-BUCKET/ebm/data/mine": ByTest(
        IT + "test_object_storage.py::test_a_dataset_in_the_bucket_is_ingested_inspected_trained_on_resumed_and_predicted_from",
        ("s3://",)),
    "ebm submit --storage s3://YOUR-BUCKET/ebm/runs -- ebm train star --num-workers 8 --use-gpu --set "
    "task.data_dir=s3://YOUR-BUCKET/ebm/data/mine --name mine-1": ByTest(
        IT + "test_rehearsal.py::test_two_nodes_s3_and_an_mlflow_server_survive_a_killed_worker", ("submit",)),
    "ebm register --run-name mine-1 --name mine": ByTest(
        IT + "test_rehearsal.py::test_two_nodes_s3_and_an_mlflow_server_survive_a_killed_worker", ("register",)),
    "ebm predict models:/mine@champion --input s3://YOUR-BUCKET/ebm/data/mine --out preds.parquet": ByTest(
        IT + "test_rehearsal.py::test_two_nodes_s3_and_an_mlflow_server_survive_a_killed_worker", ("predict",)),
    # docs/tune_and_serving.md
    "ebm tune toy2 --space space.toml --name k-sweep": TUNE,
    "ebm tune toy2 --space space.toml --scheduler fifo": ByTest(
        IT + "test_tune.py::test_a_one_worker_trial_trains_in_its_own_process_with_the_numbers_of_a_ray_train_trial",
        ("fifo",)),
    "ebm tune toy2 --seeds 20 --name toy2-20seeds": SEED_SWEEP,
    "ebm tune --resume k-sweep": ByTest(
        IT + "test_tune.py::test_an_errored_trial_resumes_from_its_checkpoint_without_duplicate_runs", ("resume",)),
    "ebm tune toy2 --space space.toml --register toy2-ebm": ByTest(
        IT + "test_tune.py::test_asha_sweep_nests_trials_logs_the_best_and_registers_one_version", ("register_name",)),
    "ebm register --run RUN_ID --name toy2-ebm": ByTest(IT + "test_registry.py::toy_model", ("register",)),
    "ebm register --run-name demo-20261125-101500 --name star-demo --alias champion": RUN,
    "ebm register --best-of PARENT_RUN_ID --name toy2-ebm": SEED_SWEEP,
    "ebm predict models:/star-demo@champion --input imgs/ --out pred.csv": RUN,
    "ebm predict models:/star-demo@champion --input data/star --split test --out pred.parquet --log-density": RUN,
    "ebm predict models:/star-demo@champion --input data/star --limit 1 --out -": RUN,
    "ebm predict runs/star-demo/checkpoint_2026-… --input s3://bucket/star --out s3://bucket/pred.parquet --workers 4":
        PREDICT_AT_SCALE,
    "ebm evaluate models:/star-demo@champion --data data/star --out eval/": RUN,
    "PATH=.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:///$PWD/mlruns.db mlflow models serve -m "
    "models:/star-demo@champion --env-manager local -h 127.0.0.1 -p 5001": SERVE,
    "curl -s 127.0.0.1:5001/invocations -H Content-Type: application/json -d {\"dataframe_split\": {\"columns\": "
    "[\"image\"], \"data\": [[\"<base64 PNG>\"]]}, \"params\": {\"M\": 1024}}": SERVE,
    "EBM_SERVE_MAX_M=4096 EBM_SERVE_MAX_ROWS=256 mlflow models serve -m models:/star-demo@champion ...": ByTest(
        IT + "test_hardening_serving.py::test_the_model_server_refuses_over_limit_requests_with_small_memory",
        ("EBM_SERVE_MAX",)),
}


def documented():
    """(document, command) for every shell command of the README and docs/*.md."""
    return [(path, c) for path in documents() for b in blocks(path, SHELL) for c in commands(b)]


def _function_source(test: str) -> str:
    """The source of ``path::name`` (a test function or fixture, or a Makefile target)."""
    path, name = test.split("::")
    text = (ROOT / path).read_text()
    if path == "Makefile":
        m = re.search(rf"^{name}:.*?(?=^\S|\Z)", text, flags=re.S | re.M)
    else:
        m = re.search(rf"^def {name}\(.*?(?=^(?:def |@|class )|\Z)", text, flags=re.S | re.M)
    assert m, f"{test}: no such {'target' if path == 'Makefile' else 'function'}"
    return m.group(0)


def test_every_documented_command_is_run_or_accounted_for():
    found = documented()
    assert len(found) >= 60, "the docs lost their commands (or the collector broke)"
    tutorial = ROOT / TUTORIAL[0]
    missing = [f"{c.block.where}: {c.key}" for path, c in found if path != tutorial and c.key not in COVERED]
    assert not missing, ("commands neither run by a test nor listed in tests/integration/test_docs_commands.py "
                         "COVERED:\n  " + "\n  ".join(missing))
    in_tutorial = {c.key for path, c in found if path == tutorial}
    for key in (k for k, v in COVERED.items() if v is SAME):
        assert key.removeprefix(".venv/bin/") in in_tutorial, f"{key}: not a command of {TUTORIAL[0]}"
    keys = {c.key for _, c in found}
    stale = [k for k in COVERED if k not in keys]
    assert not stale, "COVERED lists commands that are no longer in the docs:\n  " + "\n  ".join(stale)
    assert any(path == tutorial for path, _ in found), "docs/your_data.md has no shell commands"
    for cover in {*COVERED.values(), ByTest(TUTORIAL[1], ("run_tutorial(",)),
                  ByTest(IT + "test_your_data.py::run_tutorial", ("blocks(DOC)",))}:
        if isinstance(cover, ByTest):
            src = _function_source(cover.test)
            for token in cover.tokens:
                assert token in src, f"{cover.test} does not run {token!r}"
        elif isinstance(cover, NotHere):
            assert len(cover.reason) > 20
    not_here = {k for k, v in COVERED.items() if isinstance(v, NotHere)}
    assert len(not_here) <= 20, "keep the list of commands that cannot run here short"


def test_no_command_hides_in_an_indented_block():
    """Commands in indented (unfenced) code blocks would escape the first test."""
    for path in documents():
        text = path.read_text()
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        hidden = re.findall(r"^(?: {4}|\t)\s*((?:\.venv/bin/)?(?:ebm|mlflow|ray|curl|make) .*)$", text, flags=re.M)
        assert not hidden, f"{path.relative_to(ROOT)}: commands outside a fenced ```sh block: {hidden}"


MY_TOML = """# a tiny toy 1 model (the README's my.toml stands for any config file)
seed = 0
[task]
name = "toy1"
n_train = 128
n_val = 32
n_test = 64
[sampler]
M_eval = 64
refine_steps = 0
[optim]
epochs = 1
[eval]
batch_size = 64
"""
STAR = ["--set", "task.data_dir=data/star", "--set", 'features.kind="resnet_slim"', "--set", "features.width=4",
        "--set", "energy.y_embed=[8, 16]", "--set", "energy.hidden=32", "--set", "sampler.M_train=16",
        "--set", "sampler.M_eval=64", "--set", "sampler.refine_steps=0", "--set", "optim.epochs=1",
        "--set", "eval.batch_size=32"]


def _sh(cmd: str, ws: Path, env: dict, where: str = "") -> subprocess.CompletedProcess:
    """``cmd`` through bash in ``ws``; prints its wall and CPU seconds (pytest -s)."""
    t0, cpu0 = time.monotonic(), _children_cpu()
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=ws, env=env, capture_output=True, text=True,
                       timeout=600)
    print(f"{time.monotonic() - t0:6.1f} s wall {_children_cpu() - cpu0:6.1f} s CPU  {cmd.splitlines()[0][:90]}")
    assert r.returncode == 0, f"{where} {cmd}\n-> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A user's folder: the venv as .venv, the files the documented commands name, and one tiny star model
    (run demo-20261125-101500, as in docs/tune_and_serving.md) trained on data/star."""
    from PIL import Image

    from ebm.tasks import make_star
    ws = tmp_path_factory.mktemp("docs")
    env = user_env()
    (ws / ".venv").symlink_to(BIN.parent)
    (ws / "my.toml").write_text(MY_TOML)
    images, _, _ = make_star(4, seed=5, size=16)
    (ws / "imgs").mkdir()
    (ws / "images").mkdir()
    with open(ws / "labels.csv", "w") as f:
        f.write("file,y\n")
        rng = np.random.default_rng(0)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(ws / "images" / f"{i}.png")
            f.write(f"{i}.png,{rng.normal():.4f}\n")
    for i, a in enumerate(images):
        Image.fromarray(a[0]).save(ws / "imgs" / f"s{i}.png")
    _sh("ebm data ingest synthetic star --size 16 --n-train 64 --n-val 16 --n-test 32 --out data/star --quiet", ws, env)
    _sh(" ".join(["ebm train star --local --threads 1 --name demo-20261125-101500",
                  *[f"'{a}'" for a in STAR]]), ws, env)
    return ws, env


def test_the_runnable_commands_run_as_written(ws):
    ws, env = ws
    ran = []
    for path, c in documented():
        if COVERED.get(c.key) is RUN:
            r = _sh(c.text, ws, env, c.block.where)
            ran.append((c.key, r.stdout))
    assert len(ran) == sum(v is RUN for v in COVERED.values())
    said = dict(ran)
    assert "test nll:" in said[".venv/bin/ebm train my.toml --set proposal.K=16 --set sampler.M_train=256"]
    assert (ws / "data/star32/_dataset.json").is_file() and (ws / "data/mine/_dataset.json").is_file()
    assert (ws / "sheet.png").stat().st_size > 1000
    assert "star-demo" in said["ebm register --run-name demo-20261125-101500 --name star-demo --alias champion"]
    import pandas as pd
    assert len(pd.read_csv(ws / "pred.csv")) == 4
    assert len(pd.read_parquet(ws / "pred.parquet")) == 32 and "log_p" in pd.read_parquet(ws / "pred.parquet")
    assert '"mean"' in said["ebm predict models:/star-demo@champion --input data/star --limit 1 --out -"]
    assert (ws / "eval" / "calibration.png").is_file()


def test_a_seed_sweep_is_registered_by_best_of(ws):
    """The shape of ``ebm tune CONFIG --seeds N`` and ``ebm register --best-of PARENT_RUN_ID`` (the docs'
    toy2 at 20 seeds takes an hour), on the tiny my.toml."""
    from mlflow.tracking import MlflowClient
    ws, env = ws
    out = _sh("ebm tune my.toml --seeds 2 --name s2 --num-workers 1", ws, env).stdout
    assert "sweep s2" in out
    c = MlflowClient(f"sqlite:///{ws}/mlruns.db")
    (parent,) = c.search_runs([c.get_experiment_by_name("ebm").experiment_id],
                              filter_string="tags.`mlflow.runName` = 's2'")
    assert "test_nll_mean" in parent.data.metrics
    out = _sh(f"ebm register --best-of {parent.info.run_id} --name toy2-ebm", ws, env).stdout
    assert "registered toy2-ebm version 1" in out
