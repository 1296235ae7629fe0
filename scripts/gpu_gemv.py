#!/usr/bin/env python
"""T3's decode GEMVs for a few sequences (CUDA GPU): the fused Triton kernels of
``ttsbatch.engine.decode_gemv`` against cuBLAS (``F.linear``), at T3's four weight shapes.

    python scripts/gpu_gemv.py [--seqs 2,4,8] [--configs]

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
# (name, N, K, prologue, residual): T3's q/k/v, o, gate/up and down projections
KINDS = [("qkv+norm", 3072, 1024, 1, False), ("o+res", 1024, 1024, 0, True), ("gate_up+norm", 8192, 1024, 1, False), ("down+swiglu+res", 1024, 4096, 2, True)]


def main() -> None:
    import torch
    import torch.nn.functional as F
    import triton

    from ttsbatch.engine import decode_gemv as g

    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2,4,8")
    ap.add_argument("--configs", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(dev), "copy_gb_s": copy_bandwidth_gb_s(), "rows": []}
    print(f"{out['device']}: device-to-device copy {out['copy_gb_s']:.0f} GB/s")
    ln = torch.rand(4096, device=dev) + 0.5
    for name, N, K, pro, res in KINDS:
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        kin = 2 * K if pro == 2 else K
        for s in [int(x) for x in args.seqs.split(",")]:
            x = torch.randn(s, kin, device=dev, dtype=torch.float32 if pro == 1 or (pro == 0 and not res) else torch.bfloat16)
            r = torch.randn(s, N, device=dev)
            y = torch.empty(s, N, device=dev, dtype=torch.float32 if res else torch.bfloat16)
            mb = N * K * 2 / 1e6

            def cublas():
                xin = x[:, :K].to(torch.bfloat16)
                for w in ws:
                    F.linear(xin, w)

            def fused(bn=None, bk=None, warps=None):
                sb, dbn, dbk, dw = g.block_sizes(s, N, K, dev)
                bn_, bk_, w_ = bn or dbn, bk or dbk, warps or dw
                for w in ws:
                    g._gemv[(triton.cdiv(N, bn_),)](
                        x, ln, w, r, y, s, N, x.stride(0), w.stride(0), r.stride(0), y.stride(0), 1e-5,
                        K=K, PRO=pro, RES=res, SB=sb, BN=bn_, BK=bk_, num_warps=w_,
                    )

            rows = [("cuBLAS F.linear (GEMM only)", cublas, None), ("fused (default blocks)", fused, g.block_sizes(s, N, K, dev))]
            if args.configs and s == int(args.seqs.split(",")[0]):  # the sweep for the first count only (compiles)
                for bn in (2, 4, 8, 16):
                    for bk in (256, 512, 1024):
                        for w_ in (4, 8):
                            if bk <= K and g._seq_block(s) * bn * bk <= 32768:
                                rows.append((f"fused BN={bn} BK={bk} warps={w_}", lambda bn=bn, bk=bk, w_=w_: fused(bn, bk, w_), (bn, bk, w_)))
            best = None
            for label, fn, cfg in rows:
                try:
                    us = graph_us(fn, reps=1, iters=20) / LAYERS
                except Exception as e:  # a config that does not compile (registers) is skipped
                    print(f"  {name:16s} s={s} {label}: failed ({type(e).__name__})")
                    continue
                rec = dict(kind=name, seqs=s, label=label, us=us, gb_s=mb * 1e3 / us, config=cfg)
                out["rows"].append(rec)
                if label.startswith("fused BN") and (best is None or us < best["us"]):
                    best = rec
                if not label.startswith("fused BN"):
                    print(f"  {name:16s} s={s} {label:32s} {us:7.2f} us  {rec['gb_s']:6.0f} GB/s")
            if best:
                print(f"  {name:16s} s={s} best {best['label']:27s} {best['us']:7.2f} us  {best['gb_s']:6.0f} GB/s")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gemv.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
