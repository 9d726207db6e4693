"""The logits processing and the token draw on a realistic vocabulary: top-p sorts only the head of
the distribution (widening when the nucleus is flat), and the inverse-CDF draw never picks a token
without mass and follows the distribution."""
import pytest
import torch

from conftest import reference_probs

from forerun.config import SamplingParams
from forerun.sampling import TOP_P_PREFIX, sample, target_probs


@pytest.mark.parametrize("scale", [8.0, 1.0, 0.01])  # peaked, moderate, nearly flat (the nucleus needs > 256)
@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.5, 0), (0.95, 1000), (0.999, 0)])
def test_top_p_over_a_large_vocabulary_matches_a_full_sort(scale, top_p, top_k):
    g = torch.Generator().manual_seed(int(scale * 100) + top_k)
    logits = torch.randn(3, 49152, generator=g) * scale
    got = target_probs(logits, SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k))
    want = reference_probs(logits, 0.7, top_k, top_p)
    on_the_edge = _mass_before_is_near(logits, 0.7, top_k, top_p)
    assert torch.equal((got > 0) | on_the_edge, (want > 0) | on_the_edge)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
    if scale == 0.01:
        assert int((got[0] > 0).sum()) > TOP_P_PREFIX  # the wide case took the widening path


def _mass_before_is_near(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                         tol: float = 1e-5) -> torch.Tensor:
    """Tokens whose more likely tokens' mass lies within `tol` of top_p: float32 (forerun) and float64
    (the reference) may decide these either way, since a float32 sum over a 49k vocabulary carries
    errors of ~1e-7 (seen: 2.8e-7 on the AMD EPYC, where the sums' vector order differs from Intel's)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_k:
        probs = probs * (probs >= probs.topk(top_k, dim=-1).values[..., -1:])
        probs = probs / probs.sum(-1, keepdim=True)
    ranked, order = probs.sort(dim=-1, descending=True)
    before = torch.zeros_like(probs).scatter(-1, order, ranked.cumsum(-1) - ranked)
    return (before - top_p).abs() <= tol


def test_the_draw_never_picks_a_token_without_mass_and_follows_the_distribution():
    probs = torch.zeros(1000)
    probs[[3, 10, 500, 999]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(probs, g) for _ in range(8000)])
    assert set(draws.unique().tolist()) <= {3, 10, 500, 999}
    freq = torch.stack([(draws == t).double().mean() for t in (3, 10, 500, 999)])
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.02, rtol=0)
    last = torch.zeros(50)
    last[0], last[7] = 0.5, 0.5
    assert {sample(last, g) for _ in range(200)} == {0, 7}  # never a zero-mass token after the last one
