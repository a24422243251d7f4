"""The ``ebm`` command's failure modes: every usage, config or data error is one line on stderr and
exit 2 before anything runs or is written; a run that failed is exit 1 ("training failed: ..."); an
interrupt (Ctrl-C, SIGTERM) is exit 130. Real components throughout: the ``ebm`` executable (where
the exit code or the process's own stderr matters) or :func:`pipelines.cli.main` in-process, real
SQLite MLflow stores and real Parquet datasets under tmp_path, the debug config on ``--local``."""
import hashlib
import pathlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from pipelines.cli import main

pytestmark = pytest.mark.integration
EBM = os.path.join(os.path.dirname(sys.executable), "ebm")
FAST = ["--set", "task.n_train=128", "--set", "task.n_val=64", "--set", "task.n_test=64", "--threads", "1"]
# MLflow's own log lines (a new store's "Creating initial MLflow database tables...") are not errors
MLFLOW_LOG = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) ")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "EBM_STORAGE_PATH")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _ebm(*args, cwd, prefix=(), env=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [*prefix, sys.executable, EBM, *args] if prefix else [EBM, *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or _env())


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not MLFLOW_LOG.match(ln)]


def _one_line(code: int, rc: int, err: str) -> str:
    """The command exited ``code`` with exactly one line of its own on stderr; returns that line."""
    lines = _lines(err)
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def _runs(uri: str, name: str) -> list:
    """The runs named ``name`` (found without a search filter, whatever quotes the name holds)."""
    from mlflow.tracking import MlflowClient
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ebm")
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("ebm.run_name") == name] if exp else []


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory without tracking or storage settings: whatever a command writes by
    default lands here."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("EBM_STORAGE_PATH", raising=False)
    return d


@pytest.fixture(scope="module")
def toy1_data(tmp_path_factory):
    """A small Parquet dataset of the debug config's task (toy1), and one of another task (tab)."""
    import numpy as np

    from pipelines.data.ingest import ingest
    root = tmp_path_factory.mktemp("data")
    ingest("synthetic", "toy1", root / "toy1", n={"train": 256, "val": 64, "test": 64}, progress=False)
    rng = np.random.default_rng(0)
    (root / "t.csv").write_text("x,a\n" + "".join(f"{v:.4f},{3 * v:.4f}\n" for v in rng.uniform(-1, 1, 200)))
    ingest("table", root / "t.csv", root / "tab", task="tab", targets={"names": ["a"]}, progress=False)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- 1. non-finite float settings -------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("optim.lr=-inf", "optim.lr"),
    ("optim.weight_decay=nan", "optim.weight_decay"), ("optim.grad_clip=inf", "optim.grad_clip"),
    ("proposal.log_sigma2_max=inf", "proposal.log_sigma2_max"), ("method.kl_weight=inf", "method.kl_weight"),
    ("method.nce_plus_beta=inf", "method.nce_plus_beta"), ("method.fixed_sigmas=[0.1, inf]", "method.fixed_sigmas"),
    ("eval.interval_level=nan", "eval.interval_level"),
])
def test_non_finite_float_settings_are_refused_naming_the_key(cwd, capsys, override, key):
    for command in (["train", "debug", "--local"], ["tune", "debug", "--seeds", "2"]):
        rc = main([*command, "--set", override])
        line = _one_line(2, rc, capsys.readouterr().err)
        assert f"{key} must be a" in line and "finite" in line
    assert os.listdir(cwd) == []


def test_non_finite_lr_exits_2_from_the_executable_before_anything(cwd):
    r = _ebm("train", "debug", "--local", "--set", "optim.lr=inf", cwd=cwd)
    assert "optim.lr must be a finite number, got inf" in _one_line(2, r.returncode, r.stderr)
    assert os.listdir(cwd) == []


# -- 2. a failed run (exit 1) vs a data problem found before training (exit 2) ---------------------

def test_a_run_that_diverges_is_a_failed_run_in_one_line(cwd):
    uri = f"sqlite:///{cwd}/m.db"
    r = _ebm("train", "debug", "--local", "--name", "boom", "--set", "optim.lr=1e20", "--tracking-uri", uri, *FAST,
             cwd=cwd)
    line = _one_line(1, r.returncode, r.stderr)
    assert line.startswith("ebm: training failed: ") and "the run diverged; lower optim.lr" in line
    (run,) = _runs(uri, "boom")
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["ebm.stop_reason"]


