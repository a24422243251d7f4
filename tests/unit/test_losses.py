import math

import pytest
import torch

from ebm import losses
from ebm.config import Config
from ebm.nets import build_model
from ebm.steps import train_step

pytestmark = pytest.mark.unit


def test_nce_loss_matches_brute_force_softmax():
    B, M = 4, 6
    f0, fs = torch.randn(B), torch.randn(B, M)
    q0, qs = torch.randn(B), torch.randn(B, M)
    loss = losses.nce_loss(f0, fs, q0, qs)
    expect = 0.0
    for i in range(B):
        s = [math.exp(f0[i] - q0[i])] + [math.exp(fs[i, m] - qs[i, m]) for m in range(M)]
        expect += -math.log(s[0] / sum(s))
    assert abs(loss.item() - expect / B) < 1e-5


def test_log_partition_is_against_closed_form_gaussian_energy():
    # f(y) = -(y - a)^2 / (2 s^2): Z = sqrt(2 pi) s. Proposal N(0.3, 1.5^2), many samples.
    a, s = 0.7, 0.5
    g = torch.Generator().manual_seed(0)
    y = 0.3 + 1.5 * torch.randn(1, 400_000, generator=g)
    logq = -0.5 * ((y - 0.3) / 1.5) ** 2 - math.log(1.5 * math.sqrt(2 * math.pi))
    f = -((y - a) ** 2) / (2 * s * s)
    log_z = losses.log_partition_is(f, logq)
    assert abs(log_z.item() - math.log(math.sqrt(2 * math.pi) * s)) < 0.01


def test_ml_is_and_mdn_nll():
    f0, fs, qs = torch.randn(3), torch.randn(3, 5), torch.randn(3, 5)
    expect = (torch.logsumexp(fs - qs, 1) - math.log(5) - f0).mean()
    torch.testing.assert_close(losses.ml_is_loss(f0, fs, qs), expect)
    assert losses.mdn_nll(torch.tensor([-1.0, -3.0])).item() == 2.0


