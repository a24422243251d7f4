import math

import pytest
import torch
from torch import distributions as td

from ebm.proposal import Mixture, fixed_gmm_log_prob, fixed_gmm_sample, mixture_log_prob, sample_von_mises

pytestmark = pytest.mark.unit


def _mix(B=3, K=4, D=2, circular=None, scale=1.0):
    return Mixture(torch.randn(B, K, D) * scale, torch.randn(B, K, D), torch.randn(B, K), circular or (False,) * D)


def test_log_prob_matches_torch_distributions():
    mix = _mix(D=2)
    y = torch.randn(3, 7, 2) * 2
    ref = td.MixtureSameFamily(td.Categorical(logits=mix.logits),
                               td.Independent(td.Normal(mix.means, torch.exp(0.5 * mix.log_sigma2)), 1))
    expect = ref.log_prob(y.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(mixture_log_prob(mix, y), expect, rtol=1e-5, atol=1e-5)


def test_von_mises_log_prob_matches_torch_distributions():
    mix = Mixture(torch.rand(2, 3, 1) * 6, torch.randn(2, 3, 1), torch.randn(2, 3), (True,))
    y = torch.rand(2, 5, 1) * 2 * math.pi
    kappa = torch.exp(-mix.log_sigma2)
    ref = td.MixtureSameFamily(td.Categorical(logits=mix.logits), td.Independent(td.VonMises(mix.means, kappa), 1))
    expect = ref.log_prob(y.transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(mixture_log_prob(mix, y), expect, rtol=1e-4, atol=1e-4)


def test_log_prob_is_finite_for_extreme_parameters():
    mix = Mixture(torch.tensor([[[0.0], [1e4]]]), torch.tensor([[[-18.0], [18.0]]]), torch.tensor([[50.0, -50.0]]),
                  (False,))
    y = torch.tensor([[[1e4], [-1e4], [0.0], [3e3]]])
    lp = mixture_log_prob(mix, y)
    assert torch.isfinite(lp).all()
    # exp-then-log would underflow to -inf here; log space agrees with a float64 evaluation
    ref = mixture_log_prob(Mixture(mix.means.double(), mix.log_sigma2.double(), mix.logits.double(), (False,)),
                           y.double())
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-3)
    naive = torch.log((torch.softmax(mix.logits, -1).unsqueeze(1) * torch.exp(
        -0.5 * (y - mix.means.transpose(1, 2)) ** 2 / torch.exp(mix.log_sigma2.transpose(1, 2)))
        / torch.sqrt(2 * math.pi * torch.exp(mix.log_sigma2.transpose(1, 2)))).sum(-1))
    assert not torch.isfinite(naive).all()


def test_sampling_moments_and_reproducibility():
    mix = Mixture(torch.tensor([[[-2.0], [3.0]]]), torch.log(torch.tensor([[[0.25], [1.0]]])),
                  torch.log(torch.tensor([[0.3, 0.7]])), (False,))
    g = torch.Generator().manual_seed(1)
    s = mix.sample(200_000, g)
    assert s.shape == (1, 200_000, 1)
    assert abs(s.mean().item() - (0.3 * -2 + 0.7 * 3)) < 0.02
    frac_left = (s < 0.5).float().mean().item()
    assert abs(frac_left - 0.3) < 0.01
    s2 = mix.sample(200_000, torch.Generator().manual_seed(1))
    assert torch.equal(s, s2)
    assert not s.requires_grad


def test_von_mises_sampler_matches_density():
    loc, kappa = torch.full((100_000,), 1.0), torch.full((100_000,), 4.0)
    s = sample_von_mises(loc, kappa, torch.Generator().manual_seed(0))
    assert ((s >= 0) & (s < 2 * math.pi)).all()
    # circular mean and mean resultant length A(κ) = I1(κ)/I0(κ)
    r = torch.stack([torch.cos(s).mean(), torch.sin(s).mean()])
    assert abs(math.atan2(r[1], r[0]) - 1.0) < 0.01
    a = (torch.special.i1(torch.tensor(4.0)) / torch.special.i0(torch.tensor(4.0))).item()
    assert abs(r.norm().item() - a) < 0.01


def test_fixed_gmm_density_and_samples():
    sig = torch.tensor([0.1, 0.8])
    eps = torch.randn(5, 3, 2)
    ref = td.MixtureSameFamily(td.Categorical(probs=torch.tensor([0.5, 0.5])),
                               td.Independent(td.Normal(torch.zeros(2, 2), sig.view(2, 1).expand(2, 2)), 1))
    torch.testing.assert_close(fixed_gmm_log_prob(eps, sig), ref.log_prob(eps), rtol=1e-5, atol=1e-5)
    s = fixed_gmm_sample((100_000,), 1, sig, torch.Generator().manual_seed(0))
    assert abs(s.var().item() - 0.5 * (0.01 + 0.64)) < 0.01


@pytest.mark.parametrize("sigmas", [(0.05, 0.8), (0.8,), (3.0, 0.3)])
def test_fixed_gmm_on_a_circular_dim_is_the_wrapped_density(sigmas):
    # The density of wrap(y + eps) on the circle: it integrates to 1 over one period and equals a
    # brute-force sum over 41 images; the Gaussian density of the offset does neither.
    sig = torch.tensor(sigmas, dtype=torch.float64)
    n = 20_000
    grid = (-math.pi + 2 * math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n).unsqueeze(-1)
    lp = fixed_gmm_log_prob(grid, sig, (True,))
    assert abs(lp.exp().sum().item() * 2 * math.pi / n - 1.0) < 1e-9
    images = grid.unsqueeze(-1) + 2 * math.pi * torch.arange(-20, 21, dtype=torch.float64)     # (n, 1, J)
    brute = torch.logsumexp(td.Normal(0.0, sig.view(-1, 1, 1, 1)).log_prob(images), dim=-1)    # (S, n, 1)
    brute = torch.logsumexp(brute[..., 0], dim=0) - math.log(len(sigmas))
    torch.testing.assert_close(lp, brute, rtol=0, atol=1e-9)
    # the offset's own images give the same value: the density is one of the wrapped sample
    torch.testing.assert_close(fixed_gmm_log_prob(grid + 2 * math.pi, sig, (True,)), lp, rtol=0, atol=1e-9)
    # at ±π two images are equally near: the offset's Gaussian density there is half the wrapped one
    pi = torch.tensor([[math.pi], [-math.pi]], dtype=torch.float64)
    if max(sigmas) < 1.0:
        gap = fixed_gmm_log_prob(pi, sig, (True,)) - fixed_gmm_log_prob(pi, sig)
        torch.testing.assert_close(gap, torch.full_like(gap, math.log(2)), rtol=0, atol=1e-6)


def test_fixed_gmm_wraps_only_the_circular_dims():
    sig = torch.tensor([[0.3, 0.8], [1.2, 0.2]], dtype=torch.float64)       # (S, D): per-dim σ's
    eps = torch.tensor([[[3.0, 3.0], [-2.9, 0.5], [0.1, -0.2]]], dtype=torch.float64)
    got = fixed_gmm_log_prob(eps, sig, (False, True))
    j = 2 * math.pi * torch.arange(-50, 51, dtype=torch.float64)
    per_comp = []
    for s in range(2):
        lin = td.Normal(0.0, sig[s, 0]).log_prob(eps[..., 0])
        circ = torch.logsumexp(td.Normal(0.0, sig[s, 1]).log_prob(eps[..., 1:] + j), dim=-1)
        per_comp.append(lin + circ)
    torch.testing.assert_close(got, torch.logsumexp(torch.stack(per_comp), 0) - math.log(2), rtol=0, atol=1e-10)
    torch.testing.assert_close(fixed_gmm_log_prob(eps, sig, (False, False)), fixed_gmm_log_prob(eps, sig),
                               rtol=0, atol=0)


def test_fixed_gmm_wrapped_density_matches_wrapped_samples():
    # histogram of wrap(eps) for eps from the sampler against the wrapped density (σ = 0.8 spills past ±π)
    sig = torch.tensor([0.05, 0.8])
    s = fixed_gmm_sample((400_000,), 1, sig, torch.Generator().manual_seed(1))
    w = torch.remainder(s + math.pi, 2 * math.pi) - math.pi
    edges = torch.linspace(-math.pi, math.pi, 41, dtype=torch.float64)
    hist = torch.histc(w.double(), bins=40, min=-math.pi, max=math.pi) / w.numel()
    fine = edges[:-1].unsqueeze(1) + (edges[1] - edges[0]) * (torch.arange(200, dtype=torch.float64) + 0.5) / 200
    mass = fixed_gmm_log_prob(fine.unsqueeze(-1), sig.double(), (True,)).exp().mean(1) * (edges[1] - edges[0])
    assert (hist - mass).abs().max().item() < 4e-3
    assert abs(hist[0].item() - mass[0].item()) < 0.15 * mass[0].item()      # the end bins, where wrapping acts
