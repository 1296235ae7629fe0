"""Batched S3Gen against stock ``S3Gen`` per chunk (tiny random checkpoint, CPU, fp32).

Faithfulness uses stock's own noise: stock draws the CFM start noise with ``torch.randn_like``
and HiFiGAN's source phase/sine noise with ``torch.rand``/``torch.randn_like``; the test
patches those to return injected tensors and gives the same tensors to the batched path.

Tolerances (fp32, observed ~4e-6 on the mel and ~2e-7 on the waveform):
- mel: max abs diff <= 1e-4 (values up to ~6), over every frame of every item;
- waveform: max abs diff <= 1e-5 (amplitude ~0.1), over every sample, the last ones included
  (batched HiFiGAN masks each conv's output past the item's end, so it sees what stock sees).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ttsbatch.engine.s3gen_batched import BatchedS3Gen, length_mask, length_mask_f

MEL_TOL = 1e-4
WAV_TOL = 1e-5
LENGTHS = (7, 19, 33, 50)
STEPS = 10  # stock's default n_cfm_timesteps


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from ttsbatch.engine.model import load_model

    return load_model(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def gen(model):
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    return VoiceCache(model).get(BUILTIN, 0.5).gen


@pytest.fixture(scope="module")
def bs(model):
    return BatchedS3Gen(model)


@pytest.fixture(scope="module")
def voice(bs, gen):
    return bs.prepare_voice(gen)


@pytest.fixture(scope="module")
def case(voice):
    """Tokens of mixed lengths and stock-shaped noise for each item."""
    g = torch.Generator().manual_seed(1234)
    toks = [torch.randint(0, 6561, (n,), generator=g) for n in LENGTHS]
    z = [torch.randn(1, 80, 2 * (voice.n_prompt_tokens + n), generator=g) for n in LENGTHS]
    u = [torch.rand(1, 9, 1, generator=g) for _ in LENGTHS]  # what stock's Uniform draws with torch.rand
    sine = [torch.randn(1, 9, voice.item_frames(n) * 480, generator=g) for n in LENGTHS]
    lo, hi = torch.tensor(-math.pi), torch.tensor(math.pi)
    phase = [lo + x[0] * (hi - lo) for x in u]  # Uniform(-pi, pi).sample, as stock computes it
    return dict(toks=toks, z=z, u=u, sine=sine, phase=phase)


@pytest.fixture(scope="module")
def stock(model, gen, case):
    """Stock ``S3Gen.inference`` per chunk with the injected noise: (mels, wavs)."""
    s3 = model.s3gen
    mels, wavs = [], []
    real_randn_like, real_rand, real_hift = torch.randn_like, torch.rand, s3.hift_inference
    for i, toks in enumerate(case["toks"]):

        def randn_like(t, *a, i=i, **k):
            if t.dim() == 3 and t.shape[1] == 80:  # CFM: z = randn_like(mu), prompt + item frames
                assert t.shape == case["z"][i].shape
                return case["z"][i].clone().to(t)
            if t.dim() == 3 and t.shape[1] == 9:  # SineGen's noise
                assert t.shape == case["sine"][i].shape
                return case["sine"][i].clone().to(t)
            return torch.zeros_like(t)  # SourceModuleHnNSF's noise branch (unused at inference)

        def rand(*shape, i=i, **k):  # SineGen's Uniform(-pi, pi) phase
            return case["u"][i].clone()

        def hift(speech_feat, cache_source=None):
            mels.append(speech_feat[0].clone())
            return real_hift(speech_feat, cache_source)

        torch.randn_like, torch.rand, s3.hift_inference = randn_like, rand, hift
        try:
            wav, _ = s3.inference(speech_tokens=toks, ref_dict=gen, n_cfm_timesteps=STEPS)
        finally:
            torch.randn_like, torch.rand = real_randn_like, real_rand
            del s3.hift_inference  # back to the class's method
        wavs.append(wav[0].numpy().copy())
    assert s3.hift_inference == real_hift
    return mels, wavs


def test_mel_matches_stock(bs, voice, case, stock):
    mels = bs.synthesize_mels(case["toks"], voice, STEPS, noise=[z[0] for z in case["z"]])
    for n, ref, got in zip(LENGTHS, stock[0], mels):
        assert got.shape == ref.shape == (80, 2 * n)
        diff = (got - ref).abs().max().item()
        assert diff <= MEL_TOL, f"{n} tokens: mel differs by {diff}"


def test_wav_matches_stock(bs, voice, case, stock):
    wavs = bs.synthesize(
        case["toks"],
        voice,
        STEPS,
        noise=[z[0] for z in case["z"]],
        source_noise=[(p, s[0]) for p, s in zip(case["phase"], case["sine"])],
    )
    for n, ref, got in zip(LENGTHS, stock[1], wavs):
        assert got.dtype == np.float32 and got.shape == ref.shape == (2 * n * 480,)
        diff = float(np.abs(got - ref).max())
        tail = float(np.abs(got[-2000:] - ref[-2000:]).max())
        assert diff <= WAV_TOL and tail <= WAV_TOL, f"{n} tokens: wav differs by {diff} (last 2000: {tail})"
        assert np.abs(ref).max() > 100 * WAV_TOL  # not trivially silent


def test_buckets_and_lengths(model, voice):
    bs = BatchedS3Gen(model, buckets=(32, 64, 128), max_batch=3)
    lengths = [7, 16, 17, 33, 64, 65, 100, 0]
    assert [bs.bucket_for(n) for n in lengths[:-1]] == [32, 32, 64, 128, 128, 256, 256]
    # longest first, neighbours by length together, sizes evened out (7 items at 3 a batch:
    # 3, 2, 2), each batch padded to its longest item's bucket; the empty item is skipped
    assert bs.batches(lengths, voice) == [(256, [6, 5, 4]), (128, [3, 2]), (32, [1, 0])]
    assert voice.n_prompt_frames == 2 * voice.n_prompt_tokens  # so items get exactly 2 frames per token
    g = torch.Generator().manual_seed(7)
    toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lengths]
    wavs = bs.synthesize(toks, voice, n_timesteps=2, seeds=list(range(len(toks))))
    assert [w.shape[0] for w in wavs] == [2 * n * 480 for n in lengths]
    mels = bs.synthesize_mels(toks[:3], voice, n_timesteps=2)
    assert [m.shape for m in mels] == [(80, 2 * n) for n in lengths[:3]]
    assert all(np.isfinite(w).all() for w in wavs)


def test_batches_are_full_and_cover_every_item(model, voice):
    bs = BatchedS3Gen(model, max_batch=64)
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 300, (300,), generator=g).tolist()
    got = bs.batches(lengths, voice)
    items = [i for _, idxs in got for i in idxs]
    assert sorted(items) == [i for i, n in enumerate(lengths) if n > 0]  # each non-empty item once
    n = len(items)
    k = -(-n // 64)
    assert len(got) == k and {len(idxs) for _, idxs in got} <= {n // k, -(-n // k)}  # as few batches as fit, even
    for bucket, idxs in got:
        assert all(bs.bucket_for(lengths[i]) <= bucket for i in idxs)  # every item fits its batch's padding
        assert bucket == bs.bucket_for(lengths[idxs[0]]) == bs.bucket_for(max(lengths[i] for i in idxs))


def test_synthesize_iter_hands_over_each_batch_with_synthesize_s_audio(model, voice):
    """``synthesize_iter``: the same waveforms as ``synthesize``, a padded batch at a time in
    the order the batches run (empty items first), every item exactly once."""
    bs = BatchedS3Gen(model, buckets=(32, 64, 128), max_batch=2)
    g = torch.Generator().manual_seed(5)
    lengths = [9, 0, 40, 12, 33, 7]
    toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lengths]
    seeds = [11, 12, 13, 14, 15, 16]
    want = bs.synthesize(toks, voice, n_timesteps=2, seeds=seeds)
    got = list(bs.synthesize_iter(toks, voice, n_timesteps=2, seeds=seeds))
    assert [[i for i, _ in batch] for batch in got] == [[1]] + [idxs for _, idxs in bs.batches(lengths, voice)]
    for batch in got:
        for i, wav in batch:
            assert wav.dtype == np.float32 and np.array_equal(wav, want[i])


@pytest.mark.parametrize("iterate", [False, True])
def test_late_items_join_the_last_batch_with_their_own_audio(model, voice, iterate):
    """``late`` (``FastEngine``'s last chunks): asked once, before the last batch is launched;
    its items join that batch while it stays within ``join_limit`` (a quarter over
    ``max_batch``), else they are batched with it as usual; either way every item, late or
    not, gets the waveform it gets alone (within WAV_TOL), the late ones after the others
    (``synthesize``) or with indices after theirs (``synthesize_iter``), empty ones skipped."""
    bs = BatchedS3Gen(model, buckets=(32, 64, 128), max_batch=4)
    g = torch.Generator().manual_seed(7)
    lengths = [9, 40, 12, 33, 7, 21]  # two batches of three
    toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lengths]
    late_toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in (45, 0, 5, 30, 18)]
    seeds = [11, 12, 13, 14, 15, 16]
    late_seeds = [21, 22, 23, 24, 25]
    alone = bs.synthesize(toks + late_toks, voice, n_timesteps=2, seeds=seeds + late_seeds)
    assert bs.join_limit(128, voice) == 5
    # the last batch's 3 items and 2 late ones (and an empty one) fit one batch of 5; with 4 they do not
    for joining, batches in ((3, 2), (5, 3)):
        extra = list(zip(late_toks, late_seeds))[:joining]
        asked = []

        def late():
            asked.append(bs.times.batches)  # batches launched before it is asked
            return extra

        b0 = bs.times.batches
        if iterate:
            out = {i: w for batch in bs.synthesize_iter(toks, voice, n_timesteps=2, seeds=seeds, late=late) for i, w in batch}
        else:
            out = dict(enumerate(bs.synthesize(toks, voice, n_timesteps=2, seeds=seeds, late=late)))
        assert asked == [b0 + 1]  # once, after the first of the two planned batches
        assert bs.times.batches - b0 == batches
        said = [i for i, (t, _) in enumerate(extra) if len(t)]
        # the empty late item (index 7) only as an entry of synthesize's list
        assert sorted(out) == sorted(list(range(6)) + [6 + i for i in said] + ([] if iterate else [7]))
        for j in range(6):
            assert float(np.abs(out[j] - alone[j]).max()) <= WAV_TOL
        for i in said:
            assert out[6 + i].shape == alone[6 + i].shape
            assert float(np.abs(out[6 + i] - alone[6 + i]).max()) <= WAV_TOL
    with pytest.raises(ValueError, match="late"):
        bs.synthesize(toks, voice, n_timesteps=2, noise=[torch.zeros(80, 1)] * 6, late=lambda: [])


def test_item_independent_of_neighbours_and_bucket(model, bs, voice):
    g = torch.Generator().manual_seed(11)
    item = torch.randint(0, 6561, (19,), generator=g)
    others = [torch.randint(0, 6561, (n,), generator=g) for n in (50, 3, 19)]
    alone = bs.synthesize([item], voice, n_timesteps=3, seeds=[5])[0]
    # with neighbours, in a bigger bucket (padded to 128 frames instead of 64)
    wide = BatchedS3Gen(model, buckets=(128,))
    mixed = wide.synthesize([others[0], item, others[1], others[2]], voice, n_timesteps=3, seeds=[1, 5, 2, 3])
    assert mixed[1].shape == alone.shape == (19 * 2 * 480,)
    assert float(np.abs(mixed[1] - alone).max()) <= WAV_TOL
    # same tokens, other seed: other audio; the neighbour with the same tokens but seed 3 differs too
    assert float(np.abs(mixed[3] - alone).max()) > 1e-3
    again = bs.synthesize([item], voice, n_timesteps=3, seeds=[5])[0]
    assert np.array_equal(again, alone)


def test_mask_helpers():
    lengths = torch.tensor([0, 2, 5])
    m = length_mask(lengths, 5)
    assert m.tolist() == [[False] * 5, [True, True, False, False, False], [True] * 5]
    assert length_mask_f(lengths, 5).shape == (3, 1, 5)


@pytest.mark.parametrize("conv", ["native", "gemm"])
def test_per_bucket_work_has_no_host_reads(monkeypatch, model, voice, conv):
    """The per-bucket work (encoder, CFM, HiFiGAN on staged device tensors) never reads a
    tensor back (.item, .tolist, bool/int/float of a tensor, .numpy, .cpu) and builds no
    tensor from Python data (torch.tensor). On CPU that is the observable part of "no host
    sync"; the GPU test below runs the same work under CUDA's sync-debug mode "error"."""
    bs = BatchedS3Gen(model, conv=conv)
    toks = [list(range(1, 20)), list(range(100, 105))]
    n_tok = 32
    tokens, lengths = bs._stage_tokens(toks, voice, n_tok)
    T_mel = 2 * tokens.shape[1]
    S = (T_mel - voice.n_prompt_frames) * 480
    z, phase, sine = bs._stage_noise([0, 1], toks, voice, T_mel, S, None, None, [0, 1])
    bs._pos_emb(0, tokens.shape[1]), bs._pos_emb(1, T_mel)  # per-size tables are set up once, before

    def forbidden(name):
        def f(*a, **k):
            raise AssertionError(f"host read in the per-bucket work: {name}")

        return f

    from ttsbatch.engine.s3gen_batched import pack_layout

    layout = pack_layout([2 * (voice.n_prompt_tokens + len(t)) for t in toks], T_mel, bs.pack_gap, "cpu")
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    monkeypatch.setattr(torch, "tensor", forbidden("torch.tensor"))
    with torch.inference_mode():
        wav = bs.run_bucket(tokens, lengths, z, phase, sine, voice, n_timesteps=2)
        packed = bs.run_bucket(tokens, lengths, z, phase, sine, voice, n_timesteps=2, layout=layout)  # the CFM packed
    monkeypatch.undo()
    assert wav.shape == packed.shape == (2, S) and torch.isfinite(wav).all()
    assert (packed - wav).abs().max().item() <= WAV_TOL


@pytest.mark.gpu
def test_gpu_no_sync_and_bf16_close(tiny_checkpoint, no_host_sync):
    """On CUDA: the per-bucket work runs under sync-debug 'error'; bf16 mel is close to fp32."""
    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    m = load_model(tiny_checkpoint, "cuda")
    gen = VoiceCache(m).get(BUILTIN, 0.5).gen
    toks = [list(range(1, 40)), list(range(300, 320)), list(range(7, 70))]
    b32, b16 = BatchedS3Gen(m, dtype=torch.float32), BatchedS3Gen(m, dtype=torch.bfloat16)
    v = b32.prepare_voice(gen)
    tokens, lengths = b32._stage_tokens(toks, v, 64)
    T_mel = 2 * tokens.shape[1]
    S = (T_mel - v.n_prompt_frames) * 480
    z, phase, sine = b32._stage_noise([0, 1, 2], toks, v, T_mel, S, None, None, [0, 1, 2])
    for bs in (b32, b16):  # fp32 (masked SDPA) and bf16 (varlen flash attention where available)
        with torch.inference_mode():
            bs.run_bucket(tokens, lengths, z, phase, sine, v, n_timesteps=2)  # warm-up (lazy inits)
            with no_host_sync():
                wav = bs.run_bucket(tokens, lengths, z, phase, sine, v, n_timesteps=2)
        assert torch.isfinite(wav).all()
    noise = [z[i, :, : 2 * (v.n_prompt_tokens + len(t))] for i, t in enumerate(toks)]
    ref = b32.synthesize_mels(toks, v, 10, noise=noise)
    got = b16.synthesize_mels(toks, v, 10, noise=noise)
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() < 0.25 * a.abs().max().item()


def _estimator_case(g, B, T):
    lengths = torch.randint(T // 3, T + 1, (B,), generator=g)
    lengths[0] = T  # one row fills the bucket, the others are padded
    mask = length_mask_f(lengths, T)
    x, mu, cond = (torch.randn(B, 80, T, generator=g) for _ in range(3))
    spks = torch.randn(B, 80, generator=g)
    t = torch.rand(B, generator=g)
    packed = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, T), cond], dim=1)
    return (x, mask, mu, t, spks, cond), packed


