"""The fast T3 on a CUDA GPU, full-size random checkpoint: bf16 vs fp32, graphs vs eager, memory, no host syncs.

Run on the device machine (skipped without CUDA):

    TTSBATCH_FULL_CKPT=/tmp/ttsbatch-full .venv/bin/pytest -q -s -m gpu tests/gpu/test_t3_gpu.py

``TTSBATCH_FULL_CKPT`` (optional) names a full random checkpoint to reuse; without it one is
written into a temporary directory (a few minutes). ``-s`` shows the measured numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ttsbatch.config import GenerationOptions
from ttsbatch.engine.stock import SynthesisRequest, text_tokens_for

pytestmark = pytest.mark.gpu

TEXTS = [
    "One dollar and eighty-seven cents.",
    "That was all.",
    "And sixty cents of it was in pennies.",
    "Three times Della counted it.",
    "One dollar and eighty-seven cents, and the next day would be Christmas.",
    "There was clearly nothing to do but flop down on the shabby little couch and howl.",
    "So Della did it.",
    "In the vestibule below was a letter-box into which no letter would go, and an electric button.",
    "Also appertaining thereunto was a card bearing the name of Mr. James Dillingham Young.",
    "Jim, darling, she cried, don't look at me that way.",
    "I had my hair cut off and sold because I couldn't have lived through Christmas without giving you a present.",
    "You've cut off your hair? asked Jim, laboriously.",
    "He had paid for the combs.",
    "The old clerk counted the coins again before the lamps were lit.",
    "Yes!",
    "A young woman walked slowly to the corner while the rain kept falling on the roofs of the city.",
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from ttsbatch.engine.model import load_model, write_random_checkpoint

    env = os.environ.get("TTSBATCH_FULL_CKPT")
    if env and (Path(env) / "t3_cfg.safetensors").is_file():
        directory = Path(env)
    else:
        directory = write_random_checkpoint(tmp_path_factory.mktemp("full-ckpt"), "full", seed=0)
    m = load_model(directory, "cuda")
    assert m.random_size == "full", f"expected a full random checkpoint in {directory}, got {m.random_size}"
    return m


@pytest.fixture(scope="module")
def conds(model):
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    return VoiceCache(model).get(BUILTIN, 0.5)


@pytest.fixture(scope="module")
def fast_bf16(model):
    from ttsbatch.engine.t3_fast import FastT3

    f = FastT3(model)
    assert f.w.dtype == torch.bfloat16 and f.use_graphs is True
    return f


@pytest.fixture(scope="module")
def fast_fp32(model):
    from ttsbatch.engine.t3_fast import FastT3

    return FastT3(model, dtype=torch.float32, use_graphs=False)


def _teacher_forced(fast, conds, texts, forced, gen):
    """Logits (steps+1, rows, pairs, V) of the fast path fed ``forced`` (rows, steps)."""
    from ttsbatch.engine import t3_fast as tf

    n, steps = forced.shape
    pairs = 2 if gen.cfg_weight > 0 else 1
    reqs = [SynthesisRequest(t, i, steps + 1) for i, t in enumerate(texts)]
    st = fast.new_state(rows=n, max_len=512, max_new=steps + 1, pairs=pairs)
    st.done.fill_(True)
    fast._ensure_template(st, conds, 200)  # the shared prompt positions read from the voice template
    out = []
    with torch.inference_mode():
        tf.prefill(fast.w, st, list(range(n)), [fast.row_input(conds, r, gen, pairs) for r in reqs])
        out.append(st.logits[: n * pairs].view(n, pairs, -1).clone())  # the buffers may hold more rows
        forced = forced.to(fast.device)
        for k in range(steps):
            tf.record_tokens(st, n, forced[:, k])
            tf.forward_tokens(fast.w, st, n, st.max_len, forced[:, k])
            out.append(st.logits[: n * pairs].view(n, pairs, -1).clone())
    return torch.stack(out)


def _stock_logits(model, conds, text, forced, cfg_weight=0.5):
    """Stock T3.inference's HF forward passes with a forced history: (steps+1, 2, V)."""
    from chatterbox.models.t3.inference.t3_hf_backend import T3HuggingfaceBackend

    t3 = model.t3
    tt = text_tokens_for(model, text)
    dev = t3.device
    with torch.inference_mode():
        embeds, _ = t3.prepare_input_embeds(
            t3_cond=conds.t3, text_tokens=tt, speech_tokens=t3.hp.start_speech_token * torch.ones_like(tt[:, :1]), cfg_weight=cfg_weight
        )
        backend = T3HuggingfaceBackend(config=t3.cfg, llama=t3.tfmr, speech_enc=t3.speech_emb, speech_head=t3.speech_head)
        bos = torch.tensor([[t3.hp.start_speech_token]], device=dev)
        be = t3.speech_emb(bos) + t3.speech_pos_emb.get_fixed_embedding(0)
        kw = dict(output_attentions=True, output_hidden_states=True, return_dict=True)
        out = backend(inputs_embeds=torch.cat([embeds, torch.cat([be, be])], 1), past_key_values=None, use_cache=True, **kw)
        past, logits = out.past_key_values, [out.logits[:, -1].float().clone()]
        for i, tok in enumerate(forced):
            e = t3.speech_emb(torch.tensor([[tok]], device=dev)) + t3.speech_pos_emb.get_fixed_embedding(i + 1)
            out = backend(inputs_embeds=torch.cat([e, e]), past_key_values=past, **kw)
            past = out.past_key_values
            logits.append(out.logits[:, -1].float().clone())
    return torch.stack(logits)


