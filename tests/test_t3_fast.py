"""The batched T3 decoder (ttsbatch.engine.t3_fast) against stock T3, on the tiny random checkpoint (fp32, CPU).

- teacher forcing: same conditioning, text and forced token history -> the same logits as
  stock's HF forward (as ``T3.inference`` calls it) at every step, for several sentences of
  different lengths prefilled into one batch (one of them joining mid-way);
- greedy options: token for token what stock ``T3.inference`` itself samples;
- batch invariance, budgets, end-of-speech, refill order, host checks, FastEngine.
"""

from __future__ import annotations

import time
import types

import numpy as np
import pytest
import torch

from ttsbatch.config import GenerationOptions
from ttsbatch.engine.stock import StockEngine, SynthesisRequest, text_tokens_for

TEXTS = [
    "Hi.",
    "One dollar and eighty-seven cents, and sixty cents of it in pennies.",
    "Three times Della counted it.",
    "The next day would be Christmas.",
    "Yes!",
    "There was clearly nothing to do but flop down on the shabby little couch and howl.",
    "So Della did it.",
    "In the vestibule below was a letter-box into which no letter would go.",
]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from ttsbatch.engine.model import load_model

    return load_model(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def conds(model):
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    return VoiceCache(model).get(BUILTIN, 0.5)


@pytest.fixture(scope="module")
def fast(model):
    from ttsbatch.engine.t3_fast import FastT3

    return FastT3(model)


def _stock_logits(model, conds, text, forced, cfg_weight):
    """Stock T3.inference's forward passes with a forced token history: logits (steps+1, 2, V)."""
    from chatterbox.models.t3.inference.t3_hf_backend import T3HuggingfaceBackend

    t3 = model.t3
    tt = text_tokens_for(model, text)
    with torch.inference_mode():
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=conds.t3,
            text_tokens=tt,
            speech_tokens=t3.hp.start_speech_token * torch.ones_like(tt[:, :1]),
            cfg_weight=cfg_weight,
        )
        backend = T3HuggingfaceBackend(config=t3.cfg, llama=t3.tfmr, speech_enc=t3.speech_emb, speech_head=t3.speech_head)
        bos = torch.tensor([[t3.hp.start_speech_token]])
        bos_embed = t3.speech_emb(bos) + t3.speech_pos_emb.get_fixed_embedding(0)
        x = torch.cat([embeds, torch.cat([bos_embed, bos_embed])], dim=1)
        kw = dict(output_attentions=True, output_hidden_states=True, return_dict=True)
        out = backend(inputs_embeds=x, past_key_values=None, use_cache=True, **kw)
        past, logits = out.past_key_values, [out.logits[:, -1].clone()]
        for i, tok in enumerate(forced):
            e = t3.speech_emb(torch.tensor([[tok]])) + t3.speech_pos_emb.get_fixed_embedding(i + 1)
            out = backend(inputs_embeds=torch.cat([e, e]), past_key_values=past, **kw)
            past = out.past_key_values
            logits.append(out.logits[:, -1].clone())
    return torch.stack(logits)


@pytest.mark.parametrize("cfg_weight", [0.5, 0.0])
def test_teacher_forced_logits_match_stock(model, conds, fast, cfg_weight):
    """Rows of one batch (prefilled together, one joining later) each match stock run alone."""
    from ttsbatch.engine import t3_fast as tf

    gen = GenerationOptions(cfg_weight=cfg_weight)
    pairs = 2 if cfg_weight > 0 else 1
    texts = [TEXTS[1], TEXTS[0], TEXTS[3], TEXTS[5]]
    rows = [4, 0, 2, 1]  # out of order on purpose; row 3 stays free
    start = [0, 0, 0, 2]  # the last sentence joins after two steps
    steps = 6
    g = torch.Generator().manual_seed(0)
    forced = torch.randint(0, 6561, (len(texts), steps), generator=g)
    ref = [_stock_logits(model, conds, t, forced[i, : steps - start[i]].tolist(), cfg_weight) for i, t in enumerate(texts)]
    reqs = [SynthesisRequest(t, i, steps + 1) for i, t in enumerate(texts)]
    st = fast.new_state(rows=5, max_len=300, max_new=steps + 1, pairs=pairs)
    st.done.fill_(True)
    n = 5

    def check(i, k):  # row of sentence i has taken k forced tokens
        mine = st.logits[rows[i] * pairs : (rows[i] + 1) * pairs]
        diff = (mine - ref[i][k][:pairs]).abs().max().item()
        assert diff <= 1e-4, f"sentence {i} step {k}: max abs diff {diff}"
        return diff

    with torch.inference_mode():
        first = [i for i in range(len(texts)) if start[i] == 0]
        tf.prefill(fast.w, st, [rows[i] for i in first], [fast.row_input(conds, reqs[i], gen, pairs) for i in first])
        for step in range(steps + 1):
            if step == 2:  # a refill while the others are mid-sentence
                tf.prefill(fast.w, st, [rows[3]], [fast.row_input(conds, reqs[3], gen, pairs)])
            live = [i for i in range(len(texts)) if start[i] <= step]
            for i in live:
                check(i, step - start[i])
            if step == steps:
                break
            tok = torch.zeros(n, dtype=torch.long)
            for i in live:
                if step - start[i] < steps - start[i]:
                    tok[rows[i]] = forced[i, step - start[i]]
            tf.record_tokens(st, n, tok)
            tf.forward_tokens(fast.w, st, n, st.max_len, tok)
    # the row that joined late saw its whole forced history at the right speech positions
    assert int(st.step[rows[3]]) == steps - 2
    # the repetition penalty's memory: BOS and every token fed, nothing else
    for i in range(len(texts)):
        expected = set(forced[i, : steps - start[i]].tolist()) | {model.t3.hp.start_speech_token}
        assert set(torch.nonzero(st.seen[rows[i]]).view(-1).tolist()) == expected


