#!/usr/bin/env python
"""The CFM estimator's transformer-block tail (``cfm_estimator.block_out``) at a book's
shapes, in variants: where the feed-forward's GELU goes (CUDA GPU).

    python scripts/gpu_cfm_block.py [--rows 97280] [--modes default,max-autotune-no-cudagraphs]

``block_out`` is the output projection + residual, LayerNorm, the feed-forward's first GEMM,
GELU, the second GEMM + residual. Compiled by Inductor, the GELU (with the bias add) is a
pointwise kernel of its own between two cuBLAS GEMMs, reading and writing the (rows, 1024)
hidden once more (8% of S3Gen's kernel time in a profile). Variants:

- ``inductor``: the region as the engine compiles it;
- ``addmm_gelu``: the first GEMM as ``torch._addmm_activation(..., use_gelu=True)``, cuBLASLt's
  bias + GELU epilogue (GELU's tanh form: compared against the exact one below);
- each ``--modes`` entry other than default: the region compiled in that Inductor mode
  (Triton GEMM templates that can take the GELU into their epilogue), with its compile time;
- ``triton (config)``: the whole tail as one Triton kernel (``ttsbatch.engine.cfm_ffn``), the
  feed-forward's hidden kept on the chip, per configuration; ``triton-noproj``: the same with
  the output projection left to a compiled region; ``triton tuned``: what the engine picks;
  ``triton-ffn (config)``: the feed-forward alone (``cfm_ffn.ffn``) after the compiled
  ``block_norm3`` region (projection, residual, norm3), and ``triton-ffn tuned``.

Prints ms per call (CUDA events, 20 calls), TFLOP/s and the max |diff| against the fp32
reference; writes $OUT/cfm_block.json when OUT is set.
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
    ap.add_argument("--rows", type=int, default=128 * 760, help="2 x batch x frames (CFG rows x prompt + chunk frames)")
    ap.add_argument("--modes", default="default")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from gpu_attn import cuda_ms  # CUDA events over 20 calls after one warm-up

    from ttsbatch.engine.cfm_estimator import block_out

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    N, C, inner, ff = args.rows, 256, 512, 1024

    def rnd(*shape, scale=1.0, dtype=bf):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    o, x = rnd(N, inner), rnd(N, C, dtype=torch.float32)
    wo, bo = rnd(C, inner, scale=inner ** -0.5), rnd(C, scale=0.1)
    nw, nb = 1 + rnd(C, scale=0.1, dtype=torch.float32), rnd(C, scale=0.1, dtype=torch.float32)
    w1, b1 = rnd(ff, C, scale=C ** -0.5), rnd(ff, scale=0.1)
    w2, b2 = rnd(C, ff, scale=ff ** -0.5), rnd(C, scale=0.1)
    args_ = (o, x, wo, bo, nw, nb, w1, b1, w2, b2)
    flops = 2 * N * (inner * C + C * ff + ff * C)

    def ref():
        f = [t.float() for t in args_]
        return block_out(*f, eps=1e-5, approximate="none")

    want = ref()

    def addmm_gelu(o, x, wo, bo, nw, nb, w1, b1, w2, b2, eps: float):
        x = F.linear(o, wo, bo).float() + x
        h = F.layer_norm(x, x.shape[-1:], nw, nb, eps).to(w1.dtype)
        h = torch._addmm_activation(b1, h, w1.t(), use_gelu=True)
        return F.linear(h, w2, b2).float() + x

    rows = []

    def add(name, fn, compile_s=None):
        try:
            ms = cuda_ms(fn)
            err = (fn() - want).abs().max().item()
            rows.append(dict(variant=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), max_err=round(err, 4),
                             compile_s=compile_s))
        except Exception as e:  # noqa: BLE001 - a variant that does not run is a result too
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        print(json.dumps(rows[-1]), flush=True)

    add("eager", lambda: block_out(*args_, eps=1e-5, approximate="none"))
    for mode in args.modes.split(","):
        kw = {} if mode == "default" else {"mode": mode}
        for name, fn in (("inductor", lambda *a, eps: block_out(*a, eps=eps, approximate="none")), ("addmm_gelu", addmm_gelu)):
            torch._dynamo.reset()
            c = torch.compile(fn, dynamic=True, **kw)
            t0 = time.perf_counter()
            c(*args_, eps=1e-5)
            torch.cuda.synchronize()
            add(f"{name} [{mode}]", lambda c=c: c(*args_, eps=1e-5), round(time.perf_counter() - t0, 1))
    # the fused kernel (ttsbatch.engine.cfm_ffn), every configuration, with and without the
    # output projection inside (without: the projection as the compiled block_proj region)
    from ttsbatch.engine import cfm_ffn
    from ttsbatch.engine.cfm_estimator import block_proj

    tanh = block_out(*[t.float() for t in args_], eps=1e-5, approximate="tanh")
    print(json.dumps(dict(note="the fused kernel computes GELU's tanh form: its reference",
                          tanh_vs_exact=round((tanh - want).abs().max().item(), 4))))
    want = tanh
    torch._dynamo.reset()
    proj = torch.compile(block_proj, dynamic=True)
    for cfg in cfm_ffn.CONFIGS:
        add(f"triton {cfg}", lambda cfg=cfg: cfm_ffn.block_out(*args_, eps=1e-5, config=cfg))
        add(f"triton-noproj {cfg}", lambda cfg=cfg: cfm_ffn.block_out(
            o, proj(o, x, wo, bo), *args_[2:], eps=1e-5, proj=False, config=cfg))
    tuned = cfm_ffn.Tuned()
    add("triton tuned", lambda: tuned(*args_, eps=1e-5))
    rows[-1]["config"] = tuned.config
    # the feed-forward alone (cfm_ffn.ffn) after the compiled block_norm3 region (projection,
    # residual, norm3): every operand through shared memory, no spills (ptxas, sm_90)
    from ttsbatch.engine.cfm_estimator import block_norm3

    norm3 = torch.compile(block_norm3, dynamic=True)
    _, _, _, _, nw_, nb_, w1_, b1_, w2_, b2_ = args_

    def ffn_path(cfg=None, run=None):
        x1, h = norm3(o, x, wo, bo, nw_, nb_, eps=1e-5)
        return (run or (lambda *a: cfm_ffn.ffn(*a, config=cfg)))(h, x1, w1_, b1_, w2_, b2_)

    for cfg in cfm_ffn.FFN_CONFIGS:
        add(f"triton-ffn {cfg}", lambda cfg=cfg: ffn_path(cfg))
    tuned_ffn = cfm_ffn.Tuned(kernel="ffn")
    add("triton-ffn tuned", lambda: ffn_path(run=tuned_ffn))
    rows[-1]["config"] = tuned_ffn.config
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cfm_block.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
