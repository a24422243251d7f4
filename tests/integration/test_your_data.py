"""A user's own images under a new task name, end to end: a folder of PNGs + a CSV manifest with a
2-D target (an angle in degrees, circular, and a size in pixels, linear) -> ``ebm data ingest
folder_csv`` -> ``ebm train`` on 2 Ray workers and ``--local`` -> ``ebm tune`` (2 trials) ->
``ebm register`` -> ``ebm predict`` -> ``mlflow models serve`` over HTTP. Nothing in it knows the
task by name: the dataset defines it."""
import base64
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = os.path.dirname(sys.executable)
EBM = os.path.join(BIN, "ebm")
SIDE = 16
# a slim image model small enough for a CI box; 2 targets, so a 2-D evaluation grid
MODEL = ['features.kind="resnet_slim"', "features.width=8", "energy.y_embed=[8, 16]", "energy.hidden=32",
         "energy.residual_blocks=0", "proposal.K=2", "sampler.M_train=32", "sampler.M_eval=128",
         "sampler.refine_steps=0", "optim.batch_size=16", "optim.lr=3e-3", "eval.every=1", "eval.batch_size=64",
         'eval.select="best_val"']


def render(angle_deg: float, size: float, rng) -> np.ndarray:
    """A grey SIDE×SIDE dial whose labels can be read from the pixels: a centred disc of radius
    ``size`` px and a hand from the centre pointing at ``angle_deg`` (counter-clockwise from the x
    axis, as displayed)."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5 - SIDE / 2
    img = np.clip(1.2 * (size - np.hypot(xx, yy)), 0, 1) * 100
    a = math.radians(angle_deg)
    ux, uy = math.cos(a), -math.sin(a)              # rows grow downwards
    along, across = xx * ux + yy * uy, np.abs(yy * ux - xx * uy)
    hand = (along > 0) & (along < 7.5) & (across < 1.0)
    img = np.maximum(img, np.where(hand, 255 * np.clip(1.0 - across, 0.3, 1.0), 0))
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def make_folder(root, n=600, seed=0):
    """root/img_XXXX.png + root/labels.csv (file, angle [degrees, 0..360), size [px])."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root.mkdir()
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "angle", "size"])
        for i in range(n):
            angle, size = rng.uniform(0, 360), rng.uniform(1.5, 4.5)
            Image.fromarray(render(angle, size, rng), "L").save(root / f"img_{i:04d}.png")
            w.writerow([f"img_{i:04d}.png", f"{angle:.3f}", f"{size:.3f}"])