@pytest.mark.parametrize("cfg_weight", [0.5, 0.0])
def test_greedy_decoding_equals_stock_inference(model, conds, fast, cfg_weight):
    """With min_p=1 stock T3.inference is deterministic: the fast path must give the same tokens."""
    gen = GenerationOptions(min_p=1.0, cfg_weight=cfg_weight, ignore_eos=True)
    reqs = [SynthesisRequest(TEXTS[i], 10 + i, 5 + i) for i in (2, 5, 4)]
    stock = StockEngine(model)
    expected = [stock.speech_tokens(r, conds, gen).tolist() for r in reqs]
    got = dict(fast.generate(conds, reqs, gen, max_rows=3))
    for i in range(len(reqs)):
        assert got[i] == expected[i]


def _reqs(budgets=(9, 14, 6, 11, 17, 8, 12, 5)):
    return [SynthesisRequest(t, 1000 + 17 * i, b) for i, (t, b) in enumerate(zip(TEXTS, budgets))]


def test_a_floor_on_the_draining_batch_keeps_every_token(model, conds):
    """``min_rows``: as the rows drain at the end the batch is compacted no smaller than it,
    so fewer batch sizes are stepped (each a graph to capture on a GPU), and every request
    decodes to the same tokens."""
    from ttsbatch.engine.t3_fast import FastT3

    gen = GenerationOptions(ignore_eos=True, top_p=0.95)
    reqs = _reqs()
    sizes = {}
    for floor in (1, 4):
        t3 = FastT3(model, use_graphs="emulate")
        seen = []
        real = t3.step
        t3.step = lambda st, n, kv_len, top_p, real=real, seen=seen: seen.append(n) or real(st, n, kv_len, top_p)
        sizes[floor] = (dict(t3.generate(conds, reqs, gen, max_rows=8, check_every=2, min_rows=floor)), set(seen),
                        t3.stats["graphs_captured"])
    (base, n1, g1), (floored, n4, g4) = sizes[1], sizes[4]
    assert floored == base
    assert min(n1) < 4 and min(n4) == 4  # the plain drain went below the floor; this one did not
    assert g4 < g1


def test_batch_invariance_and_budgets(model, conds, fast):
    """Each sentence of a batch of 8 decodes to the same tokens alone, and with 3 rows and refills."""
    from ttsbatch.engine.t3_fast import FastT3

    gen = GenerationOptions(ignore_eos=True, top_p=0.95)
    reqs = _reqs()
    batch = dict(fast.generate(conds, reqs, gen, max_rows=8))
    assert sorted(batch) == list(range(8))
    for i, r in enumerate(reqs):
        assert len(batch[i]) == r.budget  # ignore_eos: exactly the budget
    for i in (0, 4, 5):  # the shortest text, the largest budget, the longest text
        alone = dict(fast.generate(conds, [reqs[i]], gen, max_rows=1))[0]
        assert alone == batch[i], f"request {i} differs alone"
    refilled = dict(fast.generate(conds, reqs, gen, max_rows=3, check_every=3))
    assert refilled == batch
    assert any(e[0] == "move" for e in fast.trace)  # the tail was compacted on the way
    assert len({tuple(t) for t in batch.values()}) == 8  # seeds give different streams
    # the graph path's bookkeeping (warm-up steps on a snapshot, restored) changes nothing
    emulated = FastT3(model, use_graphs="emulate")
    assert dict(emulated.generate(conds, reqs, gen, max_rows=3, check_every=3)) == batch
    assert emulated.stats["graphs_captured"] >= 3
    log = emulated.capture_log  # when each capture ran and of what, for bench's timeline
    assert len(log) == emulated.stats["graphs_captured"] and all(a <= b for a, b, _ in log)
    assert all(what.startswith(("rows=", "prefill of ")) for _, _, what in log)
    # batch 1: every prefill is one row's, from the (emulated) graph of its padded length,
    # its buffers refilled sentence after sentence
    assert dict(emulated.generate(conds, reqs, gen, max_rows=1)) == batch
    assert any(k[0] == "prefill" for k in emulated.state.graphs)


def test_end_of_speech_stops_a_row_and_is_not_returned(conds, fast):
    gen = GenerationOptions(ignore_eos=True)
    reqs = _reqs((12, 12, 12, 12))[:4]
    free_run = dict(fast.generate(conds, reqs, gen, max_rows=2))
    eos = free_run[1][4]  # a token row 1 samples at step 4 plays end-of-speech
    assert eos in free_run[1] and len(free_run[1]) == 12  # ignore_eos kept going past it
    stopped = dict(fast.generate(conds, reqs, GenerationOptions(ignore_eos=False), max_rows=2, eos_token=eos))
    for i in range(4):
        t = free_run[i]
        expected = t[: t.index(eos)] if eos in t else t
        assert stopped[i] == expected
    assert len(stopped[1]) <= 4
    # the early finisher's row is refilled at once, while the other row is still going
    trace = [e for e in fast.trace if e[0] in ("start", "finish")]
    row = next(e[2] for e in trace if e == ("start", 1, e[2]))
    after = trace[trace.index(("finish", 1, row)) + 1 :]
    nxt = next(e for e in after if e[0] == "start")
    assert nxt[2] == row
    others_done = [e for e in after if e[0] == "finish"]
    assert after.index(nxt) < after.index(others_done[0])


def test_real_end_of_speech_token_never_returned(conds, fast):
    reqs = _reqs()
    for i, toks in fast.generate(conds, reqs, GenerationOptions(ignore_eos=False), max_rows=8):
        assert 6562 not in toks and len(toks) <= reqs[i].budget