def test_kl_gradient_is_self_normalised_is_estimate_of_forward_kl_gradient():
    # q_phi = N(phi, 1), p = N(2, 1): d/dphi KL(p||q) = phi - 2; the SNIS estimate with fixed samples
    phi = torch.tensor(0.5, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    y = (phi.detach() + torch.randn(1, 200_000, generator=g))
    logq = -0.5 * (y - phi) ** 2 - 0.5 * math.log(2 * math.pi)
    f = -0.5 * (y - 2.0) ** 2
    losses.proposal_kl_loss(f, logq).backward()
    assert abs(phi.grad.item() - (0.5 - 2.0)) < 0.03


def _toy_cfg(method="ebm_learned_proposal", **over):
    cfg = Config().with_overrides([f"method.name=\"{method}\"", "sampler.M_train=16"])
    return cfg.with_overrides([f"{k}={v}" for k, v in over.items()])


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_gradient_routing_learned_proposal():
    cfg = _toy_cfg()
    model = build_model(cfg, (1,), 1, (False,))
    x, y = torch.randn(8, 1), torch.randn(8, 1)
    enc = model.encode(x)
    mix = model.propose(enc)
    y_all = torch.cat([y.unsqueeze(1), mix.sample(16)], 1)
    logq = mix.log_prob(y_all)
    f = model.score(enc, y_all)
    # NCE never reaches the proposal
    g = _grads(model, losses.nce_loss(f[:, 0], f[:, 1:], logq[:, 0], logq[:, 1:]))
    assert all(v is None for n, v in g.items() if n.startswith("proposal_head"))
    assert all(v is not None for n, v in g.items() if not n.startswith("proposal_head"))
    # log Z (KL) never reaches theta or the feature net
    enc = model.encode(x)
    mix = model.propose(enc)
    logq = mix.log_prob(y_all)
    f = model.score(enc, y_all)
    g = _grads(model, losses.proposal_kl_loss(f[:, 1:], logq[:, 1:]))
    assert all(v is None for n, v in g.items() if not n.startswith("proposal_head"))
    assert all(v is not None and torch.isfinite(v).all() for n, v in g.items() if n.startswith("proposal_head"))
    # the proposal's own NLL never trains the backbone in the joint model
    enc = model.encode(x)
    g = _grads(model, losses.mdn_nll(model.propose(enc).log_prob(y.unsqueeze(1))[:, 0]))
    assert all(v is None for n, v in g.items() if n.startswith("feature_net"))


@pytest.mark.parametrize("method", ["ebm_learned_proposal", "nce_fixed", "nce_plus", "ml_is", "mdn",
                                    "mdn_ebm_teacher"])
@pytest.mark.parametrize("D,circular", [(1, (False,)), (3, (False, True, False))])
def test_every_parameter_gets_a_finite_gradient(method, D, circular):
    cfg = _toy_cfg(method)
    model = build_model(cfg, (2,), D, circular)
    x, y = torch.randn(8, 2), torch.rand(8, D) * 3
    loss, mets = train_step(model, (x, y), cfg, circular=circular, fixed_sigmas=(0.1, 0.8))
    assert torch.isfinite(loss)
    for n, gr in _grads(model, loss).items():
        assert gr is not None, f"{method}: {n} got no gradient"
        assert torch.isfinite(gr).all(), f"{method}: {n} has a non-finite gradient"
    assert all(math.isfinite(v) for v in mets.values())


def test_teacher_pair_routes_losses_to_their_own_network():
    cfg = _toy_cfg("mdn_ebm_teacher")
    model = build_model(cfg, (1,), 1, (False,))
    x, y = torch.randn(8, 1), torch.randn(8, 1)
    enc = model.encode(x)
    mix = model.propose(enc)
    y_all = torch.cat([y.unsqueeze(1), mix.sample(16)], 1)
    logq, f = mix.log_prob(y_all), model.score(enc, y_all)
    g = _grads(model, losses.nce_loss(f[:, 0], f[:, 1:], logq[:, 0], logq[:, 1:]))
    assert all((v is None) == n.startswith("mdn.") for n, v in g.items())
    enc = model.encode(x)
    mix = model.propose(enc)
    logq, f = mix.log_prob(y_all), model.score(enc, y_all)
    g = _grads(model, 0.5 * losses.proposal_kl_loss(f[:, 1:], logq[:, 1:]) + 0.5 * losses.mdn_nll(logq[:, 0]))
    assert all((v is None) == n.startswith("ebm.") for n, v in g.items())


def test_no_nan_for_extreme_scores():
    for scale in (1e4, -1e4):
        f0 = torch.full((4,), scale, requires_grad=True)
        fs = (torch.randn(4, 32) * scale).requires_grad_(True)
        q0, qs = torch.randn(4) * 50, torch.randn(4, 32) * 50
        loss = losses.nce_loss(f0, fs, q0, qs) + losses.proposal_kl_loss(fs, qs)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(f0.grad).all() and torch.isfinite(fs.grad).all()


def test_frozen_backbone_and_warmup_schedule():
    cfg = _toy_cfg(**{"schedule.freeze_backbone_epochs": 2, "schedule.proposal_warmup_epochs": 1})
    model = build_model(cfg, (1,), 1, (False,))
    x, y = torch.randn(8, 1), torch.randn(8, 1)
    loss, mets = train_step(model, (x, y), cfg, epoch=0)
    assert set(mets) == {"loss", "mdn_nll"}
    g = _grads(model, loss)
    assert all((v is None) == (not n.startswith("proposal_head")) for n, v in g.items())
    loss, _ = train_step(model, (x, y), cfg, epoch=1)
    g = _grads(model, loss)
    assert all(v is None for n, v in g.items() if n.startswith("feature_net"))
    loss, _ = train_step(model, (x, y), cfg, epoch=2)
    g = _grads(model, loss)
    assert all(v is not None for n, v in g.items() if n.startswith("feature_net"))
