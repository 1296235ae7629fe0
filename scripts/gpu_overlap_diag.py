"""Why does ``test_overlapped_engine_runs_s3gen_first_and_matches_sequential`` fail on an H200
with FA4 installed and the packed CFM the default (seventeenth-eighteenth sessions)? Repeats its
setup for each attention kernel, packing on and off, and cuDNN's deterministic algorithms off
and on; prints per item whether T3's tokens agree and the largest |difference| between the
overlapped and the sequential engine's waveforms over the sequential one's peak (the test
allows 1e-4), and the same for two sequential runs.

    python3 scripts/gpu_overlap_diag.py
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from ttsbatch.config import GenerationOptions
from ttsbatch.engine.fast import FastEngine
from ttsbatch.engine.model import load_model, write_random_checkpoint
from ttsbatch.engine.stock import SynthesisRequest
from ttsbatch.engine.voice import BUILTIN, VoiceCache


def rel(a, b) -> str:
    if a.wav.shape != b.wav.shape:
        return f"shape {a.wav.shape} vs {b.wav.shape}"
    d = float(np.abs(a.wav - b.wav).max()) / max(float(np.abs(b.wav).max()), 1e-6)
    return f"{'tok ok' if a.tokens == b.tokens else 'TOK DIFF'} {d:.2e}"


def main() -> None:
    model = load_model(write_random_checkpoint(tempfile.mkdtemp(), "tiny", seed=0), "cuda")
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    gen = GenerationOptions(ignore_eos=True, cfm_steps=2)
    reqs = [SynthesisRequest(t, 70 + i, b) for i, (t, b) in enumerate([("One two three.", 9), ("Four.", 5), ("Five six.", 7), ("Seven.", 3)])]
    for attention in ("fa2", "fa4"):
        for pack in (False, True):
            for det in (False, True):
                kw = dict(s3gen_batch=2, compile_estimator=False, compile_t3=False, compile_vocoder=False, s3gen_attention=attention, s3gen_pack=pack)
                try:
                    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=det, allow_tf32=torch.backends.cudnn.allow_tf32):
                        seq = FastEngine(model, overlap=False, **kw)
                        want = seq.synthesize(reqs, conds, gen)
                        again = seq.synthesize(reqs, conds, gen)
                        ov = FastEngine(model, overlap=True, **kw)
                        got = dict(ov.synthesize_stream(reqs, conds, gen))
                except Exception as e:  # noqa: BLE001 - a diagnosis prints what it meets
                    print(f"{attention} pack={pack} det={det}: {type(e).__name__}: {e}")
                    continue
                print(f"{attention} pack={pack} det={det} (ran {seq.s3.attention}, pack {seq.s3.pack}): "
                      f"overlap vs seq {[rel(got[i], want[i]) for i in range(4)]}; seq twice {[rel(again[i], want[i]) for i in range(4)]}")


if __name__ == "__main__":
    main()
