#!/usr/bin/env python
"""T3's decode GEMVs for a few sequences (CUDA GPU): the fused Triton kernels of
``ttsbatch.engine.decode_gemv`` against cuBLAS (``F.linear``), at T3's four weight shapes.

    python scripts/gpu_gemv.py [--seqs 2] [--configs]

Each kind runs over 30 distinct weights (one per layer, as a decode step does: together they
are larger than L2), replayed from a CUDA graph; prints microseconds per call and the weight
bytes moved per second. ``--configs`` also sweeps the kernel's block sizes and warps, to
choose ``decode_gemv.block_sizes``. Writes $OUT/gemv.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_attn import copy_bandwidth_gb_s, graph_us  # noqa: E402

LAYERS = 30
# (name, N outputs, K, prologue, residual, glu): T3's q/k/v, o, gate/up (SwiGLU) and down projections
KINDS = [("qkv+norm", 3072, 1024, 1, False, False), ("o+res", 1024, 1024, 0, True, False),
         ("gate_up+norm+glu", 4096, 1024, 1, False, True), ("down+res", 1024, 4096, 0, True, False)]


def main() -> None:
    import torch
    import torch.nn.functional as F

    from ttsbatch.engine import decode_gemv as g

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2")
    ap.add_argument("--configs", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(dev), "copy_gb_s": copy_bandwidth_gb_s(), "rows": []}
    print(f"{out['device']}: device-to-device copy {out['copy_gb_s']:.0f} GB/s")
    ln = torch.rand(4096, device=dev) + 0.5
    for name, N, K, pro, res, glu in KINDS:
        ws = [torch.randn(N * (2 if glu else 1), K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        for s in [int(x) for x in args.seqs.split(",")]:
            x = torch.randn(s, K, device=dev, dtype=torch.float32 if pro == 1 else torch.bfloat16)
            r = torch.randn(s, N, device=dev)
            mb = N * K * 2 * (2 if glu else 1) / 1e6

            def cublas():
                xin = x.to(torch.bfloat16)
                for w in ws:
                    F.linear(xin, w)

            def fused(blocks=None):
                for w in ws:
                    g._launch(x, w, pro, K, ln=ln[:K] if pro == 1 else None, eps=1e-5, res=r if res else None, glu=glu, blocks=blocks)

            rows = [("cuBLAS F.linear (GEMM only)", cublas, None), ("fused (default blocks)", fused, g.block_sizes(s, N, K, dev, glu))]
            if args.configs and s == int(args.seqs.split(",")[0]):  # the sweep for the first count only (compiles)
                for bn in (1, 2, 4, 8, 16):
                    for bk in (256, 512, 1024, 2048, 4096):
                        for w_ in (4, 8):
                            if bk <= K and g._seq_block(s) * bn * bk <= 32768:
                                rows.append((f"fused BN={bn} BK={bk} warps={w_}", lambda c=(bn, bk, w_): fused(c), (bn, bk, w_)))
            swept = []
            for label, fn, cfg in rows:
                try:
                    us = graph_us(fn, reps=1, iters=20) / LAYERS
                except Exception as e:  # a config that does not compile (registers) is skipped
                    print(f"  {name:16s} s={s} {label}: failed ({type(e).__name__})")
                    continue
                rec = dict(kind=name, seqs=s, label=label, us=us, gb_s=mb * 1e3 / us, config=cfg)
                out["rows"].append(rec)
                if label.startswith("fused BN"):
                    swept.append(rec)
                if not label.startswith("fused BN"):
                    print(f"  {name:16s} s={s} {label:32s} {us:7.2f} us  {rec['gb_s']:6.0f} GB/s")
            for best in sorted(swept, key=lambda r: r["us"])[:3]:
                print(f"  {name:16s} s={s} {best['label']:32s} {best['us']:7.2f} us  {best['gb_s']:6.0f} GB/s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gemv.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