@pytest.mark.parametrize("conv", ["native", "gemm"])
def test_fused_estimator_matches_the_stock_decoder(model, conv, monkeypatch):
    """The CFM estimator as pure functions (cfm_estimator: prepared weights, q/k/v as one
    GEMM, the stream in rows layout) against chatterbox's ``ConditionalDecoder.forward``,
    fp32, padded rows of mixed lengths: max abs diff <= 1e-5 (outputs up to ~4); the causal
    convs as convolutions or as GEMMs over their shifted inputs (``conv="gemm"``), whose row
    tensors are made once for each run of calls of one shape (a batch's Euler steps)."""
    from ttsbatch.engine import cfm_estimator
    from ttsbatch.engine.s3gen_batched import attention_bias

    made = []
    real_rows_aux = cfm_estimator.rows_aux
    monkeypatch.setattr(cfm_estimator, "rows_aux", lambda B, T, *a: made.append((B, T)) or real_rows_aux(B, T, *a))
    est = model.s3gen.flow.decoder.estimator
    bs = BatchedS3Gen(model, conv=conv)
    assert bs.fused is not None and bs.fused.conv == conv  # the checkpoint has the configuration chatterbox-tts ships
    g = torch.Generator().manual_seed(3)
    shapes = ((1, 24), (3, 40), (3, 40), (4, 57), (1, 24))
    for B, T in shapes:
        args, packed = _estimator_case(g, B, T)
        mask = args[1]
        with torch.inference_mode():
            ref = est(*args)
            got = bs._estimator(packed, mask, args[3], attention_bias(mask, bs.heads))
        assert got.shape == ref.shape == (B, 80, T)
        assert (got - ref).abs().max().item() <= 1e-5
        assert ref.abs().max().item() > 0.5
    assert made == ([(1, 24), (3, 40), (4, 57), (1, 24)] if conv == "gemm" else [])


