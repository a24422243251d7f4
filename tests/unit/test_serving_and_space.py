"""Prediction rows, strict image decoding and the sweep's search-space file: pure, fast, CPU."""
import io

import numpy as np
import pytest
import torch

from ebm.config import Config, ConfigError
from ebm.nets import build_model
from ebm.tasks import get_task

pytestmark = pytest.mark.unit


def _predictor(task="toy2", overrides=()):
    import dataclasses

    from pipelines.serve.serving import Predictor
    cfg = Config().with_overrides([f'task.name="{task}"', "sampler.M_eval=64", "sampler.refine_steps=0", *overrides])
    t = get_task(task)
    if task == "star":
        t = dataclasses.replace(t, x_shape=(1, 8, 8))
    torch.manual_seed(0)
    m = build_model(cfg, t.x_shape, t.D, t.circular).eval()
    return Predictor(m, cfg, t)


def _png(shape_hw, mode):
    from PIL import Image
    buf = io.BytesIO()
    h, w = shape_hw
    Image.fromarray(np.zeros((h, w, 3) if mode == "RGB" else (h, w), np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def test_predict_rows_is_deterministic_per_seed_and_consistent():
    from pipelines.serve.serving import inputs_tensor, predict_rows, quantile_column
    p = _predictor()
    x = inputs_tensor(p, [0.1, 0.5, 0.9, [0.3]])
    a = predict_rows(p, x, [0.0, 1.0, -1.0, 2.0], quantiles=(0.1, 0.5, 0.9), interval_level=0.8, seed=1)
    b = predict_rows(p, x, [0.0, 1.0, -1.0, 2.0], quantiles=(0.1, 0.5, 0.9), interval_level=0.8, seed=1)
    c = predict_rows(p, x, None, quantiles=(0.1, 0.5, 0.9), interval_level=0.8, seed=2)
    assert a == b and a["mean"] != c["mean"] and "log_p" not in c
    assert [quantile_column(q) for q in (0.1, 0.5, 0.05, 0.975)] == ["q0.1", "q0.5", "q0.05", "q0.975"]
    for i in range(4):
        assert a["q0.1"][i] <= a["q0.5"][i] <= a["q0.9"][i]
        assert a["interval_lo"][i] == pytest.approx(a["q0.1"][i], abs=1e-5)    # 80 % central = 10 %..90 %
        assert np.isfinite(a["log_p"][i]) and a["std"][i] > 0
    s = predict_rows(p, x[:2], return_samples=True, M=16)
    assert np.array(s["samples"]).shape == (2, 16) and np.allclose(np.sum(s["weights"], axis=1), 1)


def test_bad_rows_are_named():
    from pipelines.serve.serving import InputError, decode_image, inputs_tensor, predict_rows
    p = _predictor()
    with pytest.raises(InputError, match="row 1: x has 2 value"):
        inputs_tensor(p, [0.1, [0.1, 0.2]])
    with pytest.raises(InputError, match="row 0: x is not finite"):
        inputs_tensor(p, [float("nan")])
    with pytest.raises(InputError, match=r"row 0: y has 2"):
        predict_rows(p, inputs_tensor(p, [0.1]), [[1.0, 2.0]])
    with pytest.raises(InputError, match="must lie in"):
        predict_rows(p, inputs_tensor(p, [0.1]), quantiles=(0.0, 0.5))
    assert decode_image(_png((8, 8), "L"), (1, 8, 8), "a").shape == (1, 8, 8)
    assert decode_image(_png((8, 8), "RGB"), (3, 8, 8), "a").shape == (3, 8, 8)
    with pytest.raises(InputError, match=r"f.png: image is 9x8 pixels .* expects 8x8"):
        decode_image(_png((8, 9), "L"), (1, 8, 8), "f.png")
    with pytest.raises(InputError, match=r"image has 3 channel\(s\) \(mode RGB\), the model expects grey"):
        decode_image(_png((8, 8), "RGB"), (1, 8, 8), "f.png")
    with pytest.raises(InputError, match="not a readable image"):
        decode_image(b"\x89PNG but not really", (1, 8, 8), "f.png")
    with pytest.raises(InputError, match="not base64"):
        decode_image("%%%", (1, 8, 8), "f.png")
    import base64
    assert decode_image(base64.b64encode(_png((8, 8), "L")).decode(), (1, 8, 8), "a").shape == (1, 8, 8)


def test_image_predictor_rebuilds_from_its_state_file_without_the_task_registry(tmp_path):
    from pipelines.serve.serving import load_file, inputs_tensor, predict_rows, slim_state
    p = _predictor("star", ['features.kind="resnet_slim"', "features.width=4"])
    task = p.task.to_dict()
    task["name"] = "my_own_angles"         # a task name no registry knows: the spec travels with the weights
    state = {"format": 2, "model": p.model.state_dict(), "config": p.cfg.to_dict(), "task": task, "epoch": 0,
             "optimizer": {}, "rng": {}}
    torch.save(slim_state(state), tmp_path / "model.pt")
    q = load_file(tmp_path / "model.pt")            # weights_only=True
    assert "optimizer" not in slim_state(state) and q.task.x_shape == (1, 8, 8) and q.input_column == "image"
    assert q.task.name == "my_own_angles"
    imgs = [_png((8, 8), "L")] * 2
    a = predict_rows(p, inputs_tensor(p, imgs), seed=0)
    b = predict_rows(q, inputs_tensor(q, imgs), seed=0)
    assert a == b and all(0 <= v < 2 * np.pi for v in a["mean"])


def test_space_file_is_checked_against_the_config(tmp_path):
    from pipelines.driver.tune import load_space, param_space
    base = Config()
    f = tmp_path / "s.toml"
    f.write_text('[space]\n"proposal.K" = {grid = [1, 2, 4]}\n"optim.lr" = {loguniform = [1e-4, 1e-2]}\n'
                 '"method.name" = {choice = ["ebm_learned_proposal", "mdn"]}\n"seed" = {randint = [0, 5]}\n'
                 '[tune]\nscheduler = "fifo"\nnum_samples = 2\n')
    space, opts = load_space(f, base)
    assert opts == {"scheduler": "fifo", "num_samples": 2} and set(space) == {"proposal.K", "optim.lr", "method.name", "seed"}
    ps = param_space(space)
    assert ps["proposal.K"] == {"grid_search": [1, 2, 4]}
    bad = {'"proposal.Q" = {grid = [1]}': "unknown config key 'proposal.Q'",
           '"proposal.K" = {grid = [0, 2]}': "proposal.K = 0 is not a valid value",
           '"proposal.K" = {sweep = [1, 2]}': "kind in",
           '"optim.lr" = {loguniform = [0, 1]}': "needs lo > 0",
           '"optim.lr" = {uniform = [1, 0.1]}': "lo < hi",
           '"method.name" = {choice = ["nope"]}': "method.name must be one of"}
    for line, msg in bad.items():
        f.write_text(f"[space]\n{line}\n")
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_space(f, base)
    f.write_text('[space]\n[tune]\nschedule = "asha"\n')
    with pytest.raises(ConfigError, match="known keys"):
        load_space(f, base)


def test_seed_protocol_and_scheduler_spec():
    from pipelines.driver.tune import _make_spec
    from pipelines.driver.tune_report import seed_summary
    cfg = Config().with_overrides(["seed=10", "eval.every=5"])
    s = _make_spec(cfg, {}, {}, seeds=4)
    assert s["space"] == {"seed": {"grid": [10, 11, 12, 13]}} and s["scheduler"] == "fifo"
    with pytest.raises(ConfigError, match="no search space"):
        _make_spec(cfg, {"proposal.K": {"grid": [1]}}, {}, seeds=3)
    a = _make_spec(cfg, {"proposal.K": {"grid": [1]}}, {}, seeds=0)
    assert a["scheduler"] == "asha" and a["cfg"]["eval.every"] == 1     # ASHA needs a val NLL every epoch
    rows = [{"test_nll": v} for v in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, float("nan"))]
    out = seed_summary(rows)
    assert out["n_seeds"] == 6 and out["test_nll_mean"] == pytest.approx(3.5)
    assert out["test_nll_best5_mean"] == pytest.approx(3.0)


def test_pyfunc_input_errors_are_http_400_with_their_message():
    from pipelines.serve.registry import BadInput
    from pipelines.serve.serving import InputError
    e = BadInput("row 0: not a readable image")
    assert isinstance(e, InputError) and e.get_http_status_code() == 400 and e.message == "row 0: not a readable image"


def test_few_effective_samples_per_tail_is_a_warning_naming_the_m_to_use():
    from pipelines.serve.serving import Params, few_samples
    prm = Params(M=256, quantiles=(0.5,), interval_level=0.9, refine_steps=0, return_samples=False, seed=0)
    assert few_samples([1.0] * 10, prm) == ""                        # 12.8 effective samples per tail
    assert few_samples([0.9] * 9 + [0.1], prm) == ""                # one hard row of ten: no warning
    msg = few_samples([0.5] * 10, prm)                               # 6.4 per tail
    assert msg.startswith("the 90% intervals of 10 of 10 rows rest on fewer than 10 effective samples per tail")
    assert "median 6.4 at M = 256" in msg and "raise M (about 400 for 90% of these rows)" in msg
    assert "2 of 10 rows" in few_samples([0.9] * 8 + [0.1] * 2, prm)   # two of ten: over 10 %
    assert few_samples([], prm) == ""
    # an M beyond the serving limit is not suggested; the level is printed as given
    tight = Params(M=1024, quantiles=(0.5,), interval_level=0.995, refine_steps=0, return_samples=False, seed=0)
    msg = few_samples([0.01] * 10, tight)
    assert msg.startswith("the 99.5% intervals of 10 of 10 rows") and "up to the limit of 16384, EBM_SERVE_MAX_M" in msg