def test_budget_of_one_and_validation(conds, fast):
    from ttsbatch.errors import InputError

    gen = GenerationOptions(ignore_eos=True)
    out = dict(fast.generate(conds, [SynthesisRequest("Hi.", 1, 1), SynthesisRequest("Yes.", 2, 3)], gen))
    assert len(out[0]) == 1 and len(out[1]) == 3
    with pytest.raises(InputError):
        list(fast.generate(conds, [SynthesisRequest("Hi.", 1, 0)], gen))
    with pytest.raises(InputError):
        list(fast.generate(conds, [SynthesisRequest("Hi.", 1, 3)], GenerationOptions(min_p=1.5)))


def test_refill_order_longest_first_and_rows_reused(conds, fast):
    gen = GenerationOptions(ignore_eos=True)
    texts = ["Tiny.", "A much longer sentence than the others here.", "Medium sized one.", "Mid size two!", "Go"]
    reqs = [SynthesisRequest(t, i, 3 + i) for i, t in enumerate(texts)]
    order = sorted(range(5), key=lambda i: -len(texts[i]))
    got = dict(fast.generate(conds, reqs, gen, max_rows=2, check_every=2))
    starts = [e for e in fast.trace if e[0] == "start"]
    assert [e[1] for e in starts] == order
    live, most = set(), 0
    for e in fast.trace:
        if e[0] == "start":
            assert e[2] not in live  # a row is refilled only once it is free
            live.add(e[2])
        elif e[0] == "finish":
            live.discard(e[2])
        elif e[0] == "move":
            live.discard(e[2])
            live.add(e[3])
        most = max(most, len(live))
    assert most == 2
    assert all(len(got[i]) == reqs[i].budget for i in range(5))
    for _ in fast.generate(conds, reqs, gen, max_rows=2, sort=False):
        assert not torch.is_inference_mode_enabled()  # the generator's mode does not leak to the caller
    assert [e[1] for e in fast.trace if e[0] == "start"] == [0, 1, 2, 3, 4]


def test_host_looks_once_per_k_steps(conds, fast):
    gen = GenerationOptions(ignore_eos=False)
    reqs = [SynthesisRequest("Hello there.", 3, 12), SynthesisRequest("General Kenobi.", 4, 12)]
    for k, checks in ((4, 3), (5, 3), (1, 12)):
        before = dict(fast.stats)
        list(fast.generate(conds, reqs, gen, max_rows=2, check_every=k))
        steps = fast.stats["steps"] - before["steps"]
        assert fast.stats["host_checks"] - before["host_checks"] <= checks
        assert steps <= 12


def test_steps_between_looks():
    from ttsbatch.engine.t3_fast import _steps_to_run

    assert _steps_to_run([3, 20, 40], 8, 0, None) == 8  # one row about to finish: no early look
    assert _steps_to_run([2, 3, 5], 8, 0, None) == 5  # every row done sooner
    assert _steps_to_run([2, 3, 30], 8, 1, 3) == 3  # the third free row (a refill) after 3 steps
    assert _steps_to_run([2, 3, 30], 8, 0, 6) == 8  # no refill possible before the rows run out
    assert _steps_to_run([20, 30], 8, 4, 2) == 8  # enough free rows already: refilled at the next look


def test_rows_finishing_one_by_one_do_not_make_the_host_look_every_step(conds, fast):
    """In document order some row finishes at almost every step; the host still looks only
    every ``check_every`` steps (a look is a sync), and the tokens do not depend on when it looks."""
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest("Row number %d." % i, 20 + i, 10 + i) for i in range(8)]
    before = dict(fast.stats)
    got = dict(fast.generate(conds, reqs, gen, max_rows=8, check_every=8, sort=False))
    assert fast.stats["host_checks"] - before["host_checks"] == 3  # after steps 8, 16, 17 (budgets 10..17)
    # the host's time split (bench reports it): the prefill and the 17 steps took time, the looks some
    for k in ("prefill_s", "step_launch_s", "look_wait_s"):
        assert fast.stats[k] > before[k]
    assert got == dict(fast.generate(conds, reqs, gen, max_rows=8, check_every=1, sort=False))
    assert [len(got[i]) for i in range(8)] == [r.budget for r in reqs]


def test_rows_default_on_cpu(fast):
    assert fast.pick_rows(500, 2) == 8
    assert fast.pick_rows(500, 2, n_requests=3) == 3


def test_fast_engine_synthesizes_each_request(model, conds):
    from ttsbatch.engine.fast import FastEngine, speech_tokens_for_s3gen

    assert speech_tokens_for_s3gen([5, 6561, 7, 8, 7000, 9, 6562, 10, 6562]) == [7, 8, 9]
    assert speech_tokens_for_s3gen([1, 2, 3]) == [1, 2, 3]
    engine = FastEngine(model)
    assert engine.name == "fast" and engine.sample_rate == model.sample_rate
    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest("Hello there.", 3, 6), SynthesisRequest("Hi.", 4, 4)]
    streamed = dict(engine.synthesize_stream(reqs, conds, gen))
    assert sorted(streamed) == [0, 1]
    results = engine.synthesize(reqs, conds, gen)
    tokens = dict(engine.speech_token_stream(reqs, conds, gen))
    for i, r in enumerate(results):
        assert r.tokens == len(speech_tokens_for_s3gen(tokens[i])) > 0
        assert r.wav.dtype.name == "float32" and len(r.wav) > 0
        assert (r.wav == streamed[i].wav).all()  # seeded: the same audio twice


