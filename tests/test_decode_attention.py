"""T3's Triton decode attention (ttsbatch.engine.decode_attention), run on the CPU by Triton's
interpreter: against SDPA over the padded cache (the engine's other path), with and without
split keys; the cache write; and the fast engine with the kernel against stock T3 (teacher
forcing, fp32, max abs logit diff <= 1e-4) and against itself without the kernel (tokens).
The compiled kernel on a GPU: tests/gpu/test_t3_gpu.py.
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch
import torch.nn.functional as F

from ttsbatch.config import GenerationOptions
from ttsbatch.engine.stock import SynthesisRequest

from .test_t3_fast import TEXTS, _stock_logits

MODULE = "ttsbatch.engine.decode_attention"


@pytest.fixture
def kernel():
    """The module, its kernels under Triton's interpreter (conftest turns it on before anything
    imports triton, on machines without a GPU): they run on CPU tensors."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: the compiled kernel is tested in tests/gpu/test_t3_gpu.py")
    return importlib.import_module(MODULE)


@pytest.fixture
def engine_kernel(kernel, monkeypatch):
    """The kernel for the whole-engine tests below: 128 key positions a loop iteration, not the
    GPU's 32. The interpreter runs each iteration in Python, so the engine tests (every layer
    of every step) took ~190 s of the CPU suite at 32 and take ~100 s at 128; the kernel at 32,
    its splits and its template boundaries are the kernel tests' (above). ``splits_seen``
    records the split count of every call, for a test to check its keys are still split."""
    monkeypatch.setattr(kernel, "BLOCK_N", 128)
    seen: list[int] = []
    real = kernel.splits_for
    monkeypatch.setattr(kernel, "splits_for", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(kernel, "splits_seen", seen, raising=False)
    return kernel


def _reference(q, k_new, v_new, k_cache, v_cache, pos):
    """The engine's SDPA path: write at pos, attend over positions <= pos, in fp32."""
    S = q.shape[0]
    kr, vr = k_cache.clone(), v_cache.clone()
    kr[torch.arange(S), :, pos] = k_new[:, :, 0]
    vr[torch.arange(S), :, pos] = v_new[:, :, 0]
    L = k_cache.shape[2]
    valid = (torch.arange(L)[None, :] <= pos[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.float(), kr[:S].float(), vr[:S].float(), attn_mask=valid, scale=q.shape[-1] ** -0.5)
    return out, kr, vr


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
@pytest.mark.parametrize("target", [2048, 1], ids=["split-keys", "one-split"])
@pytest.mark.parametrize("seqs,kv_len", [(2, 256), (5, 448), (3, 64)])
def test_kernel_equals_sdpa_and_writes_only_the_new_position(kernel, monkeypatch, target, seqs, kv_len, prefetch):
    """prefetch: each split's first key block is read before the new k/v (as on a GPU with
    programmatic dependent launch); whatever it read past a row's position must not count,
    even NaN."""
    monkeypatch.setattr(kernel, "TARGET_PROGRAMS", target)
    monkeypatch.setattr(kernel, "PREFETCH", prefetch)
    g = torch.Generator().manual_seed(seqs)
    H, D, L = 4, 64, 512
    k_cache, v_cache = (torch.randn(seqs + 2, H, L, D, generator=g) for _ in range(2))  # rows past seqs untouched
    # q as layer_in returns it (a transposed view), k contiguous, v a strided view
    qkv = torch.randn(seqs, 1, 3, H, D, generator=g)
    q, k_new, v_new = (z.transpose(1, 2) for z in qkv.unbind(2))
    k_new = k_new.contiguous()
    pos = torch.randint(0, kv_len, (seqs,), generator=g)
    pos[0], pos[-1] = kv_len - 1, 0  # the last live position of the bound, and the first
    splits = kernel.splits_for(seqs, H, kv_len)
    assert (splits > 1) == (target > 1 and kv_len > kernel.BLOCK_N)
    ref, kr, vr = _reference(q, k_new, v_new, k_cache, v_cache, pos)
    out = kernel.attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, kv_len, D**-0.5)
    assert out.shape == (seqs, H, 1, D)
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)
    past = torch.arange(L)[None, :] > pos[:, None]  # (seqs, L): not live this step
    for cache in (k_cache, v_cache):
        cache[:seqs].masked_fill_(past[:, None, :, None], float("nan"))
    again = kernel.attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, kv_len, D**-0.5)
    assert torch.equal(again, out)


