"""The S3Gen stage alone over a whole book, and the CFM estimator's achieved TFLOP/s.

``ttsbatch bench --parts s3gen``: the book is chunked as ``ttsbatch BOOK`` does, and every
chunk gets its token budget's worth of random speech ids as T3 with random weights makes
them (drawn over T3's speech vocabulary, then cleaned up as the engine does: about a fifth
are T3's special ids and dropped). S3Gen's work depends on how many tokens an item has, not
which. The fast engine's S3Gen renders them in document order, ``FastEngine.collect`` chunks
a call (the full collections that ``s3gen_take="full"`` hands over; in a book the default
``"ready"`` hands over whatever T3 has finished, at least a batch's worth), with the
engine's own batching, buckets, compiled regions and attention. No T3, Perth, store or MP3:
this is the stage the issue's ">= 600x" and ">= 45% of bf16 peak" are about.

Two passes over the same items: one timed end to end (the stage's real-time factor: chunk
audio over wall), one with ``BatchedS3Gen.profile`` on, whose CUDA events split the GPU
time into the flow encoder, the CFM (10 Euler steps with CFG) and HiFiGAN (profiling waits
for each batch, so its sum can exceed the first pass's wall).

The CFM estimator's useful FLOPs are what stock's estimator would do for these items: for an
item of L mel frames (the voice prompt's and its own), ``FlopCounterMode`` on the stock
module counts ``c0 + c1 L + c2 L^2`` (the time embedding, the per-frame GEMMs and convs, the
attention's two products), fitted exactly at three lengths (:func:`cfm_flop_model`), times
2 (CFG's halves) times the Euler steps. Padding and packing gaps are not counted. Beside the
achieved rate the report gives the stage's ceiling at a given share of peak: the CFM's useful
work at that share plus the encoder's and HiFiGAN's measured time.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor-core peak by GPU name (the vendor's SXM figures; the 45% target is a share
# of this). A GPU not listed gets no share, only TFLOP/s.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of ``device_name`` (first key contained in it), or None."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


@dataclass(frozen=True)
class CfmFlops:
    """FLOPs of one estimator call over one item of L frames (one CFG half): c0 + c1 L + c2 L^2."""

    c0: int  # per call whatever its length (the time embedding's MLP)
    c1: int  # per frame: the GEMMs and convs
    c2: int  # per frame pair: the attention's QK^T and PV

    def __call__(self, L: int) -> int:
        return self.c0 + self.c1 * L + self.c2 * L * L

    def item(self, L: int, steps: int) -> int:
        """An item's useful FLOPs in a whole CFM solve: both CFG halves, every Euler step."""
        return 2 * steps * self(L)


