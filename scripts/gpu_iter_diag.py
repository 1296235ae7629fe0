"""Is ``BatchedS3Gen.synthesize`` bit-reproducible on CUDA, and does ``synthesize_iter`` give
its audio? Prints the largest |difference| per item between two ``synthesize`` calls, and
between ``synthesize_iter`` and ``synthesize``, with cuDNN's deterministic algorithms off and
on (the sixteenth session's diagnosis of the GPU test
``test_synthesize_iter_on_a_side_stream_matches_synthesize``, whose setup this repeats).

    python3 scripts/gpu_iter_diag.py
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

from ttsbatch.engine.model import load_model, write_random_checkpoint
from ttsbatch.engine.s3gen_batched import BatchedS3Gen
from ttsbatch.engine.voice import BUILTIN, VoiceCache


def max_diffs(a: list[np.ndarray], b: list[np.ndarray]) -> list:
    return [float(np.abs(x - y).max()) if len(x) == len(y) else f"len {len(x)} vs {len(y)}" for x, y in zip(a, b)]


def main() -> None:
    model = load_model(write_random_checkpoint(tempfile.mkdtemp(), "tiny", seed=0), "cuda")
    s3 = BatchedS3Gen(model, buckets=(32, 64, 128), max_batch=2)
    v = s3.prepare_voice(VoiceCache(model).get(BUILTIN, 0.5).gen)
    g = torch.Generator().manual_seed(4)
    toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in (9, 40, 12, 33, 7)]
    seeds = [21, 22, 23, 24, 25]
    for det in (False, True):
        flags = torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=det, allow_tf32=torch.backends.cudnn.allow_tf32)
        with flags, torch.cuda.stream(torch.cuda.Stream()):
            first = s3.synthesize(toks, v, 3, seeds=seeds)
            second = s3.synthesize(toks, v, 3, seeds=seeds)
            batches = list(s3.synthesize_iter(toks, v, 3, seeds=seeds))
        by_iter = dict(item for batch in batches for item in batch)
        print(f"cuDNN deterministic={det}: waveforms peak at {max(float(np.abs(w).max()) for w in first):.3g}")
        print("  synthesize twice:", max_diffs(first, second))
        print("  synthesize_iter vs synthesize:", max_diffs(first, [by_iter[i] for i in range(len(toks))]))
        print("  batches:", [[i for i, _ in b] for b in batches])


if __name__ == "__main__":
    main()
