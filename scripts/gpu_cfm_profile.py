#!/usr/bin/env python
"""Where one S3Gen batch's GPU time goes, as the engine runs it (CUDA GPU), for each way of
running the CFM estimator's convs (``BatchedS3Gen(conv=...)``).

    python scripts/gpu_cfm_profile.py [--batch 64] [--tokens 100] [--spread 40] [--convs native,gemm]

A batch of book-like chunks (``--tokens`` +- ``--spread`` speech tokens, 25 a second, each
with the built-in voice's prompt), the engine's defaults otherwise (regions and HiFiGAN
compiled, FA4 where installed, packed CFM). For each conv setting:

- ``wall_ms``: ``synthesize`` of the batch, the median of 5 calls, and the stages (encoder,
  CFM, HiFiGAN) from ``BatchedS3Gen(profile=True)``'s events;
- ``cfm_tflops``: the estimator's useful FLOPs (each item's own frames, both CFG halves, every
  step; counted by ``FlopCounterMode`` on the stock estimator, one item at a time) over the
  CFM's time, and the share of bf16 dense peak (``--peak``, 989 TFLOP/s: H100/H200 SXM);
- ``regions``: GPU ms per estimator region and for the attention over one batch (CUDA events
  around every call), with call counts;
- ``kernels``: torch.profiler's kernel time by class and the top kernels.

Prints a summary and writes $OUT/cfm_profile.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from ttsbatch.bench_s3gen import estimator_flops  # noqa: E402


class RegionTimer:
    """CUDA events around every call of the estimator's regions and its attention."""

    def __init__(self, s3):
        import torch

        self.torch = torch
        self.s3, self.events, self.saved = s3, [], []
        r = s3.fused.r
        for name in r._functions:
            self.saved.append((r, name, getattr(r, name)))
            setattr(r, name, self._wrap(name, getattr(r, name)))
        self.saved.append((s3, "_flash", s3._flash))
        s3._flash = self._wrap("attention", s3._flash)

    def _wrap(self, name, fn):
        def timed(*a, **k):
            s, e = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn(*a, **k)
            e.record()
            self.events.append((name, s, e))
            return out

        return timed

    def restore(self) -> dict:
        for obj, name, fn in self.saved:
            setattr(obj, name, fn)
        self.torch.cuda.synchronize()
        out: dict = {}
        for name, s, e in self.events:
            d = out.setdefault(name, dict(ms=0.0, calls=0))
            d["ms"] += s.elapsed_time(e)
            d["calls"] += 1
        return {k: dict(ms=round(v["ms"], 2), calls=v["calls"]) for k, v in sorted(out.items(), key=lambda kv: -kv[1]["ms"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=100, help="mean speech tokens per chunk (25/s; the book's chunks are ~4 s)")
    ap.add_argument("--spread", type=int, default=40)
    ap.add_argument("--convs", default="native,gemm", help="BatchedS3Gen conv settings (native: cuDNN's convs)")
    ap.add_argument("--peak", type=float, default=989.0, help="bf16 dense TFLOP/s of the GPU")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from gpu_attn import kernel_tally
    from ttsbatch.engine.model import load_model, write_random_checkpoint
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    if not torch.cuda.is_available():
        print("gpu_cfm_profile.py: no CUDA GPU", file=sys.stderr)
        return 2
    if not (Path(args.ckpt) / "s3gen.safetensors").exists():
        write_random_checkpoint(args.ckpt, "full", seed=0)
    model = load_model(args.ckpt, "cuda")
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    g = torch.Generator().manual_seed(0)
    lens = (args.tokens + torch.randint(-args.spread, args.spread + 1, (args.batch,), generator=g)).tolist()
    toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lens]
    seeds = list(range(args.batch))
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, batch=args.batch,
                     audio_s=round(sum(lens) / 25, 1), runs={})
    est = model.s3gen.flow.decoder.estimator
    for conv in (c for c in args.convs.split(",") if c):
        s3 = BatchedS3Gen(model, max_batch=args.batch, compile_regions=True, compile_vocoder=True, profile=True, conv=conv)
        voice = s3.prepare_voice(conds.gen)
        if "flops" not in res:
            frames = [2 * (voice.n_prompt_tokens + n) for n in lens]
            cache: dict = {}
            res["flops"] = 2 * 10 * sum(cache.setdefault(L, estimator_flops(est, L, "cuda")) for L in frames)
        t0 = time.perf_counter()
        for _ in range(2):
            wavs = s3.synthesize(toks, voice, seeds=seeds)
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        s3.times.encoder = s3.times.cfm = s3.times.hifigan = 0.0
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            s3.synthesize(toks, voice, seeds=seeds)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        stages = {k: round(1000 * getattr(s3.times, k) / 5, 1) for k in ("encoder", "cfm", "hifigan")}
        wall = statistics.median(walls)
        tflops = res["flops"] / (stages["cfm"] / 1000) / 1e12
        timer = RegionTimer(s3)
        s3.synthesize(toks, voice, seeds=seeds)
        regions = timer.restore()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            s3.synthesize(toks, voice, seeds=seeds)
            torch.cuda.synchronize()
        kern, total, by_class = kernel_tally(prof)
        run = dict(
            warm_s=round(warm_s, 1), wall_ms=round(1000 * wall, 1), walls_ms=[round(1000 * w, 1) for w in walls],
            x_realtime=round(res["audio_s"] / wall, 1), stages_ms=stages, cfm_tflops=round(tflops, 1),
            cfm_peak_pct=round(100 * tflops / args.peak, 1), attention=s3.attention, pack=s3.pack, regions=regions,
            kernel_ms=round(total, 1),
            by_class={c: dict(ms=round(t, 1), pct=round(100 * t / total, 1)) for c, t in sorted(by_class.items(), key=lambda x: -x[1])},
            top=[dict(ms=round(t, 2), calls=c, pct=round(100 * t / total, 1), name=k[:120]) for t, c, k in sorted(kern, reverse=True)[:30]],
        )
        if "first" not in res:  # the first setting's audio, for the others to be compared with
            res["first"] = conv
            first_wavs = wavs
        run["max_wav_diff_vs_first"] = float(max(abs(a - b).max() for a, b in zip(wavs, first_wavs)))
        run["max_wav"] = float(max(abs(a).max() for a in wavs))
        res["runs"][conv] = run
        print(f"conv={conv}: {run['wall_ms']} ms a batch ({run['x_realtime']}x), stages {stages}, CFM {run['cfm_tflops']} TFLOP/s "
              f"({run['cfm_peak_pct']}% of {args.peak}), attention {s3.attention}, pack {s3.pack}, warm-up {run['warm_s']} s, "
              f"audio vs {res['first']}: max diff {run['max_wav_diff_vs_first']:.2e} (peak {run['max_wav']:.3f})", flush=True)
        for name, d in regions.items():
            print(f"    {name:18s} {d['ms']:9.2f} ms {d['calls']:6d} calls", flush=True)
        for c, d in run["by_class"].items():
            print(f"    [{c}] {d['ms']} ms {d['pct']}%", flush=True)
        for row in run["top"][:20]:
            print(f"    {row['pct']:5.1f}% {row['ms']:8.2f} ms {row['calls']:6d}x {row['name']}", flush=True)
        del s3
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cfm_profile.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
