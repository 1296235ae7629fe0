#!/usr/bin/env python
"""Where a T3 decode step's time goes (CUDA GPU): kernels per step, by class and by name.

    python scripts/gpu_t3_profile.py [--ckpt DIR] [--rows 1,0] [--tokens 64]

For each row count (0: as many as fit, as the engine picks them), the fast engine decodes
``rows`` book sentences for ``--tokens`` steps once (compiling and capturing), then again
under torch.profiler with the decode graphs replayed. Prints wall time per step, GPU
kernel time per step, kernels per step, and the kernel classes and top kernels in
microseconds per step. Writes $OUT/t3_profile.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kernel_class(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "flex" in n or "sdpa" in n or "_attend_split" in n or "_merge_splits" in n:
        return "attention"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "sm90_xmma" in n or "gemv" in n:  # decode_gemv's _gemv too
        return "gemm"
    if n.startswith("triton"):
        return "triton (fused)"
    if "index" in n or "scatter" in n or "gather" in n:
        return "index/scatter/gather"
    if "reduce" in n or "softmax" in n or "argmax" in n:
        return "reduction"
    if "elementwise" in n or "copy" in n or "fill" in n:
        return "elementwise (eager)"
    return "other"


def profile_rows(fast, conds, gen, reqs, rows: int | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    list(fast.generate(conds, reqs, gen, max_rows=rows))  # compile, capture
    steps0 = fast.stats["steps"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    list(fast.generate(conds, reqs, gen, max_rows=rows))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = fast.stats["steps"] - steps0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        list(fast.generate(conds, reqs, gen, max_rows=rows))
        torch.cuda.synchronize()
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            d = by_name[e.name]
            d[0] += e.device_time_total
            d[1] += 1
    total = sum(v[0] for v in by_name.values())
    classes: dict[str, float] = defaultdict(float)
    for k, (us, _) in by_name.items():
        classes[kernel_class(k)] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(
        rows=fast.rows_used, requests=len(reqs), steps=steps, wall_ms_per_step=round(wall * 1000 / steps, 3),
        tokens_per_s=round(sum(r.budget for r in reqs) / wall, 1),
        gpu_us_per_step=round(total / steps, 1), kernels_per_step=round(sum(v[1] for v in by_name.values()) / steps, 1),
        classes={k: round(v / steps, 1) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])},
        top=[dict(us_per_step=round(us / steps, 2), per_step=round(c / steps, 2), name=k[:140]) for k, (us, c) in top],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--rows", default="1,0", help="row counts to profile (0: as many as fit)")
    ap.add_argument("--tokens", type=int, default=64, help="steps per sentence")
    ap.add_argument("--book", default=str(ROOT / "bench" / "book.txt"))
    ap.add_argument("--attention", default="fused,kernel,sdpa",
                    help="decode paths to profile: fused (the engine's: Triton attention, and at batch 1 the fused "
                    "GEMV layers), kernel (Triton attention, compiled layer halves at every size), sdpa (padded cache); "
                    "each may carry knobs: fused:pdl=0 (no programmatic dependent launch), :prefetch=0 (no early "
                    "read of the first key block), :target=N (decode_attention.TARGET_PROGRAMS), :template=0 (no voice template)")
    args = ap.parse_args()
    import torch

    from ttsbatch.bench import book_sentences
    from ttsbatch.config import GenerationOptions
    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.stock import SynthesisRequest
    from ttsbatch.engine import decode_attention as da
    from ttsbatch.engine import t3_fast
    from ttsbatch.engine.t3_fast import FastT3
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    if not torch.cuda.is_available():
        print("gpu_t3_profile.py: no CUDA GPU", file=sys.stderr)
        return 2
    model = load_model(Path(args.ckpt), "cuda")
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    gen = GenerationOptions(ignore_eos=True, max_new_tokens=args.tokens)
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=args.tokens, runs=[])
    fused_max = t3_fast.FUSED_MAX_SEQS
    defaults = dict(target=da.TARGET_PROGRAMS, prefetch=da.PREFETCH)
    for variant in args.attention.split(","):
        attention, *knobs = variant.split(":")
        knob = dict(k.split("=", 1) for k in knobs)
        os.environ["TTSBATCH_PDL"] = knob.get("pdl", "1")
        da.TARGET_PROGRAMS = int(knob.get("target", defaults["target"]))
        da.PREFETCH = knob["prefetch"] != "0" if "prefetch" in knob else defaults["prefetch"]
        t3_fast.FUSED_MAX_SEQS = fused_max if attention == "fused" else 0
        fast = FastT3(model, decode_kernel=attention != "sdpa")
        if knob.get("template") == "0":  # no voice template: every prompt read from its own cache
            fast._ensure_template = lambda *a: None
        assert fast.w.decode_kernel == (attention != "sdpa"), fast.decode_kernel_error
        attention = variant
        for rows in (int(x) for x in args.rows.split(",") if x):
            n = 2 * rows if rows else 512
            texts = book_sentences(Path(args.book), n)
            reqs = [SynthesisRequest(t, 1000 + i, args.tokens) for i, t in enumerate(texts)]
            r = profile_rows(fast, conds, gen, reqs, rows or None) | dict(attention=attention)
            res["runs"].append(r)
            print(f"\n{attention}, rows {r['rows']}: {r['wall_ms_per_step']} ms/step wall, {r['gpu_us_per_step']} us/step of kernels, "
                  f"{r['kernels_per_step']} kernels/step, {r['tokens_per_s']} tokens/s", flush=True)
            for c, us in r["classes"].items():
                print(f"  {c:24s} {us:9.1f} us/step")
            for t in r["top"]:
                print(f"  {t['us_per_step']:9.2f} us {t['per_step']:6.1f}x  {t['name'][:110]}")
        del fast
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "t3_profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
