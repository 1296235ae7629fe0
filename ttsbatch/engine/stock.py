"""The stock Chatterbox path, one chunk at a time: the reference every faster engine is tested against.

It does what ``ChatterboxTTS.generate`` does (CFG rows, T3 sampling, dropping invalid
tokens, S3Gen) with two additions the pipeline needs: a per-chunk seed, so a chunk's audio
does not depend on what was generated before it, and a per-chunk token budget with an
``ignore_eos`` switch (random weights never emit end-of-speech). Watermarking is not done
here: the audio stage marks every chunk before it is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import GenerationOptions


@dataclass(frozen=True)
class SynthesisRequest:
    """One chunk for the engine."""

    text: str  # normalized text
    seed: int  # per-chunk seed (from its id)
    budget: int  # most speech tokens to generate


@dataclass(frozen=True)
class SynthesisResult:
    """What the engine made of one request."""

    wav: np.ndarray  # mono float32 at the model's sample rate, not yet watermarked
    tokens: int  # speech tokens generated


def text_tokens_for(model, text: str):
    """Stock tokenization: [START] text [STOP], duplicated for the CFG pair."""
    import torch
    import torch.nn.functional as F

    tokens = model.tokenizer.text_to_tokens(text).to(model.device)
    tokens = torch.cat([tokens, tokens], dim=0)
    tokens = F.pad(tokens, (1, 0), value=model.t3.hp.start_text_token)
    return F.pad(tokens, (0, 1), value=model.t3.hp.stop_text_token)


class StockEngine:
    """Chunks in, waveforms out, through chatterbox-tts's own T3.inference and S3Gen.inference."""

    name = "stock"

    def __init__(self, model):
        self.model = model
        self.device = model.device  # where it runs
        self.sample_rate = model.sample_rate

    def synthesize(self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions) -> list[SynthesisResult]:
        return [self._one(r, conds, gen) for r in requests]

    def speech_tokens(self, req: SynthesisRequest, conds, gen: GenerationOptions):
        """T3 only: the speech tokens stock sampling gives for ``req`` (seeded)."""
        import torch

        t3 = self.model.t3
        torch.manual_seed(req.seed)
        stop = t3.hp.stop_speech_token
        if gen.ignore_eos:
            t3.hp.stop_speech_token = -1  # stock checks equality with this id: -1 never matches
        try:
            with torch.inference_mode():
                tokens = t3.inference(
                    t3_cond=conds.t3,
                    text_tokens=text_tokens_for(self.model, req.text),
                    max_new_tokens=req.budget,
                    temperature=gen.temperature,
                    cfg_weight=gen.cfg_weight,
                    repetition_penalty=gen.repetition_penalty,
                    min_p=gen.min_p,
                    top_p=gen.top_p,
                )
        finally:
            t3.hp.stop_speech_token = stop
        return tokens[0]

    def _one(self, req: SynthesisRequest, conds, gen: GenerationOptions) -> SynthesisResult:
        import torch
        from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE, drop_invalid_tokens

        tokens = self.speech_tokens(req, conds, gen)
        tokens = drop_invalid_tokens(tokens)
        tokens = tokens[tokens < SPEECH_VOCAB_SIZE].to(self.model.device)
        if tokens.numel() == 0:  # end-of-speech at once: nothing to say
            return SynthesisResult(np.zeros(0, dtype=np.float32), 0)
        with torch.inference_mode():
            wav, _ = self.model.s3gen.inference(
                speech_tokens=tokens, ref_dict=conds.gen, n_cfm_timesteps=gen.cfm_steps
            )
        wav = wav.squeeze(0).float().cpu().numpy()
        return SynthesisResult(np.ascontiguousarray(wav, dtype=np.float32), int(tokens.numel()))
