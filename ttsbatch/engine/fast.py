"""The fast engine: batched, graph-captured T3 (``t3_fast``) glued to stock S3Gen per chunk.

Same interface as :class:`~ttsbatch.engine.stock.StockEngine`. T3 runs every request of a
call through continuous batching; as soon as a request's speech tokens are done, its
invalid tokens are dropped the way stock does and stock ``S3Gen.inference`` turns them into
a waveform (seeded with the request's seed), so :meth:`FastEngine.synthesize_stream` can
yield it while the other rows keep decoding at the next ``generate`` step.
(Batched S3Gen is a later stage.)
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..config import GenerationOptions
from .stock import SynthesisRequest, SynthesisResult


def speech_tokens_for_s3gen(tokens: Sequence[int]) -> list[int]:
    """Stock's clean-up of T3 output before S3Gen (``drop_invalid_tokens`` then ``< 6561``).

    Everything up to the first start-of-speech (6561) is dropped, everything from the first
    end-of-speech (6562) on is dropped, then ids outside the S3 vocabulary. Stock's version
    fails when an id occurs twice; this one uses the first occurrence.
    """
    from chatterbox.models.s3tokenizer import EOS, SOS, SPEECH_VOCAB_SIZE

    sos, eos = SOS, EOS
    toks = list(tokens)
    if sos in toks:
        toks = toks[toks.index(sos) + 1 :]
    if eos in toks:
        toks = toks[: toks.index(eos)]
    return [t for t in toks if t < SPEECH_VOCAB_SIZE]


class FastEngine:
    """Chunks in, waveforms out: fast T3 for all chunks at once, stock S3Gen per chunk."""

    name = "fast"

    def __init__(
        self,
        model,
        max_rows: int | None = None,
        max_vram_gb: float | None = None,
        check_every: int = 8,
        use_graphs: bool | None = None,
    ):
        from .t3_fast import FastT3

        self.model = model
        self.sample_rate = model.sample_rate
        self.max_rows = max_rows
        self.max_vram_gb = max_vram_gb
        self.check_every = check_every
        self.t3 = FastT3(model, use_graphs=use_graphs)

    def speech_token_stream(
        self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions
    ) -> Iterator[tuple[int, list[int]]]:
        """T3 only: ``(request index, tokens without EOS)`` as each request finishes."""
        return self.t3.generate(
            conds,
            requests,
            gen,
            max_rows=self.max_rows,
            check_every=self.check_every,
            max_vram_gb=self.max_vram_gb,
        )

    def synthesize_stream(
        self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions
    ) -> Iterator[tuple[int, SynthesisResult]]:
        """``(request index, result)`` for each request, as soon as its audio is done."""
        for i, tokens in self.speech_token_stream(requests, conds, gen):
            yield i, self._vocode(requests[i], tokens, conds, gen)

    def synthesize(self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions) -> list[SynthesisResult]:
        results: list[SynthesisResult | None] = [None] * len(requests)
        for i, result in self.synthesize_stream(requests, conds, gen):
            results[i] = result
        return results  # type: ignore[return-value]

    def _vocode(self, req: SynthesisRequest, tokens: list[int], conds, gen: GenerationOptions) -> SynthesisResult:
        import torch

        kept = speech_tokens_for_s3gen(tokens)
        if not kept:  # end-of-speech at once: nothing to say
            return SynthesisResult(np.zeros(0, dtype=np.float32), 0)
        speech = torch.tensor(kept, dtype=torch.long, device=self.model.device)
        torch.manual_seed(req.seed)
        with torch.inference_mode():
            wav, _ = self.model.s3gen.inference(speech_tokens=speech, ref_dict=conds.gen, n_cfm_timesteps=gen.cfm_steps)
        wav = wav.squeeze(0).float().cpu().numpy()
        return SynthesisResult(np.ascontiguousarray(wav, dtype=np.float32), len(kept))
