"""The Python API (pipelines.api): its documentation runs as written, and a model predicts through it
exactly as through the registered pyfunc, ``ebm predict`` and its checkpoint. Real components: a
tiny model trained for real, a real MLflow SQLite store in a temporary directory."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines import api
from pipelines.serve import serving
from pipelines.serve.serving import InputError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "python_api.md"
STAR = {"task.name": "star", "task.image_size": 16, "task.n_train": 64, "task.n_val": 16, "task.n_test": 32,
        "features.kind": "resnet_slim", "features.width": 4, "optim.epochs": 1, "eval.batch_size": 16,
        "sampler.M_eval": 64, "sampler.refine_steps": 0}
KW = {"M": 64, "seed": 3, "quantiles": [0.1, 0.5, 0.9], "interval_level": 0.8}


def test_every_python_block_of_the_doc_runs_in_order(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EBM_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    text = DOC.read_text()
    blocks = [(text.count("\n", 0, m.start()) + 2, m.group(1))
              for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]
    assert len(blocks) >= 10, "the doc lost its examples"
    ns = {"__name__": "python_api_md"}
    try:
        for line, code in blocks:
            try:
                exec(compile(code, f"{DOC}:{line}", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"the block at docs/python_api.md:{line} failed: {type(e).__name__}: {e}") from e
    finally:
        plt.close("all")
    assert (tmp_path / "star_density.png").stat().st_size > 5000
    assert (tmp_path / "mlruns.db").is_file() and not (tmp_path / "mlflow.db").exists()   # the documented store only


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    """A tiny star-image model trained through the API and registered with the registry's own call."""
    import mlflow

    from pipelines.serve import registry
    d = tmp_path_factory.mktemp("api")
    uri = f"sqlite:///{d}/mlflow.db"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as a Ray worker runs: the Ray test below reproduces this run exactly
    try:
        model = api.train("debug", overrides=STAR, name="api-star", storage=str(d / "runs"), tracking_uri=uri)
    finally:
        torch.set_num_threads(threads)
    reg = registry.register(uri, "api-star", run_id=model.run_id)
    mlflow.set_tracking_uri(uri)    # for mlflow.pyfunc.load_model (the registry's register set them too)
    mlflow.set_registry_uri(uri)
    from ebm.tasks import make_star
    images, angles, _ = make_star(5, seed=11, size=16)
    return {"model": model, "uri": uri, "dir": d, "model_uri": reg["model_uri"], "images": images, "angles": angles}


