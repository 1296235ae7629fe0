#!/usr/bin/env python
"""The CFM estimator's mid-block resnet (``cfm_estimator.resnet_mid``) at a batch's packed
shape, in variants (CUDA GPU): where its ~1 ms a call goes (a profile of one S3Gen batch gave
the 120 mid resnets of its 10 steps 118 ms, against 192 ms for the 560 transformer-block
tails, which do more FLOPs).

    python scripts/gpu_resnet_variants.py [--rows 45000] [--variants all] [--code]

Variants (each compiled as the engine compiles its regions, dynamic rows):
- ``cudnn``: the region as it is (convs through cuDNN over a channels-first view);
- ``gemm``: ``resnet_mid_mm`` (each conv one GEMM over its three shifted inputs side by side);
- each of those with ``+expmish``: Mish as ``x * n / (n + 2)``, ``n = e^x (e^x + 2)`` (one exp
  and a division instead of exp, log1p and tanh; the same function to fp32 rounding);
- ``gemm+realize``: ``gemm`` compiled with Inductor's ``realize_reads_threshold`` at 1, so that
  the conv block's output is written once instead of recomputed for each of the three taps.

Prints ms a call (CUDA events, 20 calls), the max |diff| against the fp32 region, and with
``--code`` the profile's kernels for each; writes $OUT/resnet_variants.json when OUT is set.
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
    ap.add_argument("--rows", type=int, default=45000, help="packed frames per CFG half (64 items of ~700 frames)")
    ap.add_argument("--item", type=int, default=700, help="frames per packed item (a 2-frame gap after each)")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--code", action="store_true", help="print each variant's kernels (torch.profiler)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from gpu_attn import cuda_ms
    from ttsbatch.engine import cfm_estimator as ce

    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    N, C, E = args.rows, 256, 1024

    def rnd(*shape, scale=1.0, dtype=torch.float32):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    x = rnd(2, N, C)
    mask = torch.ones(2, 1, N, device=dev)
    for s in range(args.item, N, args.item + 2):
        mask[:, :, s : s + 2] = 0
    x = x * mask.transpose(1, 2)
    temb = rnd(2, E, dtype=bf)
    conv = dict(c1w=rnd(C, C, 3, scale=(3 * C) ** -0.5), c2w=rnd(C, C, 3, scale=(3 * C) ** -0.5), rw=rnd(C, C, 1, scale=C ** -0.5))
    ln = [1 + rnd(C, scale=0.1), rnd(C, scale=0.1)]
    mw, mb = rnd(C, E, scale=E ** -0.5), rnd(C, scale=0.1)
    bias = [rnd(C, scale=0.1) for _ in range(3)]

    def weights(gemm: bool, dtype):
        """_resnet's weight arguments as the engine prepares them: matrices and biases in the
        compute dtype, LayerNorms fp32; the convs as GEMM matrices for the *_mm regions."""
        d = lambda t: t.to(dtype).contiguous()  # noqa: E731
        cw = (lambda w: d(w.permute(0, 2, 1).reshape(C, -1))) if gemm else d
        rw = conv["rw"][..., 0] if gemm else conv["rw"]
        return (cw(conv["c1w"]), d(bias[0]), *ln, d(mw), d(mb), cw(conv["c2w"]), d(bias[1]), *ln, d(rw), d(bias[2]))

    ref = ce.resnet_mid(x, mask, temb.float(), *weights(False, torch.float32), eps=1e-5)
    keep, rows_b = ce.rows_aux(2, N, 3, bf, dev)
    ins = {False: (x, mask, temb), True: (x.reshape(-1, C), mask, keep, rows_b, temb)}  # cudnn's inputs, gemm's

    def expmish(v):
        e = torch.exp(torch.clamp(v, max=20.0))
        n = e * (e + 2.0)
        return torch.where(v > 20.0, v, v * n / (n + 2.0))

    variants = {
        "cudnn": (ce.resnet_mid, False, {}),
        "gemm": (ce.resnet_mid_mm, True, {}),
        "gemm+realize": (ce.resnet_mid_mm, True, {"realize_reads_threshold": 1}),
    }
    want = None if args.variants == "all" else set(args.variants.split(","))
    rows = []
    flops = 2 * 2 * N * (2 * 3 * C * C + C * C)
    for name in ["cudnn", "gemm", "gemm+realize", "cudnn+expmish", "gemm+expmish", "gemm+realize+expmish"]:
        if want is not None and name not in want:
            continue
        base = name.replace("+expmish", "")
        fn, gemm, opts = variants[base]
        w = weights(gemm, bf)
        torch._dynamo.reset()
        real_mish = F.mish
        if name.endswith("+expmish"):
            F.mish = expmish  # the regions call F.mish when traced (and dynamo guards on it: kept until done)
        try:
            # as the engine marks them (Regions.dyn): the rows dynamic, channels and weights static
            c = torch.compile(lambda *a, fn=fn: fn(*a, eps=1e-5), dynamic=False, fullgraph=True, options=opts or None)
            a = (*ins[gemm], *w)
            marks = ((0,), (0, 2), (0,), (0,), (0,)) if gemm else ((0, 1), (0, 2), (0,))  # x, mask, [keep, rows_b,] temb
            for t, dims in zip(a, marks):
                for d_ in dims:
                    torch._dynamo.mark_dynamic(t, d_)
            t0 = time.perf_counter()
            c(*a)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms = cuda_ms(lambda: c(*a))
            err = (c(*a).view(ref.shape) - ref).abs().max().item()
            row = dict(variant=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), max_err=round(err, 4), compile_s=round(compile_s, 1))
            if args.code:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    c(*a)
                    torch.cuda.synchronize()
                row["kernels"] = [
                    dict(us=round(e.self_device_time_total, 1), name=e.key[:110])
                    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total) if e.self_device_time_total > 0
                ]
        finally:
            F.mish = real_mish
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
        for k in row.get("kernels", []):
            print(f"    {k['us']:9.1f} us  {k['name']}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "resnet_variants.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
