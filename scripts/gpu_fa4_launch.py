#!/usr/bin/env python
"""What one CFM attention call costs the host and the GPU: PyTorch's FA2, FlashAttention 4
through its public function, and FA4 launched directly (``ttsbatch.engine.fa4.FA4Varlen``).

    python scripts/gpu_fa4_launch.py [--lengths 650,800,1100] [--rows 128]

At the estimator's layout (``--rows`` CFG rows x T frames, 8 heads of 64, q/k/v views of one
GEMM output, each row's keys cut by seqused_k), per kernel:

- ``host_us``: Python per call, launching 200 calls back to back without a sync (the GPU is
  given a head start of queued work first, so the host never waits for it);
- ``gpu_ms``: CUDA events over 20 calls;
- ``max_err`` against FA2, and for the direct launch ``equal`` to the public call's output.

Writes $OUT/fa4_launch.json when OUT is set. Needs flash-attn-4 on the path
(scripts/fa4_wheels.sh); without it only FA2 is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="650,800,1100")
    ap.add_argument("--rows", type=int, default=128)
    args = ap.parse_args()

    import torch
    from gpu_attn import cuda_ms

    from ttsbatch.engine.s3gen_batched import BatchedS3Gen

    try:
        from flash_attn.cute import interface

        from ttsbatch.engine.fa4 import FA4Varlen
    except Exception as e:  # noqa: BLE001
        print(f"no FA4: {e}")
        interface = None

    H, D, B = 8, 64, args.rows
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(T)
        qkv = torch.randn(B * T, 3 * H * D, device="cuda", generator=g, dtype=torch.bfloat16)
        q, k, v = (t.reshape(B * T, H, D) for t in qkv.split(H * D, dim=-1))
        cu = torch.arange(0, (B + 1) * T, T, device="cuda", dtype=torch.int32)
        used = torch.randint(T // 2, T + 1, (B,), device="cuda", generator=g, dtype=torch.int32)
        scale = D ** -0.5
        kernels = {"fa2": BatchedS3Gen._flash_fa2}
        if interface is not None:
            def public(q, k, v, cu, used, T, scale):
                out = interface.flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T,
                                                       max_seqlen_k=T, seqused_k=used, softmax_scale=scale)
                return out[0] if isinstance(out, tuple) else out

            kernels["fa4_public"] = public
            kernels["fa4_direct"] = FA4Varlen()
        ref = kernels["fa2"](q, k, v, cu, used, T, scale).float()
        # a long kernel to queue ahead, so that launches are timed without waiting for the GPU
        big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        outs = {}
        for name, fn in kernels.items():
            fn(q, k, v, cu, used, T, scale)  # compile, plan
            torch.cuda.synchronize()
            gpu_ms = cuda_ms(lambda: fn(q, k, v, cu, used, T, scale))
            for _ in range(20):
                big @ big
            t0 = time.perf_counter()
            for _ in range(200):
                fn(q, k, v, cu, used, T, scale)
            host_us = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            outs[name] = fn(q, k, v, cu, used, T, scale)
            flops = 4 * H * D * T * used.float().sum().item()  # valid part: each query row against its keys
            rows.append(dict(T=T, kernel=name, host_us=round(host_us, 1), gpu_ms=round(gpu_ms, 4),
                             tflops=round(flops / gpu_ms / 1e9, 1),
                             max_err=round((outs[name].float() - ref).abs().max().item(), 4)))
            print(json.dumps(rows[-1]), flush=True)
        if "fa4_direct" in outs:
            rows[-1]["equal_to_public"] = bool(torch.equal(outs["fa4_direct"], outs["fa4_public"]))
            rows[-1]["calls"] = dict(public=kernels["fa4_direct"].public_calls, direct=kernels["fa4_direct"].direct_calls)
            print(json.dumps(rows[-1]), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fa4_launch.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
