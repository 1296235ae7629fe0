#!/usr/bin/env python
"""Batched S3Gen vs stock S3Gen on a CUDA GPU (full-size random checkpoint).

    python scripts/gpu_s3gen.py [--ckpt DIR] [--batches 16,32,64] [--compile-batches 32,64]

Writes a full random checkpoint (``write_random_checkpoint(dir, "full")``) unless ``--ckpt``
or ``TTSBATCH_FULL_CKPT`` names one that exists. Measures stock ``s3gen.inference`` per chunk
(16 chunks of ~150 tokens = 6 s each) and batched S3Gen (fp32 and bf16, eager; bf16 with
torch.compile + a CUDA graph of the CFM loop for --compile-batches, default 64): audio seconds per second,
per-stage times (encoder, CFM, HiFiGAN; with the CFM estimator's regions compiled, and
HiFiGAN's too for --vocoder-dtypes, and the flow encoder's with --encoder-compiled), the CFM estimator's achieved TFLOP/s (FLOPs of one
Euler step counted with FlopCounterMode, divided by the measured CFM time per step), peak
memory, max abs diff batched-vs-stock (mel, fp32 and bf16; waveform fp32) with stock's noise
injected, and whether the per-bucket work runs under CUDA sync-debug "error". Prints a table;
writes $OUT/s3gen.json when OUT is set. Meant to finish in < 6 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--chunks", type=int, default=16, help="chunks for the stock run")
    ap.add_argument("--tokens", type=int, default=150, help="mean speech tokens per chunk (25/s)")
    ap.add_argument("--steps", type=int, default=10, help="CFM steps (stock default 10)")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--compile-batches", default="64", help="bf16 batch sizes to also run compiled ('' = none); ~100 s of compiling each")
    ap.add_argument("--dtypes", default="fp32,bf16", help="eager configs to run")
    ap.add_argument("--regions-batches", default="64", help="bf16 batch sizes to run with the CFM estimator's regions compiled (the fast engine's default on CUDA; '' = none)")
    ap.add_argument("--regions-mode", default="", help="torch.compile mode of the estimator's regions, e.g. max-autotune-no-cudagraphs (GEMM epilogue fusion, minutes of autotuning cold); '' = default")
    ap.add_argument("--vocoder-dtypes", default="fp32", help="for each (fp32, bf16), the --regions-batches rows again with HiFiGAN's regions compiled too, their convs in that dtype ('' = none)")
    ap.add_argument("--encoder-compiled", action="store_true", help="each --vocoder-dtypes row once more with the flow encoder compiled too (compile_encoder)")
    ap.add_argument("--fa4", action="store_true", help="each --vocoder-dtypes row once more with FlashAttention 4 as the CFM attention (attention='fa4'; scripts/fa4_wheels.sh)")
    ap.add_argument("--graphs", action="store_true", help="each --vocoder-dtypes row once more with the CFM Euler step captured as a CUDA graph per shape around the compiled regions (cuda_graphs=True; batches padded to a power of two): what the host's launches cost")
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip what is left after this many seconds")
    args = ap.parse_args()
    t_start = time.time()

    import torch

    if not torch.cuda.is_available():
        print("gpu_s3gen.py: no CUDA GPU visible to PyTorch", file=sys.stderr)
        return 2
    from torch.utils.flop_counter import FlopCounterMode

    from ttsbatch.engine.model import load_model, write_random_checkpoint
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen, length_mask_f
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    ckpt = Path(args.ckpt)
    if not (ckpt / "s3gen.safetensors").is_file():
        log(f"writing a full random checkpoint to {ckpt} ...")
        write_random_checkpoint(ckpt, "full", seed=0)
    model = load_model(ckpt, "cuda")
    s3 = model.s3gen
    gen = VoiceCache(model).get(BUILTIN, 0.5).gen
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    log(f"model loaded on {gpu} ({time.time() - t_start:.0f} s)")

    steps = args.steps
    g = torch.Generator().manual_seed(0)

    def make_chunks(n):
        lo, hi = int(args.tokens * 0.93), int(args.tokens * 1.07)
        return [torch.randint(0, 6561, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g) for _ in range(n)]

    def sync():
        torch.cuda.synchronize()

    res: dict = dict(gpu=gpu, steps=steps, tokens_per_chunk=args.tokens, configs=[], notes=[])
    sr = 24000

    # ---------------------------------------------------------------- stock, per chunk
    stock_chunks = make_chunks(args.chunks)
    with torch.inference_mode():
        s3.inference(speech_tokens=stock_chunks[0].to(dev), ref_dict=gen, n_cfm_timesteps=steps)  # warm-up
        sync()
        torch.cuda.reset_peak_memory_stats()
        t_flow = t_hift = 0.0
        samples = 0
        t0 = time.perf_counter()
        for tok in stock_chunks:
            a = time.perf_counter()
            mel = s3.flow_inference(tok.to(dev), ref_dict=gen, n_cfm_timesteps=steps, finalize=True)
            sync()
            b = time.perf_counter()
            wav, _ = s3.hift_inference(mel, None)
            wav[:, : len(s3.trim_fade)] *= s3.trim_fade
            wav = wav.cpu()
            c = time.perf_counter()
            t_flow += b - a
            t_hift += c - b
            samples += wav.shape[-1]
        wall = time.perf_counter() - t0
    stock = dict(
        name="stock per chunk (fp32)", batch=1, wall_s=wall, audio_s=samples / sr, rate=samples / sr / wall,
        enc_cfm_s=t_flow, hifigan_s=t_hift, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    res["stock"] = stock
    log(f"stock: {stock['audio_s']:.1f} s audio in {wall:.2f} s = {stock['rate']:.1f} audio-s/s")

    # ---------------------------------------------------------------- accuracy with stock's noise
    # strict fp32 for the comparison: cuDNN convs default to TF32, which alone moves the mel by ~1e-3
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    acc_chunks = stock_chunks[:4]
    b32 = BatchedS3Gen(model, dtype=torch.float32)
    voice = b32.prepare_voice(gen)
    res["voice"] = dict(prompt_tokens=voice.n_prompt_tokens, prompt_frames=voice.n_prompt_frames)
    zs = [torch.randn(1, 80, 2 * (voice.n_prompt_tokens + t.numel()), generator=g).to(dev) for t in acc_chunks]
    us = [torch.rand(1, 9, 1, generator=g).to(dev) for _ in acc_chunks]
    sines = [torch.randn(1, 9, voice.item_frames(t.numel()) * 480, generator=g).to(dev) for t in acc_chunks]
    lo, hi = torch.tensor(-math.pi, device=dev), torch.tensor(math.pi, device=dev)
    phases = [lo + u[0] * (hi - lo) for u in us]
    real_randn_like, real_rand = torch.randn_like, torch.rand
    ref_mels, ref_wavs = [], []
    with torch.inference_mode():
        for i, tok in enumerate(acc_chunks):

            def randn_like(t, *a, i=i, **k):
                if t.dim() == 3 and t.shape[1] == 80:
                    return zs[i].clone().to(t)
                if t.dim() == 3 and t.shape[1] == 9:
                    return sines[i].clone().to(t)
                return torch.zeros_like(t)

            def rand(*shape, i=i, **k):
                return us[i].clone().to(k.get("device") or "cpu")

            torch.randn_like, torch.rand = randn_like, rand
            try:
                mel = s3.flow_inference(tok.to(dev), ref_dict=gen, n_cfm_timesteps=steps, finalize=True)
                wav, _ = s3.hift_inference(mel, None)
                wav[:, : len(s3.trim_fade)] *= s3.trim_fade
            finally:
                torch.randn_like, torch.rand = real_randn_like, real_rand
            ref_mels.append(mel[0].float())
            ref_wavs.append(wav[0].float().cpu())
    noise = [z[0] for z in zs]
    mel32 = b32.synthesize_mels(acc_chunks, voice, steps, noise=noise)
    wav32 = b32.synthesize(acc_chunks, voice, steps, noise=noise, source_noise=[(p, s[0]) for p, s in zip(phases, sines)])
    b16 = BatchedS3Gen(model, dtype=torch.bfloat16)
    mel16 = b16.synthesize_mels(acc_chunks, voice, steps, noise=noise)
    mel_scale = max(float(r.abs().max()) for r in ref_mels)
    acc = dict(
        mel_max_abs_fp32=max(float((a - b).abs().max()) for a, b in zip(ref_mels, mel32)),
        mel_max_abs_bf16=max(float((a - b).abs().max()) for a, b in zip(ref_mels, mel16)),
        mel_mean_abs_bf16=sum(float((a - b).abs().mean()) for a, b in zip(ref_mels, mel16)) / len(ref_mels),
        mel_max_abs_value=mel_scale,
        wav_max_abs_fp32=max(float((torch.from_numpy(b) - a).abs().max()) for a, b in zip(ref_wavs, wav32)),
        wav_max_abs_value=max(float(a.abs().max()) for a in ref_wavs),
        lengths_match=all(a.shape[-1] == b.shape[-1] for a, b in zip(ref_wavs, wav32)),
    )
    torch.backends.cudnn.allow_tf32 = tf32
    res["accuracy"] = acc
    log(f"accuracy (strict fp32, cuDNN TF32 off): {acc}")

    def vocoder_diff(bs):
        """max |wav| of bs's HiFiGAN against eager fp32's (b32) on the fp32 mels above, with
        the same source noise, over each item's own samples."""
        n = torch.tensor([m.shape[1] for m in mel32], device=dev)
        T = int(n.max())
        mel = torch.stack([torch.nn.functional.pad(m, (0, T - m.shape[1])) for m in mel32])
        ph = torch.stack(phases)
        sn = torch.stack([torch.nn.functional.pad(s[0], (0, T * 480 - s.shape[-1])) for s in sines])
        with torch.inference_mode():
            a, b = b32._vocode(mel, n, ph, sn), bs._vocode(mel, n, ph, sn)
        return max(float((a[i, : f * 480] - b[i, : f * 480]).abs().max()) for i, f in enumerate(n.tolist()))

    # ---------------------------------------------------------------- sync-free per-bucket work
    toks = [t.tolist() for t in stock_chunks[:8]]
    n_tok = b16.bucket_for(max(len(t) for t in toks)) // 2
    tokens, lengths = b16._stage_tokens(toks, voice, n_tok)
    T_mel = 2 * tokens.shape[1]
    S = (T_mel - voice.n_prompt_frames) * 480
    z, ph, sn = b16._stage_noise(list(range(8)), toks, voice, T_mel, S, None, None, list(range(8)))

    def runs_sync_free(bs, what):
        """One warm run of the staged bucket, then one under CUDA sync-debug "error"."""
        with torch.inference_mode():
            bs.run_bucket(tokens, lengths, z, ph, sn, voice, steps)
            sync()
            torch.cuda.set_sync_debug_mode("error")
            try:
                bs.run_bucket(tokens, lengths, z, ph, sn, voice, steps)
                return True
            except RuntimeError as e:
                res["notes"].append(f"sync in {what}: {str(e).splitlines()[0][:200]}")
                return False
            finally:
                torch.cuda.set_sync_debug_mode(0)
                sync()

    sync_free = runs_sync_free(b16, "per-bucket work")
    res["sync_free"] = sync_free
    res["flash_attention_bf16"] = b16.flash
    log(f"per-bucket work sync-free: {sync_free}")

    # ---------------------------------------------------------------- batched configs
    def cfm_flops(bs, chunk_list):
        """FLOPs of one Euler step (both CFG halves) for this batch, counted by FlopCounterMode."""
        tl = [t.tolist() for t in chunk_list]
        nt = bs.bucket_for(max(len(t) for t in tl)) // 2
        tokens, lengths = bs._stage_tokens(tl, voice, nt)
        T_mel = 2 * tokens.shape[1]
        with torch.inference_mode():
            mu = bs._encode(tokens, lengths, bs._pos_emb(0, tokens.shape[1]), bs._pos_emb(1, T_mel))
            mask = length_mask_f(2 * lengths, T_mel)
            cond = torch.nn.functional.pad(voice.prompt_feat, (0, T_mel - voice.n_prompt_frames))
            cond = cond.unsqueeze(0).expand(mu.shape[0], -1, -1)
            z = torch.randn_like(mu)
            with FlopCounterMode(display=False) as fc:
                bs._cfm(z, mu, mask, voice.spks, cond, 1, 2 * lengths)
        return fc.get_total_flops()

    def run_config(name, bs, batch, compiled):
        chunk_list = make_chunks(batch)
        seeds = list(range(batch))
        torch.cuda.reset_peak_memory_stats()
        warm = float("nan")
        if compiled or batch == batches[0]:  # eager kernels are warm after the first batch size
            t0 = time.perf_counter()
            for _ in range(2 if bs.cuda_graphs else 1):  # a graphed shape is captured when seen a second time
                bs.synthesize(chunk_list, voice, steps, seeds=seeds)  # warm-up (compiles / captures when compiled)
            warm = time.perf_counter() - t0
        sync()
        t0 = time.perf_counter()
        wavs = bs.synthesize(chunk_list, voice, steps, seeds=seeds)  # waits for its audio itself
        best = time.perf_counter() - t0
        audio = sum(w.shape[0] for w in wavs) / sr
        peak = torch.cuda.max_memory_allocated() / 2**30
        # per-stage times: one more run with per-batch event timing
        bs.profile = True
        bs.times.encoder = bs.times.cfm = bs.times.hifigan = 0.0
        bs.synthesize(chunk_list, voice, steps, seeds=seeds)
        bs.profile = False
        st = bs.times
        row = dict(
            name=name, batch=batch, dtype=str(bs.dtype).replace("torch.", ""), compiled=compiled,
            wall_s=best, warmup_s=warm, audio_s=audio, rate=audio / best, speedup_vs_stock=(audio / best) / stock["rate"],
            encoder_s=st.encoder, cfm_s=st.cfm, hifigan_s=st.hifigan, peak_gib=peak,
            buckets=sorted({b for b, _ in bs.batches([t.numel() for t in chunk_list], voice)}),
        )
        if not bs.compile:  # FLOPs counted on the eager twin (same math) when the regions are compiled
            flops = cfm_flops(bs if not compiled else b16, chunk_list)
            row["cfm_step_tflop"] = flops / 1e12
            row["cfm_tflops_per_s"] = flops * steps / st.cfm / 1e12 if st.cfm > 0 else float("nan")
        res["configs"].append(row)
        log(f"{name} B={batch}: {row['rate']:.0f} audio-s/s ({row['speedup_vs_stock']:.1f}x stock), "
            f"enc {st.encoder * 1e3:.0f} ms, cfm {st.cfm * 1e3:.0f} ms, hifigan {st.hifigan * 1e3:.0f} ms, peak {peak:.1f} GiB, warm-up {warm:.1f} s")
        return row

    batches = [int(b) for b in args.batches.split(",") if b]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for dtype, bs in ((torch.float32, b32), (torch.bfloat16, b16)):
        if str(dtype)[6:].replace("float", "fp").replace("bfp16", "bf16") not in dtypes:
            continue
        for batch in batches:
            if time.time() - t_start > args.budget_s:
                res["notes"].append(f"skipped eager {dtype} B={batch}: time budget")
                continue
            run_config(f"batched eager {str(dtype)[6:]}", bs, batch, False)

    if b16.flash and time.time() - t_start < args.budget_s:  # the same bf16 run with stock's masked SDPA attention
        b16.flash = False
        run_config("batched eager bf16 sdpa-mask", b16, batches[-1], False)
        b16.flash = True

    reg_batches = [int(b) for b in args.regions_batches.split(",") if b]
    if reg_batches:
        br = BatchedS3Gen(model, dtype=torch.bfloat16, compile_regions=True, regions_mode=args.regions_mode or None)
        for batch in reg_batches:
            if time.time() - t_start > args.budget_s:
                res["notes"].append(f"skipped compiled regions B={batch}: time budget")
                continue
            run_config("batched bf16 compiled regions" + (f" ({args.regions_mode})" if args.regions_mode else ""), br, batch, True)
        mr = br.synthesize_mels(acc_chunks, voice, steps, noise=noise)
        res["accuracy"]["mel_max_abs_regions_vs_stock"] = max(float((a - b).abs().max()) for a, b in zip(ref_mels, mr))
        res["accuracy"]["mel_max_abs_regions_vs_eager_bf16"] = max(float((a - b).abs().max()) for a, b in zip(mel16, mr))
        res["regions_sync_free"] = runs_sync_free(br, "compiled regions")
        for name in [d for d in args.vocoder_dtypes.split(",") if d]:
            vdt = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            bv = BatchedS3Gen(model, dtype=torch.bfloat16, compile_regions=True, compile_vocoder=True, vocoder_dtype=vdt)
            for batch in reg_batches:
                if time.time() - t_start > args.budget_s:
                    res["notes"].append(f"skipped compiled vocoder {name} B={batch}: time budget")
                    continue
                run_config(f"bf16 regions+vocoder {name}", bv, batch, True)
            res["accuracy"][f"wav_max_abs_vocoder_{name}_vs_eager_fp32"] = vocoder_diff(bv)

            def variant(label, **kw):
                """The row above once more with ``kw`` (a run that fails is a note, not the end);
                its mel against the compiled regions' on stock's noise. None if not measured."""
                b = BatchedS3Gen(model, dtype=torch.bfloat16, compile_regions=True, compile_vocoder=True, vocoder_dtype=vdt, **kw)
                if b.attention != kw.get("attention", "fa2"):  # the kernel asked for fell back (not installed, not Hopper)
                    res["notes"].append(f"{label}: {kw['attention']} not usable here, skipped")
                    return None
                for batch in reg_batches:
                    if time.time() - t_start > args.budget_s:
                        res["notes"].append(f"skipped {label} {name} B={batch}: time budget")
                        continue
                    try:
                        run_config(f"bf16 regions+vocoder {name}, {label}", b, batch, True)
                    except Exception as e:  # report, keep the rest of the summary
                        res["notes"].append(f"{label} B={batch} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                        log(res["notes"][-1])
                        return None
                m = b.synthesize_mels(acc_chunks, voice, steps, noise=noise)
                res["accuracy"][f"mel_max_abs_{label.replace(' ', '_')}_vs_regions_{name}"] = max(
                    float((x - y).abs().max()) for x, y in zip(mr, m))
                return b

            if args.fa4:
                variant("FA4 attention", attention="fa4")
            if args.graphs:
                variant("CFM step graphed", cuda_graphs=True)
            if args.encoder_compiled:
                be = variant("encoder compiled", compile_encoder=True)
                if be is not None:
                    res["encoder_sync_free"] = runs_sync_free(be, "compiled encoder")
        from torch._dynamo.utils import counters

        res["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles", "inductor")}
        log(f"compiled regions: accuracy {res['accuracy']}, dynamo {res['dynamo']}")

    comp_batches = [int(b) for b in args.compile_batches.split(",") if b]
    if comp_batches:
        bc = BatchedS3Gen(model, dtype=torch.bfloat16, compile=True, cuda_graphs=True)
        for batch in comp_batches:
            if time.time() - t_start > args.budget_s:
                res["notes"].append(f"skipped compiled bf16 B={batch}: time budget")
                continue
            try:
                run_config("batched compiled+graph bf16", bc, batch, True)
            except Exception as e:  # report, keep the rest of the summary
                res["notes"].append(f"compiled B={batch} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                log(res["notes"][-1])
                break
        # the compiled path against eager bf16 on the same noise (graphs + inductor must not change results)
        if time.time() - t_start < args.budget_s + 60:
            try:
                mc = bc.synthesize_mels(acc_chunks, voice, steps, noise=noise)
                res["accuracy"]["mel_max_abs_compiled_vs_stock"] = max(float((a - b).abs().max()) for a, b in zip(ref_mels, mc))
            except Exception as e:
                res["notes"].append(f"compiled accuracy check failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    res["total_s"] = time.time() - t_start

    # ---------------------------------------------------------------- summary
    print()
    print(f"S3Gen on {gpu}: {args.chunks} stock chunks / batches of ~{args.tokens} tokens (~{args.tokens / 25:.0f} s audio each), {steps} CFM steps")
    hdr = f"{'config':<30} {'B':>3} {'audio-s/s':>10} {'x stock':>8} {'enc ms':>8} {'cfm ms':>8} {'hift ms':>8} {'TFLOP/s':>8} {'peak GiB':>9} {'warm s':>7}"
    print(hdr)
    print("-" * len(hdr))
    print(f"{stock['name']:<30} {1:>3} {stock['rate']:>10.1f} {1.0:>8.1f} {'':>8} {stock['enc_cfm_s'] * 1e3:>8.0f} {stock['hifigan_s'] * 1e3:>8.0f} {'':>8} {stock['peak_gib']:>9.1f} {'':>7}")
    for r in res["configs"]:
        tf = f"{r['cfm_tflops_per_s']:.0f}" if "cfm_tflops_per_s" in r else "-"
        print(f"{r['name']:<30} {r['batch']:>3} {r['rate']:>10.1f} {r['speedup_vs_stock']:>8.1f} {r['encoder_s'] * 1e3:>8.0f} {r['cfm_s'] * 1e3:>8.0f} {r['hifigan_s'] * 1e3:>8.0f} {tf:>8} {r['peak_gib']:>9.1f} {r['warmup_s']:>7.1f}")
    a = res["accuracy"]
    print(f"(stock row: 'cfm ms' is encoder+CFM for all {args.chunks} chunks, 'hift ms' HiFiGAN; batched rows: one synthesize() call)")
    print(f"mel max |batched - stock| (stock noise injected, strict fp32 reference): fp32 {a['mel_max_abs_fp32']:.2e}, bf16 {a['mel_max_abs_bf16']:.2e} "
          f"(mean {a['mel_mean_abs_bf16']:.2e}; |mel| up to {a['mel_max_abs_value']:.1f})"
          + (f", compiled bf16 {a['mel_max_abs_compiled_vs_stock']:.2e}" if "mel_max_abs_compiled_vs_stock" in a else ""))
    print(f"wav max |batched - stock| fp32: {a['wav_max_abs_fp32']:.2e} (|wav| up to {a['wav_max_abs_value']:.2f}); lengths match: {a['lengths_match']}")
    for k in sorted(k for k in a if k.startswith("wav_max_abs_vocoder_")):
        print(f"wav max |compiled HiFiGAN ({k.split('_')[4]} convs) - eager fp32| (same mel and noise, TF32 convs): {a[k]:.2e}")
    print(f"per-bucket work sync-free under cuda sync-debug 'error': {res['sync_free']}; bf16 estimator attention: "
          + ("varlen flash (seqused_k)" if res["flash_attention_bf16"] else "SDPA with additive mask"))
    for n in res["notes"]:
        print("note:", n)
    print(f"total {res['total_s']:.0f} s")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "s3gen.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
