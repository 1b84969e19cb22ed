"""Sampler: greedy, temperature, top-k/top-p/min-p, seeds, penalties, logprobs (no model)."""

import math
from collections import Counter

import pytest
import torch

from runtime.sampler import RequestState, Sampler, apply_penalties
from scheduler import SamplingParams

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def state(prompt=(0,), outputs=(), **kw) -> RequestState:
    return RequestState.create(SamplingParams(**kw), prompt, torch.device("cpu")) if not outputs \
        else RequestState(SamplingParams(**kw), tuple(prompt), list(outputs), None)


def draws(n=2000, logits=LOGITS, **kw) -> Counter:
    """``n`` independent samples of one row (a seeded generator keeps the test deterministic)."""
    st = state(seed=0, **kw)
    batch = logits.expand(n, -1).clone()
    return Counter(Sampler()(batch, [st] * n).token_ids)


def test_greedy_and_top_k_1_are_argmax():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    s = Sampler()
    assert s(logits, [state(temperature=0), state(temperature=0)]).token_ids == [1, 0]
    assert s(logits, [state(top_k=1), state(top_k=1)]).token_ids == [1, 0]


def test_temperature_sampling_follows_softmax():
    torch.manual_seed(0)
    counts = draws(n=20000, temperature=1.0)
    for tok, p in enumerate([0.5, 0.3, 0.15, 0.05]):
        assert counts[tok] / 20000 == pytest.approx(p, abs=0.015)


def test_top_k_top_p_min_p_restrict_the_support():
    torch.manual_seed(0)
    assert set(draws(top_k=2)) == {0, 1}
    assert set(draws(top_p=0.7)) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert set(draws(top_p=0.4)) == {0}  # the most likely token is always kept
    assert set(draws(min_p=0.5)) == {0, 1}  # p >= 0.25
    assert set(draws(top_k=3, top_p=0.9)) == {0, 1, 2}
    assert set(draws()) == {0, 1, 2, 3}


def test_mixed_batch_rows_keep_their_own_parameters():
    torch.manual_seed(0)
    n = 500
    rows = [state(temperature=0), state(top_k=2), state(seed=3)] * n
    out = Sampler()(LOGITS.expand(3 * n, -1).clone(), rows).token_ids
    assert set(out[0::3]) == {0}
    assert set(out[1::3]) == {0, 1}
    assert set(out[2::3]) == {0, 1, 2, 3}


def test_seed_is_reproducible_and_independent_of_the_batch():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    def run(extra_rows):
        st = state(seed=42)
        others = [state() for _ in range(extra_rows)]
        batch = torch.cat([logits] + [torch.randn(1, 1000) for _ in others])
        return [Sampler()(batch, [st, *others]).token_ids[0] for _ in range(1)] + [
            Sampler()(batch, [st, *others]).token_ids[0] for _ in range(20)]
    assert run(0) == run(5)
    assert len(set(run(0))) > 1


def reference_penalties(logits, prompt, outputs, rep, freq, pres):
    out = logits.clone()
    counts = Counter(outputs)
    for t in range(len(out)):
        if t in prompt or t in counts:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        out[t] -= freq * counts.get(t, 0) + pres * (1 if counts.get(t) else 0)
    return out


def test_penalties_match_reference_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]] * 2)
    a = state(prompt=(0, 1), outputs=(3, 3, 4), repetition_penalty=1.5, frequency_penalty=0.4,
              presence_penalty=0.3)
    b = state(prompt=(0,), outputs=(1,))  # no penalties: unchanged
    got = apply_penalties(logits, [a, b])
    ref = reference_penalties(logits[0], {0, 1}, [3, 3, 4], 1.5, 0.4, 0.3)
    assert torch.allclose(got[0], ref)
    assert torch.equal(got[1], logits[1])
    # greedy on penalized logits: token 3 (3.0 -> 3.0/1.5 - 0.8 - 0.3 = 0.9) loses to 0 (2/1.5)
    assert Sampler()(logits[:1], [state(prompt=(0, 1), outputs=(3, 3, 4), temperature=0,
                                        repetition_penalty=1.5, frequency_penalty=0.4,
                                        presence_penalty=0.3)]).token_ids == [0]


def test_logprobs_rank_and_top_alternatives():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = Sampler()(logits, [state(temperature=0, logprobs=2)])
    [lp] = out.logprobs
    ref = logits.log_softmax(-1)[0]
    assert lp.token_id == 1 and lp.rank == 1
    assert lp.logprob == pytest.approx(ref[1].item())
    assert [i for i, _ in lp.top] == [1, 2]
    assert lp.top[1][1] == pytest.approx(ref[2].item())
    none = Sampler()(logits, [state(temperature=0)])
    assert none.logprobs is None
    zero = Sampler()(logits, [state(temperature=0, logprobs=0)]).logprobs[0]
    assert zero.top == () and math.isfinite(zero.logprob)


def test_inverse_cdf_sample_is_exact_at_the_edges():
    from runtime.sampler import CDF_BLOCK, inverse_cdf_sample

    vocab = 2 * CDF_BLOCK + 7  # not a multiple of the block: the tail block is padded
    probs = torch.zeros(1, vocab)
    probs[0, [3, CDF_BLOCK, vocab - 1]] = torch.tensor([0.25, 0.25, 0.5])
    def draw(u):
        return inverse_cdf_sample(probs, torch.tensor([[u]], dtype=torch.float64)).item()
    assert [draw(u) for u in (0.0, 0.2499, 0.25, 0.4999, 0.5, 0.75)] == [
        3, 3, CDF_BLOCK, CDF_BLOCK, vocab - 1, vocab - 1]
    assert draw(1 - 2**-53) == vocab - 1  # never past the last token of positive probability
    probs[0, vocab - 1] = 0  # the row's total is 0.5: u scales to it
    assert draw(0.99) == CDF_BLOCK and draw(0.1) == 3
    # every token of a random row is reachable at its own CDF interval
    probs = torch.rand(3, vocab).softmax(-1)
    cdf = probs.double().cumsum(-1)
    for row, tok in ((0, 0), (1, CDF_BLOCK - 1), (2, vocab - 1), (1, CDF_BLOCK + 5)):
        lo = cdf[row, tok - 1].item() if tok else 0.0
        u = (lo + cdf[row, tok].item()) / 2 / cdf[row, -1].item()
        got = inverse_cdf_sample(probs[row:row + 1], torch.tensor([[u]], dtype=torch.float64))
        assert got.item() == tok
