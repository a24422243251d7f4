"""PIT and central-interval coverage (ebm/calibration.py) against known answers: a calibrated Gaussian
gives uniform PIT and nominal coverage, a too-narrow one under-covers by exactly 2Φ(s·z_ℓ) − 1, the
von Mises CDF matches scipy's, and the PIT's intervals are the ones ebm.predict reports."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, vonmises

from ebm import calibration as C
from ebm import metrics as M
from ebm.nets import Encoded
from ebm.predict import summarize
from ebm.proposal import Mixture, mixture_sample

pytestmark = pytest.mark.unit
N = 2000
LEVELS = (0.5, 0.8, 0.9, 0.95)
# labels at the N quantiles of N(0, 1): the empirical distribution of y is N(0, 1) up to 1/N, without noise
Y = torch.as_tensor(norm.ppf((np.arange(N) + 0.5) / N), dtype=torch.float64).unsqueeze(1)


class GaussianModel:
    """Predicts N(0, s²) for every x, as an EBM (f = −y²/2s²), as its proposal and so as the IS prediction."""
    has_energy = has_proposal = True

    def __init__(self, s):
        self.s = s

    def encode(self, x):
        return Encoded(x, x)

    def score(self, enc, y):
        return -0.5 * (y[..., 0] / self.s) ** 2 + 0.0 * enc.h_energy[:, :1]

    def score_shared(self, enc, y):         # the same points y (S, D) for every example
        return self.score(enc, y.unsqueeze(0).expand(enc.h_energy.shape[0], -1, -1))

    def propose(self, enc):
        B = enc.h_proposal.shape[0]
        return Mixture(torch.zeros(B, 1, 1, dtype=torch.float64), torch.full((B, 1, 1), 2 * math.log(self.s),
                       dtype=torch.float64), torch.zeros(B, 1, dtype=torch.float64), (False,))


def expected_coverage(s, levels):
    """P(|Y| ≤ s z_ℓ), Y ~ N(0, 1): the coverage of N(0, s²)'s central ℓ intervals."""
    return np.array([2 * norm.cdf(s * norm.ppf(0.5 + lv / 2)) - 1 for lv in levels])