def _sampled_histories(fast, conds, texts, steps):
    """Realistic forced histories: what the bf16 graph path samples (ignore_eos, ``steps`` each)."""
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(t, 500 + i, steps) for i, t in enumerate(texts)]
    got = dict(fast.generate(conds, reqs, gen))
    return torch.tensor([got[i] for i in range(len(texts))])


def test_fp32_fast_matches_stock_on_gpu(model, conds, fast_fp32, fast_bf16):
    steps = 12
    texts = TEXTS[:3]
    forced = _sampled_histories(fast_bf16, conds, texts, steps)
    mine = _teacher_forced(fast_fp32, conds, texts, forced, GenerationOptions())
    worst = 0.0
    for i, t in enumerate(texts):
        ref = _stock_logits(model, conds, t, forced[i].tolist())
        worst = max(worst, (mine[:, i] - ref).abs().max().item())
    print(f"\n[gpu] fp32 fast vs stock HF, teacher forced: max abs logit diff {worst:.2e}")
    assert worst <= 2e-3


def _stock_bf16_logits(model, conds, texts, forced):
    """Stock T3 (HF) cast to bf16, conditioning too, fed ``forced`` (rows, steps): logits
    (steps+1, rows, 2, V), as :func:`_teacher_forced` returns them."""
    import copy
    import types

    m16 = types.SimpleNamespace(t3=copy.deepcopy(model.t3).to(torch.bfloat16), tokenizer=model.tokenizer, device=model.device)
    c16 = copy.copy(conds)
    c16.t3 = copy.deepcopy(conds.t3).to(dtype=torch.bfloat16)
    return torch.stack([_stock_logits(m16, c16, t, forced[i].tolist()) for i, t in enumerate(texts)], 1)


