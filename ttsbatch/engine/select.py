"""Which engine renders a run: ``--engine auto|stock|fast`` and ``--max-vram``.

auto picks the fast engine on a CUDA GPU and stock Chatterbox elsewhere: on the CPU the fast
engine is correct (the tests run it there) but brings nothing, and stock is the reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ModelError

ENGINES = ("auto", "stock", "fast")

# Chunks handed to an engine per call. Stock renders one at a time; the fast engine keeps its
# own batches full (continuous batching) and streams chunks back as they finish, so it gets
# a large slice of the book per call: big enough to keep every T3 row busy to the end.
STOCK_BATCH = 1
FAST_BATCH = 4096


@dataclass(frozen=True)
class EngineChoice:
    name: str  # "stock" or "fast"
    batch_size: int  # chunks per engine call


def choose_engine(engine: str, device: str, batch_size: int | None, max_vram_gb: float | None) -> EngineChoice:
    """Resolve ``auto`` against the device the model runs on; check the combination."""
    if engine not in ENGINES:
        raise InputError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if max_vram_gb is not None and max_vram_gb <= 0:
        raise InputError(f"--max-vram {max_vram_gb}: must be a positive number of GB")
    name = engine if engine != "auto" else ("fast" if device.startswith("cuda") else "stock")
    if max_vram_gb is not None and name == "stock":
        raise InputError("--max-vram applies to the fast engine; stock Chatterbox has no memory cap")
    default = FAST_BATCH if name == "fast" else STOCK_BATCH
    return EngineChoice(name, batch_size or default)


def make_engine(model, choice: EngineChoice, max_vram_gb: float | None = None):
    if choice.name == "fast":
        from .fast import FastEngine

        return FastEngine(model, max_vram_gb=max_vram_gb)
    from .stock import StockEngine

    return StockEngine(model)


def use_compile_cache(cache_root: Path) -> Path:
    """Point Inductor's, Triton's and FlashAttention 4's on-disk caches into
    ``cache_root/compile`` (unless the user set them), so compiled kernels made by one process
    (``warmup``) are reused by the next.

    FA4 (the ``hopper`` extra) keeps its compiled kernels in memory only unless told otherwise,
    so every process compiled its kernel again (2-3 s, in the engine's check that FA4 runs:
    BENCHMARKS.md, eleventh and fourteenth sessions). Its own disk cache
    (``FLASH_ATTENTION_CUTE_DSL_CACHE_*``, read when FA4 is imported, after this) compiles
    again when an entry cannot be loaded."""
    d = Path(cache_root) / "compile"
    # PyTorch makes its cache dir on its first import of dynamo, with a traceback if it cannot:
    # check here (without making anything) that it could be made
    there = d
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
        why = "is not a directory" if there.exists() and not there.is_dir() else "is not writable"
        raise ModelError(f"the cache dir {cache_root} cannot be used ({there} {why}); point $TTSBATCH_CACHE_DIR (or "
                         "warmup's --cache-dir) at a writable directory")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(d / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(d / "triton"))
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(d / "fa4"))
    return d


@dataclass(frozen=True)
class Ready:
    """What a run needs, loaded: the watermarker, the model, the engine and its batch size."""

    watermarker: object
    model: object
    engine: object
    batch_size: int


def preflight(where: str, cache_root):
    """What every run that speaks checks and starts before the model loads: ffmpeg is there
    (no output without it), the compiler cache is shared with `ttsbatch warmup`, and Perth
    loads (never unmarked audio) and warms up beside the model load. Returns the watermarker."""
    from ..audio.ffmpeg import run_ffmpeg
    from ..audio.watermark import Watermarker

    run_ffmpeg(["-version"], what="ffmpeg -version")  # there, and runs on this machine
    use_compile_cache(cache_root)
    watermarker = Watermarker(where)
    watermarker.warm_in_background(24000)  # beside the model load, not on the first chunk
    return watermarker


def load_for_run(model_dir, device: str, engine: str, batch_size: int | None, max_vram_gb: float | None, cache_root) -> Ready:
    """The shared start of every command that speaks (book, srt, warmup).

    :func:`preflight` first: stop before any GPU time is spent if ffmpeg or Perth cannot
    work. Perth runs where the model runs: it marks every chunk.
    """
    import logging

    from .model import describe, load_model, pick_device

    where = pick_device(device)
    choice = choose_engine(engine, where, batch_size, max_vram_gb)
    watermarker = preflight(where, cache_root)
    model = load_model(model_dir, where)
    logging.getLogger("ttsbatch").info("model: %s; engine: %s", describe(model), choice.name)
    return Ready(watermarker, model, make_engine(model, choice, max_vram_gb), choice.batch_size)