@pytest.mark.parametrize("conv", ["native", "gemm"])
def test_compiled_regions_are_whole_graphs_and_compile_once(model, conv):
    """Compiled, each region is one graph (``fullgraph``: a break would raise) that serves
    every bucket and batch size: after the first shape, new shapes add no graph. Dynamo's
    "eager" backend traces and guards exactly as Inductor's would, without generating code."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ttsbatch.engine import cfm_estimator
    from ttsbatch.engine.s3gen_batched import attention_bias

    torch._dynamo.reset()
    counters.clear()
    eager = BatchedS3Gen(model, conv=conv)
    compiled = BatchedS3Gen(model, compile_regions=True, regions_backend="eager", conv=conv)
    assert compiled.fused.r.compiled and not eager.fused.r.compiled
    g = torch.Generator().manual_seed(5)
    graphs = []
    for B, T in ((2, 40), (4, 56), (6, 40), (2, 88)):
        args, packed = _estimator_case(g, B, T)
        mask, t = args[1], args[3]
        with torch.inference_mode():
            ref = eager._estimator(packed, mask, t, attention_bias(mask, eager.heads))
            got = compiled._estimator(packed, mask, t, attention_bias(mask, eager.heads))
        assert torch.equal(got, ref)
        graphs.append(counters["stats"]["unique_graphs"])
    # one per region, made for the first shape only (block_proj runs only beside cfm_ffn's
    # kernel; the convs' regions or their GEMM twins, not both; the tiny checkpoint's stacks
    # have one block each, so no block's tail is chained to another's head: the next test)
    assert graphs == [len(cfm_estimator.REGIONS) - len(cfm_estimator.FFN_REGIONS) - len(cfm_estimator.MM_REGIONS)
                      - len(cfm_estimator.CHAIN_REGIONS)] * 4
    assert not counters["graph_break"] and not counters["recompiles"]
    torch._dynamo.reset()


def _two_blocks_a_stack(est, seed: int):
    """A copy of the tiny estimator with a second transformer block in every stack (the tiny
    checkpoint keeps one; the real one has 4): the first's weights, perturbed."""
    import copy

    est = copy.deepcopy(est)
    g = torch.Generator().manual_seed(seed)
    stacks = [tbs for _, tbs, _ in est.down_blocks] + [tbs for _, tbs in est.mid_blocks]
    stacks += [tbs for _, tbs, _ in est.up_blocks]
    for tbs in stacks:
        extra = copy.deepcopy(tbs[0])
        with torch.no_grad():
            for p in extra.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        tbs.append(extra)
    return est, len(stacks)