def test_bf16_vs_fp32_top1_agreement(model, conds, fast_fp32, fast_bf16):
    """bf16 (the graph dtype) vs fp32, teacher-forced on the full-size model: top-1 agreement.

    The spec asks for >= 99%. Random weights have near-flat logits (median top-1 margin ~0.07
    where bf16 weight rounding alone moves logits by ~0.003 on average), so a few near-ties
    flip whatever the implementation. The checkpoint's own floor is measured beside it:
    stock T3 cast to bf16, fed the same histories (95.8% on the CPU, scripts/bf16_agreement.py).
    The assertions: >= 99% where fp32's top-1 margin is at least 0.05 (most positions), >= 95%
    overall, and no more than 1.5 points under stock's bf16; all numbers are printed.
    """
    steps = 48
    forced = _sampled_histories(fast_bf16, conds, TEXTS, steps)
    gen = GenerationOptions()
    ref = _teacher_forced(fast_fp32, conds, TEXTS, forced, gen)  # (steps+1, n, 2, V); stock's fp32 within 4e-6
    low = _teacher_forced(fast_bf16, conds, TEXTS, forced, gen)
    stock = _stock_bf16_logits(model, conds, TEXTS, forced)
    agree = ref[:, :, 0].argmax(-1) == low[:, :, 0].argmax(-1)
    stock_raw = (ref[:, :, 0].argmax(-1) == stock[:, :, 0].argmax(-1)).float().mean().item()
    mix = lambda x: x[:, :, 0] + 0.5 * (x[:, :, 0] - x[:, :, 1])  # noqa: E731
    mix_agree = (mix(ref).argmax(-1) == mix(low).argmax(-1)).float().mean().item()
    top2 = ref[:, :, 0].topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    decisive = margin >= 0.05
    diff = (ref - low).abs()
    raw = agree.float().mean().item()
    dec = agree[decisive].float().mean().item()
    flips = margin[~agree]
    print(
        f"\n[gpu] bf16 vs fp32 over {agree.numel()} teacher-forced steps: top-1 agreement {raw:.4f} "
        f"(CFG-mixed {mix_agree:.4f}; stock T3 in bf16 {stock_raw:.4f}); on fp32 margin >= 0.05 "
        f"({decisive.float().mean().item():.0%} of steps): {dec:.4f}; "
        f"logit diff mean {diff.mean().item():.4f} (stock bf16 {(ref - stock).abs().mean().item():.4f}) max {diff.max().item():.3f}; "
        f"median margin {margin.median().item():.3f}; margins at flips {[round(x, 4) for x in flips.tolist()[:12]]}"
    )
    assert decisive.float().mean().item() >= 0.5, "too few decisive positions for the test to mean anything"
    assert dec >= 0.99
    assert raw >= 0.95
    assert raw >= stock_raw - 0.015


def test_graphs_equal_eager_and_refills(model, conds, fast_bf16):
    """Replaying captured graphs gives the tokens eager mode gives, through refills and compaction.

    Exact in fp32. In bf16, cuBLAS and SDPA may pick other kernels under capture than eagerly,
    and random weights have near-tied logits (see the bf16 agreement test), so a row can
    diverge after a near tie: there most requests must still agree, and all have their budget."""
    from ttsbatch.engine.t3_fast import FastT3

    gen = GenerationOptions(ignore_eos=True, top_p=0.95)
    reqs = [SynthesisRequest(t, 900 + i, 20 + 7 * (i % 5)) for i, t in enumerate(TEXTS * 3)]
    fp32_graphed = FastT3(model, dtype=torch.float32)
    assert fp32_graphed.use_graphs is True
    graphed = dict(fp32_graphed.generate(conds, reqs, gen, max_rows=8, check_every=8))
    eager = dict(FastT3(model, dtype=torch.float32, use_graphs=False).generate(conds, reqs, gen, max_rows=8, check_every=8))
    assert fp32_graphed.graph_error is None, f"graph capture failed: {fp32_graphed.graph_error}"
    assert fp32_graphed.stats["graphs_captured"] >= 2
    same32 = sum(graphed[i] == eager[i] for i in range(len(reqs)))

    g16 = dict(fast_bf16.generate(conds, reqs, gen, max_rows=8, check_every=8))
    e16 = dict(FastT3(model, use_graphs=False).generate(conds, reqs, gen, max_rows=8, check_every=8))
    same16 = sum(g16[i] == e16[i] for i in range(len(reqs)))
    print(f"\n[gpu] graphs vs eager: fp32 {same32}/{len(reqs)}, bf16 {same16}/{len(reqs)} requests identical")
    assert fast_bf16.graph_error is None and fast_bf16.stats["graphs_captured"] >= 2
    assert all(len(g16[i]) == len(graphed[i]) == r.budget for i, r in enumerate(reqs))
    assert same32 == len(reqs)
    assert same16 >= 0.75 * len(reqs)


