"""Perth watermarking: every chunk is marked before it is stored; ``verify`` reads the mark.

If Perth cannot load, we raise WatermarkError instead of ever writing unmarked audio.
Perth (and torch) are imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import statistics
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import WatermarkError
from .export import decode_audio, probe_duration
from .ffmpeg import probe

# Perth's decoder gives one confidence in [0, 1] per signal (it rounds at 0.5 itself).
# Measured on CPU, 24 kHz, 4-8 s signals (score = get_watermark(round=False)); "MP3" is an
# MP3 128k round trip (unmarked signals stay as low after it):
#                                  unmarked      marked      marked -> MP3
#   white noise (0.1 rms)           0.001         1.000        1.000
#   real speech (2 AISHELL clips)   0.000         1.000        1.000  (also MP3 64k, AAC 96k)
#   harmonic, f0 100-260 Hz         0.006-0.43    0.87-1.00    0.52-0.99
#   pure 440 Hz sine                0.06          0.58         0.12   (not speech: mark lost)
# 0.5 sits between unmarked and marked for noise, speech and harmonic signals, also after
# MP3. Caveat: synthetic pulse-train "vowels" scored 0.67-0.88 *unmarked*, so a positive on
# odd synthetic audio is not proof; on speech and on our own outputs the margin is wide.
THRESHOLD = 0.5

MIN_MARK_S = 0.1  # Perth's STFT (n_fft 2048 at 32 kHz) needs > 64 ms of input; shorter audio holds no mark


def _with_tail(x: np.ndarray, sr: int) -> np.ndarray:
    """``x`` with the zeros Perth needs after it: it returns a whole number of STFT hops
    (dropping up to ~10 ms at the end) and fails on very short input; cut back afterwards."""
    return np.concatenate([x, np.zeros(max(2048, round(MIN_MARK_S * sr) - len(x)), np.float32)])


def _checked(marked, n: int) -> np.ndarray:
    """Perth's output cut to the input's ``n`` samples, or WatermarkError if it is short or not finite."""
    marked = np.asarray(marked, dtype=np.float32).reshape(-1)[:n]
    if len(marked) != n or not np.isfinite(marked).all():
        raise WatermarkError(
            f"Perth returned unusable audio ({len(marked)} samples for {n}, finite: "
            f"{bool(np.isfinite(marked).all())}): refusing to write unmarked audio"
        )
    return marked


def _why(e: Exception) -> str:
    """An exception as one short line, for the user-facing message."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}"


