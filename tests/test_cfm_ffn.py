"""The fused CFM block tail (ttsbatch.engine.cfm_ffn) under Triton's interpreter, against the
region it replaces (cfm_estimator.block_out with GELU's tanh form, the form the CUDA region
computes): fp32 to summation order; bf16 no further from the fp32 result than the bf16
region is (the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: the compiled
kernel is tested in tests/gpu/test_s3gen_gpu.py)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from ttsbatch.engine.cfm_estimator import block_norm3, block_out

CFG = (32, 32, 32, 4, 1)  # small tiles: the interpreter is slow, and N = 70 leaves a partial tile


@pytest.fixture
def ffn():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: the compiled kernel is tested in tests/gpu/test_s3gen_gpu.py")
    return importlib.import_module("ttsbatch.engine.cfm_ffn")


def _args(dt, N=70, C=64, inner=128, hid=256, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    o, x = rnd(N, inner).to(dt), rnd(N, C) * 2
    wo, bo = rnd(C, inner, scale=inner ** -0.5).to(dt), rnd(C, scale=0.1).to(dt)
    nw, nb = 1 + rnd(C, scale=0.1), rnd(C, scale=0.1)
    w1, b1 = rnd(hid, C, scale=C ** -0.5).to(dt), rnd(hid, scale=0.1).to(dt)
    w2, b2 = rnd(C, hid, scale=hid ** -0.5).to(dt), rnd(C, scale=0.1).to(dt)
    return o, x, wo, bo, nw, nb, w1, b1, w2, b2


def _region(args):
    return block_out(*args, eps=1e-5, approximate="tanh")


@pytest.mark.parametrize("proj", [True, False])
def test_fused_block_out_equals_the_region_in_fp32(ffn, proj):
    args = _args(torch.float32)
    want = _region(args)
    o, x, wo, bo = args[:4]
    xin = x if proj else F.linear(o, wo, bo) + x  # proj=False: the caller did the projection
    got = ffn.block_out(o, xin, wo, bo, *args[4:], eps=1e-5, proj=proj, config=CFG)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(x, args[1])  # the residual input is not written


def _truncate(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 -> fp32 as Triton's interpreter casts: by truncation (a GPU rounds to nearest)."""
    return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)


def _region_truncating(o, x, wo, bo, nw, nb, w1, b1, w2, b2, eps=1e-5):
    """The bf16 region's casts, each truncating as the interpreter's do."""
    f = [t.float() for t in (o, wo, bo, w1, b1, w2, b2)]
    o, wo, bo, w1, b1, w2, b2 = f
    x1 = _truncate(F.linear(o, wo, bo)) + x
    h = _truncate(F.layer_norm(x1, x1.shape[-1:], nw, nb, eps))
    g = _truncate(F.gelu(F.linear(h, w1, b1), approximate="tanh"))
    return _truncate(F.linear(g, w2, b2)) + x1


def test_fused_block_out_in_bf16_rounds_where_the_bf16_region_does(ffn):
    args = _args(torch.bfloat16, seed=1)
    exact = _region([t.float() for t in args])
    scale = exact.abs().max().item()
    got = ffn.block_out(*args, eps=1e-5, config=CFG)
    # the region's casts, truncating: the same result up to fp32 summation order (which may
    # move a value across a truncation boundary: one bf16 step, 2^-8 relative, now and then)
    emulated = _region_truncating(*args)
    diff = (got - emulated).abs()
    assert diff.max().item() <= 2 ** -7 * scale and diff.mean().item() <= 1e-5 * scale
    # and bf16 at all: as far from fp32 as the bf16 region, within what truncation adds
    err_region = (_region(args) - exact).abs().max().item()
    assert 0 < err_region < 0.02 * scale and (got - exact).abs().max().item() <= 4 * err_region


def test_the_kernel_takes_the_estimators_shapes_only(ffn):
    assert ffn.supported(256, 512, 1024, True)
    assert not ffn.supported(256, 512, 1024, False)  # a missing bias
    assert not ffn.supported(320, 512, 1024, True) and not ffn.supported(512, 512, 2048, True)