def test_steps_past_a_look_equal_the_plain_schedule_on_gpu(model, conds):
    """``look_ahead`` steps, replayed graphs queued behind a look's non-blocking copies, change
    no token: the look's copies are the rows' state at the look, not after the steps behind
    them. Rows end early at a stand-in end token. fp32; the refills come later, so rows run
    in other batch sizes' graphs, whose GEMMs may differ in the last bit and a near tie flip
    one sampled token: nearly every request must be identical, every one within budget."""
    from ttsbatch.engine.t3_fast import FastT3

    f = FastT3(model, dtype=torch.float32)
    reqs = [SynthesisRequest(t, 700 + i, 20 + 7 * (i % 5)) for i, t in enumerate(TEXTS * 3)]
    first = dict(f.generate(conds, reqs, GenerationOptions(ignore_eos=True), max_rows=8, check_every=8))
    eos = first[0][9]  # a token row 0 samples at step 10: some rows stop early on it
    gen = GenerationOptions(ignore_eos=False)
    plain = dict(f.generate(conds, reqs, gen, max_rows=8, check_every=8, eos_token=eos))
    ahead = dict(f.generate(conds, reqs, gen, max_rows=8, check_every=8, eos_token=eos, look_ahead=3))
    assert f.graph_error is None
    assert any(e[0] == "ahead" for e in f.trace)
    assert any(len(plain[i]) < r.budget for i, r in enumerate(reqs))
    same = sum(ahead[i] == plain[i] for i in range(len(reqs)))
    print(f"\n[gpu] look_ahead 3 against 0: {same}/{len(reqs)} requests identical")
    assert sorted(ahead) == sorted(plain) and all(len(ahead[i]) <= r.budget for i, r in enumerate(reqs))
    assert same >= 0.9 * len(reqs)


def test_batch_invariance_on_gpu_is_close(conds, fast_bf16):
    """bf16 kernels differ by batch size, so GPU batch invariance is approximate: most rows agree."""
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(t, 70 + i, 24) for i, t in enumerate(TEXTS[:8])]
    batch = dict(fast_bf16.generate(conds, reqs, gen, max_rows=8))
    prefix = []
    for i in range(8):
        alone = dict(fast_bf16.generate(conds, [reqs[i]], gen, max_rows=1))[0]
        k = next((j for j, (a, b) in enumerate(zip(alone, batch[i])) if a != b), len(alone))
        prefix.append(k)
    print(f"\n[gpu] batch of 8 vs alone: identical prefix lengths {prefix} (of 24)")
    assert sum(p == 24 for p in prefix) >= 4


def test_decode_steps_never_sync_with_the_host(model, conds, fast_bf16, no_host_sync):
    """Eager decode steps and graph replays run with CUDA sync debug mode set to 'error'."""
    from ttsbatch.engine import t3_fast as tf

    gen = GenerationOptions(ignore_eos=True, top_p=0.9)
    f = fast_bf16
    st = f.new_state(rows=4, max_len=512, max_new=64, pairs=2)
    st.done.fill_(True)
    with torch.inference_mode():
        reqs = [SynthesisRequest(t, i, 40) for i, t in enumerate(TEXTS[:4])]
        tf.prefill(f.w, st, [0, 1, 2, 3], [f.row_input(conds, r, gen, 2) for r in reqs])
        f.step(st, 4, 512, True)  # captures (syncs) once, outside the checked region
        with no_host_sync():
            for _ in range(4):
                tf.decode_one_token(f.w, st, 4, 512, True)
            for _ in range(4):
                f.step(st, 4, 512, True)
    assert int(st.step[:4].min()) == 9


