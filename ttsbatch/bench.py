"""T3 benchmark: stock ``T3.inference`` against the fast batched T3, in one process, same sentences.

Both sides get the same sentences, the same per-character token budget and ``ignore_eos``
(random weights never stop by themselves), so they generate the same number of tokens.
Measured: tokens/s and audio-seconds/s (25 speech tokens = 1 s) of stock and fast on the
same sentences and their ratio; the fast path on a larger set of sentences (a full batch,
which is where it pays); the fast path at batch 1; peak GPU memory; and a torch.profiler
summary of where the fast decode's GPU time goes.

    python -m ttsbatch.bench --model-dir DIR [--book book.txt] [--max-vram GB]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("ttsbatch")

TOKENS_PER_SECOND = 25  # S3 speech tokens per second of audio
SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "story.txt"

# Filler for short books: deterministic, plain sentences in a nineteenth-century register.
_SUBJECTS = ["The old clerk", "A young woman", "The landlady", "My uncle", "The stranger from the north", "Della", "Jim", "The boy at the window"]
_VERBS = ["counted the coins again", "walked slowly to the corner", "looked at the grey cat on the fence", "said nothing for a long while", "wrote a letter to her sister", "opened the small wooden box", "laughed at the foolish idea", "waited by the cold stove"]
_TAILS = ["before the lamps were lit.", "and the street was quiet.", "while the rain kept falling on the roofs of the city.", "as if the whole world depended on it.", "because there was nothing else to be done.", "and then, at last, the bell rang."]


def filler_sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        s, v, t = _SUBJECTS[i % len(_SUBJECTS)], _VERBS[(i * 3 + 1) % len(_VERBS)], _TAILS[(i * 5 + 2) % len(_TAILS)]
        out.append(f"{s} {v} {t}" if i % 3 else f"{s} {v}, {t[0].lower()}{t[1:]}")
    return out


def book_sentences(book: Path | None, n: int) -> list[str]:
    """``n`` chunks of a book as the pipeline would cut them (cycled, then filler if it is short)."""
    from .config import TextOptions
    from .text import chunk_document, read_document

    path = Path(book) if book else SAMPLE
    texts = [c.text for c in chunk_document(read_document(path), TextOptions())]
    if len(texts) < min(n, 16):
        texts += filler_sentences(min(n, 16) - len(texts))
    return [texts[i % len(texts)] for i in range(n)]


def book_requests(book: Path | None, n: int, gen) -> list:
    """The benchmark's T3 requests: ``n`` chunks of the book (:func:`book_sentences`), each
    with the per-character budget of ``gen`` and a seed of its own."""
    from .engine.stock import SynthesisRequest

    return [SynthesisRequest(t, 1000 + i, gen.token_budget(len(t))) for i, t in enumerate(book_sentences(book, n))]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / (1 << 30) if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _rate(tokens: int, seconds: float) -> dict:
    return dict(tokens=tokens, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1), audio_s_per_s=round(tokens / seconds / TOKENS_PER_SECOND, 2))


def run_bench(
    model_dir: Path | None,
    device: str = "auto",
    n_sentences: int = 16,
    tokens_per_char: float = 1.0,
    max_vram_gb: float | None = None,
    book: Path | None = None,
    n_fast: int | None = None,
    check_every: int = 8,
    profile: bool = True,
    stock: bool = True,
    eager_layers: bool | None = None,
    out=None,
) -> dict:
    """Run the benchmark and return its numbers (also printed to ``out``). ``eager_layers``
    (None: on CUDA): also time T3 with its layers uncompiled (``FastT3(compile_layers=False)``),
    batch 1 and at scale, beside the default path (compiled on CUDA)."""
    import torch

    from .config import GenerationOptions
    from .engine.model import describe, load_model
    from .engine.stock import StockEngine, SynthesisRequest
    from .engine.t3_fast import FastT3
    from .engine.voice import BUILTIN, VoiceCache

    def say(msg: str) -> None:
        print(msg, file=out or sys.stdout, flush=True)  # stdout as it is now, not at import

    model = load_model(model_dir, device)
    device = model.device
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    gen = GenerationOptions(tokens_per_char=tokens_per_char, ignore_eos=True)
    if n_fast is None:
        n_fast = 256 if device.startswith("cuda") else 16
    n_all = max(n_sentences, n_fast)
    reqs = book_requests(book, n_all, gen)
    same = reqs[:n_sentences]
    tokens_same = sum(r.budget for r in same)
    result: dict = dict(
        model=json.loads(describe(model)),
        device_name=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        sentences=n_sentences,
        fast_sentences=n_fast,
        tokens_per_char=tokens_per_char,
        mean_chars=round(sum(len(r.text) for r in same) / len(same), 1),
    )
    say(f"bench: {result['device_name']}, {n_sentences} sentences ({tokens_same} tokens) for stock vs fast, {n_fast} for fast at scale")

    # -- stock: one sentence at a time -------------------------------------------------------------
    if stock:
        engine = StockEngine(model)
        engine.speech_tokens(SynthesisRequest(same[0].text, 1, 8), conds, gen)  # warm-up
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        n_tok = 0
        for r in same:
            n_tok += int(engine.speech_tokens(r, conds, gen).numel())
        _sync(device)
        result["stock"] = _rate(n_tok, time.perf_counter() - t0) | dict(peak_gib=_peak_gib(device))
        say(f"stock: {result['stock']}")

    # -- fast -------------------------------------------------------------------------------------
    def timed(rs, fast, max_rows=None, label=""):
        list(fast.generate(conds, rs, gen, max_rows=max_rows, check_every=check_every, max_vram_gb=max_vram_gb))  # warm-up: graphs (and compiling)
        before = dict(fast.stats)
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        got = dict(fast.generate(conds, rs, gen, max_rows=max_rows, check_every=check_every, max_vram_gb=max_vram_gb))
        _sync(device)
        dt = time.perf_counter() - t0
        n = sum(len(v) for v in got.values())
        assert n == sum(r.budget for r in rs), "fast path generated a different number of tokens than budgeted"
        stats = {k: fast.stats[k] - before[k] for k in fast.stats}
        rows = fast.rows_used
        r = _rate(n, dt) | dict(peak_gib=_peak_gib(device), rows=rows, steps=stats["steps"], host_checks=stats["host_checks"])
        r["mean_live_rows"] = round(stats["row_steps"] / max(1, stats["steps"]), 1)
        say(f"fast {label}: {r}")
        return r

    if eager_layers is None:
        eager_layers = device.startswith("cuda")
    if eager_layers:  # first, and freed after: its buffers would take rows from the default path's
        fast_e = FastT3(model, compile_layers=False)
        result["fast_eager_batch1"] = timed(same[:4], fast_e, max_rows=1, label="eager layers, batch 1")
        result["fast_eager_scale"] = timed(reqs[:n_fast], fast_e, label=f"eager layers, {n_fast} sentences")
        del fast_e
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    fast = FastT3(model)  # layers compiled on CUDA (the engine's default)
    result["compiled_layers"] = fast.w.regions.compiled
    result["fast_same"] = timed(same, fast, label="same sentences")
    result["fast_scale"] = timed(reqs[:n_fast], fast, label=f"{n_fast} sentences")
    result["fast_batch1"] = timed(same[:4], fast, max_rows=1, label="batch 1")
    result["compiled_layers_error"] = fast.w.regions.error
    result["graphs_captured"] = fast.stats["graphs_captured"]
    result["graph_error"] = fast.graph_error
    if fast.graph_error:
        say(f"WARNING: CUDA graphs were turned off: {fast.graph_error}")
    if "stock" in result:
        result["speedup_same"] = round(result["fast_same"]["tokens_per_s"] / result["stock"]["tokens_per_s"], 1)
        result["speedup_scale"] = round(result["fast_scale"]["tokens_per_s"] / result["stock"]["tokens_per_s"], 1)
        result["speedup_batch1"] = round(result["fast_batch1"]["tokens_per_s"] / result["stock"]["tokens_per_s"], 2)

    # -- where the fast decode's time goes ----------------------------------------------------------
    if profile:
        result["profile"] = _profile(fast, conds, gen, reqs[: min(len(reqs), 64)], device, check_every, max_vram_gb)
        say("profile (top kernels of a fast run):")
        for row in result["profile"]:
            say(f"  {row['pct']:5.1f}%  {row['ms']:9.2f} ms  {row['calls']:7d}x  {row['name'][:90]}")

    say(summary_table(result))
    return result


def _profile(fast, conds, gen, reqs, device, check_every, max_vram_gb, top: int = 15) -> list[dict]:
    """Top kernels (GPU) or ops (CPU) of one fast generate run, by self time."""
    from dataclasses import replace

    from torch.profiler import ProfilerActivity, profile

    g = replace(gen, max_new_tokens=min(gen.max_new_tokens, 64))
    short = [replace(r, budget=min(r.budget, 64)) for r in reqs]
    list(fast.generate(conds, short, g, check_every=check_every, max_vram_gb=max_vram_gb))  # warm-up
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def measure():
        with profile(activities=acts) as prof:
            list(fast.generate(conds, short, g, check_every=check_every, max_vram_gb=max_vram_gb))
            _sync(device)
        rows = []
        for e in prof.key_averages():
            if cuda:
                t = getattr(e, "self_device_time_total", None)
                t = getattr(e, "self_cuda_time_total", 0) if t is None else t
            else:
                t = e.self_cpu_time_total
            if t > 0:
                rows.append((t, e.count, e.key))
        return sorted(rows, reverse=True)

    rows = measure()
    if cuda and not rows and fast.use_graphs:  # kernels inside graphs were not traced: look at eager
        fast.use_graphs = False
        try:
            rows = [(t, c, "[eager] " + k) for t, c, k in measure()]
        finally:
            fast.use_graphs = True
    total = sum(t for t, _, _ in rows) or 1
    return [dict(name=k, ms=round(t / 1000, 2), calls=c, pct=round(100 * t / total, 1)) for t, c, k in rows[:top]]


def summary_table(r: dict) -> str:
    """A short table of the main numbers."""
    lines = ["", f"T3 bench on {r['device_name']} ({r['model']['weights']}), {r['sentences']} sentences, {r['tokens_per_char']} tokens/char", ""]
    lines.append(f"{'path':28s} {'tokens/s':>10s} {'audio s/s':>10s} {'rows':>6s} {'peak GiB':>9s}")

    def row(name, d):
        if not d:
            return
        peak = f"{d['peak_gib']:.1f}" if d.get("peak_gib") is not None else "-"
        lines.append(f"{name:28s} {d['tokens_per_s']:10.1f} {d['audio_s_per_s']:10.2f} {str(d.get('rows', 1)):>6s} {peak:>9s}")

    row("stock T3 (1 sentence)", r.get("stock"))
    tag = " (compiled)" if r.get("compiled_layers") else ""
    row(f"fast T3{tag}, same {r['sentences']}", r.get("fast_same"))
    row(f"fast T3{tag}, {r['fast_sentences']}", r.get("fast_scale"))
    row(f"fast T3{tag}, batch 1", r.get("fast_batch1"))
    row("  eager layers, batch 1", r.get("fast_eager_batch1"))
    row(f"  eager layers, {r['fast_sentences']}", r.get("fast_eager_scale"))
    if "speedup_same" in r:
        lines.append(f"speed-up vs stock: {r['speedup_same']}x on the same sentences, {r['speedup_scale']}x at scale, {r['speedup_batch1']}x at batch 1")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ttsbatch.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="checkpoint directory (default: the hub's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--book", type=Path, default=None, help="text to take sentences from (default samples/story.txt + filler)")
    p.add_argument("--sentences", type=int, default=16, help="sentences for the stock vs fast comparison")
    p.add_argument("--fast-sentences", type=int, default=None, help="sentences for the fast path at scale (default 256 on CUDA)")
    p.add_argument("--tokens-per-char", type=float, default=1.0)
    p.add_argument("--max-vram", type=float, default=None, metavar="GB")
    p.add_argument("--check-every", type=int, default=8)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-stock", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = run_bench(
        a.model_dir,
        a.device,
        n_sentences=a.sentences,
        tokens_per_char=a.tokens_per_char,
        max_vram_gb=a.max_vram,
        book=a.book,
        n_fast=a.fast_sentences,
        check_every=a.check_every,
        profile=not a.no_profile,
        stock=not a.no_stock,
    )
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
