"""HiFiGAN as the vocoder's regions (``engine.vocoder``) against stock, compiled and eager
(tiny random checkpoint, whose HiFiGAN has the full size; CPU, fp32).

Stock is ``HiFTGenerator.inference`` per row with its noise injected (as in
test_s3gen_batched.py), then stock's trim/fade: max abs diff <= 1e-5 over every sample of
every row (observed ~2e-7; amplitude ~0.09), the rows padded to a longer batch. Compiled
with dynamo's "eager" backend (it traces and guards as Inductor does, without generating
code), the regions are one graph each for every batch size and length.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from ttsbatch.engine.s3gen_batched import BatchedS3Gen

WAV_TOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    from ttsbatch.engine.model import load_model

    return load_model(tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def eager(model):
    return BatchedS3Gen(model)


@pytest.fixture(scope="module")
def eager2d(model):
    return BatchedS3Gen(model, vocoder_conv2d=True)


def _batch(g, lengths, T):
    """Mels (B, 80, T) zero past each row's ``lengths`` frames, and stock-shaped source noise:
    the uniform draws u (B, 9, 1), the phase stock makes of them, sine noise (B, 9, T * 480)."""
    n = torch.tensor(lengths)
    mel = torch.randn(len(lengths), 80, T, generator=g) * (torch.arange(T) < n[:, None]).unsqueeze(1)
    u = torch.rand(len(lengths), 9, 1, generator=g)
    phase = -math.pi + u * (2 * math.pi)
    sine = torch.randn(len(lengths), 9, T * 480, generator=g)
    return mel, n, u, phase, sine


def _stock(s3, mel, u, sine):
    """Stock HiFiGAN on one row (1, 80, n) with its noise injected, trim/fade applied."""
    real_randn_like, real_rand = torch.randn_like, torch.rand

    def randn_like(t, *a, **k):
        return sine[:, :, : t.shape[-1]].clone() if t.dim() == 3 and t.shape[1] == 9 else torch.zeros_like(t)

    torch.randn_like, torch.rand = randn_like, lambda *shape, **k: u.clone()
    try:
        wav, _ = s3.mel2wav.inference(speech_feat=mel)
    finally:
        torch.randn_like, torch.rand = real_randn_like, real_rand
    wav[:, : len(s3.trim_fade)] *= s3.trim_fade
    return wav[0]


@pytest.mark.parametrize("conv2d", [False, True], ids=["conv1d", "conv2d"])
def test_vocoder_regions_match_stock_hifigan(model, eager, eager2d, conv2d):
    """Rows of mixed lengths padded to one batch: each row equals stock on its own frames,
    with the convs as conv1d or as (1, k) conv2d over (B, C, 1, T) (weights channels-last)."""
    lengths = (40, 23, 31)
    mel, n, u, phase, sine = _batch(torch.Generator().manual_seed(0), lengths, 40)
    vocoder = eager2d if conv2d else eager
    if conv2d:  # the regions' weights really are 4-D and channels-last
        w = vocoder.vocoder.stages[0].weights[0]
        assert w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = vocoder._vocode(mel, n, phase, sine)
        for i, f in enumerate(lengths):
            ref = _stock(model.s3gen, mel[i : i + 1, :, :f], u[i : i + 1], sine[i : i + 1])
            assert ref.shape == (f * 480,) and ref.abs().max() > 100 * WAV_TOL
            diff = (got[i, : f * 480] - ref).abs().max().item()
            assert diff <= WAV_TOL, f"row {i} ({f} frames): {diff}"


def test_bf16_vocoder_stays_close(model, eager):
    """``vocoder_dtype=bf16`` (convs in bf16, the rest fp32): RMS error within 2% of fp32's
    (observed 0.9% on random weights)."""
    mel, n, _, phase, sine = _batch(torch.Generator().manual_seed(1), (32, 25), 32)
    bf16 = BatchedS3Gen(model, vocoder_dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = eager._vocode(mel, n, phase, sine)
        got = bf16._vocode(mel, n, phase, sine)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


@pytest.mark.parametrize("conv2d", [False, True], ids=["conv1d", "conv2d"])
def test_compiled_vocoder_is_whole_graphs_and_compiles_once(model, eager, conv2d):
    """Compiled, each region (one per upsampling stage, and post) is one graph (fullgraph: a
    break would raise) made on the first call and serving every later batch size, one row
    included, and every length: no new graph, no recompile. Either layout equals the eager
    conv1d vocoder."""
    torch._dynamo.reset()
    counters.clear()
    comp = BatchedS3Gen(model, compile_vocoder=True, regions_backend="eager", vocoder_conv2d=conv2d)
    assert comp.vocoder.r.compiled and not eager.vocoder.r.compiled
    n_regions = len(model.s3gen.mel2wav.ups) + 1
    g = torch.Generator().manual_seed(2)
    graphs = []
    for lengths, T in (((16, 11), 16), ((24,), 24), ((20, 13, 17), 20), ((9, 32), 32)):
        mel, n, _, phase, sine = _batch(g, lengths, T)
        with torch.inference_mode():
            ref = eager._vocode(mel, n, phase, sine)
            got = comp._vocode(mel, n, phase, sine)
        assert (got - ref).abs().max().item() <= 1e-5
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [n_regions] * 4
    assert not counters["graph_break"] and not counters["recompiles"]
    torch._dynamo.reset()


def test_a_failing_compiler_falls_back_to_the_eager_vocoder(model, eager, caplog):
    """Where torch.compile cannot work, the vocoder runs its regions eagerly, with one warning."""

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working Triton here")

    torch._dynamo.reset()
    bs = BatchedS3Gen(model, compile_vocoder=True, regions_backend=broken_backend)
    mel, n, _, phase, sine = _batch(torch.Generator().manual_seed(3), (16, 9), 16)
    with caplog.at_level(logging.WARNING, logger="ttsbatch"), torch.inference_mode():
        got = bs._vocode(mel, n, phase, sine)
        again = bs._vocode(mel, n, phase, sine)
        ref = eager._vocode(mel, n, phase, sine)
    assert torch.equal(got, ref) and torch.equal(again, ref)
    r = bs.vocoder.r
    assert not r.compiled and "no working Triton" in r.error
    assert len([x for x in caplog.records if "uncompiled" in x.getMessage()]) == 1
    torch._dynamo.reset()