def _ebm(*args, cwd, timeout=600, env=None):
    r = subprocess.run([EBM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    assert r.returncode == 0, f"ebm {' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_new_task_with_a_circular_and_a_linear_target_trains_tunes_registers_predicts_and_serves(tmp_path):
    from mlflow.tracking import MlflowClient

    from ebm.tasks import TWO_PI
    make_folder(tmp_path / "photos")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    # both URIs: an earlier in-process test's mlflow.set_registry_uri leaves MLFLOW_REGISTRY_URI in os.environ
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "EBM_STORAGE_PATH": str(tmp_path / "runs"),
           "EBM_RAY_TMPDIR": ""}
    out = _ebm("data", "ingest", "folder_csv", "photos", "--task", "dials", "--targets", "angle,size",
               "--circular", "angle:360", "--units", "size=px", "--out", "data/dials", "--quiet", cwd=tmp_path)
    assert "task dials" in out and "target angle: circular" in out and "converted from period 360" in out
    meta = json.loads((tmp_path / "data/dials/_dataset.json").read_text())
    assert meta["D"] == 2 and meta["circular"] == [True, False] and meta["target_names"] == ["angle", "size"]
    assert meta["units"] == ["radians", "px"] and meta["grid"]["hi"][0] == pytest.approx(TWO_PI)
    sets = ["--set", "task.data_dir=data/dials", *[a for m in MODEL for a in ("--set", m)]]

    # 2 Ray Train workers at 8 examples each (the same global batch as the one process below), then --local
    out = _ebm("train", "demo", *sets, "--set", "optim.epochs=16", "--set", "optim.batch_size=8", "--name", "ray2", "--num-workers", "2", cwd=tmp_path,
               env=env)
    assert "test nll:" in out
    out = _ebm("train", "demo", *sets, "--set", "optim.epochs=30", "--local", "--threads", "1", "--name", "loc",
               cwd=tmp_path, env=env)
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ebm").experiment_id
    runs = {r.data.tags["ebm.run_name"]: r for r in c.search_runs([exp])}
    for name in ("ray2", "loc"):
        r = runs[name]
        assert r.info.status == "FINISHED" and r.data.tags["task"] == "dials", name
        val = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "val_nll"), key=lambda m: m.step)]
        assert min(val[1:]) < val[0] - 0.3, (name, val)            # it learns
        m = r.data.metrics
        assert {"test_nll", "test_grid_nll", "test_mae_mean_angle", "test_mae_mean_size", "test_coverage_angle",
                "test_coverage_size"} <= set(m)
        assert math.isfinite(m["test_nll"]) and m["test_mae_mean_angle"] <= math.pi
    loc = runs["loc"].data.metrics
    print(f"\n--local test: nll {loc['test_nll']:.3f}, MAE angle {loc['test_mae_mean_angle']:.3f} rad, size "
          f"{loc['test_mae_mean_size']:.3f} px, coverage (90%) joint {loc['test_coverage']:.3f}, angle "
          f"{loc['test_coverage_angle']:.3f}, size {loc['test_coverage_size']:.3f}; selected epoch "
          f"{int(loc['selected_epoch'])}")
    # the marginal (uniform angle, uniform size) scores log(2π·3) ≈ 2.94 nats: the model reads the image
    assert loc["test_nll"] < 1.5 and loc["test_mae_mean_angle"] < 1.2 and loc["test_mae_mean_size"] < 0.3

    (tmp_path / "space.toml").write_text('[space]\n"proposal.K" = {grid = [1, 2]}\n[tune]\nscheduler = "fifo"\n')
    out = _ebm("tune", "demo", "--space", "space.toml", *sets, "--set", "optim.epochs=2", "--name", "sw",
               "--num-workers", "1", cwd=tmp_path, env=env)
    assert "sweep sw" in out
    trials = c.search_runs([exp], filter_string="tags.`ebm.sweep` = 'sw'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)

    _ebm("register", "--run-name", "loc", "--name", "dials-model", cwd=tmp_path, env=env)
    out = _ebm("predict", "models:/dials-model@champion", "--input", "photos", "--limit", "2", "--M", "256", "--seed",
               "3", "--out", "pred.json", cwd=tmp_path, env=env)
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert len(pred) == 2 and all(len(row["mean"]) == 2 and 0 <= row["mean"][0] < TWO_PI for row in pred)

    port = _port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "models", "serve", "-m", "models:/dials-model@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
                                 "PATH": BIN + os.pathsep + os.environ.get("PATH", "")})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        imgs = [base64.b64encode((tmp_path / "photos" / f"img_{i:04d}.png").read_bytes()).decode() for i in (0, 1)]
        y = [[math.radians(float(r["angle"])), float(r["size"])] for r in
             list(csv.DictReader(open(tmp_path / "photos/labels.csv")))[:2]]
        body = {"dataframe_split": {"columns": ["image", "y"], "data": [[imgs[0], y[0]], [imgs[1], y[1]]]},
                "params": {"M": 256, "seed": 3}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            rows = json.loads(r.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        log.close()
    assert len(rows) == 2 and all(len(r["mode"]) == 2 and math.isfinite(r["log_p"]) for r in rows)
    for served, cli in zip(rows, pred):        # one predict path: the same numbers from the CLI and over HTTP
        assert served["mean"] == pytest.approx(cli["mean"], rel=1e-5, abs=1e-6)
        assert served["interval_lo"] == pytest.approx(cli["interval_lo"], rel=1e-5, abs=1e-6)


def test_a_table_with_vector_inputs_defines_its_task_and_trains_locally(tmp_path):
    """The tabular form: a CSV of inputs and targets (one linear, one circular in radians) ->
    ``ebm data ingest table`` -> ``ebm train --local`` with the toy MLP -> a predictor built from the
    checkpoint alone."""
    from mlflow.tracking import MlflowClient

    from ebm import checkpoint
    from pipelines.serve.serving import from_state, inputs_tensor, predict_rows
    rng = np.random.default_rng(1)
    n = 600
    x1, x2 = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    level = 3 * x1 + rng.normal(0, 0.1, n)
    phase = np.mod(np.pi * x2 + rng.normal(0, 0.1, n), 2 * np.pi)
    with open(tmp_path / "table.csv", "w") as f:
        f.write("id,x1,x2,level,phase,note\n")
        for i in range(n):
            f.write(f"r{i},{x1[i]:.5f},{x2[i]:.5f},{level[i]:.5f},{phase[i]:.5f},{i % 3}\n")
    out = _ebm("data", "ingest", "table", "table.csv", "--task", "gauge", "--inputs", "x1,x2", "--targets",
               "level,phase", "--circular", "phase", "--out", "data/gauge", "--quiet", cwd=tmp_path)
    assert "target phase: circular" in out and "target level: linear" in out
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    _ebm("train", "debug", "--local", "--set", "task.data_dir=data/gauge", "--set", "optim.epochs=15",
         "--set", "eval.every=1", "--name", "g", "--threads", "1", cwd=tmp_path,
         env={"MLFLOW_TRACKING_URI": uri, "EBM_STORAGE_PATH": str(tmp_path / "runs")})
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("ebm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "gauge"
    assert run.data.metrics["test_mae_mean_level"] < 0.5 and run.data.metrics["test_nll"] < 2.0
    final = sorted((tmp_path / "runs" / "g").glob("checkpoint_*"))[-1]
    p = from_state(checkpoint.load(final))
    assert p.task.x_shape == (2,) and p.task.target_names == ("level", "phase") and p.task.circular == (False, True)
    rows = predict_rows(p, inputs_tensor(p, [[0.5, 0.0], [-0.5, 0.5]]), M=256)
    assert rows["mean"][0][0] == pytest.approx(1.5, abs=0.5) and rows["mean"][1][0] == pytest.approx(-1.5, abs=0.5)
