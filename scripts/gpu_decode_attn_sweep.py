#!/usr/bin/env python
"""T3's decode attention kernel at a full batch's shapes, over its knobs (CUDA GPU).

    python scripts/gpu_decode_attn_sweep.py [--seqs 512] [--layers 8] [--warps 1,2,4] [--blocks 32,64]

``--seqs`` sequences (CFG pairs: even ones conditional, odd ones unconditional) with the book's
live lengths (prompts of 60-334 positions, 0-128 tokens decoded), ``--layers`` distinct caches
(together far larger than L2, as 30 layers are), one kernel call per layer replayed from a
CUDA graph, timed with CUDA events; each variant with and without the voice template
(conditioning and the uncond prompt read from one shared table). Prints microseconds per
layer call and the live KV bytes per second. Writes $OUT/decode_attn_sweep.json when OUT is set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--blocks", default="32,64")
    args = ap.parse_args()
    import torch

    from gpu_attn import copy_bandwidth_gb_s
    from ttsbatch.engine import decode_attention as da

    g = torch.Generator(device="cuda").manual_seed(0)
    S, H, D, Lc, dt = args.seqs, 16, 64, 34, torch.bfloat16
    prompt = torch.randint(60, 335, (S // 2,), device="cuda", generator=g).repeat_interleave(2)
    gen = torch.randint(0, 129, (S // 2,), device="cuda", generator=g).repeat_interleave(2)
    pos = prompt + gen  # this step's position
    kv_len = int(pos.max()) + 1
    L = -(-kv_len // 256) * 256
    shared = torch.where(torch.arange(S, device="cuda") % 2 == 0, torch.full_like(prompt, Lc), prompt - 2).to(torch.int32)
    caches = [[torch.randn(S, H, L, D, device="cuda", dtype=dt, generator=g) for _ in range(2)] for _ in range(args.layers)]
    tk, tv = (torch.randn(H, L, D, device="cuda", dtype=dt, generator=g) for _ in range(2))
    q, kn, vn = (torch.randn(S, H, 1, D, device="cuda", dtype=dt, generator=g) for _ in range(3))
    live_bytes = int((pos + 1).sum()) * H * D * 2 * 2  # K and V of every live position, per layer
    own_bytes = int((pos + 1 - shared).sum()) * H * D * 2 * 2
    bw = copy_bandwidth_gb_s() * 1e9  # bytes/s
    res = dict(device=torch.cuda.get_device_name(), seqs=S, kv_len=kv_len, live_mb=live_bytes / 1e6, own_mb=own_bytes / 1e6,
               copy_gbs=round(bw / 1e9), runs=[])
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    for warps, block, tmpl in itertools.product(*(map(int, x.split(",")) for x in (args.warps, args.blocks)), (0, 1)):
        da.NUM_WARPS, da.BLOCK_N = warps, block
        template = [(tk, tv, shared) if tmpl else None]

        def run():
            for kc, vc in caches:
                da.attend_and_cache(q, kn, vn, kc, vc, pos, kv_len, D**-0.5, template=template[0])

        try:
            run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(20):
                graph.replay()
            b.record()
            torch.cuda.synchronize()
            us = a.elapsed_time(b) * 1e3 / 20 / len(caches)
            r = dict(warps=warps, block=block, template=bool(tmpl), us_per_layer=round(us, 1),
                     live_tbs=round(live_bytes / us / 1e6, 2), pct_copy=round(100 * live_bytes / (us * 1e-6) / bw, 1))
        except Exception as e:  # noqa: BLE001 - a variant that does not compile
            r = dict(warps=warps, block=block, template=bool(tmpl), error=f"{type(e).__name__}: {str(e)[:200]}")
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "decode_attn_sweep.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