@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
@pytest.mark.parametrize("target", [2048, 1], ids=["split-keys", "one-split"])
def test_template_positions_come_from_the_template(kernel, monkeypatch, target, prefetch):
    """template=(k, v, shared): a sequence's first shared[s] positions are read from the
    shared table, not its own cache (NaN there must not count), the rest as before; the
    same output as SDPA over a cache holding the template's keys there."""
    monkeypatch.setattr(kernel, "TARGET_PROGRAMS", target)
    monkeypatch.setattr(kernel, "PREFETCH", prefetch)
    g = torch.Generator().manual_seed(7)
    S, H, D, L, kv_len = 4, 4, 64, 512, 320
    k_cache, v_cache = (torch.randn(S, H, L, D, generator=g) for _ in range(2))
    tk, tv = (torch.randn(H, 300, D, generator=g) for _ in range(2))
    q, k_new, v_new = (torch.randn(S, H, 1, D, generator=g) for _ in range(3))
    pos = torch.tensor([319, 200, 70, 5])
    shared = torch.tensor([34, 199, 70, 0], dtype=torch.int32)  # within a block, at a boundary, up to pos, none
    assembled_k, assembled_v = k_cache.clone(), v_cache.clone()
    for s in range(S):
        n = int(shared[s])
        assembled_k[s, :, :n], assembled_v[s, :, :n] = tk[:, :n], tv[:, :n]
        k_cache[s, :, :n], v_cache[s, :, :n] = float("nan"), float("nan")
    ref, kr, vr = _reference(q, k_new, v_new, assembled_k, assembled_v, pos)
    out = kernel.attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, kv_len, D**-0.5, template=(tk, tv, shared))
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(k_cache[torch.arange(S), :, pos], k_new[:, :, 0])  # the new position still cached
    plain = kernel.attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, kv_len, D**-0.5)
    assert torch.isnan(plain[:3]).all() and not torch.isnan(plain[3]).any()  # without it, the NaN is read


def test_kernel_in_bf16_within_rounding(kernel):
    g = torch.Generator().manual_seed(1)
    S, H, D, L = 3, 4, 64, 256
    k_cache, v_cache = (torch.randn(S, H, L, D, generator=g).bfloat16() for _ in range(2))
    q, k_new, v_new = (torch.randn(S, H, 1, D, generator=g).bfloat16() for _ in range(3))
    pos = torch.tensor([0, 100, 255])
    ref, kr, vr = _reference(q, k_new, v_new, k_cache, v_cache, pos)
    out = kernel.attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, L, D**-0.5)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() <= 1e-2  # the output's bf16 rounding (|out| < 2)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


@pytest.mark.parametrize("template", [False, True], ids=["", "template"])
@pytest.mark.parametrize("rope", [False, True], ids=["", "rope"])
def test_one_kernel_signature_whatever_the_split_count(kernel, monkeypatch, rope, template):
    """Triton compiles a kernel per signature, each pointer's dtype in it, and the split count
    is a plain argument: a step with one split (many rows, as in a book) and one with many
    (few rows, as in the warm-up) must pass the same dtypes, unused buffers included. With
    bf16 `out` standing in for the fp32 split buffers, a machine's first book compiled a
    kernel the warm-up had not: 1.5-2.0 s on its first step (H100, twenty-seventh session)."""
    real = kernel._attend_split
    signatures = []

    class Spy:  # records what the kernel is launched with, then launches it
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                signatures.append((grid[1], tuple(a.dtype if torch.is_tensor(a) else type(a).__name__ for a in args)))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernel, "_attend_split", Spy())
    g = torch.Generator().manual_seed(3)
    S, H, D, L = 2, 4, 64, 256
    k_cache, v_cache = (torch.randn(S, H, L, D, generator=g).bfloat16() for _ in range(2))
    q, k_new, v_new = (torch.randn(S, H, 1, D, generator=g).bfloat16() for _ in range(3))
    pos = torch.tensor([255, 40])
    extra = {}
    if rope:
        extra["rope"] = (torch.randn(L, D, generator=g), torch.randn(L, D, generator=g))
    if template:
        tk, tv = (torch.randn(H, 64, D, generator=g).bfloat16() for _ in range(2))
        extra["template"] = (tk, tv, torch.tensor([10, 0], dtype=torch.int32))
    outs = []
    for target in (2048, 1):  # many splits, then one
        monkeypatch.setattr(kernel, "TARGET_PROGRAMS", target)
        outs.append(kernel.attend_and_cache(q, k_new.clone(), v_new.clone(), k_cache.clone(), v_cache.clone(), pos, L, D**-0.5, **extra))
    (many, sig_many), (one, sig_one) = signatures
    assert many > 1 and one == 1
    assert sig_one == sig_many
    assert (outs[0].float() - outs[1].float()).abs().max().item() <= 1e-2  # the same attention either way (bf16 output)