def estimator_flops(est, L: int, device) -> int:
    """FLOPs of stock's estimator over one item of L frames, by ``FlopCounterMode``. The
    attention runs as SDPA's math backend while counting: its two products are then plain
    matmuls, counted on every device (the CPU's fused SDPA kernel has no FLOP formula, and
    would count as none)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, mu, cond = (torch.zeros(1, 80, L, device=device) for _ in range(3))
    mask = torch.ones(1, 1, L, device=device)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        est(x, mask, mu, torch.zeros(1, device=device), torch.zeros(1, 80, device=device), cond)
    return fc.get_total_flops()


def cfm_flop_model(est, device="cpu", lengths: tuple[int, int, int] = (8, 16, 24)) -> CfmFlops:
    """The quadratic in L that ``estimator_flops`` follows, fitted exactly at ``lengths``
    (equally spaced); checked against a fourth length by the tests."""
    a, b, c = lengths
    assert b - a == c - b, "equally spaced lengths"
    fa, fb, fc = (estimator_flops(est, L, device) for L in lengths)
    h = b - a
    c2, rem = divmod(fc - 2 * fb + fa, 2 * h * h)
    assert rem == 0, "the estimator's FLOPs are not a quadratic in its length"
    c1 = (fb - fa) // h - c2 * (a + b)
    return CfmFlops(c0=fa - c1 * a - c2 * a * a, c1=c1, c2=c2)


def random_speech_tokens(budgets, vocab: int, seed: int = 0) -> list:
    """What T3 with random weights and ``ignore_eos`` hands S3Gen for chunks of these token
    ``budgets``: ids over T3's speech vocabulary (``vocab``) but its end-of-speech, cleaned up
    as the engine does (in the 2-hour book 162,150 of the 205,071 tokens are kept: 6,486 s of
    chunk audio; the book runs stored 6,506 s)."""
    import numpy as np
    from chatterbox.models.s3tokenizer import EOS

    from .engine.fast import speech_tokens_for_s3gen

    rng = np.random.default_rng(seed)
    toks = []
    for n in budgets:
        ids = rng.integers(0, vocab - 1, n)
        toks.append(speech_tokens_for_s3gen(np.where(ids >= EOS, ids + 1, ids).tolist()))
    return toks


def run_s3gen_bench(
    model_dir: Path | None,
    book: Path,
    device: str = "auto",
    tokens_per_char: float = 1.0,
    max_chars: int | None = None,
    engine_options: dict | None = None,
    target_share: float = 0.45,
    out=None,
) -> dict:
    import torch

    from .bench_book import book_chunks
    from .config import load_options
    from .engine.fast import FastEngine
    from .engine.model import load_model, pick_device
    from .engine.voice import BUILTIN, VoiceCache

    def say(msg: str) -> None:
        print(msg, file=out or sys.stdout, flush=True)

    device = pick_device(device)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    options = load_options(None, {"generation": {"tokens_per_char": tokens_per_char, "ignore_eos": True}})
    gen = options.generation
    _, chunks = book_chunks(book, options, max_chars)
    budgets = [gen.token_budget(len(c.text)) for c in chunks]
    model = load_model(model_dir, device)
    toks = random_speech_tokens(budgets, model.t3.hp.speech_tokens_dict_size)
    seeds = list(range(len(toks)))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    conds = VoiceCache(model).get(BUILTIN, gen.exaggeration)
    engine = FastEngine(model, **dict(engine_options or {}))
    s3 = engine.s3
    r: dict = dict(book=str(book), chunks=len(chunks), tokens=sum(budgets), s3gen_tokens=sum(len(t) for t in toks), device_name=name, date=time.strftime("%Y-%m-%d"),
                   attention=s3.attention, pack=s3.pack, engine_options=dict(engine_options or {}), collection=engine.collect)
    say(f"s3gen bench: {book.name}: {len(chunks)} chunks, {r['tokens']} speech tokens, {name}")
    if cuda:
        from .warmup import WarmupReport, warm_engine

        t0 = time.perf_counter()
        warm_engine(engine, conds, WarmupReport(device, engine.name, ""))
        r["warmup_s"] = round(time.perf_counter() - t0, 2)
    voice = engine.voice_ref(conds)
    spans = [(a, min(a + engine.collect, len(toks))) for a in range(0, len(toks), engine.collect)]

    def render() -> tuple[float, float]:
        sync()
        t0, samples = time.perf_counter(), 0
        for a, b in spans:
            samples += sum(len(w) for w in s3.synthesize(toks[a:b], voice, n_timesteps=gen.cfm_steps, seeds=seeds[a:b]))
        sync()
        return time.perf_counter() - t0, samples / model.sample_rate

    wall, audio = render()
    profile, s3.profile = s3.profile, True
    before = {k: getattr(s3.times, k) for k in ("encoder", "cfm", "hifigan", "batches", "cfm_frames")}
    try:
        render()
    finally:
        s3.profile = profile
    stage = {k: getattr(s3.times, k) - v for k, v in before.items()}

    flops = cfm_flop_model(model.s3gen.flow.decoder.estimator, device)
    lengths = [2 * (voice.n_prompt_tokens + len(t)) for t in toks if len(t) > 0]
    useful = sum(flops.item(L, gen.cfm_steps) for L in lengths)
    peak = peak_tflops(name) if cuda else None
    cfm_tflops = useful / stage["cfm"] / 1e12 if stage["cfm"] > 0 else None
    r |= dict(
        chunk_audio_s=round(audio, 2), wall_s=round(wall, 3), x_realtime=round(audio / wall, 2),
        stages_s={k: round(stage[k], 3) for k in ("encoder", "cfm", "hifigan")}, batches=stage["batches"],
        # frames the estimator ran over (one CFG half, padding or packing gaps included) and the
        # frames it had to (each item's own: prompt + item)
        cfm_frames=stage["cfm_frames"], cfm_useful_frames=sum(lengths), prompt_frames=2 * voice.n_prompt_tokens,
        cfm_flop_model=dict(c0=flops.c0, c1=flops.c1, c2=flops.c2),
        cfm_useful_flop=useful, cfm_useful_tflop=round(useful / 1e12, 3), cfm_tflop_per_audio_s=round(useful / 1e12 / audio, 3),
        cfm_tflops=None if cfm_tflops is None else round(cfm_tflops, 3), peak_tflops=peak,
        cfm_peak_share=None if peak is None or cfm_tflops is None else round(cfm_tflops / peak, 3),
    )
    if peak is not None:
        # The stage's ceiling with the CFM at target_share of peak and the rest as measured; the
        # CFM's own ceiling at that share (everything else free)
        cfm_at = useful / (target_share * peak * 1e12)
        rest = stage["encoder"] + stage["hifigan"]
        r["ceiling"] = dict(share=target_share, cfm_s=round(cfm_at, 2), x_realtime=round(audio / (cfm_at + rest), 1),
                            x_realtime_cfm_only=round(audio / cfm_at, 1))
    say(f"s3gen: {r}")
    # a book part may follow in this process: its peak GPU memory is its own
    del engine, s3, voice, model
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r