@pytest.mark.parametrize("conv", ["native", "gemm"])
def test_chained_blocks_match_the_stock_decoder_and_the_unchained_regions(model, conv):
    """``chain`` (the default): where a stack goes on, a block's tail and the next block's
    head run as one region (``block_out_in``). Against chatterbox's decoder with two blocks a
    stack, fp32, padded rows of mixed lengths: max abs diff <= 1e-5 (outputs up to ~4); against
    the same estimator unchained: equal (the same ops in the same order); one chained call per
    stack. Compiled (dynamo's "eager" backend), the chained region is one graph for every
    shape, with no break or recompile."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ttsbatch.engine import cfm_estimator
    from ttsbatch.engine.s3gen_batched import attention_bias

    est, stacks = _two_blocks_a_stack(model.s3gen.flow.decoder.estimator, seed=11)
    chained = cfm_estimator.FusedEstimator(est, torch.float32, cfm_estimator.regions(), conv=conv)
    plain = cfm_estimator.FusedEstimator(est, torch.float32, cfm_estimator.regions(), conv=conv, chain=False)
    calls = []
    real = chained.r.block_out_in
    chained.r.block_out_in = lambda *a, **k: calls.append(1) or real(*a, **k)
    heads = est.down_blocks[0][1][0].attn1.heads
    g = torch.Generator().manual_seed(4)
    for B, T in ((3, 40), (2, 24)):
        args, packed = _estimator_case(g, B, T)
        mask, t = args[1], args[3]
        attend = cfm_estimator.sdpa_attend(attention_bias(mask, heads), B, T)
        calls.clear()
        with torch.inference_mode():
            ref = est(*args)
            got = chained(packed, mask, t, attend)
            unchained = plain(packed, mask, t, attend)
        assert len(calls) == stacks
        assert torch.equal(got, unchained)
        assert (got - ref).abs().max().item() <= 1e-5 and ref.abs().max().item() > 0.5

    torch._dynamo.reset()
    counters.clear()
    compiled = cfm_estimator.FusedEstimator(est, torch.float32, cfm_estimator.regions(compile=True, backend="eager"), conv=conv)
    for B, T in ((3, 40), (5, 56), (2, 24)):
        args, packed = _estimator_case(g, B, T)
        mask, t = args[1], args[3]
        attend = cfm_estimator.sdpa_attend(attention_bias(mask, heads), B, T)
        with torch.inference_mode():
            assert torch.equal(compiled(packed, mask, t, attend), chained(packed, mask, t, attend))
    used = len(cfm_estimator.REGIONS) - len(cfm_estimator.FFN_REGIONS)
    used -= len(cfm_estimator.MM_REGIONS if conv == "native" else cfm_estimator.CONV_REGIONS)
    assert counters["stats"]["unique_graphs"] == used
    assert not counters["graph_break"] and not counters["recompiles"]
    torch._dynamo.reset()


def test_the_gemm_convs_regions_are_compiled_with_their_own_inductor_options(monkeypatch):
    """``MM_OPTIONS`` (Inductor writes the conv block's output once instead of recomputing it
    for each tap) reach torch.compile for the GEMM convs' regions only; another backend or a
    compile mode gets none."""
    from ttsbatch.engine import cfm_estimator

    seen = {}

    def fake_compile(fn, **kw):
        seen[fn.__name__] = kw
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfm_estimator.regions(compile=True)
    for name in cfm_estimator.REGIONS:
        want = {"realize_reads_threshold": 1} if name in cfm_estimator.MM_REGIONS else None
        assert seen[name].get("options") == want and seen[name].get("mode") is None
    seen.clear()
    cfm_estimator.regions(compile=True, mode="max-autotune-no-cudagraphs")
    assert all("options" not in kw and kw["mode"] == "max-autotune-no-cudagraphs" for kw in seen.values())


def test_a_failing_compiler_falls_back_to_the_eager_regions(model, caplog):
    """Where torch.compile cannot work (no Triton, a backend error), the estimator runs its
    regions eagerly with one warning, and the book goes on."""
    import logging

    import torch._dynamo

    from ttsbatch.engine.s3gen_batched import attention_bias

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working Triton here")

    torch._dynamo.reset()
    eager = BatchedS3Gen(model)
    bs = BatchedS3Gen(model, compile_regions=True, regions_backend=broken_backend)
    args, packed = _estimator_case(torch.Generator().manual_seed(2), 2, 32)
    mask, t = args[1], args[3]
    with caplog.at_level(logging.WARNING, logger="ttsbatch"), torch.inference_mode():
        got = bs._estimator(packed, mask, t, attention_bias(mask, bs.heads))
        again = bs._estimator(packed, mask, t, attention_bias(mask, bs.heads))
        ref = eager._estimator(packed, mask, t, attention_bias(mask, bs.heads))
    assert torch.equal(got, ref) and torch.equal(again, ref)
    assert not bs.fused.r.compiled and "no working Triton" in bs.fused.r.error
    warnings = [r for r in caplog.records if "uncompiled" in r.getMessage()]
    assert len(warnings) == 1
    torch._dynamo.reset()


def test_unsupported_estimator_runs_the_stock_modules(model, gen, monkeypatch):
    """A checkpoint whose estimator differs from what cfm_estimator mirrors gets the stock
    modules (and refuses to compile regions it cannot build)."""
    from ttsbatch.engine import cfm_estimator

    monkeypatch.setattr(cfm_estimator, "supported", lambda est: False)
    plain = BatchedS3Gen(model)
    assert plain.fused is None and not plain.flash
    with pytest.raises(ValueError, match="compile_regions"):
        BatchedS3Gen(model, compile_regions=True)
    g = torch.Generator().manual_seed(9)
    toks = [torch.randint(0, 6561, (n,), generator=g) for n in (9, 21)]
    fused = BatchedS3Gen(model)
    v = fused.prepare_voice(gen)
    a = plain.synthesize_mels(toks, v, n_timesteps=2)
    b = fused.synthesize_mels(toks, v, n_timesteps=2)
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= MEL_TOL



def test_compiled_encoder_is_one_graph_for_every_batch_and_bucket(model, bs, voice):
    """``compile_encoder=True``: the flow encoder's conformer layers are one region whose
    single graph serves every layer of both stacks (the upsampled one at twice the frames),
    every bucket and batch size, a batch of one included (rows unbacked), with the eager
    encoder's result. Dynamo's "eager" backend traces and guards as Inductor's would."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    comp = BatchedS3Gen(model, compile_encoder=True, regions_backend="eager")
    assert comp.encoder.compiled and not bs.encoder.compiled
    enc = model.s3gen.flow.encoder
    assert len(enc.encoders) >= 1 and len(enc.up_encoders) >= 1  # two stacks, two frame rates, one graph
    g = torch.Generator().manual_seed(9)
    for B, n in ((3, 20), (5, 40), (1, 33), (2, 64)):
        toks = [torch.randint(0, 6561, (n - j,), generator=g).tolist() for j in range(B)]
        tokens, lengths = comp._stage_tokens(toks, voice, n)
        T = tokens.shape[1]
        with torch.inference_mode():
            got = comp._enc_fn(tokens, lengths, comp._pos_emb(0, T), comp._pos_emb(1, 2 * T))
            want = bs._enc_fn(tokens, lengths, bs._pos_emb(0, T), bs._pos_emb(1, 2 * T))
        assert got.shape == (B, 80, 2 * T) and torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"] and not counters["recompiles"]
    torch._dynamo.reset()


