#!/usr/bin/env python
"""The CFM estimator's attention, padded (as the engine runs it) against packed rows (CUDA GPU).

    python scripts/gpu_cfm_attn_packed.py [--rows 128] [--lengths 650,800,1100]

The engine keeps S3Gen's stream padded, (rows, T) frames, and runs FA2's varlen kernel over
it with each row's valid key count (``seqused_k``): padded queries are computed too, and FA2
is not a Hopper kernel (25% of S3Gen's kernel time, BENCHMARKS.md, tenth session). The
transformer blocks around the attention are row-wise, so the stream could be packed to its
valid frames for a group of blocks. This measures what that would buy, per attention call:

- ``padded FA2 + seqused_k``: the engine;
- ``packed FA2 varlen``: the same kernel over packed rows (no padded queries);
- ``packed cuDNN``: ``aten._cudnn_attention_forward`` over packed rows (what SDPA runs for
  nested tensors with the cuDNN backend), timed warm, with the cost of its first call and of
  a first call at a new total length (PyTorch builds a cuDNN graph per shape);
- ``padded cuDNN, no mask``: the dense bound (attends the padding: wrong, for scale only);
- FlashAttention 4's Hopper kernel (CuTe DSL), padded with ``seqused_q``/``seqused_k`` and
  packed, when ``flash_attn.cute`` is importable (``scripts/fa4_wheels.sh`` says how to
  carry it: its wheels are ~110 MB); the first call includes its JIT compile.

Rows get random valid lengths in [0.8 T, T] (rows of one S3Gen batch are neighbours by
length). TFLOP/s count the valid work only (4 * heads * 64 * sum of length^2). Max abs error
against fp32 SDPA per row. Writes $OUT/cfm_attn_packed.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128, help="estimator rows: 2 x the S3Gen batch (CFG)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--lengths", default="650,800,1100", help="padded lengths T (prompt + chunk frames)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from gpu_attn import cuda_ms  # CUDA events over 20 calls after one warm-up

    if not torch.cuda.is_available():
        print("gpu_cfm_attn_packed.py: no CUDA GPU", file=sys.stderr)
        return 2
    dev, bf, H, D, R = "cuda", torch.bfloat16, args.heads, 64, args.rows
    scale = D ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)

    out = []
    for T in (int(x) for x in args.lengths.split(",") if x):
        lens = torch.randint(int(0.8 * T), T + 1, (R,), device=dev, generator=g)
        lens[0] = T
        q, k, v = (torch.randn(R * T, H, D, device=dev, dtype=bf, generator=g) for _ in range(3))
        valid = (torch.arange(T, device=dev)[None, :] < lens[:, None]).reshape(-1)
        idx = valid.nonzero().squeeze(1)
        qp, kp, vp = q[idx], k[idx], v[idx]
        cu_pad = torch.arange(0, (R + 1) * T, T, device=dev, dtype=torch.int32)
        cu = torch.zeros(R + 1, device=dev, dtype=torch.int32)
        cu[1:] = lens.cumsum(0)
        used = lens.to(torch.int32)
        flops = 4 * H * D * float((lens.double() ** 2).sum())

        # reference: fp32 SDPA per row over its valid frames
        ref = torch.zeros(R * T, H, D, device=dev)
        for i in range(R):
            n = int(lens[i])
            s = slice(i * T, i * T + n)
            ref[s] = F.scaled_dot_product_attention(*(t[s].float().transpose(0, 1)[None] for t in (q, k, v)), scale=scale)[0].transpose(0, 1)
        ref_p = ref[idx]

        def padded_fa2():
            return torch.ops.aten._flash_attention_forward(q, k, v, cu_pad, cu_pad, T, T, 0.0, False, False, scale=scale, seqused_k=used)[0]

        def packed_fa2():
            return torch.ops.aten._flash_attention_forward(qp, kp, vp, cu, cu, T, T, 0.0, False, False, scale=scale)[0]

        def packed_cudnn():
            return torch.ops.aten._cudnn_attention_forward(qp, kp, vp, None, cu, cu, T, T, False, 0.0, False, False, scale=scale)[0]

        def dense_cudnn():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(*(t.view(R, T, H, D).transpose(1, 2) for t in (q, k, v)), scale=scale)

        def fa4(**kw):
            from flash_attn.cute.interface import flash_attn_varlen_func

            o = flash_attn_varlen_func(softmax_scale=scale, **kw)
            return o[0] if isinstance(o, tuple) else o

        def padded_fa4():  # the engine's layout, padded queries skipped too (seqused_q)
            return fa4(q=q, k=k, v=v, cu_seqlens_q=cu_pad, cu_seqlens_k=cu_pad, max_seqlen_q=T, max_seqlen_k=T,
                       seqused_q=used, seqused_k=used)

        def packed_fa4():
            return fa4(q=qp, k=kp, v=vp, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T)

        variants = [("padded FA2 + seqused_k (engine)", padded_fa2, False), ("packed FA2 varlen", packed_fa2, True),
                    ("packed cuDNN", packed_cudnn, True), ("padded cuDNN, no mask (dense bound)", dense_cudnn, None)]
        try:
            import importlib

            importlib.import_module("flash_attn.cute.interface")  # FlashAttention 4, when carried (scripts/fa4_wheels.sh)

            variants += [("padded FA4 + seqused_q/k", padded_fa4, False), ("packed FA4 varlen", packed_fa4, True)]
        except Exception as e:  # noqa: BLE001 - not installed here
            out.append(dict(T=T, kernel="FA4", error=f"not importable: {type(e).__name__}: {str(e)[:120]}"))
        for name, fn, packed in variants:
            row = dict(T=T, rows=R, kernel=name)
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                o = fn()
                torch.cuda.synchronize()
                row["first_call_ms"] = round((time.perf_counter() - t0) * 1000, 1)
                ms = cuda_ms(fn)
                row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
                if packed is True:
                    row["max_err"] = round(float((o.float().reshape(-1, H, D) - ref_p).abs().max()), 4)
                elif packed is False:
                    row["max_err"] = round(float((o.float().reshape(-1, H, D)[idx] - ref_p).abs().max()), 4)
                if name == "packed cuDNN":  # a new total length: does PyTorch build another cuDNN graph?
                    cut = int(lens[-1]) // 2
                    cu2 = cu.clone()
                    cu2[-1] -= cut
                    t0 = time.perf_counter()
                    torch.ops.aten._cudnn_attention_forward(qp[:-cut], kp[:-cut], vp[:-cut], None, cu2, cu2, T, T, False, 0.0, False, False, scale=scale)
                    torch.cuda.synchronize()
                    row["new_total_first_call_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            except Exception as e:  # noqa: BLE001 - a kernel that does not run here is a result
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            out.append(row)
            print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cfm_attn_packed.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