@pytest.mark.parametrize("s", [1.0, 0.5, 2.0])
def test_every_source_gives_the_exact_coverage_of_a_gaussian_prediction(s):
    model = GaussianModel(s)
    x = torch.zeros(N, 1, dtype=torch.float64)
    grid = torch.linspace(-12 * s, 12 * s, 4001, dtype=torch.float64)
    pits = C.model_pits(model, x, Y, (False,), M=2048, grid=grid, generator=torch.Generator().manual_seed(0))
    assert set(pits) == {"prediction", "proposal", "ebm_grid"}
    want_pit = norm.cdf(Y[:, 0].numpy() / s)
    want = expected_coverage(s, LEVELS)
    for source, pit in pits.items():
        assert pit.shape == (N, 1)
        tol = 1e-6 if source == "proposal" else (5e-4 if source == "ebm_grid" else 0.04)   # exact, quadrature, 2048 samples
        assert np.abs(pit[:, 0].numpy() - want_pit).max() < tol, source
        cov = C.coverage(pit, LEVELS)[:, 0].numpy()
        assert np.abs(cov - want).max() < (2.0 / N if source != "prediction" else 0.02), (source, cov, want)
    without = C.model_pits(model, x, Y, (False,), M=None, grid=grid)       # no M: no IS prediction
    assert set(without) == {"proposal", "ebm_grid"} and torch.equal(without["proposal"], pits["proposal"])
    if s == 1.0:        # calibrated: PIT uniform (the labels are N(0, 1)'s quantiles, so exactly (i + ½)/N)
        hist = np.histogram(pits["proposal"].numpy(), bins=20, range=(0, 1))[0]
        assert (hist == N // 20).all()
        assert C.calibration_error(pits["proposal"], C.LEVELS) < 1e-3
    else:               # too narrow (s < 1) under-covers, too wide over-covers, by the amounts above
        cov90 = float(C.coverage(pits["proposal"], (0.9,))[0, 0])
        assert cov90 == pytest.approx(expected_coverage(s, (0.9,))[0], abs=1e-3)
        assert (cov90 < 0.9) == (s < 1)


def test_pit_of_weighted_samples_gives_the_interval_ebm_predict_reports():
    """u ∈ [(1−ℓ)/2, (1+ℓ)/2] exactly when y lies in ebm.predict's central interval, linear and circular."""
    g = torch.Generator().manual_seed(3)
    circular = (False, True)
    B, Mn = 400, 64
    samples = torch.stack([torch.randn(B, Mn, generator=g) * 2 + 1,
                           torch.remainder(torch.randn(B, Mn, generator=g) * 1.5 + 5.5, 2 * math.pi)], -1)
    log_w = torch.randn(B, Mn, generator=g)
    y = torch.stack([torch.randn(B, generator=g) * 2.5 + 1, torch.rand(B, generator=g) * 2 * math.pi], -1)
    pit = C.pit_weighted(samples, torch.softmax(log_w, 1), y, circular)
    assert ((pit >= 0) & (pit <= 1)).all()
    for lv in (0.5, 0.9):
        s = summarize(samples, log_w, circular, (0.5,), lv)
        want = M.interval_covered_per_dim(s["interval"], y, circular)
        got = C.in_central_interval(pit, (lv,))[:, 0]
        assert (got == want).float().mean() > 0.995, lv        # only labels on an interval's end may differ


def test_von_mises_cdf_matches_scipy():
    d = torch.linspace(-math.pi, math.pi, 201, dtype=torch.float64)
    for kappa in (1e-6, 0.3, 2.0, 10.0, 49.0, 51.0, 400.0, 1e6):
        got = C.von_mises_cdf(d, torch.full_like(d, kappa)).numpy()
        assert np.abs(got - vonmises.cdf(d.numpy(), kappa)).max() < 1e-9, kappa


def test_circular_mixture_pit_is_the_mass_of_the_arc_from_the_antipode_of_the_mean():
    mix = Mixture(torch.tensor([[[1.0], [4.0]]]), torch.log(torch.tensor([[[0.3], [1.5]]])), torch.tensor([[0.3, -0.2]]),
                  (True,))
    start = float(C.mixture_centre(mix)) + math.pi
    for yv in np.linspace(0.05, 2 * math.pi - 0.05, 9):
        arc = (yv - start) % (2 * math.pi)
        t = torch.linspace(0, arc, 20001) + start
        want = float(torch.trapezoid(mix.log_prob(t.view(1, -1, 1)).exp()[0], t))
        assert float(C.pit_mixture(mix, torch.tensor([[yv]]))) == pytest.approx(want, abs=1e-5), yv
    # the mixture's exact PIT and its samples' PIT agree; labels drawn from it have uniform PIT
    g = torch.Generator().manual_seed(0)
    big = Mixture(mix.means.expand(1000, 2, 1), mix.log_sigma2.expand(1000, 2, 1), mix.logits.expand(1000, 2), (True,))
    y = mixture_sample(big, 1, g)[:, 0]
    exact = C.pit_mixture(big, y)
    sampled = C.pit_weighted(mixture_sample(big, 1000, g), torch.full((1000, 1000), 1e-3), y, (True,))
    gap = (exact - sampled).abs()
    gap = torch.minimum(gap, 1 - gap)       # near the antipode of the mean u wraps from 1 to 0
    assert gap.mean() < 0.02 and gap.max() < 0.1     # the samples' mean (where u starts) is off by sampling noise
    assert np.abs(np.sort(exact[:, 0].numpy()) - (np.arange(1000) + 0.5) / 1000).max() < 0.05    # KS distance


def test_joint_coverage_needs_every_dim():
    pit = torch.tensor([[0.5, 0.5], [0.5, 0.99], [0.01, 0.5], [0.3, 0.7]])
    assert C.coverage(pit, (0.9,)).tolist() == [[0.75, 0.75]]
    assert C.joint_coverage(pit, (0.9,)).tolist() == [0.5]