def test_fast_engine_is_fast_t3_then_batched_s3gen(model, conds):
    """The engine's audio is exactly batched S3Gen over the fast T3's cleaned tokens, seeded per
    request, whatever the S3Gen batch size (items never depend on their neighbours)."""
    from ttsbatch.engine.fast import FastEngine, speech_tokens_for_s3gen
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest(t, 40 + i, b) for i, (t, b) in enumerate([("One two three.", 9), ("Four.", 5), ("Five six.", 7)])]
    one_by_one = FastEngine(model, s3gen_batch=1, s3gen_collect=1)
    order = [i for i, _ in one_by_one.synthesize_stream(reqs, conds, gen)]
    assert sorted(order) == [0, 1, 2]
    tokens = dict(one_by_one.speech_token_stream(reqs, conds, gen))
    kept = [speech_tokens_for_s3gen(tokens[i]) for i in range(3)]
    s3 = BatchedS3Gen(model)
    want = s3.synthesize(kept, s3.prepare_voice(conds.gen), n_timesteps=2, seeds=[r.seed for r in reqs])
    for s3gen_batch in (1, 8):
        got = FastEngine(model, s3gen_batch=s3gen_batch, s3gen_collect=s3gen_batch).synthesize(reqs, conds, gen)
        for i in range(3):
            assert got[i].tokens == len(kept[i])
            assert len(got[i].wav) == len(want[i]) == 2 * len(kept[i]) * 480  # 2 mel frames per token, 480 samples per frame
            np.testing.assert_allclose(got[i].wav, want[i], atol=1e-5)


def test_fast_engine_overlapped_equals_sequential(model, conds):
    """T3 on its own thread (the GPU default) gives exactly the sequential engine's audio."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest(t, 70 + i, b) for i, (t, b) in enumerate([("One two three.", 9), ("Four.", 5), ("Five six.", 7), ("Seven.", 3)])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads of torch work at once: keep the BLAS split fixed
    try:
        seq = FastEngine(model, s3gen_batch=2, overlap=False).synthesize(reqs, conds, gen)
        engine = FastEngine(model, s3gen_batch=2, overlap=True)
        got = {}
        for i, res in engine.synthesize_stream(reqs, conds, gen):
            got[i] = res
            time.sleep(0.05)  # the caller's work with each result: the timeline's consumer time
        done = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    # where the S3Gen thread's time went: T3 decoded before the first collection could start,
    # S3Gen's batches were launched, the caller held each of the 4 results
    tl = engine.timeline
    assert tl.collections == 2 and tl.t3_wait_s > 0 and engine.s3.times.launch_s > 0
    assert 0.2 <= tl.consumer_s < 1.0 and tl.t3_done_at is not None and tl.t3_done_at < done
    # the threads' CPU time: S3Gen's launches on the CPU for part of their wall, T3's thread busy
    assert 0 < engine.s3.times.launch_cpu_s <= engine.s3.times.launch_s + 0.01 and tl.t3_cpu_s > 0
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(4):
        assert got[i].tokens == seq[i].tokens
        np.testing.assert_array_equal(got[i].wav, seq[i].wav)


def test_fast_engine_keeps_the_callers_order(model, conds):
    """Requests start in the order given (document order), not longest first."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    texts = ["Hi.", "A much longer sentence than the first one.", "Mid length one.", "Ok."]
    reqs = [SynthesisRequest(t, 90 + i, 4) for i, t in enumerate(texts)]
    engine = FastEngine(model, max_rows=2)
    list(engine.speech_token_stream(reqs, conds, gen))
    assert [i for kind, i, *_ in engine.t3.trace if kind == "start"] == [0, 1, 2, 3]


def test_ready_groups_hand_over_what_is_made_once_enough_is():
    """``ReadyGroups`` (T3's thread and S3Gen's collections): a group is everything made so
    far, up to ``most``, as soon as ``least`` are there, without waiting for ``most``; the first
    is ``first`` items; the producer's error comes after its items; closing the consumer stops
    the producer's thread."""
    import threading

    from ttsbatch.engine.fast import HostTimeline, ReadyGroups

    go, made = threading.Event(), threading.Event()

    def producer():
        yield from range(5)
        go.wait(10)  # T3 decoding: nothing more finishes until the test says so
        yield from range(5, 17)
        made.set()

    tl = HostTimeline()
    it = ReadyGroups(producer(), least=3, most=10, first=2, timeline=tl)
    assert next(it) == [0, 1]  # the first group: ``first`` items
    assert next(it) == [2, 3, 4]  # not a full group of 10: what there is
    go.set()
    assert made.wait(10)
    assert next(it) == list(range(5, 15))  # at most 10
    assert next(it) == [15, 16]  # the producer is done: fewer than least
    assert next(it, None) is None and tl.t3_done_at is not None

    def failing():
        yield from (1, 2)
        raise ValueError("t3 broke")

    it = ReadyGroups(failing(), least=1)
    got = []
    with pytest.raises(ValueError, match="t3 broke"):
        for group in it:
            got += group
    assert got == [1, 2]

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()  # closed on the producer's thread when the consumer stops

    it = ReadyGroups(endless(), least=2, most=4)
    assert 2 <= len(next(it)) <= 4
    it.close()  # an error downstream, an interrupt
    assert closed.is_set()
    assert not any(t.name == "ttsbatch-t3" for t in threading.enumerate())


def test_ready_groups_ask_a_changing_least_again_as_items_come():
    """``least`` as a function (``s3gen_take="drain"``): full groups while it says so, then
    whatever is there once it says less, before the producer is done."""
    import threading

    from ttsbatch.engine.fast import ReadyGroups

    draining, go, made, more = [False], threading.Event(), threading.Event(), threading.Event()

    def producer():
        yield from range(8)
        go.wait(10)
        draining[0] = True  # T3 has started every request
        yield from range(8, 11)
        made.set()
        more.wait(10)  # the last rows still decoding
        yield from range(11, 13)

    it = ReadyGroups(producer(), least=lambda: 2 if draining[0] else 4, most=4)
    assert next(it) == [0, 1, 2, 3] and next(it) == [4, 5, 6, 7]  # full groups
    go.set()
    assert made.wait(10)
    assert next(it) == [8, 9, 10]  # draining: what there is, the producer not done
    more.set()
    assert next(it) == [11, 12] and next(it, None) is None


