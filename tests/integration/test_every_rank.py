"""The loop on 2 real ranks (torch.distributed gloo on 127.0.0.1, spawned processes): evaluation split
across ranks gives the single-rank figures exactly; frozen phases communicate nothing for the frozen
parameters and a run through the phase boundary trains."""
import math

import pytest
import torch

from distlab import GlooRuntime, run_ranks
from ebm.config import Config
from ebm.data import in_memory, load_data
from ebm.evaluate import evaluate
from ebm.loop import eval_seed, train
from ebm.nets import build_model

pytestmark = pytest.mark.integration


def _cfg(*over):
    return Config.from_toml("pipelines/configs/debug.toml", list(over))


def _train_on_rank(rank, world, over):
    cfg = _cfg(*over)
    rt = GlooRuntime(rank, world)
    task, splits = load_data(cfg)
    res = train(cfg, in_memory(task, splits, cfg, rank, world), rt)
    return {"rows": rt.rows, "selected": res.model.state_dict(), "last": rt.last_weights, "sent": rt.sent,
            "wrapped_trainable": rt.wrapped_trainable}


def test_two_ranks_evaluate_halves_and_report_the_single_rank_figures():
    over = ["optim.epochs=3", "eval.every=1", 'eval.select="best_val"', "task.n_val=200", "task.n_test=300",
            "eval.batch_size=64"]
    r0, r1 = run_ranks(_train_on_rank, 2, over)
    # every rank holds the same figures and the same selection
    for a, b in zip(r0["rows"], r1["rows"]):
        assert {k: v for k, v in a.items() if k.startswith(("val_", "test_", "selected"))} == \
               {k: v for k, v in b.items() if k.startswith(("val_", "test_", "selected"))}
    for k, v in r0["selected"].items():
        assert torch.equal(v, r1["selected"][k]), k
    # and they are those of one process evaluating the whole split
    cfg = _cfg(*over)
    task, splits = load_data(cfg)
    model = build_model(cfg, task.x_shape, task.D, task.circular)
    final = r0["rows"][-1]
    for weights, split, prefix in ((r0["last"], "val", "val_"), (r0["selected"], "test", "test_")):
        model.load_state_dict(weights)
        single = evaluate(model, splits[split], task, cfg, seed=eval_seed(cfg))
        assert {f"{prefix}{k}": v for k, v in single.items()} == {k: v for k, v in final.items() if k.startswith(prefix)}
    assert final["selected_epoch"] == min(range(3), key=lambda e: r0["rows"][e]["val_nll"])


def test_two_ranks_through_frozen_phases_send_only_trainable_gradients_and_train():
    over = ["optim.epochs=3", "eval.every=3", "schedule.freeze_backbone_epochs=2", "schedule.proposal_warmup_epochs=1"]
    r0, r1 = run_ranks(_train_on_rank, 2, over)
    cfg = _cfg(*over)
    task, _ = load_data(cfg)
    n_all = sum(p.numel() for p in build_model(cfg, task.x_shape, task.D, task.circular).parameters())
    # one wrapper per phase: proposal only (warm-up, backbone frozen), + energy head, everything
    assert r0["wrapped_trainable"] == r1["wrapped_trainable"]
    trainable = r0["wrapped_trainable"]
    assert len(trainable) == 3 and trainable[0] < trainable[1] < trainable[2] == n_all
    steps = [int(r["steps"]) for r in r0["rows"]]
    sent = r0["sent"]               # elements per bucket, every bucket of every step (small model: one bucket)
    assert len(sent) == sum(steps)
    assert sent == [trainable[0]] * steps[0] + [trainable[1]] * steps[1] + [trainable[2]] * steps[2]
    for row in r0["rows"]:
        assert row["param_spread_across_ranks"] == 0.0 and math.isfinite(row["train_loss"])
    assert math.isfinite(r0["rows"][-1]["test_nll"])