def test_refills_never_sync_with_the_host(model, conds, fast_bf16, no_host_sync):
    """A refill (its prompts embedded, the eager prefill of many rows and the graphed one of
    one row, the rows' state reset) queues its work without waiting for the GPU: in a book
    beside S3Gen every blocking copy waited for T3's queued work and gave up the GIL."""
    from ttsbatch.engine import t3_fast as tf

    gen = GenerationOptions(ignore_eos=True)
    f = fast_bf16
    st = f.new_state(rows=4, max_len=512, max_new=64, pairs=2)
    st.done.fill_(True)
    reqs = [SynthesisRequest(t, i, 40) for i, t in enumerate(TEXTS[:4])]
    again = [SynthesisRequest(t, 10 + i, 30) for i, t in enumerate(TEXTS[:4])]
    with torch.inference_mode():
        tf.prefill(f.w, st, [0, 1, 2, 3], [f.row_input(conds, r, gen, 2) for r in reqs])
        f.prefill(st, [2], [f.row_input(conds, reqs[2], gen, 2)])  # captures its graph (syncs) here
        f.step(st, 4, 512, False)
        with no_host_sync():
            inputs = [f.row_input(conds, r, gen, 2) for r in again]
            tf.prefill(f.w, st, [0, 1, 2, 3], inputs)
            f.prefill(st, [2], inputs[2:3])
            f.step(st, 4, 512, False)
    assert st.budget[:4].tolist() == [30] * 4 and st.step[:4].tolist() == [1] * 4
    assert st.seed_lo[:4].tolist() == [tf.split_seed(10 + i)[0] for i in range(4)]


def test_rows_from_free_memory_and_the_cap(model, conds):
    from ttsbatch.engine.t3_fast import FastT3

    f = FastT3(model)
    free_rows = f.pick_rows(1536, 2)
    held = torch.cuda.memory_reserved() / (1 << 30)
    cap = held + 4.0  # room for ~4 GiB of KV: a handful of rows at 1536 positions
    capped = f.pick_rows(1536, 2, max_vram_gb=cap)
    per_row = f.bytes_per_row(1536, 2) / (1 << 30)
    print(f"\n[gpu] rows: {free_rows} from free memory, {capped} under --max-vram {cap:.1f} (≈{per_row:.2f} GiB per row, {held:.1f} GiB held)")
    assert 1 <= capped < free_rows
    # a run under the cap stays under it
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(t, i, 64) for i, t in enumerate(TEXTS * 4)]
    torch.cuda.reset_peak_memory_stats()
    got = dict(f.generate(conds, reqs, gen, max_vram_gb=cap))
    peak = torch.cuda.max_memory_reserved() / (1 << 30)
    print(f"[gpu] run under the cap: {f.state.rows} rows, peak reserved {peak:.2f} GiB (cap {cap:.1f})")
    assert len(got) == len(reqs) and all(len(v) == 64 for v in got.values())
    assert peak <= cap
    with pytest.raises(Exception, match="GPU memory"):
        f.pick_rows(1536, 2, max_vram_gb=0.5)


def test_fast_engine_end_to_end_on_gpu(model, conds):
    from ttsbatch.engine.fast import FastEngine

    engine = FastEngine(model, max_rows=4)
    gen = GenerationOptions(ignore_eos=True, cfm_steps=4)
    reqs = [SynthesisRequest(t, 40 + i, 50) for i, t in enumerate(TEXTS[:6])]
    results = engine.synthesize(reqs, conds, gen)
    for r in results:
        assert r.tokens > 0 and len(r.wav) > 0 and r.wav.dtype.name == "float32"


def test_fast_engine_stays_under_max_vram(model, conds):
    """T3 and batched S3Gen together, under --max-vram: peak reserved memory within the cap."""
    from ttsbatch.engine.fast import FastEngine

    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved() / (1 << 30)
    cap = held + 12.0
    engine = FastEngine(model, max_vram_gb=cap)
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(t, 70 + i, 150) for i, t in enumerate(TEXTS * 8)]
    torch.cuda.reset_peak_memory_stats()
    results = engine.synthesize(reqs, conds, gen)
    peak = torch.cuda.max_memory_reserved() / (1 << 30)
    print(f"[gpu] fast engine under --max-vram {cap:.1f}: {engine.t3.rows_used} T3 rows, peak reserved {peak:.2f} GiB")
    # stock's clean-up drops ids >= 6561 (and cuts at an end-of-speech id) from random tokens
    assert all(0 < r.tokens <= 150 and len(r.wav) == r.tokens * 2 * 480 for r in results)
    assert peak <= cap


