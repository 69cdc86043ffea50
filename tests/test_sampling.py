"""Logits filters on hand-made logits, and seeded sampling."""
import math

import pytest
import torch

from ember.errors import GenerationError
from ember.generation.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_k=2))) == [True, True, False, False, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.2 = 0.7 < 0.75 → the third token is needed too
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.75))) == [True, True, True, False, False]
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, top_p=0.5))) == [True, False, False, False, False]


def test_min_p_scales_with_the_top_probability():
    # threshold 0.3 * 0.5 = 0.15: 0.15 is kept, 0.1 is not
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))) == [True, True, True, False, False]


def test_temperature_divides_logits():
    out = filter_logits(LOGITS, SamplingParams(temperature=0.5))
    assert torch.allclose(out, LOGITS / 0.5)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g)
    ours = filter_logits(x, SamplingParams(temperature=1.0, top_k=20, top_p=0.8, min_p=0.05))
    ref = MinPLogitsWarper(0.05)(None, TopPLogitsWarper(0.8)(None, TopKLogitsWarper(20)(None, x.clone())))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_repetition_penalty_follows_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    ref = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 1]]), x.clone())
    assert torch.allclose(apply_repetition_penalty(x, seen, 1.5), ref)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    p = SamplingParams(temperature=1.0, seed=0)
    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(LOGITS, p, g).item() for _ in range(200)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    counts = torch.bincount(torch.tensor(draw(3) + draw(4) + draw(5) + draw(6) + draw(7)), minlength=5).float() / 1000
    assert torch.allclose(counts, LOGITS.exp()[0], atol=0.05)


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams()).item() == 0


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=0), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(temperature=math.nan), "temperature"), (dict(seed="x"), "seed"), (dict(top_k=1.5), "top_k"),
])
def test_bad_sampling_values_are_refused(kw, msg):
    with pytest.raises(GenerationError, match=msg):
        SamplingParams(**kw).validate()
