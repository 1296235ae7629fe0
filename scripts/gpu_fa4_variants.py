#!/usr/bin/env python
"""FA4 at one uniform attention shape, five ways (CUDA GPU): which of the engine's call's
properties costs rate (the book's layouts ran at ~292 TFLOP/s in gpu_attention_book.py, the
dense 128 x 704 call at ~364 in gpu_cfm_ceiling.py).

    python scripts/gpu_fa4_variants.py [--seqs 128] [--frames 704]

dense/contiguous (S, T, H, D); dense from a strided qkv view; varlen contiguous; varlen from a
strided qkv view (the engine's q/k/v); the latter with seqused_k (the engine's call), and
that with FA4's varlen batch-lookup aid forced on (by default only above 256 sequences).
Writes $OUT/fa4_variants.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

from gpu_cfm_ceiling import timed_ms  # scripts/ is on the path when a script runs


@contextmanager
def lookup_aid(interface):
    """FA4's varlen batch-lookup aid (a tile -> sequence table built on the GPU in a public
    call) at any number of sequences: FA4 builds it only above BIN_BATCH_SEARCH_THRESH (256)."""
    old, interface.BIN_BATCH_SEARCH_THRESH = interface.BIN_BATCH_SEARCH_THRESH, 0
    try:
        yield
    finally:
        interface.BIN_BATCH_SEARCH_THRESH = old


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--frames", type=str, default="704,672,576,850")
    args = ap.parse_args()
    import torch
    from flash_attn.cute import interface
    from flash_attn.cute.interface import flash_attn_func, flash_attn_varlen_func

    H, D, S = 8, 64, args.seqs
    res = {}
    for T in [int(x) for x in args.frames.split(",")]:
        flops = 4 * S * H * T * T * D
        qkv = torch.randn(S * T, 3 * H * D, device="cuda", dtype=torch.bfloat16)
        qs, ks, vs = (t.reshape(S * T, H, D) for t in qkv.split(H * D, dim=-1))  # strided, as the engine
        qc, kc, vc = (t.contiguous() for t in (qs, ks, vs))
        cu = torch.arange(0, S * T + 1, T, device="cuda", dtype=torch.int32)
        used = torch.full((S,), T, device="cuda", dtype=torch.int32)
        ways = {
            "dense contiguous": lambda: flash_attn_func(qc.view(S, T, H, D), kc.view(S, T, H, D), vc.view(S, T, H, D)),
            "dense strided": lambda: flash_attn_func(qs.view(S, T, H, D), ks.view(S, T, H, D), vs.view(S, T, H, D)),
            "varlen contiguous": lambda: flash_attn_varlen_func(qc, kc, vc, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T),
            "varlen strided": lambda: flash_attn_varlen_func(qs, ks, vs, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T),
            "varlen strided seqused_k": lambda: flash_attn_varlen_func(qs, ks, vs, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, seqused_k=used),
        }
        ways["varlen strided seqused_k, lookup aid"] = ways["varlen strided seqused_k"]
        for name, fn in ways.items():
            try:
                if "lookup aid" in name:
                    with lookup_aid(interface):
                        ms = timed_ms(fn)
                else:
                    ms = timed_ms(fn)
                res[f"{T} {name}"] = dict(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
            except Exception as e:  # a way this FA4 build does not take
                res[f"{T} {name}"] = dict(error=f"{type(e).__name__}: {str(e)[:160]}")
            print(T, name, res[f"{T} {name}"], flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "fa4_variants.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
