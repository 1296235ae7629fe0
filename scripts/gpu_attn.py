#!/usr/bin/env python
"""Where S3Gen's CFM time goes, and which attention kernel would serve it best (CUDA GPU).

    python scripts/gpu_attn.py [--ckpt DIR] [--batch 64] [--tokens 150]

1. Attention alone, at the CFM estimator's shapes (2 x batch rows for CFG, 8 heads of 64,
   prompt + chunk frames, each row with its own valid key length): the varlen flash kernel
   the engine uses, against SDPA's flash / cuDNN / memory-efficient backends and
   FlexAttention with a key-padding block mask. Time (CUDA events) and TFLOP/s of the valid
   part (4 * rows * heads * T_q * T_k_valid * 64).
2. One batch of S3Gen (``BatchedS3Gen``, bf16, estimator regions compiled) under
   torch.profiler: GPU time per kernel class (attention, GEMM, convolution, Triton-fused,
   other) and the top kernels.
3. T3's decode attention (one query per sequence, KV cache padded to the longest row)
   as the engine runs it, against kernels that read only each sequence's live keys.

Prints both; writes $OUT/attn.json when OUT is set.
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cuda_ms(fn, iters: int = 20) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def graph_us(fn, reps: int = 20, iters: int = 10) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph (``reps`` calls per graph):
    the cost inside the engine's captured decode step, without Python's launch overhead."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000 / (iters * reps)


def attention_table(rows: int, heads: int, T: int, seed: int = 0) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt, D = "cuda", torch.bfloat16, 64
    g = torch.Generator(device=dev).manual_seed(seed)
    used = torch.randint(max(1, T - 200), T + 1, (rows,), device=dev, generator=g, dtype=torch.int32)
    q, k, v = (torch.randn(rows * T, heads, D, device=dev, dtype=dt, generator=g) for _ in range(3))
    cu = torch.arange(0, rows + 1, device=dev, dtype=torch.int32) * T
    scale = D**-0.5
    flops = 4.0 * heads * D * T * float(used.sum())
    dense = [t.view(rows, T, heads, D).transpose(1, 2) for t in (q, k, v)]
    valid = torch.arange(T, device=dev).view(1, 1, 1, T) < used.view(rows, 1, 1, 1)  # (rows, 1, 1, T)
    bias = torch.zeros(rows, 1, 1, T, device=dev, dtype=dt).masked_fill(~valid, float("-inf"))

    def varlen():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, T, T, 0.0, False, False, scale=scale, seqused_k=used)[0]

    ref = varlen().view(rows, T, heads, D).transpose(1, 2).float()
    out: list[dict] = []

    def add(name, fn, exact: bool):
        try:
            ms = cuda_ms(fn)
            err = (fn().float() - ref).abs().max().item() if exact else None
            out.append(dict(kernel=name, ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1), max_err=err))
        except Exception as e:  # a backend that cannot take these inputs here
            out.append(dict(kernel=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        print(f"  T={T:5d} {out[-1]}", flush=True)

    add("varlen flash (engine)", lambda: varlen().view(rows, T, heads, D).transpose(1, 2), True)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def dense_fn(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(*dense, scale=scale)

        add(f"sdpa {name}, no mask (padding attended)", dense_fn, False)
        if name != "flash":
            def masked_fn(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(*dense, attn_mask=bias, scale=scale)

            add(f"sdpa {name}, key-padding bias", masked_fn, True)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def keep(b, h, q_idx, kv_idx):
            return kv_idx < used[b]

        bm = create_block_mask(keep, rows, None, T, T, device=dev)
        flex = torch.compile(flex_attention, dynamic=False)
        add("flex_attention, key-padding block mask", lambda: flex(*dense, block_mask=bm, scale=scale), True)
    except Exception as e:
        out.append(dict(kernel="flex_attention", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
    return out


def decode_attention_table(seqs: int, kv_len: int, max_len: int = 1024, heads: int = 16, seed: int = 0) -> list[dict]:
    """T3's decode attention (one query per sequence over its KV cache), as the engine runs it
    (SDPA over the cache padded to ``kv_len`` with an additive mask) and alternatives that read
    only each sequence's live keys. GB/s counts the live K/V bytes only."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt, D = "cuda", torch.bfloat16, 64
    g = torch.Generator(device=dev).manual_seed(seed)
    live = torch.randint(kv_len // 3, kv_len + 1, (seqs,), device=dev, generator=g, dtype=torch.int32)
    q = torch.randn(seqs, heads, 1, D, device=dev, dtype=dt, generator=g)
    k_hl = torch.randn(seqs, heads, max_len, D, device=dev, dtype=dt, generator=g)  # the engine's layout
    v_hl = torch.randn(seqs, heads, max_len, D, device=dev, dtype=dt, generator=g)
    k_lh, v_lh = (t.transpose(1, 2).contiguous() for t in (k_hl, v_hl))  # (seqs, max_len, heads, D)
    valid = (torch.arange(kv_len, device=dev)[None, :] < live[:, None])[:, None, None, :]
    mask = torch.zeros(valid.shape, dtype=dt, device=dev).masked_fill(~valid, float("-inf"))
    scale = D**-0.5
    live_bytes = float(live.sum()) * heads * D * 2 * 2
    cu_q = torch.arange(seqs + 1, device=dev, dtype=torch.int32)
    cu_k = cu_q * max_len

    def engine():
        return F.scaled_dot_product_attention(q, k_hl[:, :, :kv_len], v_hl[:, :, :kv_len], attn_mask=mask, scale=scale)

    ref = engine().float()
    out: list[dict] = []

    def add(name, fn):
        try:
            ms = cuda_ms(fn, 50)
            err = (fn().float().reshape(ref.shape) - ref).abs().max().item()
            us_g = graph_us(fn)
            out.append(dict(kernel=name, us=round(ms * 1000, 1), graph_us=round(us_g, 1), live_gb_s=round(live_bytes / us_g / 1e3, 1), max_err=err))
        except Exception as e:
            out.append(dict(kernel=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        print(f"  decode seqs={seqs} kv={kv_len} {out[-1]}", flush=True)

    add("sdpa default, padded + mask (engine)", engine)
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        def forced(be=be):
            with sdpa_kernel([be]):
                return engine()

        add(f"sdpa {name}, padded + mask", forced)

    def varlen():
        return torch.ops.aten._flash_attention_forward(
            q.view(seqs, heads, D), k_lh.view(seqs * max_len, heads, D), v_lh.view(seqs * max_len, heads, D),
            cu_q, cu_k, 1, kv_len, 0.0, False, False, scale=scale, seqused_k=live,
        )[0]

    add("varlen flash, live keys only, (seqs, len, heads, D) cache", varlen)

    # FlexAttention's decoding kernel (split-KV, Triton) over the engine's layout and the whole
    # max_len cache, with a block mask that lists only each sequence's live blocks
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    for block in (128, 64):
        nblk = max_len // block
        idx = torch.arange(nblk, device=dev, dtype=torch.int32).expand(seqs, 1, 1, nblk).contiguous()
        used = live - 1  # the query's own position: keys at positions <= used

        def live_blocks(block=block, idx=idx, used=used):
            num = (used // block + 1).to(torch.int32).view(seqs, 1, 1)
            bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= used[b], seq_lengths=(1, max_len), compute_q_blocks=False)
            return flex(q, k_hl, v_hl, block_mask=bm, scale=scale)

        add(f"flex decoding, live blocks of {block} only, whole cache", live_blocks)

    # the engine's Triton kernel (ttsbatch/engine/decode_attention.py): also writes this
    # step's K/V at the last live position
    from ttsbatch.engine.decode_attention import attend_and_cache

    kc, vc = k_hl.clone(), v_hl.clone()
    pos = (live - 1).to(torch.int64)
    at = torch.arange(seqs, device=dev)
    kn, vn = k_hl[at, :, pos][:, :, None], v_hl[at, :, pos][:, :, None]  # rewriting what is there: same result as the reference
    add("triton attend_and_cache (live keys, K/V write included)", lambda: attend_and_cache(q, kn, vn, kc, vc, pos, kv_len, scale))
    return out


def copy_bandwidth_gb_s() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second (the issue's yardstick)."""
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() / ms / 1e6


def classify(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "conv" in n or "implicit" in n or "xmma_fprop" in n or "winograd" in n:
        return "convolution"
    if "gemm" in n or "nvjet" in n or "cutlass" in n or "matmul" in n or "sm90_xmma" in n or n.startswith("aten::mm") or "addmm" in n:
        return "gemm"
    if n.startswith("triton"):
        return "triton (fused)"
    if "fft" in n:
        return "fft"
    return "other"


def kernel_tally(prof) -> tuple[list, float, dict]:
    """A torch.profiler run's device kernels: ([(ms, calls, name)], total ms, {class: ms})."""
    kern = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        if t > 0:
            kern.append((t / 1000, e.count, e.key))
    by_class: dict[str, float] = {}
    for t, _, k in kern:
        by_class[classify(k)] = by_class.get(classify(k), 0.0) + t
    return kern, sum(t for t, _, _ in kern) or 1.0, by_class


def s3gen_profile(ckpt: str, batch: int, tokens: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ttsbatch.engine.model import load_model, write_random_checkpoint
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    if not (Path(ckpt) / "s3gen.safetensors").exists():
        write_random_checkpoint(ckpt, "full", seed=0)
    model = load_model(ckpt, "cuda")
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    s3 = BatchedS3Gen(model, max_batch=batch, compile_regions=True)
    voice = s3.prepare_voice(conds.gen)
    g = torch.Generator().manual_seed(0)
    toks = [torch.randint(0, 6561, (int(tokens + d),), generator=g).tolist() for d in torch.randint(-20, 21, (batch,), generator=g)]
    seeds = list(range(batch))
    t0 = time.perf_counter()
    s3.synthesize(toks, voice, seeds=seeds)  # compiles (or loads) the regions
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    s3.synthesize(toks, voice, seeds=seeds)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        s3.synthesize(toks, voice, seeds=seeds)
        torch.cuda.synchronize()
    kern, total, by_class = kernel_tally(prof)
    audio = sum(len(t) for t in toks) / 25
    return dict(
        batch=batch, audio_s=round(audio, 1), warm_s=round(warm, 2), wall_ms=round(wall * 1000, 1),
        x_realtime=round(audio / wall, 1), gpu_ms=round(total, 1),
        by_class={c: dict(ms=round(t, 1), pct=round(100 * t / total, 1)) for c, t in sorted(by_class.items(), key=lambda x: -x[1])},
        top=[dict(ms=round(t, 2), calls=c, pct=round(100 * t / total, 1), name=k[:110]) for t, c, k in sorted(kern, reverse=True)[:25]],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=150, help="speech tokens per chunk (25/s)")
    ap.add_argument("--lengths", default="650,800,1100", help="attention lengths T (prompt + chunk mel frames)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_attn.py: no CUDA GPU", file=sys.stderr)
        return 2
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(), attention={})
    print(f"{res['device']}, torch {res['torch']}, cuDNN {res['cudnn']}", flush=True)
    for T in (int(x) for x in args.lengths.split(",") if x):
        res["attention"][T] = attention_table(2 * args.batch, 8, T)
    res["copy_gb_s"] = round(copy_bandwidth_gb_s(), 1)
    print(f"device-to-device copy: {res['copy_gb_s']} GB/s (read + write)", flush=True)
    res["decode_attention"] = {}
    for seqs, kv in ((2, 256), (2, 768), (128, 384), (256, 640), (512, 512)):
        res["decode_attention"][f"{seqs}x{kv}"] = decode_attention_table(seqs, kv)
    if not args.no_profile:
        p = s3gen_profile(args.ckpt, args.batch, args.tokens)
        res["s3gen_profile"] = p
        print(f"S3Gen batch {p['batch']}: {p['audio_s']} s of audio in {p['wall_ms']} ms ({p['x_realtime']}x); GPU kernels {p['gpu_ms']} ms")
        for c, d in p["by_class"].items():
            print(f"  {c:16s} {d['ms']:8.1f} ms {d['pct']:5.1f}%")
        for row in p["top"]:
            print(f"  {row['pct']:5.1f}% {row['ms']:8.2f} ms {row['calls']:6d}x {row['name']}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "attn.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
