#!/usr/bin/env python
"""The CFM estimator's ceiling on this GPU: its GEMMs and its attention alone, each at its
best isolated rate, at a book batch's shapes (CUDA GPU).

    python scripts/gpu_cfm_ceiling.py [--rows 90000] [--seqs 128] [--frames 704]

The estimator's useful FLOPs per frame and per frame pair are those of
``ttsbatch.bench_s3gen.cfm_flop_model`` (stock's module, ``FlopCounterMode``, counted here). Here every
GEMM shape the estimator runs (per transformer block: q/k/v 256->1536, output 512->256, the
feed-forward 256->1024 and 1024->256; per resnet: a k=3 causal conv as a (3 x 256)->256 GEMM
and the 1x1 residual) is timed alone by cuBLAS in bf16 over ``--rows`` frames, and the
attention (8 heads of 64) alone over ``--seqs`` sequences of ``--frames`` (PyTorch's FA2
through SDPA, and FlashAttention 4 where it is installed). The estimator's time if each of
its products ran at that rate and nothing else took any (no LayerNorm, Mish, residual adds,
casts, launches) is its ceiling here, as a share of the dense bf16 peak (``--peak``).

Prints one line per kernel and the ceiling; writes $OUT/cfm_ceiling.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed_ms(fn, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=90_000, help="frames of one CFM call (both CFG halves of a book batch)")
    ap.add_argument("--seqs", type=int, default=128, help="attention sequences: 2 x a batch of 64 (CFG)")
    ap.add_argument("--frames", type=int, default=704, help="frames a sequence (prompt 500 + a book chunk's ~204)")
    ap.add_argument("--peak", type=float, default=989.0, help="dense bf16 TFLOP/s of the GPU")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from chatterbox.models.s3gen import S3Gen

    from ttsbatch.bench_s3gen import cfm_flop_model

    dev, bf = "cuda", torch.bfloat16
    M = args.rows
    # (name, K, N, uses per estimator call): 56 transformer blocks; 14 resnets (12 mid, the
    # down and up ones counted as mid: their wider inputs are 1.5% of the FLOPs) with two k=3
    # convs and a 1x1 residual; the down/up-sampling convs and the final block as k=3 convs
    shapes = [("qkv", 256, 1536, 56), ("out", 512, 256, 56), ("ff1 +gelu", 256, 1024, 56), ("ff2", 1024, 256, 56),
              ("conv k3", 768, 256, 2 * 14 + 3), ("res 1x1", 256, 256, 14)]
    res: dict = dict(gpu=torch.cuda.get_device_name(), rows=M, seqs=args.seqs, frames=args.frames, peak=args.peak, gemms={})
    gemm_s_per_frame = 0.0
    gemm_flops_per_frame = 0
    for name, K, N, uses in shapes:
        a = torch.randn(M, K, device=dev, dtype=bf)
        w = torch.randn(N, K, device=dev, dtype=bf) / K**0.5
        b = torch.randn(N, device=dev, dtype=bf)
        if "gelu" in name:
            fn = lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True)  # noqa: E731  (the engine's epilogue)
        else:
            fn = lambda: F.linear(a, w, b)  # noqa: E731
        ms = timed_ms(fn)
        flops = 2 * M * K * N
        tb = (M * K + M * N + K * N) * 2 / (ms / 1e3) / 1e12
        res["gemms"][name] = dict(ms=round(ms, 3), tflops=round(flops / (ms / 1e3) / 1e12, 1), tb_s=round(tb, 2), uses=uses)
        gemm_s_per_frame += uses * ms / 1e3 / M
        gemm_flops_per_frame += uses * 2 * K * N
        print(f"{name:>10}: ({M} x {K}) @ ({K} x {N}): {ms:.3f} ms, {res['gemms'][name]['tflops']} TFLOP/s, {tb:.2f} TB/s", flush=True)
        del a, w, b

    H, D, S, T = 8, 64, args.seqs, args.frames
    q, k, v = (torch.randn(S, H, T, D, device=dev, dtype=bf) for _ in range(3))
    attn_flops = 4 * S * H * T * T * D
    attn = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    attn["fa2"] = dict(ms=round(ms, 3), tflops=round(attn_flops / (ms / 1e3) / 1e12, 1))
    try:
        from flash_attn.cute.interface import flash_attn_func

        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (S, T, H, D)
        ms = timed_ms(lambda: flash_attn_func(qt, kt, vt))
        attn["fa4"] = dict(ms=round(ms, 3), tflops=round(attn_flops / (ms / 1e3) / 1e12, 1))
    except Exception as e:  # not installed, or no kernel for this GPU
        attn["fa4"] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    res["attention"] = attn
    for name, d in attn.items():
        print(f"attention {name}: {S} x {H} heads x {T} frames: {d}", flush=True)

    # the estimator per call at this length, from stock's own FLOP count (c1: frames, c2: pairs),
    # on the CPU over an S3Gen as chatterbox builds it (its shapes; the weights do not matter)
    m = cfm_flop_model(S3Gen().flow.decoder.estimator.eval(), "cpu")
    res["cfm_flop_model"] = dict(c0=m.c0, c1=m.c1, c2=m.c2)
    best_attn = max(d.get("tflops", 0) for d in attn.values())
    frames = S * T
    useful = m.c1 * frames + m.c2 * S * T * T
    # the GEMM share at the measured per-shape rates (the rest of c1, ~0.3%, at the mean rate)
    gemm_rate = gemm_flops_per_frame / gemm_s_per_frame
    t = m.c1 * frames / gemm_rate + m.c2 * S * T * T / (best_attn * 1e12)
    res["ceiling"] = dict(
        gemm_tflops=round(gemm_rate / 1e12, 1), attention_tflops=best_attn,
        attention_flop_share=round(m.c2 * S * T * T / useful, 3),
        cfm_tflops=round(useful / t / 1e12, 1), peak_share=round(useful / t / 1e12 / args.peak, 3),
    )
    print(f"ceiling: {res['ceiling']}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "cfm_ceiling.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
