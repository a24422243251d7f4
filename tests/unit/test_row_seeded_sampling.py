"""Per-row generators (prediction's seeding): a row's proposal samples depend on its own generator
only, not on which other rows share its batch."""
import math

import torch

from ebm.proposal import Mixture, mixture_sample


def _mixture(B: int, circular=(False, True)) -> Mixture:
    g = torch.Generator().manual_seed(0)
    D = len(circular)
    return Mixture(torch.randn(B, 3, D, generator=g), torch.randn(B, 3, D, generator=g) - 1.0,
                   torch.randn(B, 3, generator=g), circular)


def _rows(mix: Mixture, idx) -> Mixture:
    return Mixture(mix.means[idx], mix.log_sigma2[idx], mix.logits[idx], mix.circular)


def _gens(rows, seed: int = 5):
    return [torch.Generator().manual_seed(seed * 1_000_003 + r) for r in rows]


def test_a_rows_samples_do_not_depend_on_its_batch():
    mix = _mixture(7)
    whole = mixture_sample(mix, 50, _gens(range(7)))
    assert whole.shape == (7, 50, 2)
    # rows 2..4 alone, and row 3 alone, draw exactly what they drew inside the batch of 7
    torch.testing.assert_close(mixture_sample(_rows(mix, slice(2, 5)), 50, _gens(range(2, 5))), whole[2:5],
                               rtol=0, atol=0)
    torch.testing.assert_close(mixture_sample(_rows(mix, slice(3, 4)), 50, _gens([3])), whole[3:4], rtol=0, atol=0)
    # ... and what one generator draws for that row alone
    torch.testing.assert_close(mixture_sample(_rows(mix, slice(3, 4)), 50, _gens([3])[0]), whole[3:4], rtol=0, atol=0)
    # another seed draws otherwise; the circular dim stays on [0, 2π)
    assert not torch.equal(mixture_sample(mix, 50, _gens(range(7), seed=6)), whole)
    assert float(whole[..., 1].min()) >= 0 and float(whole[..., 1].max()) < 2 * math.pi


def test_generators_must_match_the_rows():
    mix = _mixture(3)
    try:
        mixture_sample(mix, 4, _gens(range(2)))
    except ValueError as e:
        assert "2 generators for a batch of 3 rows" in str(e)
    else:
        raise AssertionError("a wrong number of generators was accepted")
    assert mixture_sample(_rows(mix, slice(0, 0)), 4, []).shape == (0, 4, 2)
