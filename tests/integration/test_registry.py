"""The model registry on a real MLflow server (127.0.0.1, SQLite backend), ``mlflow models serve``
answering HTTP, and ``ebm predict`` / ``ebm evaluate`` on real files. No Ray: the models are trained
in-process and logged in the training job's checkpoint format."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest

from ebm.config import Config

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)
TOY = ['task.name="toy2"', "task.n_train=0", "task.n_val=0", "task.n_test=0", "eval.grid_nll=false", "optim.epochs=1",
       "sampler.refine_steps=0"]
STAR = ['task.name="star"', "task.image_size=16", "task.n_train=64", "task.n_val=16", "task.n_test=32",
        'features.kind="resnet_slim"', "features.width=4", "optim.epochs=1", "eval.batch_size=16",
        "sampler.M_eval=32", "sampler.refine_steps=0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float, log) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}: {open(log.name).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s: {open(log.name).read()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """The process and its children (uvicorn workers, job runner) by process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _spawn(args, log, env=None):
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = _port()
    log = open(d / "server.log", "w")
    proc = _spawn([os.path.join(BIN, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
                   "--artifacts-destination", str(d / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", "1"], log)
    try:
        uri = f"http://127.0.0.1:{port}"
        _wait(uri + "/health", proc, 90, log)
        yield uri
    finally:
        _stop(proc)
        log.close()


def _train_and_log(uri: str, name: str, overrides: list[str]) -> str:
    """A finished training run with its checkpoint artifact: ``ebm train --local`` against the server
    (a local run is registrable like a Ray one: one checkpoint format)."""
    from pipelines.driver.local import train_local
    cfg = Config.from_toml(os.path.join(ROOT, "pipelines/configs/debug.toml"), overrides)
    # tiny matmuls: a second thread costs more than it gives on a busy box
    (res,) = train_local(cfg, name=name, tracking_uri=uri, experiment="registry-test", threads=1,
                         storage=tempfile.mkdtemp(prefix="ebm-reg-"))
    return res["mlflow_run_id"]


@pytest.fixture(scope="module")
def toy_model(server):
    import mlflow

    from pipelines.serve import registry
    run_id = _train_and_log(server, "toy", TOY)
    out = registry.register(server, "toy2-tiny", run_id=run_id, alias="champion")
    mlflow.set_tracking_uri(server)
    return out


@pytest.fixture(scope="module")
def star_model(server):
    from pipelines.cli import main
    _train_and_log(server, "star-run", STAR)
    assert main(["register", "--run-name", "star-run", "--name", "star-tiny", "--tracking-uri", server]) == 0
    return "models:/star-tiny@champion"


ROWS = pd.DataFrame({"x": [0.05, 0.5, 0.95], "y": [1.0, 0.0, -2.5]})
PARAMS = {"quantiles": [0.1, 0.9], "interval_level": 0.8, "M": 256, "seed": 7}
COLS = ("mode", "mean", "std", "q0.1", "q0.9", "interval_lo", "interval_hi", "ess", "log_p")


def _in_process(server, run_id):
    from pipelines.serve import registry, serving
    p = serving.from_state(registry.checkpoint_state(server, run_id))
    return serving.predict_rows(p, serving.inputs_tensor(p, ROWS["x"].tolist()), ROWS["y"].tolist(), M=256,
                                quantiles=[0.1, 0.9], interval_level=0.8, seed=7)


def test_the_registered_pyfunc_has_a_signature_and_predicts_like_the_in_process_model(server, toy_model):
    import mlflow
    from mlflow.tracking import MlflowClient
    model = mlflow.pyfunc.load_model("models:/toy2-tiny@champion")
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["x", "y"] and {p.name for p in sig.params} >= {"quantiles", "M", "seed"}
    got = model.predict(ROWS, params=PARAMS)
    want = _in_process(server, toy_model["run_id"])
    for c in COLS:
        assert got[c].tolist() == pytest.approx(want[c], rel=1e-6, abs=1e-6), c
    assert (got["interval_lo"] <= got["q0.1"] + 1e-6).all() and (got["q0.9"] <= got["interval_hi"] + 1e-6).all()
    # weighted samples on request; the model carries its config and code
    s = model.predict(ROWS[["x"]], params={"return_samples": True, "M": 32})
    assert len(s["samples"][0]) == 32 and abs(sum(s["weights"][0]) - 1) < 1e-6 and "log_p" not in s
    c = MlflowClient(server)
    v = c.get_model_version_by_alias("toy2-tiny", "champion")
    assert v.tags["source_run_id"] == toy_model["run_id"]
    arts = {a.path for a in c.list_artifacts(toy_model["run_id"], "model")}
    assert {"model/artifacts", "model/code", "model/MLmodel"} <= arts


def test_mlflow_models_serve_answers_http_with_the_same_numbers(server, toy_model, tmp_path):
    port = _port()
    log = open(tmp_path / "serve.log", "w")
    proc = _spawn([os.path.join(BIN, "mlflow"), "models", "serve", "-m", "models:/toy2-tiny@champion",
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], log,
                  env={"MLFLOW_TRACKING_URI": server, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")})
    try:
        _wait(f"http://127.0.0.1:{port}/ping", proc, 120, log)
        body = {"dataframe_split": {"columns": ["x", "y"], "data": ROWS.values.tolist()}, "params": PARAMS}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
    finally:
        _stop(proc)
        log.close()
    want = _in_process(server, toy_model["run_id"])
    assert len(preds) == 3
    for c in COLS:
        assert [row[c] for row in preds] == pytest.approx(want[c], rel=1e-5, abs=1e-5), c


def _png(path, size, mode):
    from PIL import Image
    Image.fromarray(np.full((size, size, 3) if mode == "RGB" else (size, size), 90, np.uint8), mode).save(path)


def test_ebm_predict_on_images_and_clear_errors_for_bad_inputs(star_model, tmp_path, capsys):
    from pipelines.cli import main
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        _png(good / f"img{i}.png", 16, "L")
    out = tmp_path / "pred.json"
    assert main(["predict", star_model, "--input", str(good), "--out", str(out), "--M", "64"]) == 0
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(0 <= r["mean"] < 2 * np.pi and r["std"] > 0 and r["interval_lo"] is not None for r in rows)
    # 64 samples hold at most 3.2 in each 5 % tail of a 90 % interval: the user is told to raise M
    err = capsys.readouterr().err
    assert "ebm predict: warning: the 90% intervals of 3 of 3 rows rest on fewer than 10 effective samples" in err
    assert "raise M" in err
    assert main(["predict", star_model, "--input", str(good), "--out", "-", "--limit", "1", "--M", "64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 1 and printed[0]["id"] == "img0.png" and printed[0]["std"] > 0
    # one image file is an input of one row, predicted as in its folder (same row index, same draws;
    # float rounding of a batch of 1 vs 3)
    assert main(["predict", star_model, "--input", str(good / "img0.png"), "--out", "-", "--M", "64"]) == 0
    (one,) = json.loads(capsys.readouterr().out)
    assert one["id"] == "img0.png" and one["mean"] == pytest.approx(rows[0]["mean"], abs=1e-5)
    (tmp_path / "x.txt").write_text("not an image")
    assert main(["predict", star_model, "--input", str(tmp_path / "x.txt"), "--out", "-"]) == 2
    assert "x.txt: not an image (.png, .jpg" in capsys.readouterr().err
    cases = {"big.png": (lambda p: _png(p, 20, "L"), ["big.png", "20x20", "16x16"]),
             "rgb.png": (lambda p: _png(p, 16, "RGB"), ["rgb.png", "3 channel", "grey (1 channel)"]),
             "junk.png": (lambda p: p.write_bytes(b"this is not an image"), ["junk.png", "not a readable image"])}
    for name, (make, words) in cases.items():
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        _png(d / "ok.png", 16, "L")
        make(d / name)
        capsys.readouterr()
        assert main(["predict", star_model, "--input", str(d), "--out", str(tmp_path / "x.csv")]) == 2, name
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    assert main(["predict", star_model, "--input", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    import mlflow

    from pipelines.serve.serving import InputError
    model = mlflow.pyfunc.load_model(star_model)        # the same checks behind the pyfunc (and HTTP: 400)
    with pytest.raises(InputError, match="row 1: not a readable image"):
        model.predict(pd.DataFrame({"image": [(good / "img0.png").read_bytes(), b"junk"]}))


def test_ebm_evaluate_and_predict_on_a_parquet_dataset(star_model, tmp_path, capsys):
    from pipelines.cli import main
    data = tmp_path / "star"
    assert main(["data", "ingest", "synthetic", "star", "--out", str(data), "--size", "16", "--n-train", "32",
                 "--n-val", "8", "--n-test", "48", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", star_model, "--data", str(data), "--out", str(tmp_path / "ev"), "--M", "64"]) == 0
    text = capsys.readouterr().out
    for k in ("test nll", "test mae_mean", "test crps", "test coverage", "test calibration_error"):
        assert k in text, text
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 48 and np.isfinite(m["grid_nll"]) and 0 <= m["coverage"] <= 1
    assert (tmp_path / "ev" / "calibration.png").stat().st_size > 1000
    out = tmp_path / "pred.parquet"
    assert main(["predict", star_model, "--input", str(data), "--out", str(out), "--log-density", "--M", "64"]) == 0
    df = pd.read_parquet(out)
    assert len(df) == 48 and np.isfinite(df["log_p"]).all() and df["id"].iloc[0].startswith("star:test:")