class Watermarker:
    """Perth's implicit (neural) watermarker on ``device`` ("cpu", "cuda", "cuda:0", ...)."""

    threshold = THRESHOLD

    def __init__(self, device: str = "cpu"):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pkg_resources.*")  # perth's own import
                import torch

                # Imported from its module, not `perth.PerthImplicitWatermarker`: perth's
                # __init__ swallows the ImportError (e.g. no pkg_resources) and sets it to None.
                from perth.perth_net.perth_net_implicit.perth_watermarker import PerthImplicitWatermarker
            # Its loader prints "loaded PerthNet ..." to stdout, which may carry machine-readable
            # progress. The redirect is process-wide, so it spans only this ~0.1 s call.
            with contextlib.redirect_stdout(io.StringIO()):
                self._perth = PerthImplicitWatermarker(device=device)
        except Exception as e:
            raise WatermarkError(
                f"cannot load the Perth watermarker ({_why(e)}): "
                "refusing to write unmarked audio; reinstall with `uv sync`"
            ) from None
        self._torch = torch
        self.device = device

    def warm_in_background(self, sr: int = 24000) -> threading.Thread:
        """Mark a fraction of a second of noise on a thread of its own. Perth's first call
        imports librosa and JIT-compiles its resampler (numba): ~10-20 s, measured in a book
        run on the GPU machine, that otherwise land on the first chunk and hold the other
        store worker on the import lock. Started beside the model load, it costs nothing.
        Errors are left to the real calls, which report them."""

        def warm():
            noise = np.random.default_rng(0).normal(0, 0.1, sr // 2).astype(np.float32)
            with contextlib.suppress(Exception), self._torch.inference_mode():
                self._perth.apply_watermark(noise, sample_rate=sr)

        t = threading.Thread(target=warm, name="perth-warm", daemon=True)
        t.start()
        return t

    def apply(self, wav: np.ndarray, sr: int) -> np.ndarray:
        """The watermarked copy of mono ``wav``: float32, same length."""
        x = np.asarray(wav, dtype=np.float32).reshape(-1)
        try:
            with self._torch.inference_mode():
                marked = self._perth.apply_watermark(_with_tail(x, sr), sample_rate=sr)
        except Exception as e:
            raise WatermarkError(f"Perth failed to watermark a chunk ({_why(e)})") from None
        return _checked(marked, len(x))

    def apply_batch(self, wavs: Sequence[np.ndarray], sr: int, group_samples: int = 1 << 21) -> list[np.ndarray]:
        """The watermarked copies of several mono signals: what :meth:`apply` makes of each
        (within float rounding: ``tests/test_audio_watermark.py``), with Perth's STFT, network
        and inverse STFT run over padded groups of up to ``group_samples`` samples (at Perth's
        32 kHz: ~65 s of audio, ~16 of the book's chunks; ~300 MB of spectra and activations
        at the peak, beside the engine's memory budget) instead of one signal at a time.

        One signal costs Perth ~30 small launches, a host sync and their Python, which on a
        GPU run hold the GIL the engine's threads launch with; a group costs that once. Each
        signal keeps its own edges: it is reflect-padded for the STFT as Perth's centred STFT
        pads it, and the encoder's convolutions see zeros past its last frame, as they do
        when it is alone. Resampling (librosa's soxr, as Perth's) stays per signal; soxr
        releases the GIL."""
        from librosa import resample

        net = self._perth.perth_net
        hp = net.hp
        out: list[np.ndarray | None] = [None] * len(wavs)
        items = []  # (index, samples, signal at Perth's rate, padded for the STFT)
        for i, wav in enumerate(wavs):
            x = np.asarray(wav, dtype=np.float32).reshape(-1)
            if not len(x):
                out[i] = x
                continue
            y = _with_tail(x, sr)  # as apply() pads
            if sr != hp.sample_rate:
                y = resample(y, orig_sr=sr, target_sr=hp.sample_rate)
            items.append((i, len(x), np.asarray(y, dtype=np.float32)))
        items.sort(key=lambda t: len(t[2]))
        group: list = []
        try:
            with self._torch.inference_mode():
                for item in items:
                    if group and (len(group) + 1) * (len(item[2]) + hp.n_fft) > group_samples:
                        self._mark_group(group, out, sr, resample)
                        group = []
                    group.append(item)
                if group:
                    self._mark_group(group, out, sr, resample)
        except WatermarkError:
            raise
        except Exception as e:
            raise WatermarkError(f"Perth failed to watermark a chunk ({_why(e)})") from None
        return out  # type: ignore[return-value]

    def _mark_group(self, group, out: list, sr: int, resample) -> None:
        """Mark signals of similar length (at Perth's rate) as one padded batch."""
        torch = self._torch
        from perth.perth_net.perth_net_implicit.model import magmask
        from perth.perth_net.perth_net_implicit.utils import cx_to_magphase, magphase_to_cx

        net = self._perth.perth_net
        hp, ap, encoder = net.hp, net.ap, net.encoder
        half, hop = hp.n_fft // 2, hp.hop_size
        width = max(len(y) for _, _, y in group) + 2 * half
        batch = np.zeros((len(group), width), np.float32)
        for row, (_, _, y) in enumerate(group):
            batch[row, : len(y) + 2 * half] = np.pad(y, half, mode="reflect")  # torch.stft(center=True)'s padding
        signal = torch.from_numpy(batch).to(net.device)
        window = ap.spectrogram.window.to(signal.device)
        spec = torch.stft(signal, hp.n_fft, hop, hp.window_size, window, center=False, normalized=False, onesided=True, return_complex=True)
        mag, phase = cx_to_magphase(hp, spec)  # (B, F, T)
        frames = torch.tensor([1 + len(y) // hop for _, _, y in group], device=signal.device)
        valid = (torch.arange(mag.shape[-1], device=signal.device)[None] < frames[:, None]).to(mag.dtype)[:, None]  # (B, 1, T)
        # Encoder.forward over each signal's own frames: zeros past them, as its convs pad
        mask = magmask(mag * valid)[:, None]
        h = mag[:, : encoder.subband] * valid
        for layer in encoder.layers:
            h = layer(h) * valid
        marked = mag.clone()
        marked[:, : encoder.subband] += h * mask
        wm = ap.inv_spectrogram(magphase_to_cx(hp, marked, phase)).cpu().numpy()  # one host sync per group
        for row, (i, n, y) in enumerate(group):
            w = wm[row, : (len(y) // hop) * hop]  # what Perth's inverse STFT returns for this signal alone
            if sr != hp.sample_rate:
                w = resample(w, orig_sr=hp.sample_rate, target_sr=sr)
            out[i] = _checked(w, n)

    def score(self, wav: np.ndarray, sr: int) -> float:
        """Perth's detection confidence in [0, 1]; 0.0 for silence (Perth has nothing to read)."""
        x = np.asarray(wav, dtype=np.float32).reshape(-1)
        if len(x) < MIN_MARK_S * sr:
            x = np.concatenate([x, np.zeros(round(MIN_MARK_S * sr) - len(x), np.float32)])
        try:
            with self._torch.inference_mode():
                conf = self._perth.get_watermark(x, sample_rate=sr, round=False)
        except Exception as e:
            raise WatermarkError(f"Perth failed to read the watermark ({_why(e)})") from None
        conf = np.asarray(conf, dtype=np.float64)
        if not np.isfinite(conf).any():  # Perth masks silent frames: all-silent input gives 0/0
            return 0.0
        return float(np.clip(np.mean(conf[np.isfinite(conf)]), 0.0, 1.0))

    def is_marked(self, wav: np.ndarray, sr: int) -> bool:
        return self.score(wav, sr) >= self.threshold


@functools.lru_cache(maxsize=None)
def load_watermarker(device: str = "cpu") -> Watermarker:
    """One Watermarker per device for the whole process (loading costs seconds)."""
    return Watermarker(device)


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    duration_s: float
    sample_rate: int  # the file's own rate
    score: float  # median of the window scores (0.0 if every window was silent)
    marked: bool  # score >= THRESHOLD
    windows: int  # windows that had sound and were scored
    window_scores: tuple[float, ...] = ()


def verify_file(path: Path, watermarker: Watermarker, max_windows: int = 8, window_s: float = 10.0) -> VerifyReport:
    """Check the mark of an audio file in up to ``max_windows`` windows of ``window_s``
    spread evenly from start to end (Perth on CPU reads ~80x real time: 10 hours would take
    minutes). The median of the window scores decides, so one odd window (music, a silent
    stretch, a glitch) does not flip the verdict either way.
    """
    from concurrent.futures import ThreadPoolExecutor

    path = Path(path)
    duration = probe_duration(path)
    sr = probe(path).sample_rate
    n = max(1, min(max_windows, math.ceil(duration / window_s)))
    starts = np.linspace(0.0, max(0.0, duration - window_s), n) if n > 1 else [0.0]

    def window(start: float) -> float | None:
        wav, _ = decode_audio(path, sr=sr, start_s=float(start), duration_s=window_s)
        if wav.size == 0 or not np.any(np.abs(wav) > 1e-4):
            return None  # silence carries no mark: it counts neither for nor against
        return watermarker.score(wav, sr)

    # the windows at once: each is an ffmpeg process and a Perth pass, both outside the GIL
    # (one after the other they were ~1.5 s of a 2-hour book's end, H100 host)
    with ThreadPoolExecutor(max(1, min(n, os.cpu_count() or 1)), thread_name_prefix="ttsbatch-verify") as pool:
        scores = [s for s in pool.map(window, starts) if s is not None]
    score = statistics.median(scores) if scores else 0.0
    return VerifyReport(path, duration, sr, score, score >= watermarker.threshold, len(scores), tuple(scores))
