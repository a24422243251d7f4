"""optim.precision / optim.accumulate / optim.grad_comm: validated, serialised, and what they do."""
from __future__ import annotations

import pytest

from ebm.config import Config, ConfigError


@pytest.mark.parametrize("override,match", [
    ("optim.precision=fp16", "optim.precision must be one of"),
    ("optim.accumulate=0", "optim.accumulate must be an integer >= 1"),
    ("optim.accumulate=1.5", "optim.accumulate must be of type int"),
    ("optim.grad_comm=int8", "optim.grad_comm must be one of"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        Config().with_overrides([override])


def test_keys_round_trip_through_the_flat_form():
    cfg = Config().with_overrides(["optim.precision=bf16", "optim.accumulate=4", "optim.grad_comm=bf16"])
    flat = {k: str(v) for k, v in cfg.to_flat().items()}       # as MLflow params come back
    back = Config.from_flat(flat)
    assert (back.optim.precision, back.optim.accumulate, back.optim.grad_comm) == ("bf16", 4, "bf16")
    assert Config().optim.precision == "fp32" and Config().optim.accumulate == 1


# -- mixed precision -----------------------------------------------------------------------------

import copy
import math
import threading

import torch

from ebm.data import Prefetch, in_memory, load_data
from ebm.loop import Runtime, run_epoch, train
from ebm.nets import build_model
from ebm.steps import frozen_modules, train_step

pytestmark = pytest.mark.unit
IMAGE = {"task": {"name": "star", "image_size": 16}, "features": {"kind": "resnet_slim", "width": 8},
         "energy": {"y_embed": [16, 32], "hidden": 64, "residual_blocks": 0}, "sampler": {"M_train": 128}}


def _debug(*over):
    return Config.from_toml("pipelines/configs/debug.toml", list(over))


class _Quiet(Runtime):
    def __init__(self):
        super().__init__("cpu", quiet=True)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["ebm_learned_proposal", "nce_fixed", "mdn"])
def test_a_bf16_step_matches_the_fp32_step_and_its_losses_are_fp32(method):
    """Same weights, batch and samples. The loss averages B·(1+M) terms each off by bf16's unit
    roundoff (2^-9) at most, so it agrees within 2^-9 relative (measured: ~1e-4). The gradient of a
    bf16 ResNet (conv + batch-norm backward) is off by 20–70 % in norm here; what bounds that is the
    noise SGD already lives with: it stays under the difference between the fp32 gradients of
    two mini-batches (measured: 0.2–0.7 vs 0.9–1.5 of the gradient's norm)."""
    cfg32 = Config.from_dict({**IMAGE, "method": {"name": method}})
    cfg16 = cfg32.with_overrides(["optim.precision=bf16"])
    torch.manual_seed(0)
    model = build_model(cfg32, (1, 16, 16), 1, (True,))
    x, y = torch.randn(32, 1, 16, 16), torch.rand(32, 1) * 6
    out = {}
    for name, cfg, rows in (("fp32", cfg32, slice(0, 16)), ("bf16", cfg16, slice(0, 16)),
                            ("other batch", cfg32, slice(16, 32))):
        loss, mets = train_step(model, (x[rows], y[rows]), cfg, circular=(True,), fixed_sigmas=(0.1, 0.8),
                                generator=torch.Generator().manual_seed(1))
        assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in mets.values())
        grads = _grads(model, loss)
        assert all(g is None or (g.dtype == torch.float32 and torch.isfinite(g).all()) for g in grads.values())
        out[name] = (loss.detach(), mets, torch.cat([g.flatten() for g in grads.values() if g is not None]))
    (l32, m32, g32), (l16, m16, g16), (_, _, g_other) = out["fp32"], out["bf16"], out["other batch"]
    assert not torch.equal(l32, l16)                         # bf16 did run
    assert math.isclose(l16.item(), l32.item(), rel_tol=2 ** -9)
    for k in m32:
        assert math.isclose(m16[k].item(), m32[k].item(), rel_tol=2 ** -7, abs_tol=2 ** -9), k
    assert (g16 - g32).norm() < (g_other - g32).norm()


def test_a_bf16_run_trains():
    cfg = _debug("optim.precision=\"bf16\"", "optim.epochs=4", "eval.every=4")
    task, splits = load_data(cfg)
    torch.manual_seed(cfg.seed)
    from ebm.evaluate import evaluate
    untrained = evaluate(build_model(cfg, task.x_shape, task.D, task.circular), splits["test"], task, cfg)
    res = train(cfg, in_memory(task, splits, cfg), _Quiet())
    losses = [h["train_loss"] for h in res.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert math.isfinite(res.last["test_nll"]) and res.last["test_nll"] < untrained["nll"] - 0.2


# -- gradient accumulation -----------------------------------------------------------------------

def _one_step(cfg, batches, model, g_seed=5):
    """Parameters after one run_epoch over ``batches`` with SGD(lr=1): p − (the step's gradient)."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(g_seed)

    def step(x, y, e):
        return train_step(model, (x, y), cfg, epoch=e, circular=(False,), generator=g)
    out, _ = run_epoch(model, opt, batches, cfg, 0, step, all_finite=lambda t: bool(torch.isfinite(t).all()),
                       device="cpu")
    return out, dict(model.named_parameters())


def test_k_micro_batches_of_b_equal_one_batch_of_kb_for_the_mdn():
    cfg = _debug("method.name=\"mdn\"", "optim.batch_size=8")
    torch.manual_seed(0)
    model = build_model(cfg, (1,), 1, (False,))
    x, y = torch.randn(24, 1), torch.randn(24, 1)
    # uneven micro-batches too: 8 + 8 + 8 in one step vs 24 at once, and 16 + 5 vs 21
    for k, sizes in ((3, (8, 8, 8)), (2, (16, 5))):
        edges = [0]
        for s in sizes:
            edges.append(edges[-1] + s)
        micro = [(x[a:b], y[a:b]) for a, b in zip(edges, edges[1:])]
        out_k, p_k = _one_step(cfg.with_overrides([f"optim.accumulate={k}"]), micro, model)
        out_1, p_1 = _one_step(cfg, [(x[:edges[-1]], y[:edges[-1]])], model)
        assert out_k["steps"] == out_1["steps"] == 1
        for n, p in p_1.items():
            torch.testing.assert_close(p_k[n], p, rtol=1e-5, atol=1e-6, msg=n)
        assert any(not torch.equal(p, q) for p, q in zip(p_1.values(), model.parameters()))


def test_an_accumulated_ebm_step_is_the_example_weighted_mean_of_its_micro_steps():
    """For the EBM methods one batch of k·b draws other samples than k micro-batches of b (the
    generator's stream is consumed per call), so what is equal is this: the accumulated step's gradient
    is the mean of the k micro-batches' gradients computed one after another from the same stream
    (weighted by their sizes) — the gradient of the k·b-example mean loss given those samples."""
    cfg = _debug("optim.batch_size=8")
    torch.manual_seed(0)
    model = build_model(cfg, (1,), 1, (False,))
    x, y = torch.randn(16, 1), torch.randn(16, 1)
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]
    _, p_acc = _one_step(cfg.with_overrides(["optim.accumulate=2"]), micro, model)
    g = torch.Generator().manual_seed(5)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xb, yb in micro:
        loss, _ = train_step(model, (xb, yb), cfg, circular=(False,), generator=g)
        for n, gr in _grads(model, loss).items():
            total[n] += 0.5 * gr
    for n, p in model.named_parameters():
        torch.testing.assert_close(p_acc[n], p - total[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_non_finite_micro_batch_skips_the_whole_accumulated_step():
    cfg = _debug("method.name=\"mdn\"", "optim.accumulate=2")
    torch.manual_seed(0)
    model = build_model(cfg, (1,), 1, (False,))
    x, y = torch.randn(32, 1), torch.randn(32, 1)
    bad = y.clone()
    bad[3] = float("nan")
    batches = [(x[:8], y[:8]), (x[8:16], bad[8:16] * 0 + bad[3]), (x[16:24], y[16:24]), (x[24:], y[24:])]
    out, params = _one_step(cfg, batches, model)
    assert out["steps"] == 1 and out["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in params.values())
    # the step that ran is the second one alone (SGD: the skipped one left no trace)
    _, only = _one_step(cfg, batches[2:], model)
    for n, p in only.items():
        assert torch.equal(params[n], p), n


# -- frozen parameters ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ebm_learned_proposal", "mdn_ebm_teacher", "nce_fixed", "mdn"])
@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_frozen_modules_are_exactly_the_parameters_without_a_gradient(method, epoch):
    cfg = _debug(f"method.name=\"{method}\"", "schedule.freeze_backbone_epochs=2",
                 "schedule.proposal_warmup_epochs=1")
    torch.manual_seed(0)
    model = build_model(cfg, (1,), 1, (False,))
    loss, _ = train_step(model, (torch.randn(8, 1), torch.randn(8, 1)), cfg, epoch=epoch, circular=(False,),
                         fixed_sigmas=(0.1, 0.8), generator=torch.Generator().manual_seed(0))
    no_grad = {n for n, g in _grads(model, loss).items() if g is None}
    frozen_ids = {id(p) for m in frozen_modules(model, cfg, epoch) for p in m.parameters()}
    assert {n for n, p in model.named_parameters() if id(p) in frozen_ids} == no_grad


class _Phases(Runtime):
    """Records which parameters require grad whenever the loop builds its data-parallel wrapper."""

    def __init__(self):
        super().__init__("cpu", quiet=True)
        self.wraps = []

    def wrap(self, step, find_unused_parameters):
        self.wraps.append(sum(p.numel() for p in step.parameters() if p.requires_grad))
        return step


def test_freezing_leaves_a_phased_run_unchanged_and_rewraps_at_each_phase(monkeypatch):
    cfg = _debug("schedule.freeze_backbone_epochs=2", "schedule.proposal_warmup_epochs=1", "optim.epochs=3",
                 "eval.every=1")
    task, splits = load_data(cfg)
    rt = _Phases()
    res = train(cfg, in_memory(task, splits, cfg), rt)
    n_all = sum(p.numel() for p in res.model.parameters())
    assert len(rt.wraps) == 3 and rt.wraps[0] < rt.wraps[1] < rt.wraps[2] == n_all
    assert all(p.requires_grad for p in res.model.parameters())
    monkeypatch.setattr("ebm.loop.frozen_modules", lambda *a: [])          # the loop as it was: nothing frozen
    plain = train(cfg, in_memory(task, splits, cfg), _Phases())
    from ebm.loop import TIMING_KEYS as timing
    for a, b in zip(res.history, plain.history):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    for (n, p), q in zip(res.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), n


def test_resuming_in_the_middle_of_a_frozen_phase_is_exact():
    cfg = _debug("schedule.freeze_backbone_epochs=2", "optim.epochs=3", "eval.every=1")
    task, splits = load_data(cfg)

    class Keep(_Phases):
        states = []

        def report(self, row, state, model):
            self.states.append(copy.deepcopy(state))
    full = train(cfg, in_memory(task, splits, cfg), Keep())
    resumed = train(cfg, in_memory(task, splits, cfg), _Phases(), resume=Keep.states[0])   # after epoch 1 of 2 frozen
    assert resumed.last["test_nll"] == full.last["test_nll"]
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n


# -- prefetch ------------------------------------------------------------------------------------

def test_prefetch_yields_the_same_items_raises_the_producers_error_and_stops_early():
    with Prefetch(iter(range(50)), depth=3) as it:
        assert list(it) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad shard")
    with pytest.raises(ValueError, match="bad shard"):
        with Prefetch(failing()) as it:
            list(it)

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()
    before = threading.active_count()
    with Prefetch(endless(), depth=2) as it:
        for i in it:
            if i == 5:
                break
    assert closed.is_set() and threading.active_count() == before
