"""On-device sampling (ttsbatch.engine.sampling) against HF's logits processors and the laws of chance.

No model here: random logits, fixed seeds, fast.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from ttsbatch.engine import sampling as S

V = 8194  # T3's speech vocabulary
BOS = 6561


def _logits(rows=6, vocab=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


def _vec(rows, value):
    return torch.full((rows,), float(value))


def _ids_and_seen(rows, vocab=V, n=40, seed=1):
    """Generated ids as stock keeps them (BOS first, duplicates included) and the equivalent mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (rows, n), generator=g)  # a small range: many duplicates
    ids = torch.cat([torch.full((rows, 1), BOS), ids], dim=1)
    seen = torch.zeros(rows, vocab, dtype=torch.bool)
    seen.scatter_(1, ids, True)
    return ids, seen


def _same_filtering(mine, ref):
    """Same removed (-inf) set, same finite values."""
    assert torch.equal(torch.isinf(mine), torch.isinf(ref))
    fin = ~torch.isinf(ref)
    torch.testing.assert_close(mine[fin], ref[fin], rtol=1e-6, atol=1e-6)


def _only(**kw):
    """filter_logits with every stage neutral except those in kw (all rows alike)."""
    return dict(repetition_penalty=1.0, temperature=1.0, min_p=0.0, top_p=1.0, use_top_p=False) | kw


def _filter(logits, seen, **kw):
    p = _only(**kw)
    rows = logits.shape[0]
    return S.filter_logits(
        logits,
        seen,
        _vec(rows, p["repetition_penalty"]),
        _vec(rows, p["temperature"]),
        _vec(rows, p["min_p"]),
        _vec(rows, p["top_p"]),
        p["use_top_p"],
    )