def _png(a: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(a[0]).save(buf, format="PNG")
    return buf.getvalue()


def test_the_readmes_python_example_runs(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "EBM_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "the README lost its Python example"
    ns = {"__name__": "readme"}
    try:
        for code in blocks:
            exec(compile(code, "README.md", "exec"), ns)
    finally:
        plt.close("all")
    assert ns["model"].metrics["test_nll"] < 5


def test_predictions_match_the_registered_pyfunc_ebm_predict_and_the_checkpoint(star, tmp_path):
    import mlflow

    from ebm import checkpoint
    from pipelines.cli import main
    model, images = star["model"], star["images"]
    want = model.predict(images, **KW, y=star["angles"][:, 0])
    assert model.metrics["test_nll"] > 0 and model.run_name == "api-star" and model.run_id
    assert list(want.columns) == ["mode", "mean", "std", "q0.1", "q0.5", "q0.9", "interval_lo", "interval_hi", "ess",
                                  "log_p"]
    # the registered pyfunc (what `mlflow models serve` runs): same rows, same params
    rows = pd.DataFrame({"image": [_png(a) for a in images], "y": star["angles"][:, 0]})
    pyfunc = mlflow.pyfunc.load_model(star["model_uri"]).predict(rows, params=KW)
    pd.testing.assert_frame_equal(pyfunc, want)
    # the checkpoint, through serving.predict_rows directly
    found = checkpoint.load(next((star["dir"] / "runs" / "api-star").glob("checkpoint_*")))
    p = serving.from_state(found)
    direct = serving.predict_rows(p, serving.inputs_tensor(p, list(rows["image"])), list(rows["y"]), **KW)
    pd.testing.assert_frame_equal(pd.DataFrame(direct), want)
    # the model loaded back from the registry (model.pt only), by version, from runs:/ and from storage
    run = f"runs:/{model.run_id}"
    for src in (star["model_uri"], "models:/api-star/1", f"{run}/model", run, f"{run}/checkpoint"):
        m = api.load(src, tracking_uri=star["uri"])
        assert (m.run_id, m.run_name) == (model.run_id, "api-star") and m.metrics == model.metrics, src
        pd.testing.assert_frame_equal(m.predict(images, **KW, y=star["angles"][:, 0]), want)
    for m in (api.load(run="api-star", storage=str(star["dir"] / "runs")), api.load(star["dir"] / "runs" / "api-star"),
              api.load(model.source), api.load(Path(model.source) / "checkpoint.pt")):
        assert m.run_name == "api-star" and m.metrics == model.metrics
        pd.testing.assert_frame_equal(m.predict(images, **KW, y=star["angles"][:, 0]), want)
    # `ebm predict` on a folder of the same images
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, b in enumerate(rows["image"]):
        (folder / f"img{i}.png").write_bytes(b)
    out = tmp_path / "pred.parquet"
    assert main(["predict", star["model_uri"], "--input", str(folder), "--out", str(out), "--M", "64", "--seed", "3",
                 "--quantiles", "0.1,0.5,0.9", "--interval-level", "0.8", "--tracking-uri", star["uri"]]) == 0
    got = model.predict(folder, **KW)
    assert list(got.index) == [f"img{i}.png" for i in range(5)]
    pd.testing.assert_frame_equal(pd.read_parquet(out).set_index("id"), got)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.drop(columns="log_p"))


def test_every_form_of_the_same_images_gives_the_same_predictions(star, tmp_path):
    from PIL import Image
    model, images = star["model"], star["images"]
    want = model.predict(images, **KW)
    paths = []
    for i, a in enumerate(images):
        paths.append(tmp_path / f"s{i}.png")
        paths[-1].write_bytes(_png(a))
    forms = {"NHWC": images.transpose(0, 2, 3, 1), "NHW": images[:, 0], "tensor": torch.as_tensor(images),
             "list of arrays": list(images), "bytes": [_png(a) for a in images],
             "PIL": [Image.fromarray(a[0]) for a in images], "paths": paths, "str paths": [str(q) for q in paths],
             "DataFrame": pd.DataFrame({"image": [_png(a) for a in images]})}
    for name, inputs in forms.items():
        pd.testing.assert_frame_equal(model.predict(inputs, **KW), want, obj=name)
    # one input: density and plot take any single form alike
    y0, d0 = model.density(images[0])
    for one in (images[0, 0], images[0].transpose(1, 2, 0), _png(images[0]), paths[0], Image.open(paths[0])):
        y, d = model.density(one)
        assert np.array_equal(y, y0) and np.array_equal(d, d0)


def test_density_is_the_grid_nll_density_and_plots(star):
    import matplotlib.pyplot as plt

    from ebm import metrics as M
    model, images, angles = star["model"], star["images"], star["angles"]
    y, d = model.density(images[1])
    assert y.shape == (1024,) and (d > 0).all()
    assert abs(d.sum() * (y[1] - y[0]) - 1) < 1e-6            # normalised on the task grid
    # at the label, exp(-grid NLL) as the test metrics compute it
    task = model.task
    x = serving.inputs_tensor(model.predictor, [_png(images[1])])
    grids = [torch.as_tensor(g, dtype=torch.float32) for g in task.grid()]
    nll = M.grid_nll(model.predictor.model, x, torch.as_tensor(angles[1:2]), grids, task.cell_volume())
    _, at = model.density(images[1], grid=[float(angles[1, 0])])
    assert at[0] == pytest.approx(math.exp(-float(nll[0])), rel=1e-4)
    _, q = model.density(images[1], proposal=True)
    assert abs(q.sum() * (y[1] - y[0]) - 1) < 1e-3 and not np.allclose(q, d)
    fig = model.plot(images[1], y_true=float(angles[1, 0]))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["EBM", "proposal q", "label"]
    fig2, ax = plt.subplots()
    assert model.plot(images[2], ax=ax) is fig2
    plt.close("all")


def test_a_marginal_density_for_two_targets():
    """D = 2 (random weights: the quadrature, not the training, is under test): the marginal of each
    dim is the joint on the task grid summed over the other."""
    from ebm.config import Config
    from ebm.metrics import grid_points, model_log_density_on_grid
    from ebm.nets import build_model
    from ebm.tasks import TaskSpec
    task = TaskSpec(name="two", D=2, x_shape=(3,), circular=(False, True), grid_lo=(-2.0, 0.0),
                    grid_hi=(3.0, 2 * math.pi), grid_n=(40, 30), fixed_sigmas=(0.1, 0.5), ml_is_sigmas=(0.1, 0.5),
                    units=("m", "rad"), has_true_density=False, target_names=("h", "a"))
    cfg = Config()
    net = build_model(cfg, task.x_shape, task.D, task.circular).eval()
    model = api.Model(serving.Predictor(net, cfg, task))
    x = [0.1, -0.3, 2.0]
    g = [torch.as_tensor(a, dtype=torch.float32) for a in task.grid()]
    with torch.no_grad():
        f = model_log_density_on_grid(net, torch.tensor([x]), grid_points(g))[0].double()
    joint = (torch.softmax(f, 0).reshape(40, 30) / task.cell_volume()).numpy()
    for dim, other in ((0, 1), (1, 0)):
        y, d = model.density(x, dim=dim)
        cell = float(g[other][1] - g[other][0])
        np.testing.assert_allclose(d, joint.sum(axis=other) * cell, rtol=1e-6)
        assert abs(d.sum() * (y[1] - y[0]) - 1) < 1e-5
    assert model.predict(np.array([x, x]), M=16)["mean"].map(len).tolist() == [2, 2]
    with pytest.raises(InputError, match="dim must be a target dim from 0 to 1"):
        model.density(x, dim=2)


def test_bad_inputs_and_parameters_are_clear_errors(star, tmp_path):
    from PIL import Image
    model, images = star["model"], star["images"]
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (16, 16)).save(rgb)
    cases = [
        (dict(inputs=images.astype(np.float32)), "images as arrays must be uint8"),
        (dict(inputs=np.zeros((2, 1, 20, 20), np.uint8)), r"shape \(2, 1, 20, 20\).*\(N, 1, 16, 16\)"),
        (dict(inputs=[_png(images[0]), 7]), "row 1: an image must be encoded PNG/JPEG bytes"),
        (dict(inputs=[[0.5], [0.2]]), "row 0: an image must be"),
        (dict(inputs=[str(tmp_path / "nope.png")]), r"row 0 \(.*nope.png\): cannot read"),
        (dict(inputs=[rgb]), r"row 0 \(.*rgb.png\): image has 3 channel\(s\)"),
        (dict(inputs=[Image.new("RGBA", (16, 16))]), "RGB with an alpha channel"),
        (dict(inputs=[b"junk"]), "row 0: not a readable image"),
        (dict(inputs={"image": 1}), "inputs of type dict"),
        (dict(inputs=pd.DataFrame({"x": [1.0]})), "needs a column 'image'"),
        (dict(inputs=images, M=0), r"M \(proposal samples per row\) must be an integer from 1"),
        (dict(inputs=images, quantiles=[0.5, 1.5]), r"quantiles\[1\] must lie in \(0, 1\)"),
        (dict(inputs=images, seed=-1), "seed must be an integer"),
        (dict(inputs=images, return_samples="yes"), "return_samples must be true or false"),
        (dict(inputs=images, y=[0.1, 0.2]), "y has 2 rows but x has 5"),
        (dict(inputs=pd.DataFrame({"image": [_png(images[0])], "y": [0.1]}), y=[0.2]), "y is given twice"),
    ]
    for kw, match in cases:
        with pytest.raises(InputError, match=match):
            model.predict(kw.pop("inputs"), **kw)
    with pytest.raises(InputError, match="one input expected, got 2"):
        model.density(images[:2])
    with pytest.raises(InputError, match="grid must be a non-empty 1-D array"):
        model.density(images[0], grid=[[0.0, 1.0]])
    # a vector model (random weights: the checks come first): the same row-naming checks as the pyfunc
    from ebm.config import Config
    from ebm.nets import build_model
    from ebm.tasks import get_task
    t1 = get_task("toy1")
    vec = api.Model(serving.Predictor(build_model(Config(), t1.x_shape, t1.D, t1.circular).eval(), Config(), t1))
    for inputs, match in (([[0.1], [0.2, 0.3]], "row 1: x has 2 value"), ([b"png"], "row 0: x must be a number"),
                          (np.zeros((2, 1, 1)), r"x has shape \(2, 1, 1\)"),
                          (np.array([[0.0], [np.nan]]), "row 1: x is not finite")):
        with pytest.raises(InputError, match=match):
            vec.predict(inputs, M=8)
    assert vec.predict(np.array([0.5, 1.0]), M=8).shape[0] == 2 and vec.density(0.5)[1].shape == (t1.grid_n[0],)