@pytest.mark.parametrize("seqs,kv_len", [(2, 768), (64, 512), (512, 640)])
def test_decode_kernel_equals_padded_sdpa_in_a_graph(seqs, kv_len):
    """The Triton decode attention (split keys at 2 sequences, one split at 512), replayed from
    a CUDA graph, against the engine's other path: SDPA over the padded cache with a mask."""
    import torch.nn.functional as F

    from ttsbatch.engine.decode_attention import attend_and_cache, splits_for

    g = torch.Generator(device="cuda").manual_seed(seqs)
    H, D, L, dt = 16, 64, 1024, torch.bfloat16
    kc, vc = (torch.randn(seqs, H, L, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
    q, kn, vn = (torch.randn(seqs, H, 1, D, device="cuda", dtype=dt, generator=g) for _ in range(3))
    pos = torch.randint(0, kv_len, (seqs,), device="cuda", generator=g)
    kr, vr = kc.clone(), vc.clone()
    idx = torch.arange(seqs, device="cuda")
    kr[idx, :, pos], vr[idx, :, pos] = kn[:, :, 0], vn[:, :, 0]
    valid = (torch.arange(kv_len, device="cuda")[None, :] <= pos[:, None])[:, None, None, :]
    ref = F.scaled_dot_product_attention(q.float(), kr[:, :, :kv_len].float(), vr[:, :, :kv_len].float(), attn_mask=valid, scale=D**-0.5)
    out = torch.empty_like(q)
    attend_and_cache(q, kn, vn, kc.clone(), vc.clone(), pos, kv_len, D**-0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(attend_and_cache(q, kn, vn, kc, vc, pos, kv_len, D**-0.5))
    graph.replay()
    err = (out.float() - ref).abs().max().item()
    print(f"\n[gpu] decode kernel, {seqs} seqs x {kv_len} ({splits_for(seqs, H, kv_len)} splits): max |diff| vs fp32 SDPA {err:.2e}")
    assert err <= 2e-2  # bf16 output rounding (|out| < 2)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


def test_decode_kernel_compiles_once_for_every_batch_and_key_bound():
    """The decode attention's sizes (key bound, split count, chunk) are arguments, not
    constexprs: every (sequences, kv_len) a book meets runs the kernels compiled by the first
    call, so none compiles mid-book (each new kv_len bucket and split count did, on T3's
    thread, before: a machine's first book process ran 4.5-9 s slower than its next ones)."""
    from ttsbatch.engine import decode_attention as da

    H, D, L, dt = 16, 64, 1024, torch.bfloat16
    dev = torch.device("cuda", torch.cuda.current_device())

    def variants(kernel) -> int:
        caches = getattr(kernel, "device_caches", None)  # Triton 3.x: device -> (kernels by key, ...)
        if caches is None:
            pytest.skip("this Triton keeps its compiled kernels elsewhere")
        return sum(len(c[0]) for c in caches.values())

    before = variants(da._attend_split), variants(da._merge_splits)
    splits = set()
    for seqs in (1, 2, 8, 64, 512):
        kc, vc = (torch.zeros(seqs, H, L, D, device=dev, dtype=dt) for _ in range(2))
        q, kn, vn = (torch.randn(seqs, H, 1, D, device=dev, dtype=dt) for _ in range(3))
        for kv_len in (256, 512, 768, 1024):
            pos = torch.full((seqs,), kv_len - 1, device=dev)
            da.attend_and_cache(q, kn, vn, kc, vc, pos, kv_len, D**-0.5)
            splits.add(da.splits_for(seqs, H, kv_len))
    torch.cuda.synchronize()
    assert len(splits) >= 3  # the shapes above do run one, a few and many splits
    assert variants(da._attend_split) - before[0] <= 1 and variants(da._merge_splits) - before[1] <= 1


def test_fused_gemvs_are_as_accurate_as_the_eager_layer_on_gpu():
    """decode_gemv's kernels compiled (round to nearest, unlike the interpreter) against the
    eager bf16 layer they replace: q/k/v no further from the exact fp32 product than eager's
    (the fused norm is not rounded to bf16, eager's is), and the layer's output equal to
    eager's within 2% of its update."""
    import torch.nn.functional as F

    from ttsbatch.engine import decode_gemv as g
    from ttsbatch.engine.t3_fast import layer_out, rms_norm

    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, dt, eps = "cuda", torch.bfloat16, 1e-5
    x = torch.randn(2, 1024, device=dev, generator=gen) * 3
    ln1, ln2 = (torch.rand(1024, device=dev, generator=gen) + 0.5 for _ in range(2))
    wqkv, wo = (torch.randn(n, 1024, device=dev, generator=gen).mul(0.03).to(dt) for n in (3072, 1024))
    wgu, wdown = torch.randn(8192, 1024, device=dev, generator=gen).mul(0.03).to(dt), torch.randn(1024, 4096, device=dev, generator=gen).mul(0.03).to(dt)
    exact = F.linear(rms_norm(x, ln1, eps), wqkv.float())
    fused_err = (g.norm_linear(x, ln1, wqkv, eps).float() - exact).abs().max().item()
    eager_err = (F.linear(rms_norm(x, ln1, eps).to(dt), wqkv).float() - exact).abs().max().item()
    o = torch.randn(2, 16, 1, 64, device=dev, generator=gen).to(dt)
    h = g.linear_residual(o.reshape(2, 1024), wo, x)
    out = g.linear_residual(g.norm_swiglu(h, ln2, wgu, eps), wdown, h)
    ref_out = layer_out(o, x[:, None], wo, ln2, wgu, wdown, eps)[:, 0]
    rel = ((out - ref_out).abs().max() / (ref_out - x).abs().max()).item()
    print(f"\n[gpu] fused GEMVs: q/k/v max |err| vs exact {fused_err:.2e} (eager bf16 {eager_err:.2e}); layer_out vs eager {rel:.2%} of the update")
    assert fused_err <= eager_err * 1.01
    assert rel <= 0.02


def test_fused_small_batch_path_on_gpu(monkeypatch, conds, fast_fp32, fast_bf16):
    """Batch 1 (at most FUSED_MAX_SEQS sequences) decodes through decode_gemv's fused layers:
    teacher-forced against fp32 with the bf16 agreement test's criterion, and against the
    compiled layer halves (the path of bigger batches)."""
    from ttsbatch.engine import t3_fast as tf

    assert fast_bf16.w.decode_kernel, fast_bf16.decode_kernel_error
    texts, steps, gen = TEXTS[:1], 96, GenerationOptions()  # one row: a CFG pair
    forced = _sampled_histories(fast_bf16, conds, texts, steps)
    ref = _teacher_forced(fast_fp32, conds, texts, forced, gen)
    fused = _teacher_forced(fast_bf16, conds, texts, forced, gen)
    monkeypatch.setattr(tf, "FUSED_MAX_SEQS", 0)
    halves = _teacher_forced(fast_bf16, conds, texts, forced, gen)
    top2 = ref[:, :, 0].topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) >= 0.05
    agree = ref[:, :, 0].argmax(-1) == fused[:, :, 0].argmax(-1)
    vs_halves = (fused - halves).abs()
    vs_fp32 = (fused - ref).abs().mean().item()
    print(
        f"\n[gpu] fused small-batch path: top-1 vs fp32 {agree.float().mean().item():.4f}, on decisive steps "
        f"{agree[decisive].float().mean().item():.4f}; logit diff vs fp32 mean {vs_fp32:.4f}; vs the layer halves "
        f"mean {vs_halves.mean().item():.4f} max {vs_halves.max().item():.3f}"
    )
    assert agree[decisive].float().mean().item() >= 0.99
    assert vs_halves.mean().item() <= 2 * (halves - ref).abs().mean().item() + 1e-3  # no further from fp32 than bf16 is