@pytest.mark.parametrize("penalty", [1.2, 2.0, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    logits = _logits()
    ids, seen = _ids_and_seen(logits.shape[0])
    ref = RepetitionPenaltyLogitsProcessor(penalty=penalty)(ids, logits.clone())
    mine = _filter(logits, seen, repetition_penalty=penalty)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(mine, logits)  # it did something


@pytest.mark.parametrize("temperature", [0.8, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    logits = _logits()
    seen = torch.zeros_like(logits, dtype=torch.bool)
    ref = logits if temperature == 1.0 else TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(_filter(logits, seen, temperature=temperature), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 1.0])
def test_min_p_matches_hf(min_p):
    logits = _logits(scale=2.0)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    ref = MinPLogitsWarper(min_p=min_p)(None, logits.clone())
    mine = _filter(logits, seen, min_p=min_p)
    _same_filtering(mine, ref)
    if min_p == 1.0:  # only the top token survives
        assert torch.equal((~torch.isinf(mine)).sum(-1), torch.ones(logits.shape[0], dtype=torch.long))


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.8, 0.95])
def test_top_p_matches_hf(top_p):
    logits = _logits(scale=4.0)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    ref = TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    _same_filtering(_filter(logits, seen, top_p=top_p, use_top_p=True), ref)


def test_top_p_one_skipped_gives_the_same_distribution():
    """At top_p=1 HF only removes tokens of probability 0: skipping the warper samples the same."""
    logits = _logits(scale=20.0)  # wide logits: some softmax probabilities underflow to 0
    ref = torch.softmax(TopPLogitsWarper(top_p=1.0)(None, logits.clone()), -1)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    mine = torch.softmax(_filter(logits, seen, use_top_p=False), -1)
    assert torch.equal(mine, ref)
    # and running it (use_top_p=True) reproduces HF exactly
    _same_filtering(_filter(logits, seen, top_p=1.0, use_top_p=True), TopPLogitsWarper(top_p=1.0)(None, logits.clone()))


def test_full_chain_per_row_options_match_stock_order():
    """Different options per row in one call == stock's processors applied to each row alone."""
    opts = [  # (penalty, temperature, min_p, top_p)
        (1.2, 0.8, 0.05, 1.0),
        (1.0, 1.0, 0.0, 0.9),
        (2.0, 0.5, 0.2, 0.7),
        (1.3, 1.5, 0.01, 0.95),
    ]
    rows = len(opts)
    logits = _logits(rows=rows, scale=2.0, seed=7)
    ids, seen = _ids_and_seen(rows, seed=8)
    vec = [torch.tensor([o[j] for o in opts]) for j in range(4)]
    mine = S.filter_logits(logits, seen, *vec, use_top_p=True)
    for r, (pen, temp, min_p, top_p) in enumerate(opts):
        x = logits[r : r + 1].clone()
        x = RepetitionPenaltyLogitsProcessor(penalty=pen)(ids[r : r + 1], x)
        if temp != 1.0:
            x = x / temp
        x = MinPLogitsWarper(min_p=min_p)(ids[r : r + 1], x)
        x = TopPLogitsWarper(top_p=top_p)(ids[r : r + 1], x)
        _same_filtering(mine[r : r + 1], x)


def test_cfg_mix_is_stocks_formula():
    cond, uncond = _logits(seed=3), _logits(seed=4)
    cfg = torch.tensor([0.5, 0.0, 1.0, 0.3, 2.0, 0.5])
    for r in range(cond.shape[0]):
        w = torch.as_tensor(float(cfg[r]), dtype=cond.dtype)
        ref = cond[r : r + 1] + w * (cond[r : r + 1] - uncond[r : r + 1])
        torch.testing.assert_close(S.cfg_mix(cond, uncond, cfg)[r : r + 1], ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The draw


def _draw(probs, seeds, steps):
    seeds = torch.as_tensor(seeds, dtype=torch.int64)
    lo, hi = seeds & S.M32, (seeds >> 32) & S.M32
    return S.race(probs, S.uniform_noise(lo, hi, torch.as_tensor(steps, dtype=torch.int64), probs.shape[-1]))


def _chi2(counts, probs):
    n = counts.sum()
    expected = probs * n
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical values at p = 0.001 (fixed seeds: deterministic, never flaky)
CHI2_999 = {7: 24.32, 15: 37.70}


def test_draw_frequencies_follow_probabilities_across_seeds():
    probs = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
    n = 40000
    toks = _draw(probs.expand(n, -1), torch.arange(n) * 7919 + 12345, torch.zeros(n, dtype=torch.int64))
    counts = torch.bincount(toks, minlength=len(probs)).double()
    assert _chi2(counts, probs.double()) < CHI2_999[7]


def test_draw_frequencies_follow_probabilities_along_one_stream():
    """One seed, many steps (how a row actually samples), and no memory from step to step."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    n = 40000
    toks = _draw(probs.expand(n, -1), torch.full((n,), 2**40 + 99), torch.arange(n))
    counts = torch.bincount(toks, minlength=4).double()
    assert _chi2(counts, probs.double()) < CHI2_999[7]  # df=3 is stricter; 24.3 is a generous bound
    pairs = torch.bincount(toks[:-1] * 4 + toks[1:], minlength=16).double()
    joint = (probs[:, None] * probs[None, :]).reshape(-1).double()
    assert _chi2(pairs, joint) < CHI2_999[15]


def test_draw_with_the_full_vocabulary_and_zero_probabilities():
    """Tokens filtered to probability 0 are never drawn, even at vocabulary size."""
    logits = _logits(rows=1, scale=1.0, seed=5).expand(2000, -1).clone()
    keep = torch.zeros(V, dtype=torch.bool)
    keep[torch.tensor([3, 100, 6562, 8193])] = True
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
    toks = _draw(probs, torch.arange(2000), torch.full((2000,), 3))
    assert set(toks.tolist()) == {3, 100, 6562, 8193}
    counts = torch.bincount(toks, minlength=V)[keep].double()
    assert _chi2(counts, probs[0][keep].double()) < CHI2_999[7]


def test_draw_is_a_pure_function_of_seed_and_step():
    """A row draws the same whatever else is in the batch (batch invariance of the RNG)."""
    probs = torch.softmax(_logits(rows=5, scale=1.0), -1)
    seeds, steps = torch.tensor([1, 2, 3, 2**33 + 1, 5]), torch.tensor([0, 10, 10, 4, 99])
    together = _draw(probs, seeds, steps)
    for r in range(5):
        assert _draw(probs[r : r + 1], seeds[r : r + 1], steps[r : r + 1]).item() == together[r].item()
    # a different seed or step gives a different stream
    many = _draw(probs[:1].expand(64, -1), torch.arange(64), torch.zeros(64, dtype=torch.int64))
    assert len(set(many.tolist())) > 40
    u = S.uniform_noise(torch.arange(100), torch.zeros(100, dtype=torch.int64), torch.zeros(100, dtype=torch.int64), 1000)
    assert bool(((u > 0) & (u < 1)).all()) and abs(float(u.mean()) - 0.5) < 0.01
    extremes = -torch.log(S.hash_to_unit(torch.tensor([0, 1, S.M32 - 1, S.M32])))
    assert bool(torch.isfinite(extremes).all() and (extremes > 0).all())  # E = -log(U) never 0 or inf
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.02


def test_draws_use_64_bit_seeds():
    lo1, hi1 = S.split_seed(5)
    lo2, hi2 = S.split_seed(5 + (1 << 32))
    assert lo1 == lo2 and hi1 != hi2
    t = lambda x: torch.tensor([x])  # noqa: E731
    assert not torch.equal(S.uniform_noise(t(lo1), t(hi1), t(0), 64), S.uniform_noise(t(lo2), t(hi2), t(0), 64))


@pytest.mark.parametrize("option", ["min_p=1", "top_p tiny"])
def test_greedy_options_give_the_argmax(option):
    rows = 64
    logits = _logits(rows=rows, scale=2.0, seed=11)
    ids, seen = _ids_and_seen(rows, seed=12)
    min_p, top_p = (1.0, 1.0) if option == "min_p=1" else (0.0, 1e-6)
    params = dict(
        cfg=_vec(rows, 0.5),
        repetition_penalty=_vec(rows, 1.2),
        temperature=_vec(rows, 0.8),
        min_p=_vec(rows, min_p),
        top_p=_vec(rows, top_p),
    )
    seeds = torch.arange(rows, dtype=torch.int64)
    toks = S.sample_tokens(logits, seen, params, seeds, seeds * 0, seeds * 3, use_top_p=top_p < 1)
    penalized = RepetitionPenaltyLogitsProcessor(penalty=1.2)(ids, logits.clone())
    assert torch.equal(toks, penalized.argmax(-1))


def test_sample_tokens_distribution_matches_processed_softmax():
    """End to end through the filters: frequencies follow softmax(stock-processed logits)."""
    n = 20000
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    logits = base.expand(n, -1).clone()
    ids = torch.tensor([[1, 1]]).expand(n, -1)  # token 1 was generated before
    seen = torch.zeros(n, 8, dtype=torch.bool)
    seen[:, 1] = True
    params = dict(
        cfg=_vec(n, 0.5),
        repetition_penalty=_vec(n, 1.5),
        temperature=_vec(n, 0.9),
        min_p=_vec(n, 0.05),
        top_p=_vec(n, 0.95),
    )
    seeds = torch.arange(n, dtype=torch.int64) + 77
    toks = S.sample_tokens(logits, seen, params, seeds, seeds * 0, seeds * 0 + 5, use_top_p=True)
    x = RepetitionPenaltyLogitsProcessor(penalty=1.5)(ids[:1], base[None].clone()) / 0.9
    x = TopPLogitsWarper(top_p=0.95)(None, MinPLogitsWarper(min_p=0.05)(None, x))
    probs = torch.softmax(x, -1)[0].double()
    counts = torch.bincount(toks, minlength=8).double()
    assert counts[probs == 0].sum() == 0
    live = probs > 0
    assert int(live.sum()) >= 3  # the filters left a real choice
    assert _chi2(counts[live], probs[live]) < CHI2_999[7]
    assert not math.isnan(float(counts.sum()))
