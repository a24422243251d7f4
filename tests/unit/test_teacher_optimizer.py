"""docs/method.md §4.2: the teacher pair's one Adam with two parameter groups (the EBM's, the MDN's) makes
the same updates as two Adams, one per network, stepping on the same batch, samples and gradients."""
import copy

import pytest
import torch

from ebm.config import Config
from ebm.loop import make_optimizer
from ebm.nets import build_model
from ebm.steps import train_step

pytestmark = pytest.mark.unit


def test_one_adam_with_two_groups_is_two_adams():
    cfg = Config().with_overrides(['method.name="mdn_ebm_teacher"', "sampler.M_train=16", "optim.lr=0.01"])
    torch.manual_seed(0)
    joint = build_model(cfg, (1,), 1, (False,))
    split, start = copy.deepcopy(joint), copy.deepcopy(joint)
    one = make_optimizer(joint, cfg)
    assert [g["name"] for g in one.param_groups] == ["ebm", "mdn"]
    assert {id(p) for g in one.param_groups for p in g["params"]} == {id(p) for p in joint.parameters()}
    two = [torch.optim.Adam(net.parameters(), lr=cfg.optim.lr) for net in (split.ebm, split.mdn)]
    data = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(16, 1, generator=data), torch.randn(16, 1, generator=data)
        for model, opts in ((joint, [one]), (split, two)):
            loss, _ = train_step(model, (x, y), cfg, generator=torch.Generator().manual_seed(step))
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
    for net in ("ebm", "mdn"):           # both networks were trained
        assert any(not torch.equal(a, b) for a, b in zip(getattr(joint, net).parameters(),
                                                          getattr(start, net).parameters())), net
    for (name, a), b in zip(joint.named_parameters(), split.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