def test_ready_groups_rest_hands_over_the_last_few_only_once_the_producer_is_done():
    """``ReadyGroups.rest`` (S3Gen's late joiners): nothing while the producer may still make
    items or when more than ``most`` wait; once it is done, every waiting item, and the
    groups then end without them."""
    import threading

    from ttsbatch.engine.fast import ReadyGroups

    go, made = threading.Event(), threading.Event()

    def producer():
        yield from range(4)
        made.set()
        go.wait(10)
        yield from range(4, 7)

    groups = ReadyGroups(producer(), least=4, most=4)
    assert next(groups) == [0, 1, 2, 3]
    assert groups.rest(8) == []  # not done: the next items may still come
    go.set()
    t3 = next(t for t in threading.enumerate() if t.name == "ttsbatch-t3")
    t3.join(10)
    assert groups.rest(2) == []  # done, but three wait: a group of their own
    assert groups.rest(3) == [4, 5, 6]
    assert groups.rest(3) == [] and next(groups, None) is None


@pytest.mark.parametrize("join", [False, True])
def test_the_last_chunks_join_s3gen_s_last_batch_once_t3_is_done(model, conds, join):
    """``s3gen_join_late``: the chunks T3 finishes while S3Gen launches a collection ride in
    its last batch (one batch fewer, no collection of their own) once T3 is done; a chunk with
    nothing to say among them still gets its empty result; every chunk's audio is what it
    is without joining (within 1e-5 of its range)."""
    import threading

    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest("x", 40 + i, 4) for i in range(8)]
    rng = np.random.default_rng(3)
    toks = [rng.integers(0, 6561, 3 + (7 * i) % 11).tolist() for i in range(8)]
    toks[7] = []  # end-of-speech at once
    engine = FastEngine(model, s3gen_batch=2, s3gen_collect=4, overlap=True, s3gen_join_late=join)
    go = threading.Event()

    def finished(requests, conds, gen):  # T3: the last two chunks once S3Gen has the second collection
        yield from ((i, toks[i]) for i in range(6))
        go.wait(10)
        yield from ((i, toks[i]) for i in (6, 7))

    synthesize = engine.s3.synthesize

    def s3gen(token_lists, *a, **k):
        if len(token_lists) == 4:  # the second collection: T3 finishes before its launches
            go.set()
            next(t for t in threading.enumerate() if t.name == "ttsbatch-t3").join(10)
        return synthesize(token_lists, *a, **k)

    engine._finished, engine.s3.synthesize = finished, s3gen
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = dict(engine.synthesize_stream(reqs, conds, gen))
        want = engine.s3.synthesize_iter([toks[i] for i in range(7)], engine.voice_ref(conds), n_timesteps=2,
                                         seeds=[r.seed for r in reqs[:7]])
        want = {i: w for batch in want for i, w in batch}
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == list(range(8))
    sizes = [n for what, _, _, n in engine.timeline.spans if what == "s3gen"]
    if join:
        assert sizes == [2, 5] and engine.timeline.late_joined == 1  # the empty one not vocoded
        assert engine.s3.times.batches - 4 == 3  # 1 + 2: the late one in the last batch
    else:
        assert sizes == [2, 4, 1] and engine.timeline.late_joined == 0  # a collection of its own
        assert engine.s3.times.batches - 4 == 4
    assert got[7].tokens == 0 and got[7].wav.size == 0
    for i in range(7):
        assert got[i].tokens == len(toks[i])
        scale = float(np.abs(want[i]).max(initial=0.0))
        np.testing.assert_allclose(got[i].wav, want[i], rtol=0, atol=1e-5 * max(scale, 1e-6))