def test_splits_spread_few_sequences_over_the_keys(kernel):
    B = kernel.BLOCK_N
    assert kernel.splits_for(2, 16, 8 * B) == 8  # batch 1 (a CFG pair): a block of keys per program
    assert kernel.splits_for(2, 16, B) == 1  # one block of keys: nothing to split
    assert kernel.splits_for(512, 16, 768) == 1  # 8,192 programs already
    assert kernel.splits_for(2, 16, 4096) == kernel.MAX_SPLITS


def test_bad_layout_is_refused(kernel):
    q = k = v = torch.zeros(1, 2, 1, 64)
    cache = torch.zeros(1, 2, 64, 64)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.attend_and_cache(q, k, v, cache, cache.transpose(2, 3), torch.zeros(1, dtype=torch.long), 64, 0.125)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from ttsbatch.engine.model import load_model

    return load_model(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def conds(model):
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    return VoiceCache(model).get(BUILTIN, 0.5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-gemv-layers", "layer-halves"])
def test_fast_t3_with_the_kernel_matches_stock_teacher_forced(engine_kernel, model, conds, fused):
    """Forced tokens, CFG pairs: every step's logits as stock's. One sentence (one pair: the
    fused GEMV layers of decode_gemv), or two sentences of one batch in swapped rows (four
    sequences: the layer halves around the kernel). The shared prompt positions come from
    the voice template."""
    from ttsbatch.engine import t3_fast as tf

    fast = tf.FastT3(model, decode_kernel=True)
    assert fast.w.decode_kernel and fast.decode_kernel_error is None
    engine_kernel.splits_seen.clear()  # the start-up check's short probes run one split
    gen = GenerationOptions(cfg_weight=0.5)
    texts, rows, steps = ([TEXTS[1]], [0], 4) if fused else ([TEXTS[1], TEXTS[3]], [1, 0], 4)
    n = len(texts)
    assert (2 * n <= tf.FUSED_MAX_SEQS) == fused
    forced = torch.randint(0, 6561, (n, steps), generator=torch.Generator().manual_seed(0))
    ref = [_stock_logits(model, conds, t, forced[i].tolist(), 0.5) for i, t in enumerate(texts)]
    reqs = [SynthesisRequest(t, i, steps + 1) for i, t in enumerate(texts)]
    st = fast.new_state(rows=n, max_len=300, max_new=steps + 1, pairs=2)
    st.done.fill_(True)
    fast._ensure_template(st, conds, 200)
    with torch.inference_mode():
        inputs = [fast.row_input(conds, r, gen, 2) for r in reqs]
        tf.prefill(fast.w, st, rows, inputs)
        # the voice template stands in for the conditioning (both sequences) and the uncond
        # sequence's prompt but its BOS pair: their own cached positions are never read
        n_cond = fast.cond_emb(conds).shape[0]
        for i, inp in enumerate(inputs):
            L = inp.embeds.shape[1]
            assert inp.shared == (n_cond, L - 2)
            for j, n_sh in enumerate(inp.shared):
                s = rows[i] * 2 + j
                assert st.shared[s] == n_sh
                st.k[:, s, :, :n_sh] = float("nan")
                st.v[:, s, :, :n_sh] = float("nan")
        for step in range(steps + 1):
            for i in range(n):
                diff = (st.logits[rows[i] * 2 : rows[i] * 2 + 2] - ref[i][step]).abs().max().item()
                assert diff <= 1e-4, f"sentence {i} step {step}: {diff}"
            if step == steps:
                break
            tok = torch.zeros(n, dtype=torch.long)
            for i in range(n):
                tok[rows[i]] = forced[i, step]
            tf.record_tokens(st, n, tok)
            tf.forward_tokens(fast.w, st, n, st.max_len, tok)
    assert set(engine_kernel.splits_seen) == {2}  # every decode step's keys split, at 128 a block


def test_fast_t3_with_the_kernel_gives_the_same_tokens(engine_kernel, model, conds, monkeypatch):
    """A batch of 4 mixed-length sentences in 2 rows (refills; the last one alone in one row,
    through the fused GEMV layers): the same tokens with and without the kernels."""
    from ttsbatch.engine import t3_fast as tf

    fused_steps = []
    real = tf._fused_layers
    monkeypatch.setattr(tf, "_fused_layers", lambda *a: fused_steps.append(1) or real(*a))
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(t, 500 + i, b) for i, (t, b) in enumerate(zip(TEXTS[:4], (4, 6, 2, 5)))]
    plain = dict(tf.FastT3(model, decode_kernel=False).generate(conds, reqs, gen, max_rows=2, check_every=3))
    assert not fused_steps
    with_kernel = tf.FastT3(model, decode_kernel=True)
    fused_steps.clear()  # the start-up check runs one
    assert dict(with_kernel.generate(conds, reqs, gen, max_rows=2, check_every=3)) == plain
    assert len(plain) == 4 and with_kernel.stats["prefills"] >= 2
    assert fused_steps  # the tail, one row alone, went through the fused layers


def test_without_cfg_the_template_holds_the_conditioning(engine_kernel, model, conds):
    """cfg_weight 0 (one sequence a sentence): only the conditioning is shared, and the tokens
    are the plain path's."""
    from ttsbatch.engine import t3_fast as tf

    gen = GenerationOptions(ignore_eos=True, cfg_weight=0.0)
    reqs = [SynthesisRequest(t, 800 + i, 3) for i, t in enumerate(TEXTS[:2])]
    plain = dict(tf.FastT3(model, decode_kernel=False).generate(conds, reqs, gen, max_rows=2))
    fast = tf.FastT3(model, decode_kernel=True)
    assert dict(fast.generate(conds, reqs, gen, max_rows=2)) == plain
    n_cond = fast.cond_emb(conds).shape[0]
    assert fast.state.pairs == 1 and fast.state.shared[:2].tolist() == [n_cond, n_cond]


def test_the_template_adds_no_compiled_graph(engine_kernel, model, conds):
    """The template's prefill runs the compiled layer halves as the refills do (two rows, a
    dynamic length): the same 6 graphs as without it (test_t3_fast), no recompile, no break."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ttsbatch.engine import t3_fast as tf

    torch._dynamo.reset()
    counters.clear()
    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(t, 900 + i, 2) for i, t in enumerate(TEXTS[:3])]
    comp = tf.FastT3(model, compile_layers=True, layers_backend="aot_eager", use_graphs="emulate", decode_kernel=True)
    dict(comp.generate(conds, reqs, gen, max_rows=2))
    assert comp.state.template is not None and comp.w.regions.compiled
    assert counters["stats"]["unique_graphs"] == 6
    assert not counters["recompiles"] and not counters["graph_break"]
    torch._dynamo.reset()


def test_the_voice_template_follows_the_voice(engine_kernel, model):
    """One engine, two voices (a new exaggeration is a new conditioning): the second call
    rebuilds the template, to what a fresh state gets for that voice; and a prompt longer
    than the template holds reads its own cache past the conditioning."""
    from ttsbatch.engine import t3_fast as tf
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    gen = GenerationOptions(ignore_eos=True)
    reqs = [SynthesisRequest(TEXTS[1], 700, 1)]
    a, b = VoiceCache(model).get(BUILTIN, 0.5), VoiceCache(model).get(BUILTIN, 1.5)
    fast = tf.FastT3(model, decode_kernel=True)
    dict(fast.generate(a, reqs, gen, max_rows=1))
    st = fast.state
    cond_a, L = st.template[0], st.template[1]
    tk_a = st.tk[:, :, :L].clone()
    dict(fast.generate(b, reqs, gen, max_rows=1))
    assert fast.state is st and st.template[0] is fast.cond_emb(b) is not cond_a
    fresh = tf.DecodeState(fast.w, 1, st.max_len, 1, 2, st.eos)
    fast._ensure_template(fresh, b, L - cond_a.shape[0])
    assert fresh.template[1] == st.template[1] == L
    assert torch.equal(st.tk[:, :, :L], fresh.tk[:, :, :L]) and not torch.allclose(st.tk[:, :, :L], tk_a)
    n_cond = cond_a.shape[0]
    st.template = (st.template[0], n_cond + 3)  # as if it held 3 text positions only
    assert fast.row_input(b, reqs[0], gen, 2).shared == (n_cond, n_cond)


def test_a_failing_kernel_falls_back_to_sdpa(engine_kernel, monkeypatch, model, caplog):
    from ttsbatch.engine.t3_fast import FastT3

    def broken(*a, **k):
        raise RuntimeError("no Triton compiler here")

    monkeypatch.setattr(engine_kernel, "attend_and_cache", broken)
    with caplog.at_level(logging.WARNING, logger="ttsbatch"):
        fast = FastT3(model, decode_kernel=True)
    assert not fast.w.decode_kernel
    assert fast.decode_kernel_error == "RuntimeError: no Triton compiler here"
    assert "Triton decode kernels failed" in caplog.text


def test_a_wrong_fused_gemv_is_caught_at_start(engine_kernel, monkeypatch, model):
    """The start-up check runs the fused batch-1 layer too: a GEMV that drops its product
    (the residual alone) turns the kernels off instead of producing noise."""
    from ttsbatch.engine import decode_gemv
    from ttsbatch.engine.t3_fast import FastT3

    monkeypatch.setattr(decode_gemv, "linear_residual", lambda x, w, res: res.clone())
    fast = FastT3(model, decode_kernel=True)
    assert not fast.w.decode_kernel
    assert fast.decode_kernel_error.startswith("wrong fused layer result")
