#!/usr/bin/env python
"""HiFiGAN's fp32 convs channels-first (conv1d, the default) against (1, k) conv2d over
channels-last tensors (``BatchedS3Gen(vocoder_conv2d=True)``), compiled as the engine runs
them (CUDA GPU, the full-size checkpoint).

    python scripts/gpu_vocoder_layout.py [--batch 64] [--frames 200] [--spread 80] [--ckpt /tmp/ttsbatch-full]

A batch of random mels of book-like lengths (``--frames`` +- ``--spread`` mel frames, padded
to the longest), the vocoder's ``_vocode`` (f0, source, STFT, the regions, iSTFT) timed per
layout: the median of 7 calls (CUDA events), the largest difference from conv1d's waveform,
and torch.profiler's kernel time over one call: all, cuDNN's layout work, its conv kernels.
Prints one line per layout and writes $OUT/vocoder_layout.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--spread", type=int, default=80)
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    a = ap.parse_args()

    import torch

    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen

    model = load_model(Path(a.ckpt), "cuda")
    g = torch.Generator().manual_seed(0)
    lengths = (a.frames + (torch.rand(a.batch, generator=g) * 2 - 1) * a.spread).round().long().clamp(min=8)
    T = int(lengths.max())
    mel = torch.randn(a.batch, 80, T, generator=g) * (torch.arange(T) < lengths[:, None]).unsqueeze(1)
    phase = -math.pi + torch.rand(a.batch, 9, 1, generator=g) * (2 * math.pi)
    sine = torch.randn(a.batch, 9, T * 480, generator=g)
    mel, n, phase, sine = (t.cuda() for t in (mel, lengths, phase, sine))

    results, ref = {}, None
    for layout in os.environ.get("LAYOUTS", "conv1d,conv2d,conv1d").split(","):  # the default again last: the drift
        s3 = BatchedS3Gen(model, compile_vocoder=True, vocoder_conv2d=layout == "conv2d")
        with torch.inference_mode():
            for _ in range(3):  # compile (or recompile for the other layout), then warm
                wav = s3._vocode(mel, n, phase, sine)
            torch.cuda.synchronize()
            ms = []
            for _ in range(7):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                wav = s3._vocode(mel, n, phase, sine)
                e1.record()
                torch.cuda.synchronize()
                ms.append(e0.elapsed_time(e1))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                s3._vocode(mel, n, phase, sine)
                torch.cuda.synchronize()
        ref = wav if ref is None else ref
        kern = {}
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA:
                kern[e.name()] = kern.get(e.name(), 0) + e.duration_ns() / 1e6
        # cuDNN's layout work (its transposes and convertTensor) and its conv kernels (fprop; a
        # transposed conv runs as dgrad) by name: Inductor's fused kernels also say "convolution"
        transposes = sum(v for k, v in kern.items() if "ToNhwc" in k or "ToNchw" in k or "convertTensor" in k)
        convs = sum(v for k, v in kern.items() if "fprop" in k or "dgrad" in k)
        r = dict(ms=round(statistics.median(ms), 2), max_diff=float((wav - ref).abs().max()), peak=float(ref.abs().max()),
                 kernel_ms=round(sum(kern.values()), 2), transpose_ms=round(transposes, 2), conv_ms=round(convs, 2),
                 errors=s3.vocoder.r.error, top=sorted(((round(v, 2), k[:100]) for k, v in kern.items()), reverse=True)[:12])
        results.setdefault(layout, []).append(r)
        print(f"{layout}: {r['ms']} ms for {a.batch} chunks ({float(n.sum()) * 0.02:.0f} s of audio), kernels {r['kernel_ms']} ms "
              f"(transposes {r['transpose_ms']}, convs {r['conv_ms']}), max diff {r['max_diff']:.2e} (peak {r['peak']:.3f}), "
              f"compile error {r['errors']}", flush=True)
        for v, k in r["top"][:8]:
            print(f"    {v:8.2f} ms {k}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "vocoder_layout.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
