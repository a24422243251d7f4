"""The one training loop (ebm.loop.train) in a single process: learning, model selection, seeding,
divergence handling and checkpoints (resume is exact, files load with weights_only=True)."""
import copy
import math

import pytest
import torch

from ebm import checkpoint
from ebm.config import Config
from ebm.data import LoopData, Split, in_memory, load_data
from ebm.evaluate import evaluate
from ebm.loop import Runtime, TrainingFailed, eval_seed, make_optimizer, run_epoch, train
from ebm.nets import build_model
from ebm.tasks import get_task

pytestmark = pytest.mark.unit


def _debug(**over):
    return Config.from_toml("pipelines/configs/debug.toml", [f"{k}={v}" for k, v in over.items()])


class _Recorder(Runtime):
    """A single-process runtime that keeps every report (what a driver would write)."""

    def __init__(self):
        super().__init__("cpu")
        self.rows, self.states = [], []

    def report(self, row, state, model):
        self.rows.append(row)
        self.states.append(copy.deepcopy(state))      # a real runtime writes it out at once

    def log(self, line):
        pass


def _fit(cfg, data=None, resume=None, rt=None):
    rt = rt or _Recorder()
    data = data or in_memory(*load_data(cfg), cfg)
    return train(cfg, data, rt, resume), rt


@pytest.mark.parametrize("method", ["ebm_learned_proposal", "mdn_ebm_teacher", "nce_fixed"])
def test_the_loop_learns_toy1_and_reports_finite_metrics(method):
    cfg = _debug(**{"method.name": f'"{method}"'})
    task, splits = load_data(cfg)
    torch.manual_seed(cfg.seed)
    untrained = evaluate(build_model(cfg, task.x_shape, task.D, task.circular), splits["test"], task, cfg)
    res, _ = _fit(cfg, in_memory(task, splits, cfg))
    test = {k[5:]: v for k, v in res.last.items() if k.startswith("test_")}
    assert all(math.isfinite(v) for v in test.values())
    assert test["nll"] < untrained["nll"] - 0.2
    if method != "nce_fixed":
        assert {"is_nll", "crps", "coverage", "mae_mode", "ess"} <= set(test)
        # per-level coverage of each source (ebm.calibration): the IS prediction's 90% is the interval
        # ebm.predict reports (eval.interval_level = 0.9), and coverage grows with the level
        sources = ["", "proposal_", "ebm_grid_"]        # both methods have an energy head and a proposal
        for src in sources:
            cov = [test[f"coverage_{src}{lv}"] for lv in (50, 80, 90, 95)]
            assert all(0 <= c <= 1 for c in cov) and cov == sorted(cov), (src, cov)
        assert test["coverage_90"] == pytest.approx(test["coverage"], abs=1e-12)
        # the PIT histogram of each source (10 bins): fractions summing to 1, and the central 80%
        # interval is the PIT's bins 1..8
        for src in ("prediction", "proposal", "ebm_grid"):
            bins = [test[f"pit_{src}_{b}"] for b in range(10)]
            assert sum(bins) == pytest.approx(1, abs=1e-9) and min(bins) >= 0, (src, bins)
            cov80 = test[f"coverage_{'' if src == 'prediction' else src + '_'}80"]
            assert sum(bins[1:9]) == pytest.approx(cov80, abs=0.01), (src, bins, cov80)


def test_best_val_selection_tests_and_checkpoints_the_best_epoch():
    cfg = _debug(**{"eval.every": 1, "eval.select": "\"best_val\"", "optim.epochs": 4})
    res, rt = _fit(cfg)
    vals = [h["val_nll"] for h in res.history]
    best = min(range(len(vals)), key=vals.__getitem__)
    assert res.selected_epoch == best == res.last["selected_epoch"]
    final = rt.states[-1]
    assert checkpoint.selected_epoch(final) == best
    for k, v in checkpoint.selected_weights(final).items():
        assert torch.equal(v, rt.states[best]["model"][k]), k
    # the test figures are those of the selected weights
    task, splits = load_data(cfg)
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    model.load_state_dict(checkpoint.selected_weights(final))
    again = evaluate(model, splits["test"], task, cfg, seed=eval_seed(cfg))
    assert again["nll"] == res.last["test_nll"] and again["is_nll"] == res.last["test_is_nll"]


