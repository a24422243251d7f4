import math

import numpy as np
import properscoring
import pytest
import torch

from ebm import metrics as M
from ebm.nets import Encoded
from ebm.predict import predict, summarize, weighted_quantiles
from ebm.proposal import Mixture

pytestmark = pytest.mark.unit

MODES, SIG, W = (-2.0, 3.0), 0.3, (0.35, 0.65)


class BimodalModel:
    """A known energy: f(y) = log(0.35 N(y; -2, .3²) + 0.65 N(y; 3, .3²)) + c(x), with a wide proposal.
    p(y|x) is exactly that mixture whatever c is."""
    has_energy = has_proposal = True

    def __init__(self, circular=False):
        self.circular = circular

    def encode(self, x):
        return Encoded(x, x)

    def score(self, enc, y):
        comps = torch.stack([math.log(w) - 0.5 * ((y[..., 0] - m) / SIG) ** 2 - math.log(SIG * math.sqrt(2 * math.pi))
                             for m, w in zip(MODES, W)], -1)
        return torch.logsumexp(comps, -1) + enc.h_energy[:, :1] * 5.0

    def score_shared(self, enc, y):         # the same points y (S, D) for every example
        return self.score(enc, y.unsqueeze(0).expand(enc.h_energy.shape[0], -1, -1))

    def propose(self, enc):
        B = enc.h_proposal.shape[0]
        return Mixture(torch.full((B, 1, 1), 0.5), torch.full((B, 1, 1), math.log(9.0)), torch.zeros(B, 1),
                       (False,))


def exact_logp(y):
    return float(np.log(sum(w * np.exp(-0.5 * ((y - m) / SIG) ** 2) / (SIG * np.sqrt(2 * np.pi))
                            for m, w in zip(MODES, W))))


