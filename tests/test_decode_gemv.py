"""The fused decode GEMVs (ttsbatch.engine.decode_gemv) under Triton's interpreter, against
the eager layer they replace (t3_fast.layer_in / layer_out): fp32 to summation order, bf16
within the interpreter's rounding (it truncates fp32 -> bf16 where a GPU rounds to nearest:
tests/gpu/test_t3_gpu.py checks the compiled kernels). The whole fused layer path against
stock T3: tests/test_decode_attention.py.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from ttsbatch.engine.t3_fast import layer_in, layer_out, rms_norm


@pytest.fixture
def gemv():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: the compiled kernels are tested in tests/gpu/test_t3_gpu.py")
    return importlib.import_module("ttsbatch.engine.decode_gemv")


def _weights(dt, d=1024, mlp=1536, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        ln1=torch.rand(d, generator=g) + 0.5,
        wqkv=(torch.randn(3 * d, d, generator=g) * 0.03).to(dt),
        wo=(torch.randn(d, d, generator=g) * 0.03).to(dt),
        ln2=torch.rand(d, generator=g) + 0.5,
        wgu=(torch.randn(2 * mlp, d, generator=g) * 0.03).to(dt),
        wdown=(torch.randn(d, mlp, generator=g) * 0.03).to(dt),
    )


@pytest.mark.parametrize("seqs", [1, 2])
def test_fused_gemvs_equal_the_eager_layer_in_fp32(gemv, seqs):
    w = _weights(torch.float32)
    x = torch.randn(seqs, 1024, generator=torch.Generator().manual_seed(seqs)) * 3
    eps = 1e-5
    # layer_in's GEMM (before RoPE): the norm in fp32, then the fused q/k/v projection
    qkv = gemv.norm_linear(x, w["ln1"], w["wqkv"], eps)
    ref_qkv = F.linear(rms_norm(x, w["ln1"], eps), w["wqkv"])
    assert (qkv - ref_qkv).abs().max().item() <= 1e-5
    # layer_out, the three fused GEMVs against the eager function
    o = torch.randn(seqs, 16, 1, 64, generator=torch.Generator().manual_seed(7))
    ref = layer_out(o, x[:, None], w["wo"], w["ln2"], w["wgu"], w["wdown"], eps)[:, 0]
    h = gemv.linear_residual(o.reshape(seqs, 1024), w["wo"], x)
    out = gemv.linear_residual(gemv.norm_swiglu(h, w["ln2"], w["wgu"], eps), w["wdown"], h)
    assert out.dtype == torch.float32 and out.shape == (seqs, 1024)
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def _truncate_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 -> fp32 as Triton's interpreter casts: by truncation (a GPU rounds to nearest)."""
    return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)


def test_fused_gemvs_in_bf16_round_where_the_eager_layer_rounds(gemv):
    """bf16 weights: the casts of the eager layer (the GEMVs' outputs, SiLU, the gate product;
    not the norm's output, kept fp32 on purpose) happen in the kernels too. The reference rounds
    as the interpreter does (truncating), so the two agree to fp32 summation order, with bf16
    outputs where eager's are."""
    w = _weights(torch.bfloat16)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(3)) * 3
    t = _truncate_to_bf16
    out = gemv.norm_linear(x, w["ln1"], w["wqkv"], 1e-5)
    ref = t(F.linear(rms_norm(x, w["ln1"], 1e-5), w["wqkv"].float()))
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs() > 1e-5).float().mean().item() < 1e-3  # a last-bit flip, rarely
    gate, up = (t(z) for z in F.linear(rms_norm(x, w["ln2"], 1e-5), w["wgu"].float()).chunk(2, -1))
    ref = t(t(F.silu(gate)) * up)
    m = gemv.norm_swiglu(x, w["ln2"], w["wgu"], 1e-5)
    assert m.dtype == torch.bfloat16 and m.shape == (2, 1536)
    assert ((m.float() - ref).abs() > 1e-5).float().mean().item() < 1e-3
    ref = x + t(F.linear(m.float(), w["wdown"].float()))
    out = gemv.linear_residual(m, w["wdown"], x)
    assert out.dtype == torch.float32
    assert ((out - ref).abs() > 1e-5).float().mean().item() < 1e-3


