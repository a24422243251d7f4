import math

import pytest
import torch

from ebm.config import Config
from ebm.nets import build_model
from ebm.tasks import get_task
from ebm.train import NonFiniteLoss, Split, batches, evaluate, fit, load_data, make_optimizer, run_epoch

pytestmark = pytest.mark.unit


def _debug(**over):
    return Config.from_toml("pipelines/configs/debug.toml", [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("method", ["ebm_learned_proposal", "mdn_ebm_teacher", "nce_fixed"])
def test_fit_learns_toy2_and_reports_finite_metrics(method):
    cfg = _debug(**{"method.name": f'"{method}"', })
    task, splits = load_data(cfg)
    torch.manual_seed(cfg.seed)
    untrained = evaluate(build_model(cfg, task.x_shape, task.D, task.circular), splits["test"], task, cfg)
    res = fit(cfg, log=None, data=(task, splits))
    assert all(math.isfinite(v) for v in res.test.values())
    assert res.test["nll"] < untrained["nll"] - 0.2
    if method != "nce_fixed":
        assert {"is_nll", "crps", "coverage", "mae_mode", "ess"} <= set(res.test)


def test_best_val_selection_restores_the_best_epoch():
    cfg = _debug(**{"eval.every": 1, "eval.select": "\"best_val\""})
    res = fit(cfg, log=None)
    vals = [h["val_nll"] for h in res.history]
    assert res.best_epoch == min(range(len(vals)), key=vals.__getitem__)


def test_same_seed_same_result():
    cfg = _debug(**{"optim.epochs": 1})
    a, b = fit(cfg, log=None), fit(cfg, log=None)
    assert a.test == b.test


class _NaNEvery:
    """Batches whose targets are NaN on chosen steps."""

    def __init__(self, split, bad):
        self.split, self.bad = split, bad

    def __iter__(self):
        for i, (x, y) in enumerate(batches(self.split, 32, None)):
            yield x, (torch.full_like(y, float("nan")) if i in self.bad else y)


def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_training():
    cfg = _debug()
    task = get_task("toy2")
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    opt = make_optimizer(model, cfg)
    split = Split(torch.rand(320, 1), torch.randn(320, 1))
    before = [p.detach().clone() for p in model.parameters()]
    out = run_epoch(model, opt, _NaNEvery(split, {1, 4}), cfg, task, 0)
    assert out["skipped_steps"] == 2 and out["steps"] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(NonFiniteLoss, match="non-finite losses in a row"):
        run_epoch(model, opt, _NaNEvery(split, set(range(10))), cfg, task, 0, max_skips_in_row=5)


def test_evaluate_star_reports_exact_kl():
    cfg = Config.from_dict({"task": {"name": "star", "image_size": 16, "n_train": 32, "n_val": 16, "n_test": 16},
                            "features": {"kind": "resnet_slim", "width": 4}, "sampler": {"M_eval": 64},
                            "energy": {"y_embed": [8, 8], "hidden": 8}})
    task, splits = load_data(cfg)
    assert splits["train"].x.shape[1:] == (1, 16, 16)
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    out = evaluate(model, splits["test"], task, cfg)
    assert out["kl_ebm"] > 0 and out["kl_proposal"] > 0 and math.isfinite(out["grid_nll"])


def test_toy_inputs_are_standardised_by_buffers_that_travel_with_the_weights():
    cfg = _debug(**{"optim.epochs": 1})
    task, splits = load_data(cfg)
    res = fit(cfg, log=None, data=(task, splits))
    sd = res.model.state_dict()
    torch.testing.assert_close(sd["feature_net.x_mean"], splits["train"].x.mean(0))
    torch.testing.assert_close(sd["feature_net.x_std"], splits["train"].x.std(0))
    raw = fit(_debug(**{"optim.epochs": 1, "features.standardize": "false"}), log=None, data=(task, splits))
    assert torch.equal(raw.model.state_dict()["feature_net.x_std"], torch.ones(1))
