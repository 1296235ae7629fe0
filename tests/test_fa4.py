"""The FA4 launcher (ttsbatch.engine.fa4.FA4Varlen) on the CPU, against a stand-in for
``flash_attn.cute.interface`` built as FA4 is: a public function that looks its compiled
kernel up in ``_flash_attn_fwd.compile_cache`` and calls it with the tensors (detached) among
other arguments. The real kernel's bit-for-bit test is tests/gpu/test_s3gen_gpu.py."""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from ttsbatch.engine.fa4 import FA4Varlen


def _kernel(q, k, v, out, lse, scale, cu_q, cu_k, used_q, used_k, page_table, wl, wr, sink, sparse, aux):
    """The 'compiled kernel': masked attention over each row's keys, written into ``out``."""
    T = int(cu_q[1] - cu_q[0])
    B = cu_q.numel() - 1
    H, D = q.shape[1:]
    qs, ks, vs = (t.reshape(B, T, H, D).transpose(1, 2) for t in (q, k, v))
    keep = torch.arange(T) < used_k.view(B, 1, 1, 1)
    out.copy_(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=keep, scale=scale).transpose(1, 2).reshape(B * T, H, D))


def fake_interface(launches_per_call: int = 1):
    iface = types.SimpleNamespace()

    def _flash_attn_fwd():  # only its compile_cache attribute is used, as FA4's
        raise AssertionError

    _flash_attn_fwd.compile_cache = {}
    iface._flash_attn_fwd = _flash_attn_fwd
    iface.compiles = 0

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                               seqused_k=None, softmax_scale=None):
        key = (q.dtype, q.shape[-1])
        if key not in iface._flash_attn_fwd.compile_cache:
            iface.compiles += 1
            iface._flash_attn_fwd.compile_cache[key] = _kernel
        out = torch.empty(q.shape, dtype=q.dtype)
        for _ in range(launches_per_call):
            iface._flash_attn_fwd.compile_cache[key](
                q.detach(), k.detach(), v.detach(), out, None, softmax_scale, cu_seqlens_q, cu_seqlens_k, None, seqused_k,
                None, None, None, None, None, ("aux",),
            )
        return out, None

    iface.flash_attn_varlen_func = flash_attn_varlen_func
    return iface


def _inputs(B=3, T=7, H=2, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B * T, 3 * H * D, generator=g)
    q, k, v = (t.reshape(B * T, H, D) for t in qkv.split(H * D, dim=-1))  # views, as the estimator's
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32)
    used = torch.tensor([T, 3, 5], dtype=torch.int32)[:B]
    return q, k, v, cu, used, T


def _reference(q, k, v, cu, used, T, scale):
    out = torch.empty(q.shape)
    _kernel(q, k, v, out, None, scale, cu, cu, None, used, None, None, None, None, None, None)
    return out


def test_the_first_call_of_a_layout_is_public_and_the_rest_launch_the_recorded_kernel():
    iface = fake_interface()
    fa = FA4Varlen(iface)
    q, k, v, cu, used, T = _inputs()
    first = fa(q, k, v, cu, used, T, 0.5)
    assert (fa.public_calls, fa.direct_calls) == (1, 0)
    assert torch.equal(first, _reference(q, k, v, cu, used, T, 0.5))
    # the plan holds none of the first call's q, k, v or output (their memory would stay taken)
    assert all(fa.plan.args[i] is None for i in fa.plan.slots)
    assert iface._flash_attn_fwd.compile_cache[(q.dtype, 4)] is _kernel  # the cache is FA4's own again

    for seed in (1, 2, 3):  # new q, k, v (a block's projections), the same layout objects
        q2, k2, v2, *_ = _inputs(seed=seed)
        out = fa(q2, k2, v2, cu, used, T, 0.5)
        assert torch.equal(out, _reference(q2, k2, v2, cu, used, T, 0.5))
        assert out.data_ptr() not in (first.data_ptr(), q2.data_ptr())
    assert (fa.public_calls, fa.direct_calls, iface.compiles) == (1, 3, 1)


def test_a_new_layout_scale_or_shape_takes_the_public_path_again():
    fa = FA4Varlen(fake_interface())
    q, k, v, cu, used, T = _inputs()
    fa(q, k, v, cu, used, T, 0.5)
    # equal values in new tensors (the next Euler step's views): planned anew, not trusted
    cu2, used2 = cu.clone(), torch.tensor([2, 7, 1], dtype=torch.int32)
    out = fa(q, k, v, cu2, used2, T, 0.5)
    assert torch.equal(out, _reference(q, k, v, cu2, used2, T, 0.5))
    assert (fa.public_calls, fa.direct_calls) == (2, 0)
    out = fa(q, k, v, cu2, used2, T, 0.25)  # another scale
    assert torch.equal(out, _reference(q, k, v, cu2, used2, T, 0.25))
    q4, k4, v4, cu4, used4, T4 = _inputs(B=2, T=9, seed=4)  # another shape
    out = fa(q4, k4, v4, cu4, used4, T4, 0.25)
    assert torch.equal(out, _reference(q4, k4, v4, cu4, used4, T4, 0.25))
    assert (fa.public_calls, fa.direct_calls) == (4, 0)
    fa(q4.contiguous(), k4.contiguous(), v4.contiguous(), cu4, used4, T4, 0.25)  # other strides
    assert (fa.public_calls, fa.direct_calls) == (5, 0)
    fa(q4, k4, v4, cu4, used4, T4, 0.25)
    assert fa.direct_calls == 0  # the contiguous call re-planned for its strides
    fa(q4, k4, v4, cu4, used4, T4, 0.25)
    assert fa.direct_calls == 1


def test_an_unexpected_launch_turns_direct_calls_off_and_stays_correct(caplog):
    fa = FA4Varlen(fake_interface(launches_per_call=2))  # not the one launch a call should make
    q, k, v, cu, used, T = _inputs()
    with caplog.at_level(logging.WARNING, logger="ttsbatch"):
        for _ in range(3):
            out = fa(q, k, v, cu, used, T, 0.5)
            assert torch.equal(out, _reference(q, k, v, cu, used, T, 0.5))
    assert (fa.public_calls, fa.direct_calls, fa.direct, fa.plan) == (3, 0, False, None)
    assert "not recorded as expected (2 launches)" in caplog.text