def test_attention_choice_is_checked_and_an_unusable_fa4_gives_way(model, caplog):
    """``attention="fa4"`` where FlashAttention 4 cannot run (here: no GPU) warns once and
    keeps the portable attention; an unknown kernel name is an error."""
    with pytest.raises(ValueError, match="fa2"):
        BatchedS3Gen(model, attention="fa3")
    with caplog.at_level("WARNING", logger="ttsbatch"):
        bs = BatchedS3Gen(model, attention="fa4")
    assert bs.attention is None and not bs.flash
    assert "FlashAttention 4 is not usable here" in caplog.text


def test_auto_attention_falls_back_silently(model, caplog):
    """``"auto"`` takes FA4 only where it runs: elsewhere (here: no GPU) the portable
    attention, with no warning."""
    with caplog.at_level("WARNING", logger="ttsbatch"):
        bs = BatchedS3Gen(model, attention="auto")
    assert bs.attention is None and not bs.flash
    assert "FlashAttention" not in caplog.text


def test_ffn_choice_is_checked_and_the_fused_kernel_waits_for_a_gpu(model, caplog):
    """``ffn="triton"`` (cfm_ffn's kernel) runs on CUDA only: here it warns and keeps the
    compiled region; an unknown choice is an error."""
    with pytest.raises(ValueError, match="triton"):
        BatchedS3Gen(model, ffn="cutlass")
    with caplog.at_level("WARNING", logger="ttsbatch"):
        bs = BatchedS3Gen(model, ffn="triton")
    assert bs.ffn == "region" and bs.fused.ffn is None
    assert "fused feed-forward kernel does not run here" in caplog.text


