"""Hardening of prediction and serving against a demanding (or hostile) user: per-row log_p, checked
parameters, bounded requests (refused before any work; allowed ones chunked), safe model loading,
resolvable pip requirements, and the inputs that used to crash or mislead.

A real MLflow SQLite store in tmp_path with a real registered model (a 1-epoch toy2 run whose energy
head is the image head's width, 512, so memory bounds are measured at the size that matters) and a
real ``mlflow models serve`` on 127.0.0.1. Fast, unregistered models are used where only the
predictor's arithmetic is under test."""
import ast
import dataclasses
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from ebm.config import Config

pytestmark = pytest.mark.integration
ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.path.dirname(sys.executable)
TOY = ['task.name="toy2"', "task.n_train=0", "task.n_val=0", "task.n_test=0", "eval.grid_nll=false", "optim.epochs=1",
       "sampler.refine_steps=0", "energy.hidden=512"]
NAME = "toy-hardening"


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A registered model in a SQLite MLflow store: {"uri", "model_uri", "run_id", "dir"}."""
    import mlflow

    from pipelines.driver.local import train_local
    from pipelines.serve import registry
    d = tmp_path_factory.mktemp("hard-store")
    uri = f"sqlite:///{d}/mlruns.db"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    cfg = Config.from_toml(ROOT / "pipelines/configs/debug.toml", TOY)
    (res,) = train_local(cfg, name="hard", tracking_uri=uri, experiment="hardening", threads=1, storage=str(d / "runs"))
    out = registry.register(uri, NAME, run_id=res["mlflow_run_id"], alias="champion")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield {"uri": uri, "model_uri": out["model_uri"], "run_id": out["run_id"], "dir": d}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def pyfunc(store):
    import mlflow
    return mlflow.pyfunc.load_model(store["model_uri"])


def _predictor(task="toy2", overrides=(), **task_changes):
    """An unregistered predictor (random weights): for the arithmetic of rows, chunks and inputs."""
    from ebm.nets import build_model
    from ebm.tasks import get_task
    from pipelines.serve.serving import Predictor
    cfg = Config().with_overrides([f'task.name="{task}"', "sampler.M_eval=64", "sampler.refine_steps=0", *overrides])
    t = dataclasses.replace(get_task(task), **task_changes)
    torch.manual_seed(0)
    return Predictor(build_model(cfg, t.x_shape, t.D, t.circular).eval(), cfg, t)


def _two_dim_predictor():
    """D = 2 (one linear, one circular target) on 2-dim vector inputs."""
    from ebm.nets import build_model
    from ebm.tasks import TaskSpec
    from pipelines.serve.serving import Predictor
    t = TaskSpec(name="two", D=2, x_shape=(2,), circular=(False, True), grid_lo=(-3.0, 0.0), grid_hi=(3.0, 2 * np.pi),
                 grid_n=(16, 16), fixed_sigmas=((0.1, 0.05), (0.8, 0.8)), ml_is_sigmas=((0.1, 0.05), (0.8, 0.8)),
                 units="", has_true_density=False)
    cfg = Config().with_overrides(["sampler.M_eval=32", "sampler.refine_steps=0"])
    torch.manual_seed(0)
    return Predictor(build_model(cfg, t.x_shape, t.D, t.circular).eval(), cfg, t)


def _image_pyfunc(limits=None):
    """The pyfunc class around an 8x8 grey image predictor, as load_context leaves it."""
    from pipelines.serve.registry import EBMPyfunc
    from pipelines.serve.serving import Limits
    m = EBMPyfunc()
    m.predictor = _predictor("star", ['features.kind="resnet_slim"', "features.width=4"], x_shape=(1, 8, 8))
    m.limits = limits or Limits()
    return m


def _png(h=8, w=8, mode="L", value=90) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3) if mode == "RGB" else (h, w), value, np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


ROWS = pd.DataFrame({"x": [0.05, 0.5, 0.95]})


# ---------------------------------------------------------------------------------------------------
# 1. log_p per row


def test_a_row_without_y_gets_a_null_log_p_and_the_others_their_value(pyfunc):
    full = pyfunc.predict(ROWS.assign(y=[1.0, 0.0, -2.5]), params={"M": 256, "seed": 3})
    part = pyfunc.predict(ROWS.assign(y=[1.0, None, -2.5]), params={"M": 256, "seed": 3})
    assert part["log_p"].tolist()[1] is None
    # the labelled rows keep exactly the value they have when every row is labelled, and y changes no
    # other column (log_p has its own random stream)
    assert [part["log_p"][i] for i in (0, 2)] == [full["log_p"][i] for i in (0, 2)]
    assert all(np.isfinite(full["log_p"]))
    bare = pyfunc.predict(ROWS, params={"M": 256, "seed": 3})
    for c in bare.columns:
        assert part[c].tolist() == bare[c].tolist() == full[c].tolist(), c
    none = pyfunc.predict(ROWS.assign(y=[None, None, None]), params={"M": 256, "seed": 3})
    assert none["log_p"].tolist() == [None, None, None] and "log_p" not in bare


def test_per_row_y_for_two_dim_targets_and_named_errors():
    from pipelines.serve.serving import InputError, inputs_tensor, predict_rows
    p = _two_dim_predictor()
    x = inputs_tensor(p, [[0.1, 0.2], [0.3, -0.4], [1.0, 1.0]])
    out = predict_rows(p, x, [[0.5, 1.0], None, [-0.5, 6.0]], M=64)
    assert out["log_p"][1] is None and all(np.isfinite(out["log_p"][i]) for i in (0, 2))
    assert np.array(out["mean"]).shape == (3, 2)
    with pytest.raises(InputError, match=r"row 2: y is not finite"):
        predict_rows(p, x, [[0.5, 1.0], None, [float("nan"), 1.0]], M=64)     # half a y is not a missing y
    with pytest.raises(InputError, match=r"row 0: y has 1 value\(s\), the model expects 2"):
        predict_rows(p, x, [[0.5], None, None], M=64)
    with pytest.raises(InputError, match="y has 2 rows but x has 3"):
        predict_rows(p, x, [None, None], M=64)


def test_ebm_predict_log_density_is_per_row_too(store, tmp_path, capsys):
    from pipelines.cli import main
    src = tmp_path / "rows.parquet"
    pd.DataFrame({"id": ["a", "b", "c"], "x": [0.05, 0.5, 0.95], "y": [1.0, None, -2.5]}).to_parquet(src)
    out = tmp_path / "pred.json"
    assert main(["predict", store["model_uri"], "--input", str(src), "--out", str(out), "--log-density",
                 "--M", "128", "--tracking-uri", store["uri"]]) == 0
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["log_p"] is None and all(np.isfinite(rows[i]["log_p"]) for i in (0, 2))


# ---------------------------------------------------------------------------------------------------
# 2. parameters are checked, never silently defaulted


BAD_PARAMS = [
    ({"M": 0}, r"^M \(proposal samples per row\) must be an integer from 1 to 16384, got 0"),
    ({"M": -3}, r"^M .* got -3"),
    ({"interval_level": 0.0}, r"^interval_level must lie in \(0, 1\)"),
    ({"interval_level": 1.0}, r"^interval_level must lie in \(0, 1\)"),
    ({"interval_level": float("nan")}, r"^interval_level must lie in \(0, 1\).*nan"),
    ({"quantiles": [0.0, 0.5]}, r"^quantiles\[0\] must lie in \(0, 1\)"),
    ({"quantiles": [0.5, 1.5]}, r"^quantiles\[1\] must lie in \(0, 1\)"),
    ({"quantiles": [0.5, float("nan")]}, r"^quantiles\[1\] must lie in \(0, 1\)"),
    ({"refine_steps": -1}, r"^refine_steps must be an integer from 0 to 100, got -1"),
    ({"seed": -1}, r"^seed must be an integer from 0 to 9223372036854775807, got -1"),
]


@pytest.mark.parametrize("params,message", BAD_PARAMS, ids=[json.dumps(p) for p, _ in BAD_PARAMS])
def test_bad_parameters_are_refused_naming_the_parameter(pyfunc, params, message):
    from pipelines.serve.serving import InputError
    with pytest.raises(InputError, match=message):
        pyfunc.predict(ROWS, params=params)


def test_parameter_types_are_checked_where_mlflow_does_not():
    """In-process predict_rows and ebm predict have no MLflow signature in front of them."""
    from pipelines.serve.serving import InputError, check_params, inputs_tensor, predict_rows
    p = _predictor()
    x = inputs_tensor(p, [0.1])
    for kw, msg in [({"M": 2.5}, r"^M .* got 2.5 \(float\)"), ({"M": "100"}, r"^M .* got '100' \(str\)"),
                    ({"M": True}, r"^M .* got True \(bool\)"), ({"M": 10 ** 6}, "EBM_SERVE_MAX_M"),
                    ({"interval_level": "0.9"}, r"^interval_level must be a number"),
                    ({"quantiles": "0.5"}, r"^quantiles must be a list"), ({"quantiles": [True]}, r"^quantiles\[0\]"),
                    ({"refine_steps": 1.0}, r"^refine_steps must be an integer"),
                    ({"return_samples": "false"}, r"^return_samples must be true or false"),
                    ({"seed": 2 ** 70}, r"^seed must be an integer from 0 to 9223372036854775807, got 1180591620717411303424")]:
        with pytest.raises(InputError, match=msg):
            predict_rows(p, x, **kw)
    ok = check_params(p, M=np.int64(8), quantiles=np.array([0.1, 0.9]), seed=np.int64(1))
    assert ok.M == 8 and ok.quantiles == (0.1, 0.9) and ok.seed == 1
    assert check_params(p).M == p.cfg.sampler.M_eval          # omitted (None) is the model's default; 0 is not


# ---------------------------------------------------------------------------------------------------
# 3. bounded requests


def test_over_limit_requests_are_refused_before_any_decoding_or_sampling():
    from pipelines.serve.serving import InputError, Limits
    m = _image_pyfunc()
    junk = pd.DataFrame({"image": [b"not an image"] * 1025})
    # the rows bound and the parameters are judged first: no image is decoded (junk would be named)
    with pytest.raises(InputError, match=r"^1025 rows in one request, over the serving limit of 1024 \(EBM_SERVE_MAX_ROWS\)"):
        m._predict(junk, {})
    with pytest.raises(InputError, match=r"M \(proposal samples per row\) = 1000000 is over the serving limit of 16384 "
                                         r"\(EBM_SERVE_MAX_M\)"):
        m._predict(junk[:1], {"M": 10 ** 6})
    with pytest.raises(InputError, match=r"^200 rows x M = 16384 is 3276800 proposal samples in one request, over the "
                                         r"serving limit of 2097152 \(EBM_SERVE_MAX_SAMPLES\)"):
        m._predict(junk[:200], {"M": 16384})
    with pytest.raises(InputError, match=r"^100 rows x M = 16384 x 2 \(log_p\) is 3276800"):
        m._predict(junk[:100].assign(y=1.0), {"M": 16384})
    with pytest.raises(InputError, match=r"return_samples with M = 1025: at most 1024 samples per row"):
        m._predict(junk[:1], {"M": 1025, "return_samples": True})
    with pytest.raises(InputError, match="row 0: not a readable image"):      # within every bound: now it decodes
        m._predict(junk[:100], {"M": 16384})
    small = _image_pyfunc(Limits(max_rows=2, max_M=8))
    with pytest.raises(InputError, match=r"over the serving limit of 2 \(EBM_SERVE_MAX_ROWS\)"):
        small._predict(pd.DataFrame({"image": [_png()] * 3}), {"M": 8})
    assert len(small._predict(pd.DataFrame({"image": [_png()] * 2}), {"M": 8})) == 2


def test_ebm_evaluate_bounds_M_before_reading_anything():
    from pipelines.serve.model_eval import evaluate_dataset
    from pipelines.serve.serving import InputError
    p = _predictor()
    with pytest.raises(InputError, match=r"M \(proposal samples per row\) = 1000000 is over the serving limit"):
        evaluate_dataset(p, "/nonexistent/dataset", M_samples=10 ** 6)
    with pytest.raises(InputError, match=r"M \(proposal samples per row\) must be an integer from 1 to 16384, got 0"):
        evaluate_dataset(p, "/nonexistent/dataset", M_samples=0)


def test_limits_come_from_the_environment_and_bad_values_are_named():
    from pipelines.serve.serving import Limits
    assert Limits.from_env({}) == Limits()
    lim = Limits.from_env({"EBM_SERVE_MAX_M": "4096", "EBM_SERVE_MAX_ROWS": " 64 ", "EBM_SERVE_CHUNK_MB": ""})
    assert (lim.max_M, lim.max_rows, lim.chunk_mb) == (4096, 64, Limits().chunk_mb)
    for raw in ("0", "-5", "1e6", "lots"):
        with pytest.raises(ValueError, match=rf"EBM_SERVE_MAX_SAMPLES={raw!r}: must be a positive integer"):
            Limits.from_env({"EBM_SERVE_MAX_SAMPLES": raw})


def test_allowed_large_requests_are_chunked_to_the_memory_budget(store, monkeypatch):
    """The chunk holds rows x (1 + M) x (4 hidden + ...) floats within chunk_mb, and chunking changes
    nothing but the chunk boundaries."""
    from pipelines.serve import serving
    p = serving.load_file(next(pathlib.Path(store["dir"]).rglob(serving.MODEL_FILE)))
    assert p.cfg.energy.hidden == 512
    assert serving.chunk_rows(p, 16384, serving.Limits()) == 1
    assert serving.chunk_rows(p, 64, serving.Limits()) == 256         # small M: the plain batch size
    seen = []
    real = serving.predict

    def spy(model, xb, *a, **k):
        seen.append(xb.shape[0])
        return real(model, xb, *a, **k)
    monkeypatch.setattr(serving, "predict", spy)
    x = serving.inputs_tensor(p, np.linspace(0, 1, 10).tolist())
    out = serving.predict_rows(p, x, [0.5] * 10, M=512, limits=serving.Limits(chunk_mb=32))
    budget = serving.chunk_rows(p, 512, serving.Limits(chunk_mb=32))
    assert 1 < budget < 10 and seen == [budget, 10 - budget]
    assert len(out["mean"]) == len(out["log_p"]) == 10 and all(np.isfinite(out["log_p"]))


def test_an_allowed_request_at_the_largest_M_stays_within_bounded_memory(store):
    """16 rows at M = 16384 on the 512-wide head: 2.3 GB peak unchunked (measured), a few hundred MB now."""
    model = next(pathlib.Path(store["dir"]).rglob("model.pt"))
    code = ("import resource, sys, torch\n"
            "torch.set_num_threads(1)\n"
            "from pipelines.serve.serving import inputs_tensor, load_file, predict_rows\n"
            "p = load_file(sys.argv[1]); x = inputs_tensor(p, [0.1] * 16)\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "out = predict_rows(p, x, M=16384)\n"
            "assert len(out['mean']) == 16\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    grew_mb = int(r.stdout.split()[-1])
    assert grew_mb < 600, f"peak RSS grew by {grew_mb} MB"


# ---------------------------------------------------------------------------------------------------
# 4. model files are loaded without running code


def test_every_torch_load_in_the_repo_uses_weights_only():
    calls = []
    for top in ("ebm", "pipelines", "cluster", "bench"):
        for f in (ROOT / top).rglob("*.py"):
            text = f.read_text()
            for node in ast.walk(ast.parse(text, str(f))):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    wo = [k.value for k in node.keywords if k.arg == "weights_only"]
                    safe = bool(wo) and isinstance(wo[0], ast.Constant) and wo[0].value is True
                    calls.append((f"{f.relative_to(ROOT)}:{node.lineno}", safe))
            assert "from torch import load" not in text, f"{f}: import torch.load under another name"
    assert calls, "no torch.load found: the audit lost its target"
    assert [c for c, ok in calls if not ok] == []


class _Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(tempfile.gettempdir()) / f"ebm-pwned-{os.getpid()}",))


def test_a_model_file_that_would_run_code_is_refused(tmp_path):
    from pipelines.serve.serving import InputError, load_file
    marker = pathlib.Path(tempfile.gettempdir()) / f"ebm-pwned-{os.getpid()}"
    marker.unlink(missing_ok=True)
    f = tmp_path / "model.pt"
    torch.save({"format": 2, "model": _Payload()}, f)
    with pytest.raises(InputError, match="not a model file of this project"):
        load_file(f)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# 5. pip requirements resolve from the public index


def _check_requirements(lines):
    from importlib import metadata

    from packaging.requirements import Requirement
    reqs = [Requirement(line) for line in lines]
    for r in reqs:
        for spec in r.specifier:
            assert "+" not in spec.version, f"{r}: a local version label is not on the public index"
        installed = metadata.version(r.name)
        assert r.specifier.contains(installed, prereleases=True), f"{r} does not admit the installed {installed}"
    return {r.name: r for r in reqs}


def test_the_registered_model_requirements_parse_and_carry_no_local_label(store):
    import mlflow
    path = mlflow.pyfunc.get_model_dependencies(store["model_uri"])
    lines = [ln.strip() for ln in pathlib.Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    reqs = _check_requirements(lines)
    from importlib import metadata

    from packaging.version import Version
    assert str(reqs["torch"].specifier) == f"=={Version(metadata.version('torch')).public}"
    assert {"torch", "numpy", "pandas", "mlflow"} <= set(reqs) and "pillow" not in reqs   # a vector model


def test_requirements_strip_local_labels_and_bound_unreleased_versions(monkeypatch):
    from importlib import metadata

    from pipelines.serve import registry
    versions = {"torch": "2.13.0+cu121", "numpy": "2.5.0.dev0+git20260101", "pandas": "3.1.1", "pillow": "13.0.0",
                "mlflow": "3.17.2"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    reqs = registry._requirements(image=True)
    assert reqs == ["torch==2.13.0", "numpy>=2.5.0.dev0", "pandas==3.1.1", "pillow==13.0.0", "mlflow==3.17.2"]
    from packaging.requirements import Requirement
    assert all("+" not in str(Requirement(r)) for r in reqs)
    assert Requirement("torch==2.13.0").specifier.contains("2.13.0+cu121")     # a CUDA or CPU build satisfies it
    assert "pillow" not in " ".join(registry._requirements(image=False))


# ---------------------------------------------------------------------------------------------------
# 6. inputs that crashed with a traceback, or were silently wrong


def test_repeated_quantiles_are_refused_and_an_empty_list_means_no_quantile_columns(pyfunc):
    from pipelines.serve.serving import InputError
    with pytest.raises(InputError, match=r"quantiles must be distinct .* repeated \['q0.5'\]"):
        pyfunc.predict(ROWS, params={"quantiles": [0.5, 0.5]})
    with pytest.raises(InputError, match=r"quantiles must be distinct"):     # the same column name
        pyfunc.predict(ROWS, params={"quantiles": [0.1234561, 0.1234564]})
    out = pyfunc.predict(ROWS, params={"quantiles": []})
    assert not [c for c in out.columns if c.startswith("q")] and {"mean", "interval_lo"} <= set(out.columns)


def test_values_beyond_float32_or_the_models_range_are_refused_naming_the_row(pyfunc):
    from pipelines.serve.serving import InputError
    with pytest.raises(InputError, match=r"^row 1: x = \[1e\+300\] is outside float32's range"):
        pyfunc.predict(pd.DataFrame({"x": [0.5, 1e300]}))
    with pytest.raises(InputError, match=r"^row 0: y = \[-1e\+300\] is outside float32's range"):
        pyfunc.predict(pd.DataFrame({"x": [0.5], "y": [-1e300]}))
    # finite in float32, but the network overflows on it
    with pytest.raises(InputError, match=r"^row 2: the model's prediction is not finite for this input"):
        pyfunc.predict(pd.DataFrame({"x": [0.5, 0.1, 3e38]}))
    with pytest.raises(InputError, match=r"^row 1: log p\(y\|x\) is not finite at this y"):   # was -inf: JSON -Infinity
        pyfunc.predict(pd.DataFrame({"x": [0.5, 0.5], "y": [0.0, -3e38]}))
    out = pyfunc.predict(pd.DataFrame({"x": [0.5, 1e3]}))                    # far but finite: an answer
    assert np.isfinite(out["mean"]).all()


def test_other_failures_inside_the_model_are_not_blamed_on_the_input(monkeypatch):
    from pipelines.serve import serving
    p = _predictor()

    def fails(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")
    monkeypatch.setattr(serving, "predict", fails)
    with pytest.raises(RuntimeError, match="not enough memory"):
        serving.predict_rows(p, serving.inputs_tensor(p, [0.5]))


def test_huge_or_misshapen_image_payloads_are_refused_before_decoding():
    from pipelines.serve.serving import InputError, decode_image, max_image_bytes
    m = _image_pyfunc()
    cap = max_image_bytes((1, 8, 8))
    padded = _png() + b"\0" * (cap + 1)          # a valid PNG with trailing megabytes: Pillow reads it happily
    with pytest.raises(InputError, match=rf"^row 1: {len(padded)} bytes is too large for an encoded 8x8 image of 1 "
                                         rf"channel\(s\) \(at most {cap} bytes\)"):
        m._predict(pd.DataFrame({"image": [_png(), padded]}), {"M": 8})
    with pytest.raises(InputError, match="too large for an encoded 8x8 image"):
        decode_image("A" * (2 * cap), (1, 8, 8), "row 0")                   # base64 text judged by its size
    assert len(m._predict(pd.DataFrame({"image": [_png()]}), {"M": 8})) == 1


def test_vector_rows_must_be_flat_lists_of_numbers():
    from pipelines.serve.serving import InputError, inputs_tensor
    p = _two_dim_predictor()
    for row, msg in [([[0.1, 0.2]], r"row 0: x must be a number or a flat list of 2 numbers"),   # nested: was flattened
                     (["0.1"], r"row 0: x must be a number or a flat list of 2 numbers, got \['0.1'\]"),  # text: was parsed
                     ([True, False], r"row 0: x must be a number"),                              # bools: were 1.0/0.0
                     ([0.1, None], r"row 0: x is not finite"),
                     (None, r"row 0: x is missing \(null\)")]:
        with pytest.raises(InputError, match=msg):
            inputs_tensor(p, [row])
    assert inputs_tensor(p, [[0.1, 0.2], np.array([1, 2])]).shape == (2, 2)


def test_serving_normalises_images_with_the_tasks_own_statistics():
    """A dataset may carry its own normalisation; training used it, so must serving."""
    from pipelines.serve.serving import inputs_tensor
    p = _predictor("star", ['features.kind="resnet_slim"', "features.width=4"], x_shape=(1, 8, 8),
                   norm_mean=(0.2,), norm_std=(0.3,))
    got = inputs_tensor(p, [_png(value=51)])
    assert torch.allclose(got, torch.full((1, 1, 8, 8), (51 / 255 - 0.2) / 0.3))


# ---------------------------------------------------------------------------------------------------
# the HTTP server: over-limit requests answer 400 quickly with small memory; null log_p is JSON null


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += _tree(int(c))
    except OSError:
        pass
    return out


def _peak_rss_mb(pid: int) -> int:
    """The largest peak RSS (VmHWM) of the process and its descendants."""
    peak = 0
    for q in _tree(pid):
        try:
            for line in pathlib.Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
    return peak


def _post(port: int, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the server's memory")
def test_the_model_server_refuses_over_limit_requests_with_small_memory(store, tmp_path):
    port = _port()
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_REGISTRY_URI": store["uri"],
           "PATH": BIN + os.pathsep + os.environ.get("PATH", ""), "EBM_SERVE_MAX_ROWS": "8"}
    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "models", "serve", "-m", store["model_uri"], "--env-manager",
                             "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.time() - t0 < 180, "server did not start: " + (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        one = {"columns": ["x"], "data": [[0.1]]}
        code, text = _post(port, {"dataframe_split": one, "params": {"M": 16}})
        assert code == 200, text
        ready_mb = _peak_rss_mb(proc.pid)
        # 1 KB that asked for 10^6 samples (8 GB, 52 s before): refused, no memory spent
        code, text = _post(port, {"dataframe_split": one, "params": {"M": 1_000_000}})
        assert code == 400 and "M (proposal samples per row) = 1000000 is over the serving limit of 16384 " \
                               "(EBM_SERVE_MAX_M)" in _strict_json(text)["message"], text
        assert _peak_rss_mb(proc.pid) < ready_mb + 200
        code, text = _post(port, {"dataframe_split": {"columns": ["x"], "data": [[0.1]] * 9}, "params": {"M": 16}})
        assert code == 400 and "9 rows in one request, over the serving limit of 8 (EBM_SERVE_MAX_ROWS)" in text, text
        code, text = _post(port, {"dataframe_split": one, "params": {"M": 0}})
        assert code == 400 and "M (proposal samples per row) must be an integer from 1 to 16384, got 0" in text, text
        code, text = _post(port, {"dataframe_split": one, "params": {"quantiles": [0.5, 0.5]}})
        assert code == 400 and "quantiles must be distinct" in text, text
        code, text = _post(port, {"dataframe_split": {"columns": ["x"], "data": [[1e300]]}})
        assert code == 400 and "row 0: x = [1e+300] is outside float32's range" in text, text
        # per-row log_p: standard JSON null for the row without y
        code, text = _post(port, {"dataframe_split": {"columns": ["x", "y"], "data": [[0.1, 1.0], [0.5, None]]},
                                  "params": {"M": 64}})
        assert code == 200, text
        preds = _strict_json(text)["predictions"]
        assert np.isfinite(preds[0]["log_p"]) and preds[1]["log_p"] is None
        code, text = _post(port, {"dataframe_split": {"columns": ["x"], "data": []}})
        assert code == 200 and _strict_json(text)["predictions"] == [], text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()