def test_drain_handoff_hands_over_by_batch_once_t3_drains(model, conds):
    """``s3gen_handoff="drain"``: S3Gen's audio a collection at a time while T3 still has
    chunks to start, a batch at a time once it drains (the store works on the last collection
    while S3Gen renders its last batch); the audio is the collection handoff's."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest("x", 60 + i, 4) for i in range(8)]
    rng = np.random.default_rng(5)
    toks = [rng.integers(0, 6561, 3 + (5 * i) % 9).tolist() for i in range(8)]
    runs = {}
    for handoff in ("collection", "drain"):
        engine = FastEngine(model, s3gen_batch=2, s3gen_collect=4, overlap=False, s3gen_handoff=handoff)

        def finished(requests, conds, gen, engine=engine):  # T3 drains before its last four
            yield from ((i, toks[i]) for i in range(4))
            engine.t3.draining = True
            yield from ((i, toks[i]) for i in range(4, 8))

        calls = []
        whole, by_batch = engine.s3.synthesize, engine.s3.synthesize_iter
        engine.s3.synthesize = lambda t, *a, **k: calls.append(("collection", len(t))) or whole(t, *a, **k)
        engine.s3.synthesize_iter = lambda t, *a, **k: calls.append(("batch", len(t))) or by_batch(t, *a, **k)
        engine._finished = finished
        runs[handoff] = dict(engine.synthesize_stream(reqs, conds, gen)), calls
    assert runs["collection"][1] == [("collection", 2), ("collection", 4), ("collection", 2)]
    # the second collection is taken once T3 has made its sixth chunk: it is draining by then
    assert runs["drain"][1] == [("collection", 2), ("batch", 4), ("batch", 2)]
    got, want = runs["drain"][0], runs["collection"][0]
    assert sorted(got) == sorted(want) == list(range(8))
    for i in range(8):
        assert got[i].tokens == want[i].tokens and np.array_equal(got[i].wav, want[i].wav)
    with pytest.raises(ValueError, match="s3gen_handoff"):
        FastEngine(model, s3gen_handoff="whenever")


@pytest.mark.parametrize("take", ["full", "drain"])
def test_drain_takes_what_has_finished_only_once_t3_drains(model, take):
    """The engine's side of ``s3gen_take="drain"``: collections of ``s3gen_collect`` while T3
    still has requests to start; once it drains (``FastT3.draining``), what has finished,
    before T3 is done. "full" waits for a full collection or T3's end."""
    import threading

    from ttsbatch.engine.fast import FastEngine

    engine = FastEngine(model, s3gen_batch=2, s3gen_collect=4, overlap=True, s3gen_take=take)
    go, made, more = threading.Event(), threading.Event(), threading.Event()

    def finished(requests, conds, gen):  # T3's finished requests, as the test lets them come
        yield from ((i, [1]) for i in range(6))
        go.wait(10)
        engine.t3.draining = True
        yield from ((i, [1]) for i in range(6, 9))
        made.set()
        more.wait(10)
        yield 9, [1]

    engine._finished = finished
    it = engine._groups([], None, None)
    assert [len(next(it)), len(next(it))] == [2, 4]  # the first collection one batch, then full
    go.set()
    assert made.wait(10)
    if take == "drain":
        assert [i for i, _ in next(it)] == [6, 7, 8]  # three of four, T3 not done
        more.set()
        assert [i for i, _ in next(it)] == [9]
    else:
        more.set()
        assert [i for i, _ in next(it)] == [6, 7, 8, 9]
    assert next(it, None) is None


def test_fast_engine_taking_ready_chunks_equals_sequential(model, conds):
    """``s3gen_take="ready"``: S3Gen's collections are whatever T3 has finished (one batch's
    worth at least, ``s3gen_collect`` at most), and every chunk gets the sequential engine's
    tokens and, within 1e-5 of its range, its audio (collections made differently put a
    chunk in other batches; fp32 on the CPU)."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    texts = ["One two three.", "Four.", "Five six.", "Seven.", "Eight nine ten.", "Eleven."]
    reqs = [SynthesisRequest(t, 70 + i, 3 + (5 * i) % 8) for i, t in enumerate(texts)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = FastEngine(model, s3gen_batch=2, overlap=False).synthesize(reqs, conds, gen)
        engine = FastEngine(model, s3gen_batch=2, s3gen_collect=3, overlap=True, s3gen_take="ready")
        got = dict(engine.synthesize_stream(reqs, conds, gen))
    finally:
        torch.set_num_threads(threads)
    assert sorted(got) == list(range(6))
    assert engine.timeline.collections >= 2 and engine.s3.times.items == sum(1 for r in seq if r.tokens)  # empty ones skip S3Gen
    for i in range(6):
        assert got[i].tokens == seq[i].tokens and got[i].wav.shape == seq[i].wav.shape
        scale = float(np.abs(seq[i].wav).max(initial=0.0))
        np.testing.assert_allclose(got[i].wav, seq[i].wav, rtol=0, atol=1e-5 * max(scale, 1e-6))
    with pytest.raises(ValueError, match="s3gen_take"):
        FastEngine(model, s3gen_take="greedy")
    with pytest.raises(ValueError, match="stream_priority"):
        FastEngine(model, stream_priority="t5")


def test_fast_engine_taking_the_draining_chunks_as_they_come_equals_sequential(model, conds):
    """``s3gen_take="drain"``: full collections until T3 has started every chunk, then what
    has finished; every chunk gets the sequential engine's tokens and, within 1e-5 of its
    range, its audio."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    texts = ["One two three.", "Four.", "Five six.", "Seven.", "Eight nine ten.", "Eleven.", "Twelve.", "Thirteen."]
    reqs = [SynthesisRequest(t, 90 + i, 3 + (5 * i) % 8) for i, t in enumerate(texts)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = FastEngine(model, s3gen_batch=2, overlap=False).synthesize(reqs, conds, gen)
        engine = FastEngine(model, max_rows=3, s3gen_batch=2, s3gen_collect=4, overlap=True, s3gen_take="drain")
        got = dict(engine.synthesize_stream(reqs, conds, gen))
    finally:
        torch.set_num_threads(threads)
    assert engine.t3.draining  # T3 drained its last rows
    sizes = [n for what, _, _, n in engine.timeline.spans if what == "s3gen"]
    assert sizes[0] == 2 and max(sizes) <= 4 and sum(sizes) == engine.s3.times.items
    for i in range(len(reqs)):
        assert got[i].tokens == seq[i].tokens and got[i].wav.shape == seq[i].wav.shape
        scale = float(np.abs(seq[i].wav).max(initial=0.0))
        np.testing.assert_allclose(got[i].wav, seq[i].wav, rtol=0, atol=1e-5 * max(scale, 1e-6))


@pytest.mark.parametrize("ahead", [1, 3])
def test_steps_launched_past_a_look_change_no_tokens(conds, fast, ahead):
    """``look_ahead`` steps are queued after a look's copies: rows done by the look are
    harvested from the look's copy (not from the steps after it), rows finishing in those
    steps at the next look, and no row runs past its budget."""
    gen = GenerationOptions(ignore_eos=False)
    reqs = [SynthesisRequest(f"Sentence number {i} here.", 300 + i, 2 + (5 * i) % 11) for i in range(9)]
    plain = dict(fast.generate(conds, reqs, gen, max_rows=3, check_every=4, sort=False, refill_min=1))
    got = dict(fast.generate(conds, reqs, gen, max_rows=3, check_every=4, sort=False, refill_min=1, look_ahead=ahead))
    assert got == plain
    assert all(len(got[i]) <= reqs[i].budget for i in range(9))
    assert sorted(e[1] for e in fast.trace if e[0] == "finish") == list(range(9))
    aheads = [e[1] for e in fast.trace if e[0] == "ahead"]
    assert aheads and max(aheads) == ahead  # it did queue steps past looks, never more than asked
    with pytest.raises(ValueError, match="look_ahead"):
        list(fast.generate(conds, reqs, gen, look_ahead=-1))


def test_refills_wait_for_refill_min_free_rows_and_tokens_do_not_change(conds, fast):
    """Rows are refilled in groups of ``refill_min`` (fewer prefills); a request's tokens do not
    depend on when it started."""
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(f"Sentence number {i} here.", 200 + i, 2 + (3 * i) % 7) for i in range(10)]
    p0 = fast.stats["prefills"]
    one = dict(fast.generate(conds, reqs, gen, max_rows=4, check_every=1, sort=False, refill_min=1))
    p1 = fast.stats["prefills"]
    grouped = dict(fast.generate(conds, reqs, gen, max_rows=4, check_every=1, sort=False, refill_min=3))
    assert fast.stats["prefills"] - p1 < p1 - p0
    assert grouped == one
    starts, group = [], []
    for e in fast.trace:  # starts between two finishes form one refill
        if e[0] == "start":
            group.append(e[1])
        elif group:
            starts.append(group)
            group = []
    starts.append(group)
    starts = [g for g in starts if g]
    assert starts[0] == [0, 1, 2, 3]
    queue_left = 6
    for g in starts[1:]:
        assert len(g) >= min(3, queue_left)  # never fewer than refill_min unless the queue ends
        queue_left -= len(g)