@pytest.mark.parametrize("proj", [True, False, "ffn"])
def test_fused_ffn_kernel_in_the_estimator_matches_the_stock_decoder(model, proj):
    """The estimator with every transformer block's tail as cfm_ffn's kernel (under Triton's
    interpreter; with the output projection inside it, or in the ``block_proj`` region; or
    the feed-forward alone after the ``block_norm3`` region)
    against chatterbox's decoder, fp32: within 2e-3 of outputs up to ~4. The kernel computes
    GELU's tanh form (as the CUDA region does), stock the exact one: that is the difference
    (the kernel alone equals the tanh-form region to 1e-5: tests/test_cfm_ffn.py)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: tests/gpu/test_s3gen_gpu.py runs the compiled kernel")
    from ttsbatch.engine import cfm_ffn
    from ttsbatch.engine.s3gen_batched import attention_bias

    est = model.s3gen.flow.decoder.estimator
    bs = BatchedS3Gen(model)
    calls = []

    def kernel(*args, eps):
        calls.append(proj)
        return cfm_ffn.block_out(*args, eps=eps, proj=proj, config=(32, 32, 32, 4, 1))

    def ffn_kernel(*args):
        calls.append(proj)
        return cfm_ffn.ffn(*args, config=(32, 32, 4, 1))

    if proj == "ffn":  # the feed-forward alone, after the block_norm3 region
        bs.fused.ffn, bs.fused.ffn_input = ffn_kernel, "h"
    else:
        bs.fused.ffn, bs.fused.ffn_input = kernel, "o" if proj else "x"
    g = torch.Generator().manual_seed(3)
    args, packed = _estimator_case(g, 3, 40)
    mask = args[1]
    with torch.inference_mode():
        ref = est(*args)
        got = bs._estimator(packed, mask, args[3], attention_bias(mask, bs.heads))
    f = bs.fused
    assert len(calls) == len(f.down[1]) + sum(len(b) for _, b in f.mid) + len(f.up[1])  # every block
    assert (got - ref).abs().max().item() <= 2e-3 and ref.abs().max().item() > 0.5


# ---- the CFM over packed rows (PackedLayout) -------------------------------------------------


def test_pack_layout_maps_every_item_frame_and_leaves_masked_gaps():
    from ttsbatch.engine.s3gen_batched import pack_layout

    L, T, gap = [5, 9, 1], 10, 2
    lay = pack_layout(L, T, gap, "cpu", align=16)
    assert lay.n == 32 and lay.max_len == 14  # 7 + 11 + 3 = 21 -> 32; the last range takes the tail
    starts = [0, 7, 18]
    cu, used = lay.bounds.tolist()
    assert cu == starts + [32 + s for s in starts] + [64] and used == L + L + [64]
    src, dst, m = lay.src.tolist(), lay.dst.tolist(), lay.mask[0, 0].tolist()
    assert lay.mask.shape == (1, 1, 32)
    for b, (s, n) in enumerate(zip(starts, L)):
        for f in range(T):
            p = dst[b * T + f]
            if f < n:  # an item frame: packed and back again
                assert p == s + f and src[p] == b * T + f and m[p] == 1.0
            else:  # past its end: the masked frame after it
                assert p == s + n and m[p] == 0.0
        assert m[s + n : s + n + gap] == [0.0] * gap  # the causal convs see zeros before the next item
    assert sum(m) == sum(L)
    with pytest.raises(ValueError):
        pack_layout([3, 11], T, gap, "cpu")


@pytest.mark.parametrize("conv", ["native", "gemm"])
def test_packed_cfm_matches_stock(model, voice, case, stock, conv):
    """The CFM over the items end to end (a batch of mixed lengths, one bucket) gives stock's
    mel and waveform, with the padded path's tolerances, and runs over fewer frames; with the
    convs as GEMMs too, whose shifted inputs reach across an item's end into the gap."""
    packed, padded = BatchedS3Gen(model, pack=True, conv=conv), BatchedS3Gen(model, buckets=(128,))
    assert packed.pack and packed.pack_gap == 2 and not padded.pack  # CPU: no flash attention, off unless asked
    noise = [z[0] for z in case["z"]]
    mels = packed.synthesize_mels(case["toks"], voice, STEPS, noise=noise)
    for n, ref, got in zip(LENGTHS, stock[0], mels):
        assert got.shape == ref.shape == (80, 2 * n)
        diff = (got - ref).abs().max().item()
        assert diff <= MEL_TOL, f"{n} tokens: packed mel differs by {diff}"
    padded.synthesize_mels(case["toks"], voice, STEPS, noise=noise)
    assert packed.times.batches == padded.times.batches == 1
    frames = [2 * (voice.n_prompt_tokens + n) for n in LENGTHS]
    assert packed.times.cfm_frames == -(-(sum(frames) + 2 * len(frames)) // 16) * 16
    assert padded.times.cfm_frames == len(frames) * 2 * (voice.n_prompt_tokens + 64)
    src = [(p, s[0]) for p, s in zip(case["phase"], case["sine"])]
    wavs = packed.synthesize(case["toks"], voice, STEPS, noise=noise, source_noise=src)
    for n, ref, got in zip(LENGTHS, stock[1], wavs):
        assert got.shape == ref.shape and float(np.abs(got - ref).max()) <= WAV_TOL


@pytest.mark.parametrize("conv", ["native", "gemm"])
def test_packed_items_need_the_gap(model, voice, case, stock, conv):
    """Without the masked frames between items, an item's first frames would see its
    neighbour's last through the causal convs: the test above can fail."""
    bs = BatchedS3Gen(model, pack=True, conv=conv)
    bs.pack_gap = 0
    mels = bs.synthesize_mels(case["toks"], voice, STEPS, noise=[z[0] for z in case["z"]])
    assert max((got - ref).abs().max().item() for ref, got in zip(stock[0][1:], mels[1:])) > 100 * MEL_TOL


def test_conv_choice_is_checked_and_defaults_to_the_native_convs_on_the_cpu(model):
    """On the CPU oneDNN's convs ran the full-size CFM 6-9% faster than the GEMM path: the
    default there (CUDA's is "gemm")."""
    assert BatchedS3Gen(model).fused.conv == "native"
    with pytest.raises(ValueError, match="conv must be"):
        BatchedS3Gen(model, conv="winograd")


def test_packing_needs_the_fused_estimator(model, monkeypatch):
    from ttsbatch.engine import cfm_estimator

    monkeypatch.setattr(cfm_estimator, "supported", lambda est: False)
    with pytest.raises(ValueError, match="pack=True"):
        BatchedS3Gen(model, pack=True)
    assert not BatchedS3Gen(model).pack