def test_prediction_recovers_the_modes_and_mean_of_a_bimodal_energy():
    model = BimodalModel()
    x = torch.randn(4, 1)
    p = predict(model, x, (False,), M=20_000, refine_steps=10, keep_samples=True,
                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(p.mode, torch.full((4, 1), 3.0), atol=0.02)
    mean = sum(w * m for m, w in zip(MODES, W))
    assert torch.allclose(p.mean, torch.full((4, 1), mean), atol=0.15)  # ~3 sd at ESS ~ 2000
    var = sum(w * (SIG ** 2 + m ** 2) for m, w in zip(MODES, W)) - mean ** 2
    assert torch.allclose(p.std, torch.full((4, 1), math.sqrt(var)), atol=0.1)
    # weighted samples put about 35% of their mass on the left mode
    left = (p.weights * (p.samples[..., 0] < 0.5)).sum(1)
    assert torch.allclose(left, torch.full((4,), 0.35), atol=0.04)
    # the 90% central interval covers 90% of the exact distribution
    g = np.linspace(-6, 7, 20001)
    dens = np.exp([exact_logp(v) for v in g])
    lo, hi = p.interval[0, 0, 0].item(), p.interval[0, 1, 0].item()
    mass = dens[(g >= lo) & (g <= hi)].sum() * (g[1] - g[0])
    assert abs(mass - 0.9) < 0.03


def test_grid_and_is_nll_agree_with_the_exact_density():
    model = BimodalModel()
    x, y = torch.randn(6, 1), torch.tensor([[-2.1], [3.0], [0.5], [2.8], [-1.7], [3.3]])
    grid = [torch.linspace(-12.5, 12.5, 8192)]
    nll_grid = M.grid_nll(model, x, y, grid, 25.0 / 8191)
    exact = torch.tensor([-exact_logp(v) for v in y[:, 0].tolist()])
    torch.testing.assert_close(nll_grid, exact.float(), atol=1e-3, rtol=1e-4)
    nll_is = M.is_nll(model, x, y, 50_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(nll_is, exact.float(), atol=0.03, rtol=0)


def test_grid_nll_is_finite_for_huge_scores():
    class Huge(BimodalModel):
        def score(self, enc, y):
            return super().score(enc, y) * 0 + 1e4 - (y[..., 0] ** 2)
    nll = M.grid_nll(Huge(), torch.zeros(2, 1), torch.tensor([[0.1], [1.0]]), [torch.linspace(-5, 5, 1001)], 0.01)
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(nll, torch.tensor([0.01, 1.0]) + 0.5 * math.log(math.pi), atol=1e-3, rtol=0)


def test_weighted_quantiles_match_numpy_for_equal_weights():
    y = torch.randn(2, 1001, 1)
    w = torch.full((2, 1001), 1 / 1001)
    q = weighted_quantiles(y, w, torch.tensor([0.1, 0.5, 0.9]))
    ref = np.quantile(y[..., 0].numpy(), [0.1, 0.5, 0.9], axis=1).T
    np.testing.assert_allclose(q[..., 0].numpy(), ref, atol=0.02)


def test_crps_matches_properscoring_weighted_ensemble():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 64, 2, generator=g)
    w = torch.softmax(torch.randn(5, 64, generator=g), 1)
    y = torch.randn(5, 2, generator=g)
    ours = M.crps_weighted(s, w, y, (False, False))
    for d in range(2):
        ref = properscoring.crps_ensemble(y[:, d].numpy(), s[:, :, d].numpy(), weights=w.numpy())
        np.testing.assert_allclose(ours[:, d].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_circular_crps_uses_the_geodesic_distance():
    s = torch.tensor([[[0.1], [2 * math.pi - 0.1]]])
    w = torch.tensor([[0.5, 0.5]])
    y = torch.tensor([[0.0]])
    # E|X-y| = 0.1, E|X-X'| = 0.5 * 0.2 -> CRPS = 0.1 - 0.05
    torch.testing.assert_close(M.crps_weighted(s, w, y, (True,)), torch.tensor([[0.05]]))


def test_circular_crps_in_sorted_form_equals_the_pairwise_definition():
    from ebm.circular import wrap_diff
    g = torch.Generator().manual_seed(3)
    s = torch.rand(4, 257, 2, generator=g) * 14 - 7          # angles far outside [0, 2π) too, and a linear dim
    s[0, :40, 0] = 1.0                                        # ties
    s[1, :100, 0], s[1, 100:200, 0] = 0.5, 0.5 + math.pi      # antipodal points, at distance π exactly
    s[2, :, 0] = torch.remainder(s[2, :, 0], 0.3)             # all within a short arc
    w = torch.softmax(torch.randn(4, 257, generator=g) * 3, 1)
    y = torch.randn(4, 2, generator=g)
    diff = wrap_diff(s[:, :, 0].unsqueeze(2) - s[:, :, 0].unsqueeze(1), (True,)).abs()
    pairs = torch.einsum("bi,bij,bj->b", w.double(), diff.double(), w.double())      # the definition, M² terms
    e1 = (w * wrap_diff(s[:, :, 0] - y[:, :1], (True,)).abs()).sum(1)
    got = M.crps_weighted(s, w, y, (True, False))
    torch.testing.assert_close(got[:, 0].double(), (e1.double() - 0.5 * pairs), rtol=0, atol=2e-6)
    torch.testing.assert_close(got[:, 1], M.crps_weighted(s[:, :, 1:], w, y[:, 1:], (False,))[:, 0])


def test_circular_summaries_wrap_through_zero():
    s = torch.tensor([[[0.1], [2 * math.pi - 0.1], [0.05], [2 * math.pi - 0.05]]])
    out = summarize(s, torch.zeros(1, 4), (True,), (0.5,), 0.9)
    mean = out["mean"][0, 0].item()
    assert min(mean, 2 * math.pi - mean) < 1e-5
    assert out["std"][0, 0].item() < 0.1
    assert M.interval_covered(out["interval"], torch.tensor([[0.0]]), (True,)).item()
    assert not M.interval_covered(out["interval"], torch.tensor([[math.pi]]), (True,)).item()
    assert M.abs_error(torch.tensor([[0.1]]), torch.tensor([[2 * math.pi - 0.1]]), (True,)).item() == pytest.approx(0.2, abs=1e-5)


def test_kl_on_grid_zero_for_equal_and_positive_otherwise():
    a = torch.randn(3, 100)
    assert torch.allclose(M.kl_on_grid(a, a + 7.0), torch.zeros(3), atol=1e-6)
    assert (M.kl_on_grid(a, torch.randn(3, 100)) > 0).all()
    t = a.clone()
    t[:, :50] = -math.inf
    assert torch.isfinite(M.kl_on_grid(t, a)).all()
