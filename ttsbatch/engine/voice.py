"""Voice conditioning: a reference recording becomes the model's speaker conditioning, once per voice.

The steps are stock ``ChatterboxTTS.prepare_conditionals`` (same resampling, the same 6 s
and 10 s windows), but fed from an array we have already checked, so a corrupt, silent or
too short file gets a clear error instead of a traceback deep in librosa. Conditionings are
cached in memory and on disk, keyed by the voice's content hash and the model identity.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger("ttsbatch")

MIN_VOICE_S = 2.0  # shorter references give unusable speaker embeddings
MAX_VOICE_READ_S = 60.0  # only this much of a (possibly huge) voice file is read
SILENCE_PEAK = 1e-3  # a reference whose peak is below this (-60 dBFS) is silent


@dataclass(frozen=True)
class Voice:
    """A reference voice, read and checked, or the checkpoint's built-in one (``wav is None``)."""

    id: str  # content hash of the audio (or "builtin"): part of every chunk id
    wav: np.ndarray | None  # mono float32
    sample_rate: int
    name: str


BUILTIN = Voice(id="builtin", wav=None, sample_rate=0, name="built-in voice")


def read_voice(path: Path) -> Voice:
    """Read a wav/flac/mp3/ogg reference voice; mono, at most MAX_VOICE_READ_S; checked for use."""
    import soundfile as sf

    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise InputError(f"--voice {path}: is {kind}; give one audio file")
    if not path.is_file():
        raise InputError(f"voice file not found: {path}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            data = f.read(frames=int(MAX_VOICE_READ_S * sr), dtype="float32", always_2d=True)
    except Exception:
        # Formats libsndfile cannot read (m4a, ...) go through ffmpeg.
        from ..audio.export import decode_audio

        try:
            mono, sr = decode_audio(path, duration_s=MAX_VOICE_READ_S)
        except InputError:
            raise InputError(f"voice file {path} is not readable audio (expected wav, flac, mp3 or ogg)") from None
        data = mono[:, None]
    wav = data.mean(axis=1).astype(np.float32)
    seconds = len(wav) / sr if sr else 0.0
    if seconds < MIN_VOICE_S:
        raise InputError(f"voice file {path} is {seconds:.1f} s long; a reference voice needs at least {MIN_VOICE_S:.0f} s")
    if not np.isfinite(wav).all() or float(np.abs(wav).max()) < SILENCE_PEAK:
        raise InputError(f"voice file {path} is silent (or not finite); record a few seconds of clear speech")
    digest = hashlib.sha256(np.ascontiguousarray(wav).tobytes() + str(sr).encode()).hexdigest()[:16]
    return Voice(id=digest, wav=wav, sample_rate=sr, name=path.name)


def conditionals_from_wav(model, wav: np.ndarray, sr: int, exaggeration: float):
    """Stock ``prepare_conditionals`` on an array: T3 speaker/prompt conditioning and S3Gen's ref dict."""
    import librosa
    import torch
    from chatterbox.models.s3gen import S3GEN_SR
    from chatterbox.models.s3tokenizer import S3_SR
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import ChatterboxTTS, Conditionals

    device = model.device
    s3gen_ref_wav = librosa.resample(wav, orig_sr=sr, target_sr=S3GEN_SR) if sr != S3GEN_SR else wav
    ref_16k_wav = librosa.resample(s3gen_ref_wav, orig_sr=S3GEN_SR, target_sr=S3_SR)
    s3gen_ref_wav = s3gen_ref_wav[: ChatterboxTTS.DEC_COND_LEN]
    with torch.inference_mode():
        s3gen_ref_dict = model.s3gen.embed_ref(s3gen_ref_wav, S3GEN_SR, device=device)
        plen = model.t3.hp.speech_cond_prompt_len
        tokens, _ = model.s3gen.tokenizer.forward([ref_16k_wav[: ChatterboxTTS.ENC_COND_LEN]], max_len=plen)
        tokens = torch.atleast_2d(tokens).to(device)
        ve_embed = torch.from_numpy(model.ve.embeds_from_wavs([ref_16k_wav], sample_rate=S3_SR))
        ve_embed = ve_embed.mean(axis=0, keepdim=True).to(device)
    t3_cond = T3Cond(
        speaker_emb=ve_embed,
        cond_prompt_speech_tokens=tokens,
        emotion_adv=exaggeration * torch.ones(1, 1, 1),
    ).to(device=device)
    return Conditionals(t3_cond, s3gen_ref_dict)


def with_exaggeration(conds, exaggeration: float, device: str):
    """The same conditioning with another emotion exaggeration (as stock ``generate`` does)."""
    import torch
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    c = conds.t3
    t3 = T3Cond(
        speaker_emb=c.speaker_emb,
        cond_prompt_speech_tokens=c.cond_prompt_speech_tokens,
        emotion_adv=exaggeration * torch.ones(1, 1, 1),
    ).to(device=device)
    return Conditionals(t3, conds.gen)


class VoiceCache:
    """Conditionings computed once per (voice, model, exaggeration), kept in memory and on disk."""

    def __init__(self, model, cache_dir: Path | None = None):
        self.model = model
        self.cache_dir = Path(cache_dir) / "voices" if cache_dir else None
        self._memory: dict[tuple[str, float], object] = {}

    def get(self, voice: Voice, exaggeration: float):
        key = (voice.id, float(exaggeration))
        if key in self._memory:
            return self._memory[key]
        conds = self._load_or_compute(voice)
        conds = with_exaggeration(conds, exaggeration, self.model.device)
        self._memory[key] = conds
        return conds

    def _load_or_compute(self, voice: Voice):
        from chatterbox.tts import Conditionals

        if voice.wav is None:
            if self.model.builtin_voice is None:
                raise InputError(f"the checkpoint in {self.model.directory} has no built-in voice (conds.pt): pass --voice")
            return self.model.builtin_voice
        path = self.cache_dir / f"{voice.id}-{self.model.model_id}.pt" if self.cache_dir else None
        if path and path.exists():
            try:
                return Conditionals.load(path, map_location="cpu").to(self.model.device)
            except Exception:  # a damaged cache entry is recomputed, never trusted
                log.info("voice cache entry %s unreadable; recomputing", path)
        conds = conditionals_from_wav(self.model, voice.wav, voice.sample_rate, exaggeration=0.5)
        if path:
            try:
                from ..store import atomic_write_bytes
                import io
                import torch

                path.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                torch.save(dict(t3=conds.t3.__dict__, gen=conds.gen), buf)
                atomic_write_bytes(path, buf.getvalue())
            except OSError as e:  # a cache we cannot write only costs time
                log.info("cannot cache voice conditioning in %s: %s", path, e)
        return conds