def test_bad_sources_and_configs_are_clear_errors(star, tmp_path):
    from ebm.config import ConfigError
    uri = star["uri"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    ckpt = tmp_path / "ck" / "checkpoint.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes((Path(star["model"].source) / "checkpoint.pt").read_bytes()[:500])
    missing_store = tmp_path / "nostore" / "mlflow.db"
    cases = [
        (dict(source="models:/nope@champion", tracking_uri=uri), "models:/nope@champion.*nope"),
        (dict(source="models:/api-star@nope", tracking_uri=uri), "api-star@nope.*alias"),
        (dict(source="models:/a/b/c", tracking_uri=uri), "models:/a/b/c"),
        (dict(source=f"runs:/{star['model'].run_id}/nothing", tracking_uri=uri), "neither an MLflow model"),
        (dict(source="models:/api-star@champion", tracking_uri=f"sqlite:///{missing_store}"), "no MLflow store"),
        (dict(source=str(tmp_path / "missing")), "missing: no such file or directory"),
        (dict(source=tmp_path / "empty"), "a directory, but not a checkpoint"),
        (dict(source=tmp_path / "junk.pt"), "junk.pt: not a model file of this project"),
        (dict(source=ckpt), "checkpoint.pt is unreadable"),
        (dict(run="nope", storage=str(star["dir"] / "runs")), "run 'nope': no checkpoint"),
        (dict(), "one of the two"),
        (dict(source="x", run="y"), "one of the two"),
        (dict(source="x", storage="y"), "storage goes with run=NAME"),
        (dict(source=3), "cannot load a model from int 3"),
    ]
    for kw, match in cases:
        with pytest.raises(api.SourceError, match=match):
            api.load(**kw)
    assert not missing_store.parent.exists()          # reading never creates a store
    with pytest.raises(api.SourceError, match="has no MLflow run"):
        api.register(api.load(run="api-star", storage=str(star["dir"] / "runs")), "x", tracking_uri=uri)
    for kw, match in ((dict(overrides=42), "overrides must be a dict"),
                      (dict(overrides={"proposal.K": 0}), "proposal.K must be an integer >= 1"),
                      (dict(overrides=["optim.epoch=2"]), "unknown key 'optim.epoch'.*optim.epochs"),
                      (dict(num_workers=3), r"num_workers applies to Ray Train runs \(local=False\) only"),
                      (dict(seed="1"), "seed must be an integer"), (dict(name=""), "name must be a non-empty")):
        with pytest.raises(ConfigError, match=match):
            api.train("debug", **kw)
    with pytest.raises(ConfigError, match="config must be a TOML file"):
        api.train(3)


@pytest.mark.slow
def test_training_on_ray_gives_the_model_of_the_same_run_in_this_process(star, tmp_path, monkeypatch):
    """``local=False``: a Ray Train job (a local Ray started and stopped by the call) with one worker
    trains the same weights as the fixture's run in this process, and the model comes back from the
    job's own checkpoint."""
    import ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("EBM_STORAGE_PATH", raising=False)
    ours = not ray.is_initialized()
    m = api.train("debug", overrides=STAR, local=False, num_workers=1, storage=str(tmp_path / "runs"),
                  tracking_uri=star["uri"])
    assert not (ours and ray.is_initialized())       # a Ray it started is shut down
    assert m.run_name.startswith("star-ebm_learned_proposal-") and m.run_id not in (None, star["model"].run_id)
    assert Path(m.source).parent == tmp_path / "runs" / m.run_name
    assert m.metrics["test_nll"] == star["model"].metrics["test_nll"]
    pd.testing.assert_frame_equal(m.predict(star["images"], **KW), star["model"].predict(star["images"], **KW))


def test_the_api_leaves_a_notebooks_matplotlib_backend_alone():
    code = ("import matplotlib.pyplot; from pipelines import api; api._plots(); import pipelines.plots, matplotlib; "
            "print(matplotlib.get_backend())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.split()[-1] == "svg", r.stderr[-2000:]