@pytest.mark.parametrize("method", ["ebm_learned_proposal", "mdn_ebm_teacher", "mdn"])
def test_validating_the_nll_alone_trains_and_selects_exactly_as_validating_everything(method):
    """eval.val_figures = "nll" leaves out the per-epoch prediction, coverage and PITs: the losses, the
    validation NLL of every epoch, the selected epoch and every test figure are bit-for-bit the same."""
    from ebm.loop import TIMING_KEYS as timing
    cfg = _debug(**{"method.name": f'"{method}"', "eval.every": 1, "eval.select": '"best_val"', "optim.epochs": 3})
    (full, _), (lean, _) = _fit(cfg), _fit(cfg.with_overrides(['eval.val_figures="nll"']))
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in lean.history]
    assert [h["val_nll"] for h in full.history] == [h["val_nll"] for h in lean.history]
    assert full.selected_epoch == lean.selected_epoch
    assert {k: v for k, v in full.last.items() if k.startswith("test_")} == \
        {k: v for k, v in lean.last.items() if k.startswith("test_")}
    left_out = {k for k in full.history[0] if k.startswith("val_")} - set(lean.history[0])
    assert {"val_coverage", "val_crps", "val_mae_mean", "val_pit_proposal_0"} <= left_out
    assert not {k for k in lean.history[0] if k.startswith("val_") and k not in full.history[0]}
    assert {k for k in lean.last if k not in timing} - {k for k in full.last if k not in timing} == set()


def test_same_seed_same_result():
    cfg = _debug(**{"optim.epochs": 1})
    (a, _), (b, _) = _fit(cfg), _fit(cfg)
    from ebm.loop import TIMING_KEYS as timing
    assert {k: v for k, v in a.last.items() if k not in timing} == {k: v for k, v in b.last.items() if k not in timing}


@pytest.mark.parametrize("interrupted", [True, False])
def test_resume_from_a_checkpoint_file_is_exact(tmp_path, interrupted):
    """A run stopped after epoch 2 of 3 (interrupted), or one that finished 2 epochs and is extended to
    3, continues to exactly the weights and test figures of an uninterrupted 3-epoch run."""
    cfg = _debug(**{"optim.epochs": 3, "eval.every": 1})
    full, rt_full = _fit(cfg)
    if interrupted:
        stopped = rt_full.states[1]
    else:
        stopped = _fit(cfg.with_overrides(["optim.epochs=2"]))[1].states[-1]
    checkpoint.save(tmp_path / "c", stopped)
    state = checkpoint.load(tmp_path / "c")            # weights_only=True inside
    resumed, _ = _fit(cfg, resume=state)
    assert [h["epoch"] for h in resumed.history] == [2] and resumed.history[0]["first_epoch"] == 2
    for k, v in rt_full.states[-1]["model"].items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.last["test_nll"] == full.last["test_nll"]


def test_checkpoint_errors_name_the_problem(tmp_path):
    cfg = _debug(**{"optim.epochs": 1})
    _, rt = _fit(cfg)
    path = checkpoint.save(tmp_path / "ok", rt.states[-1])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / checkpoint.CKPT_FILE).write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="half-written"):
        checkpoint.load(tmp_path / "half")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint.pt"):
        checkpoint.load(tmp_path / "missing")
    torch.save({"format": 1, "model": {}}, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match="format 1"):
        checkpoint.load(tmp_path / "old.pt")


class _NaNAt:
    """Batches of a split whose targets are NaN at chosen (epoch, step) pairs."""

    def __init__(self, split, bad, batch=32):
        self.split, self.bad, self.batch = split, bad, batch

    def epoch(self, e, seed=0):
        for i, s in enumerate(range(0, len(self.split), self.batch)):
            x, y = self.split.x[s:s + self.batch], self.split.y[s:s + self.batch]
            yield x, (torch.full_like(y, float("nan")) if (e, i) in self.bad or ("all", i) in self.bad else y)