def test_too_many_sequences_or_a_bad_layout_are_refused(gemv):
    w = torch.zeros(64, 128)
    with pytest.raises(ValueError, match="at most"):
        gemv.linear_residual(torch.zeros(gemv.MAX_SEQS + 1, 128), w, torch.zeros(gemv.MAX_SEQS + 1, 64))
    with pytest.raises(ValueError, match="contiguous"):
        gemv.linear_residual(torch.zeros(128, 2).t(), w, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="features"):
        gemv.norm_linear(torch.zeros(2, 64), torch.ones(64), w, 1e-5)


def test_rope_inside_the_attention_kernel_equals_layer_in(gemv):
    """attend_and_cache(rope=...) on layer_in's unrotated q/k: the rotated k lands in the cache
    and the output equals attention over layer_in's rotated q/k."""
    da = importlib.import_module("ttsbatch.engine.decode_attention")
    g = torch.Generator().manual_seed(5)
    S, H, D, L = 3, 4, 64, 128
    x = torch.randn(S, 1, H * D, generator=g)
    ln = torch.rand(H * D, generator=g) + 0.5
    wqkv = torch.randn(3 * H * D, H * D, generator=g) * 0.03
    ang = torch.arange(L)[:, None] * (1e-2 * torch.arange(1, D // 2 + 1))[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1).contiguous()
    sin = torch.cat([ang.sin(), ang.sin()], -1).contiguous()
    pos = torch.tensor([5, 0, 77])
    q, k, v = layer_in(x, ln, wqkv, cos[pos][:, None], sin[pos][:, None], 1e-5, H, D)  # rotated
    qkv = F.linear(rms_norm(x[:, 0], ln, 1e-5), wqkv).view(S, 3, H, 1, D)  # unrotated
    kc, vc = torch.randn(S, H, L, D, generator=g), torch.randn(S, H, L, D, generator=g)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = da.attend_and_cache(q, k, v, kc, vc, pos, L, D**-0.5)
    out = da.attend_and_cache(qkv[:, 0], qkv[:, 1], qkv[:, 2], kc2, vc2, pos, L, D**-0.5, rope=(cos, sin))
    assert (out - ref).abs().max().item() <= 1e-5
    assert (kc2 - kc).abs().max().item() <= 1e-5 and (vc2 - vc).abs().max().item() <= 1e-5  # v: summation order


@pytest.mark.parametrize("with_bias", [True, False])
def test_head_kernel_equals_the_eager_norm_and_head(gemv, with_bias):
    """The batch-1 path's last kernel: T3's final RMSNorm and the fp32 speech head (+ bias),
    written into the logits buffer, against t3_fast._head's eager F.linear."""
    from types import SimpleNamespace

    from ttsbatch.engine.t3_fast import _head

    g = torch.Generator().manual_seed(5)
    vocab = 700  # not a multiple of the block: the last program is masked
    w = SimpleNamespace(norm=torch.rand(1024, generator=g) + 0.5, speech_head=torch.randn(vocab, 1024, generator=g) * 0.03,
                        speech_head_bias=torch.randn(vocab, generator=g) if with_bias else None, eps=1e-5)
    x = torch.randn(2, 1024, generator=g) * 3
    logits = torch.full((4, vocab), 7.0)  # the decode state's buffer, bigger than the rows written
    gemv.norm_linear_bias(x, w.norm, w.speech_head, w.speech_head_bias, w.eps, out=logits[:2])
    ref = _head(w, x)
    assert (logits[:2] - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert torch.equal(logits[2:], torch.full((2, vocab), 7.0))
    with pytest.raises(ValueError, match="fp32"):
        gemv.norm_linear_bias(x, w.norm, w.speech_head.bfloat16(), None, w.eps)


def test_embedding_kernel_repeats_each_rows_token_for_its_pair(gemv):
    """emb[tok] + pos_emb[step] (step past the table clamps to its last row), once per
    sequence of a CFG pair."""
    g = torch.Generator().manual_seed(6)
    emb, pos_emb = torch.randn(50, 256, generator=g), torch.randn(20, 256, generator=g)
    tok, step = torch.tensor([4, 49]), torch.tensor([3, 25])
    x = gemv.embed_tokens(tok, step, emb, pos_emb, 2)
    ref = (emb[tok] + pos_emb[step.clamp(max=19)]).repeat_interleave(2, 0)
    assert x.shape == (4, 256) and torch.equal(x, ref)