def test_refill_prompts_are_embedded_while_the_previous_steps_run(model, conds):
    """The host embeds the next requests' prompts right after launching a check's steps, so
    that the GPU is not idle while it does: a refill's prompts were embedded before the host
    harvested the rows it refills (its "finish" events), each prompt once."""
    from ttsbatch.engine.t3_fast import FastT3

    f = FastT3(model)
    row_input, prefill = f.row_input, f.prefill
    # logged into f.trace, beside its ("start"/"finish", request, row) events, in order
    f.row_input = lambda conds, req, *a: f.trace.append(("input", req.seed)) or row_input(conds, req, *a)
    f.prefill = lambda st, rows, inputs: f.trace.append(("prefill", [x.seed for x in inputs])) or prefill(st, rows, inputs)
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(f"Sentence number {i} here.", 300 + i, 3 + i % 4) for i in range(9)]
    got = dict(f.generate(conds, reqs, gen, max_rows=2, check_every=2, sort=False, refill_min=1))
    assert got == dict(FastT3(model).generate(conds, reqs, gen, max_rows=2, check_every=2, sort=False, refill_min=1))
    ev = f.trace
    assert sorted(e[1] for e in ev if e[0] == "input") == [r.seed for r in reqs]  # each prompt embedded once
    refills = [i for i, e in enumerate(ev) if e[0] == "prefill"]
    assert len(refills) >= 4
    for at in refills[1:]:
        for seed in ev[at][1]:
            made = ev.index(("input", seed))
            assert any(e[0] == "finish" for e in ev[made:at]), (seed, ev)