def test_tuning_times_each_configuration_at_scale_and_keeps_the_fastest_that_runs(ffn):
    """``Tuned`` times every configuration once (here a stand-in for Triton's ``do_bench``,
    which needs CUDA events) on ``rows`` rows of the call's widths, skips one that fails to
    compile or launch, and runs every call with the fastest."""
    configs = [(32, 32, 32, 4, 1), (32, 32, 64, 4, 1), (64, 32, 32, 4, 1)]
    times = iter([2.0, RuntimeError("out of resources: shared memory"), 1.5])
    rows_seen = []

    def bench(fn, warmup, rep):
        t = next(times)
        if isinstance(t, Exception):
            raise t
        rows_seen.append(fn().shape[0])  # the kernel runs, on the tuning rows
        return t

    args = _args(torch.float32)
    tuned = ffn.Tuned(configs=configs, rows=48)
    assert tuned._time_configs(bench, args, {"eps": 1e-5}) == configs[2]
    assert tuned.timings == {configs[0]: 2.0, configs[1]: "RuntimeError", configs[2]: 1.5}
    assert rows_seen == [48, 48]


FFN_CFG = (32, 32, 4, 1)


def test_feed_forward_kernel_after_block_norm3_equals_the_region_in_fp32(ffn):
    """``ffn`` on ``block_norm3``'s rows (the projection and norm3 left to that region) is
    ``block_out``: fp32 to summation order; its inputs are not written."""
    args = _args(torch.float32, seed=2)
    o, x, wo, bo, nw, nb, w1, b1, w2, b2 = args
    x1, h = block_norm3(o, x, wo, bo, nw, nb, eps=1e-5)
    h0, x10 = h.clone(), x1.clone()
    got = ffn.ffn(h, x1, w1, b1, w2, b2, config=FFN_CFG)
    want = _region(args)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert torch.equal(h, h0) and torch.equal(x1, x10)


def test_feed_forward_kernel_in_bf16_rounds_where_the_bf16_region_does(ffn):
    args = _args(torch.bfloat16, seed=3)
    o, x, wo, bo, nw, nb, w1, b1, w2, b2 = args
    exact = _region([t.float() for t in args])
    scale = exact.abs().max().item()
    # the region's first half with the interpreter's truncating casts, then the kernel
    x1 = _truncate(F.linear(o.float(), wo.float(), bo.float())) + x
    h = _truncate(F.layer_norm(x1, x1.shape[-1:], nw, nb, 1e-5)).to(torch.bfloat16)
    got = ffn.ffn(h, x1, w1, b1, w2, b2, config=FFN_CFG)
    diff = (got - _region_truncating(*args)).abs()
    assert diff.max().item() <= 2 ** -7 * scale and diff.mean().item() <= 1e-5 * scale
    err_region = (_region(args) - exact).abs().max().item()
    assert 0 < err_region < 0.02 * scale and (got - exact).abs().max().item() <= 4 * err_region


def test_tuning_the_feed_forward_kernel_uses_its_own_configurations(ffn):
    """``Tuned(kernel="ffn")`` tries ``FFN_CONFIGS``-shaped configurations on its rows."""
    assert ffn.Tuned(kernel="ffn").configs == ffn.FFN_CONFIGS
    with pytest.raises(ValueError, match="kernel"):
        ffn.Tuned(kernel="cutlass")
    configs = [(32, 32, 4, 1), (32, 64, 4, 1)]
    times = iter([3.0, 1.0])
    rows_seen = []

    def bench(fn, warmup, rep):
        rows_seen.append(fn().shape[0])
        return next(times)

    o, x, wo, bo, nw, nb, w1, b1, w2, b2 = _args(torch.float32)
    _, h = block_norm3(o, x, wo, bo, nw, nb, eps=1e-5)
    tuned = ffn.Tuned(kernel="ffn", configs=configs, rows=40)
    assert tuned._time_configs(bench, (h, x, w1, b1, w2, b2), {}) == configs[1]
    assert rows_seen == [40, 40] and tuned.timings == {configs[0]: 3.0, configs[1]: 1.0}