def test_a_damaged_dataset_is_one_line_exit_2_before_training(cwd, toy1_data, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    gone = _copy(toy1_data / "toy1", tmp_path / "gone")
    os.remove(gone / "val" / "part-00000.parquet")
    r = _ebm("train", "debug", "--local", "--set", f"task.data_dir={gone}", cwd=cwd)
    line = _one_line(2, r.returncode, r.stderr)
    assert "val/part-00000.parquet" in line and "missing" in line
    # labels edited after ingest (the shard keeps its metadata): found by --verify-data; a non-finite label always
    for value, flags, says in ((0.5, ["--verify-data"], "edited after ingest"), (float("nan"), [], "non-finite")):
        edited = _copy(toy1_data / "toy1", tmp_path / f"edited{value}")
        shard = edited / "train" / "part-00000.parquet"
        t = pq.read_table(shard)
        y = t.column("y").to_pylist()
        y[0] = [y[0][0] + value]
        pq.write_table(t.set_column(t.schema.get_field_index("y"), t.schema.field("y"),
                                    pa.array(y, type=t.schema.field("y").type)), shard)
        rc = main(["train", "debug", "--local", "--set", f"task.data_dir={edited}", *flags])
        assert says in _one_line(2, rc, capsys.readouterr().err)
    assert os.listdir(cwd) == []        # no store, no checkpoints


def test_a_dataset_deleted_during_a_run_fails_the_run_exit_1(cwd, toy1_data, tmp_path):
    data = _copy(toy1_data / "toy1", tmp_path / "live")
    uri = f"sqlite:///{cwd}/m.db"
    p = subprocess.Popen([EBM, "train", "debug", "--local", "--name", "live", "--tracking-uri", uri, "--threads", "1",
                          "--set", f"task.data_dir={data}", "--set", "optim.epochs=100000"],
                         cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:                   # the run is training: delete its train split
            if line.startswith("epoch 1/"):
                shutil.rmtree(data / "train")
                break
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    line = _one_line(1, p.returncode, err)
    assert line.startswith("ebm: training failed: ") and "during the run" in line
    (run,) = _runs(uri, "live")
    assert run.info.status == "FAILED" and "during the run" in run.data.tags["ebm.stop_reason"]


# -- 3. a read-only tracking store ------------------------------------------------------------------

@pytest.fixture
def shared_dir():
    """A directory another user can use (tmp_path's parents are private to this user)."""
    d = tempfile.mkdtemp(prefix="ebm-ro-")
    os.chmod(d, 0o777)
    yield d
    for root, dirs, _ in os.walk(d):
        for x in dirs:
            os.chmod(os.path.join(root, x), 0o777)
    shutil.rmtree(d)


def _unprivileged() -> tuple:
    """How to run a command that file permissions apply to: as this user, or as nobody if this is root
    (root writes read-only files)."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions cannot be exercised")
    # nobody must reach the interpreter and the checkout (a clone under a 0700 mktemp directory: no)
    for f in (sys.executable, __file__):
        for d in pathlib.Path(os.path.abspath(f)).parents:
            if not os.stat(d).st_mode & 0o001:
                pytest.skip(f"{d} is not searchable by other users: nobody cannot run this checkout's ebm")
    return ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


@pytest.mark.parametrize("read_only", ["file", "directory"])
def test_a_read_only_store_is_one_line_exit_2_before_training(shared_dir, read_only):
    from pipelines.tracking import open_client
    store_dir = os.path.join(shared_dir, "store")
    os.mkdir(store_dir)
    db = os.path.join(store_dir, "ro.db")
    open_client(f"sqlite:///{db}").create_experiment("ebm")
    before = hashlib.sha256(open(db, "rb").read()).hexdigest()
    if read_only == "file":
        os.chmod(db, 0o444)
    else:       # the file is writable, its directory (where SQLite writes the journal) is not
        os.chmod(db, 0o666)
        os.chmod(store_dir, 0o555)
    storage = os.path.join(shared_dir, "runs")
    r = _ebm("train", "debug", "--local", "--tracking-uri", f"sqlite:///{db}", "--storage", storage, *FAST,
             cwd=shared_dir, prefix=_unprivileged(),
             env=_env(HOME=shared_dir, MPLCONFIGDIR=os.path.join(shared_dir, "mpl")))
    line = _one_line(2, r.returncode, r.stderr)
    says = "is read-only" if read_only == "file" else f"directory {store_dir} does not exist or is not writable"
    assert says in line
    assert "epoch" not in r.stdout and not os.path.exists(storage)
    assert hashlib.sha256(open(db, "rb").read()).hexdigest() == before


# -- 4. quotes in run names; evaluate on another task ------------------------------------------------

def test_quoted_run_names_train_register_and_resume(cwd, capsys, toy1_data):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{cwd}/m.db"
    t = ["--tracking-uri", uri]
    for name, model in (("it's", "single"), ('say "hi"', "double")):
        assert main(["train", "debug", "--local", "--name", name, "--set", "optim.epochs=1", *FAST, *t]) == 0
        assert main(["register", "--run-name", name, "--name", model, *t]) == 0
        assert main(["train", "debug", "--local", "--resume", name, "--set", "optim.epochs=2", *FAST, *t]) == 0
        (run,) = _runs(uri, name)
        assert run.info.status == "FINISHED" and run.data.tags["ebm.registered_model"] == f"{model}/1"
        steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train_loss")]
        assert steps == [0, 1]          # the same run continued
    capsys.readouterr()
    rc = main(["train", "debug", "--local", "--name", "it's \"both\"", *FAST, *t])
    assert "not both" in _one_line(2, rc, capsys.readouterr().err)
    # 8: a registered model evaluated on a dataset of another task: one line, exit 2
    rc = main(["evaluate", "models:/single@champion", "--data", str(toy1_data / "tab"), *t])
    assert "task" in _one_line(2, rc, capsys.readouterr().err)


# -- 5, 6. predict reads only, and checks what it can before loading the model ----------------------

def test_predict_of_an_unknown_model_creates_nothing_and_exits_2(cwd, toy1_data):
    r = _ebm("predict", "models:/typo@x", "--input", str(toy1_data / "toy1"), "--out", "p.csv", cwd=cwd)
    assert "models:/typo@x" in _one_line(2, r.returncode, r.stderr)
    assert os.listdir(cwd) == []                # resolving the default store did not create mlruns.db


def test_predict_checks_its_arguments_before_loading_the_model(cwd, capsys, toy1_data):
    from pipelines.tracking import open_client      # a new store from the cached empty one: no migrations
    uri = f"sqlite:///{cwd}/m.db"
    open_client(uri).create_experiment("ebm")
    (cwd / "afile").write_text("x")
    (cwd / "adir.csv").mkdir()
    data = str(toy1_data / "toy1")
    # the model does not exist: each of these must fail on its own argument first, writing nothing
    for args, says in ((["--out", "p.txt"], "--out p.txt: the file must end in .csv, .parquet or .json"),
                       (["--out", "afile/p.csv"], "is not a directory"),
                       (["--out", "adir.csv"], "is a directory"),
                       (["--out", "p.csv", "--limit", "-1"], "--limit must be >= 0"),
                       (["--out", "p.csv", "--quantiles", "0.1,x"], "--quantiles '0.1,x'"),
                       (["--out", "p.csv", "--input", str(cwd / "nothing")], "no such file")):
        argv = ["predict", "models:/typo@x", "--input", data, *args, "--tracking-uri", uri]
        if "--input" in args:
            argv = ["predict", "models:/typo@x", *args, "--tracking-uri", uri]
        rc = main(argv)
        assert says in _one_line(2, rc, capsys.readouterr().err)
    rc = main(["predict", "models:/typo@x", "--input", data, "--out", "p.csv", "--tracking-uri", uri])
    assert "cannot load model 'models:/typo@x'" in _one_line(2, rc, capsys.readouterr().err)
    rc = main(["evaluate", "models:/typo@x", "--data", data, "--out", "afile", "--tracking-uri", uri])
    assert "--out afile" in _one_line(2, rc, capsys.readouterr().err)
    rc = main(["evaluate", "models:/typo@x", "--data", data, "--M", "-5", "--tracking-uri", uri])
    assert "--M must be >= 1" in _one_line(2, rc, capsys.readouterr().err)      # was a ConfigError traceback
    assert sorted(os.listdir(cwd)) == ["adir.csv", "afile", "m.db"]


# -- 7. interrupts: 130 for every command -----------------------------------------------------------

def test_sigterm_during_training_exits_130_and_marks_the_run_killed(cwd):
    uri = f"sqlite:///{cwd}/m.db"
    p = subprocess.Popen([EBM, "train", "debug", "--local", "--name", "stopme", "--tracking-uri", uri, *FAST,
                          "--set", "optim.epochs=100000"],
                         cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("epoch 1/"):
                p.send_signal(signal.SIGTERM)
                break
        out, err = p.communicate(timeout=300)
    finally:
        p.kill()
    assert "--resume stopme" in _one_line(130, p.returncode, err)
    (run,) = _runs(uri, "stopme")
    assert run.info.status == "KILLED"


def _interrupt(sig):
    def fn(*a, **k):
        os.kill(os.getpid(), sig)               # a real signal, delivered to this process
        raise AssertionError("the signal did not interrupt")
    return fn


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_every_command_exits_130_when_interrupted(cwd, capsys, monkeypatch, toy1_data, sig):
    from pipelines.tracking import open_client      # a new store from the cached empty one: no migrations
    uri = f"sqlite:///{cwd}/m.db"
    open_client(uri).create_experiment("ebm")
    monkeypatch.setattr("pipelines.cli.results.collect", _interrupt(sig))
    monkeypatch.setattr("pipelines.data.inspect.summary", _interrupt(sig))
    monkeypatch.setattr("pipelines.cli.tune.run_sweep", _interrupt(sig))
    monkeypatch.setattr("pipelines.serve.model_eval.read_inputs", _interrupt(sig))
    previous = signal.getsignal(signal.SIGTERM)
    for argv in (["results", "ebm", "--out", "r.md", "--tracking-uri", uri],
                 ["data", "inspect", str(toy1_data / "toy1")],
                 ["tune", "debug", "--seeds", "2", "--tracking-uri", uri],
                 ["predict", "does-not-matter", "--input", "x", "--out", "p.csv"]):
        if argv[0] == "predict":
            monkeypatch.setattr("pipelines.cli.models._load", lambda args: None)
            argv[3] = str(toy1_data / "toy1")
        assert "interrupted" in _one_line(130, main(argv), capsys.readouterr().err), argv
        assert signal.getsignal(signal.SIGTERM) is previous         # the handler is put back
    assert sorted(os.listdir(cwd)) == ["m.db"]


# -- 8. more probes: flags and files that cannot work -----------------------------------------------

def test_train_refuses_flags_and_files_that_cannot_work_before_anything(cwd, capsys, tmp_path):
    (cwd / "afile").write_text("x")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n[optim]\nlr = 0.01\n")
    for argv, says in (
            (["--local", "--threads", "-1"], "--threads must be >= 0"),           # was a torch traceback
            (["--num-workers", "0"], "--num-workers must be >= 1"),               # was a run with no workers
            (["--max-failures", "-1"], "--max-failures must be >= 0"),
            (["--local", "--name", "../escape"], "'..' parts"),                   # was checkpoints outside --storage
            (["--local", "--resume", "a//b"], "empty"),
            (["--local", "--storage", "afile"], "--storage afile: exists and is not a directory"),  # after an epoch
            (["--local", "--storage", "afile/runs"], "is a file"),
            (["--local", "--out", "afile"], "--out afile: exists and is not a directory"),  # after all the training
            (["--local", "--set", "optim.lr=true"], "optim.lr must be of type float, got True"),   # was lr = 1.0
            (["--local", "--set", "optim.epochs=1e300"], "optim.epochs must be of type int"),
            (["--local", "--set", "optim.lrr=0.1"], "did you mean optim.lr"),
            (["--local", "--tracking-uri", f"sqlite:///{cwd}/afile"], "is not a SQLite database"),   # was SQL error
    ):
        rc = main(["train", "debug", *argv])
        assert says in _one_line(2, rc, capsys.readouterr().err), argv
    rc = main(["train", str(tmp_path / "latin1.toml"), "--local"])           # was a UnicodeDecodeError traceback
    assert "not UTF-8" in _one_line(2, rc, capsys.readouterr().err)
    rc = main(["train", str(tmp_path), "--local"])
    assert _one_line(2, rc, capsys.readouterr().err)
    assert os.listdir(cwd) == ["afile"] and not (tmp_path / "escape").exists()


def test_tune_refuses_bad_flags_and_space_files_before_ray(cwd, capsys):
    (cwd / "mode.toml").write_text('[space]\n"proposal.K" = {grid = [1, 2]}\n[tune]\nmode = "up"\n')
    (cwd / "zero.toml").write_text('[space]\n"proposal.K" = {grid = [1, 2]}\n[tune]\nnum_samples = 0\n')
    (cwd / "empty.toml").write_text("")
    (cwd / "unknown.toml").write_text('[space]\n"optim.learning_rate" = {grid = [0.1]}\n')
    for argv, says in (
            (["--seeds", "-1"], "--seeds must be >= 0"),                           # was an IndexError traceback
            (["--seeds", "2", "--num-workers", "0"], "--num-workers must be >= 1"),   # was every trial errored
            (["--seeds", "2", "--max-concurrent", "0"], "--max-concurrent must be >= 1"),
            (["--seeds", "2", "--threads", "0"], "--threads must be >= 1"),
            (["--space", "mode.toml"], "mode must be 'min' or 'max'"),            # was a ValueError after Ray started
            (["--space", "zero.toml"], "num_samples must be >= 1"),               # was a sweep of no trials, exit 0
            (["--space", "empty.toml"], "the search space is empty"),
            (["--space", "unknown.toml"], "unknown config key 'optim.learning_rate'"),
            (["--space", "nothing.toml"], "space file not found"),
            (["--seeds", "2", "--name", "../x"], "'..' parts"),
            (["--resume", "x"], "--resume continues the sweep as it was started"),
    ):
        rc = main(["tune", "debug", *argv])
        assert says in _one_line(2, rc, capsys.readouterr().err), argv
    assert sorted(os.listdir(cwd)) == ["empty.toml", "mode.toml", "unknown.toml", "zero.toml"]


def test_results_reads_only_and_refuses_empty_input(cwd, capsys):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{cwd}/m.db"
    rc = main(["results", "ebm", "--out", "r.md"])                       # was: created ./mlruns.db
    assert "no MLflow store at" in _one_line(2, rc, capsys.readouterr().err)
    assert os.listdir(cwd) == []
    c = MlflowClient(uri)
    exp = c.create_experiment("ebm")
    rc = main(["results", "other", "--out", "r.md", "--tracking-uri", uri])     # was exit 1
    assert "no experiment 'other'" in _one_line(2, rc, capsys.readouterr().err)
    run = c.create_run(exp, tags={"ebm.group": "g", "task": "toy1", "seed": "0"}).info.run_id
    c.set_terminated(run, "FAILED")
    rc = main(["results", "ebm", "--out", "r.md", "--tracking-uri", uri])       # was an empty table, exit 0
    assert "no finished runs" in _one_line(2, rc, capsys.readouterr().err)
    assert not (cwd / "r.md").exists()
    done = c.create_run(exp, tags={"ebm.group": "g", "task": "toy1", "seed": "1"}).info.run_id
    c.log_metric(done, "test_nll", 1.5)
    c.set_terminated(done, "FINISHED")
    rc = main(["results", "ebm", "--out", "r.md", "--groups", "h*", "--tracking-uri", uri])
    assert "matching h*" in _one_line(2, rc, capsys.readouterr().err)
    assert main(["results", "ebm", "--out", "r.md", "--tracking-uri", uri]) == 0
    assert "1.500 ± 0.000" in (cwd / "r.md").read_text()


def test_register_errors_are_one_line_without_mlflow_warnings(cwd):
    from pipelines.tracking import open_client      # a new store from the cached empty one: no migrations
    uri = f"sqlite:///{cwd}/m.db"
    open_client(uri).create_experiment("ebm")
    r = _ebm("register", "--run", "0123456789abcdef", "--name", "m", "--tracking-uri", uri, cwd=cwd)
    assert "0123456789abcdef" in _one_line(2, r.returncode, r.stderr)     # was an MlflowException traceback
    r = _ebm("register", "--run-name", "it's", "--name", "m", cwd=cwd)
    assert "no MLflow store at" in _one_line(2, r.returncode, r.stderr)
    assert sorted(os.listdir(cwd)) == ["m.db"]