def _nan_data(cfg, bad):
    task = get_task("toy2")
    train_split = Split(torch.rand(320, 1), torch.randn(320, 1))
    evals = {"val": Split(torch.rand(64, 1), torch.randn(64, 1)), "test": Split(torch.rand(64, 1), torch.randn(64, 1))}
    return LoopData(task, evals, train_split.x, _NaNAt(train_split, bad).epoch)


def test_non_finite_steps_are_skipped():
    cfg = _debug(**{"task.name": '"toy1"', "optim.epochs": 1})
    task = get_task("toy2")
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    opt = make_optimizer(model, cfg)
    data = _nan_data(cfg, {(0, 1), (0, 4)})
    before = [p.detach().clone() for p in model.parameters()]

    def step(x, y, e):
        from ebm.steps import train_step
        return train_step(model, (x, y), cfg, epoch=e, circular=task.circular)
    out, in_row = run_epoch(model, opt, data.train_epoch(0, 0), cfg, 0, step,
                            all_finite=lambda t: bool(torch.isfinite(t).all()), device="cpu")
    assert out["skipped_steps"] == 2 and out["steps"] == 8 and in_row == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_non_finite_steps_in_a_row_are_counted_across_epochs():
    # 10 steps per epoch; the last 6 of epoch 0 and the first 6 of epoch 1 are NaN: 12 in a row, never
    # 10 in one epoch. A counter that restarted every epoch would let this run "finish".
    cfg = _debug(**{"optim.epochs": 3})
    bad = {(0, i) for i in range(4, 10)} | {(1, i) for i in range(6)}
    with pytest.raises(TrainingFailed, match="12 non-finite losses in a row"):
        train(cfg, _nan_data(cfg, bad), _Recorder(), max_nonfinite_in_row=12)


def test_an_epoch_without_a_successful_step_fails_the_run():
    cfg = _debug(**{"optim.epochs": 2})
    with pytest.raises(TrainingFailed, match="epoch 1 had no successful step"):
        train(cfg, _nan_data(cfg, {("all", i) for i in range(10)}), _Recorder(), max_nonfinite_in_row=100)


def test_evaluate_star_reports_exact_kl():
    cfg = Config.from_dict({"task": {"name": "star", "image_size": 16, "n_train": 32, "n_val": 16, "n_test": 16},
                            "features": {"kind": "resnet_slim", "width": 4}, "sampler": {"M_eval": 64},
                            "energy": {"y_embed": [8, 8], "hidden": 8}})
    task, splits = load_data(cfg)
    assert splits["train"].x.shape[1:] == (1, 16, 16) and task.x_shape == (1, 16, 16)
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    out = evaluate(model, splits["test"], task, cfg)
    assert out["kl_ebm"] > 0 and out["kl_proposal"] > 0 and math.isfinite(out["grid_nll"])


def test_toy_inputs_are_standardised_by_buffers_that_travel_with_the_weights():
    cfg = _debug(**{"optim.epochs": 1})
    task, splits = load_data(cfg)
    res, _ = _fit(cfg, in_memory(task, splits, cfg))
    sd = res.model.state_dict()
    torch.testing.assert_close(sd["feature_net.x_mean"], splits["train"].x.mean(0))
    torch.testing.assert_close(sd["feature_net.x_std"], splits["train"].x.std(0))
    raw_cfg = _debug(**{"optim.epochs": 1, "features.standardize": "false"})
    raw, _ = _fit(raw_cfg, in_memory(task, splits, raw_cfg))
    assert torch.equal(raw.model.state_dict()["feature_net.x_std"], torch.ones(1))


def test_resuming_on_another_number_of_ranks_restarts_the_sampling_streams_and_says_so():
    cfg = _debug(**{"optim.epochs": 2, "eval.every": 1})
    _, rt = _fit(cfg.with_overrides(["optim.epochs=1"]))
    state = copy.deepcopy(rt.states[-1])
    state["rng"]["samplers"] = state["rng"]["samplers"] * 2          # as written by a 2-rank run

    class Logged(_Recorder):
        lines = []

        def log(self, line):
            self.lines.append(line)
    res, _ = _fit(cfg, resume=state, rt=Logged())
    assert math.isfinite(res.last["test_nll"])
    assert any("sampling streams restart" in line for line in Logged.lines)