def test_s3gen_collections_start_small_then_grow(model, conds):
    """The first S3Gen collection is one S3Gen batch (early first audio), later ones ``collect``,
    with T3 on S3Gen's thread or on its own (``overlap``); with ``s3gen_take="ready"`` later
    ones are at most ``collect``."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest(f"Words {i}.", 300 + i, 2 + i % 3) for i in range(8)]
    for overlap in (False, True):
        engine = FastEngine(model, s3gen_batch=2, s3gen_collect=3, overlap=overlap)
        assert [len(g) for g in engine._groups(reqs, conds, gen)] == [2, 3, 3]
    ready = FastEngine(model, s3gen_batch=2, s3gen_collect=3, overlap=True, s3gen_take="ready")
    sizes = [len(g) for g in ready._groups(reqs, conds, gen)]
    assert sizes[0] == 2 and max(sizes) <= 3 and sum(sizes) == 8


def test_batch_handoff_gives_the_collection_s_audio(model, conds):
    """``s3gen_handoff="batch"``: S3Gen's audio handed over a batch at a time is the audio of
    the default whole-collection handoff, for every request."""
    from ttsbatch.engine.fast import FastEngine

    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest(f"Words {i}.", 500 + i, 2 + i % 4) for i in range(7)]
    whole = FastEngine(model, s3gen_batch=2, s3gen_collect=5).synthesize(reqs, conds, gen)
    by_batch = FastEngine(model, s3gen_batch=2, s3gen_collect=5, s3gen_handoff="batch")
    handed = []
    batches = by_batch.s3.synthesize_iter

    def counted(*a, **k):
        for batch in batches(*a, **k):
            handed.append(len(batch))
            yield batch

    by_batch.s3.synthesize_iter = counted
    got = by_batch.synthesize(reqs, conds, gen)
    assert sum(handed) == len(reqs) and max(handed) <= 2  # a batch (of at most s3gen_batch) at a time
    for a, b in zip(whole, got):
        assert a.tokens == b.tokens and np.array_equal(a.wav, b.wav)
    with pytest.raises(ValueError, match="handoff"):
        FastEngine(model, s3gen_handoff="chunk")


def test_fine_s3gen_buckets_pad_each_batch_to_its_longest_item(model):
    """``s3gen_bucket_frames=2``: a bucket for every even frame count, so a batch is padded to
    its longest item only (the default buckets pad a 70-token item to 192 frames); odd or
    non-positive steps are refused."""
    from ttsbatch.engine.fast import FastEngine
    from ttsbatch.engine.s3gen_batched import DEFAULT_BUCKETS

    default = FastEngine(model, s3gen_batch=4)
    fine = FastEngine(model, s3gen_batch=4, s3gen_bucket_frames=2)
    assert default.s3.buckets == DEFAULT_BUCKETS and fine.s3.buckets[-1] == DEFAULT_BUCKETS[-1]
    voice = types.SimpleNamespace(n_prompt_tokens=10)
    lengths = [70, 66, 65, 3, 40]
    assert [b for b, _ in default.s3.batches(lengths, voice)] == [192, 128]
    assert fine.s3.batches(lengths, voice) == [(140, [0, 1, 2]), (80, [4, 3])]
    assert [b for b, _ in FastEngine(model, s3gen_batch=4, s3gen_bucket_frames=32).s3.batches(lengths, voice)] == [160, 96]
    for bad in (3, 0):
        with pytest.raises(ValueError, match="even"):
            FastEngine(model, s3gen_batch=4, s3gen_bucket_frames=bad)


def test_compiled_layers_give_the_same_tokens_and_compile_once(model, conds, fast):
    """``compile_layers=True``: each layer's halves around the attention are compiled regions
    (one graph each for all layers; prefill and decode are the two shapes they see), so is
    the sampling, and the tokens are the eager path's. Dynamo's "eager" backend traces and guards as Inductor's
    would; after the first call, more rows, other lengths and refills add no graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ttsbatch.engine.t3_fast import FastT3

    torch._dynamo.reset()
    counters.clear()
    gen = GenerationOptions(ignore_eos=True)  # top_p < 1 samples eagerly (see sample_rows)
    reqs = _reqs()
    comp = FastT3(model, compile_layers=True, layers_backend="aot_eager", use_graphs="emulate")
    # a look every step: the rows finish one by one, so the tail runs one row (its own graph)
    first = dict(comp.generate(conds, reqs[:3], gen, max_rows=3, check_every=1))
    assert first == dict(fast.generate(conds, reqs[:3], gen, max_rows=3))
    graphs = counters["stats"]["unique_graphs"]
    # layer_in and layer_out, each for prefill (length dynamic) and decode (length 1); the
    # sampling region for one row and for any number of rows above one
    assert graphs == 6
    more = dict(comp.generate(conds, reqs, gen, max_rows=5, check_every=3))  # other rows, lengths, refills
    assert more == dict(fast.generate(conds, reqs, gen, max_rows=5, check_every=3))
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
    # top-p: the compiled layers with the eager sampling, the same tokens and no new graph
    top_p = GenerationOptions(ignore_eos=True, top_p=0.95)
    assert dict(comp.generate(conds, reqs, top_p, max_rows=5)) == dict(fast.generate(conds, reqs, top_p, max_rows=5))
    assert counters["stats"]["unique_graphs"] == graphs
    assert comp.w.regions.compiled and comp.w.sampling.compiled and not fast.w.regions.compiled
    torch._dynamo.reset()


@pytest.mark.parametrize("graphed_rows", [6, 5], ids=["graphed", "too-big-eager"])
def test_graphed_prefill_pads_rows_by_repeating_the_last_and_equals_the_plain_prefill(model, conds, monkeypatch, graphed_rows):
    """FastT3.prefill with graphs (emulated here): a small prefill runs from a graph, its rows
    padded to a bucket with copies of the last row, its prompts to a multiple of
    PREFILL_LEN_STEP; a bigger one (over GRAPHED_PREFILL_TOKENS) runs eagerly. Either way the
    cache, logits and positions of every real row are the plain prefill's, and other rows
    are untouched."""
    from ttsbatch.engine import t3_fast as tf

    assert [tf.prefill_row_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    gen = GenerationOptions()
    plain, graphed = tf.FastT3(model), tf.FastT3(model, use_graphs="emulate")
    inputs = [plain.row_input(conds, SynthesisRequest(t, 5, 20), gen, 2) for t in TEXTS[:5]]
    rows = [6, 0, 3, 1, 5]  # five rows: a bucket of 6, one padding row (a copy of row 5's sentence)
    L = max(x.embeds.shape[1] for x in inputs)
    padded = -(-L // tf.PREFILL_LEN_STEP) * tf.PREFILL_LEN_STEP
    monkeypatch.setattr(tf, "GRAPHED_PREFILL_TOKENS", graphed_rows * 2 * padded)
    states = []
    for f in (plain, graphed):
        st = tf.DecodeState(f.w, 8, L + 64, 20, 2, 0)
        st.k.fill_(7.0)
        st.v.fill_(7.0)
        if f is plain:
            tf.prefill(f.w, st, rows, inputs)
        else:
            f.prefill(st, rows, inputs)
        states.append(st)
    a, b = states
    assert [k for k in b.graphs if k[0] == "prefill"] == ([("prefill", 6, padded)] if graphed_rows == 6 else [])
    seqs = [r * 2 + j for r in rows for j in range(2)]
    assert torch.equal(a.pos, b.pos) and (a.logits[seqs] - b.logits[seqs]).abs().max().item() <= 1e-4
    for r, x in zip(rows, inputs):
        n = x.embeds.shape[1]
        for c in ("k", "v"):
            live = slice(r * 2, r * 2 + 2)
            assert (getattr(a, c)[:, live, :, :n] - getattr(b, c)[:, live, :, :n]).abs().max().item() <= 1e-4
    for c in ("k", "v"):  # rows 2, 4 and 7 were not prefilled
        for r in (2, 4, 7):
            assert (getattr(b, c)[:, r * 2 : r * 2 + 2] == 7.0).all()
