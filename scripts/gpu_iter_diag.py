"""Diagnose the synthesize_iter GPU test: is synthesize itself bit-reproducible on CUDA?
Prints max |diff| per item for synthesize vs synthesize (run twice), and synthesize_iter vs
synthesize, with cuDNN's deterministic flag off and on."""
import sys, tempfile
import numpy as np
import torch

from ttsbatch.engine.model import load_model, write_random_checkpoint
from ttsbatch.engine.s3gen_batched import BatchedS3Gen
from ttsbatch.engine.voice import BUILTIN, VoiceCache

# the setup of tests/gpu/test_s3gen_gpu.py::test_synthesize_iter_on_a_side_stream_matches_synthesize, on purpose
ck = write_random_checkpoint(tempfile.mkdtemp(), "tiny", seed=0)
m = load_model(ck, "cuda")
gen = VoiceCache(m).get(BUILTIN, 0.5).gen
s3 = BatchedS3Gen(m, buckets=(32, 64, 128), max_batch=2)
v = s3.prepare_voice(gen)
g = torch.Generator().manual_seed(4)
lengths = [9, 40, 12, 33, 7]
toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lengths]
seeds = [21, 22, 23, 24, 25]


def diffs(a, b):
    return [float(np.abs(x - y).max()) if len(x) == len(y) else f"len {len(x)} vs {len(y)}" for x, y in zip(a, b)]


for det in (False, True):
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=det, allow_tf32=torch.backends.cudnn.allow_tf32):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            w1 = s3.synthesize(toks, v, 3, seeds=seeds)
            w2 = s3.synthesize(toks, v, 3, seeds=seeds)
            it = list(s3.synthesize_iter(toks, v, 3, seeds=seeds))
        w3 = [None] * len(toks)
        for b in it:
            for i, w in b:
                w3[i] = w
        print(f"deterministic={det}: scale {max(float(np.abs(w).max()) for w in w1):.3g}", flush=True)
        print("  synthesize twice:", diffs(w1, w2))
        print("  iter vs synthesize:", diffs(w1, w3))
        print("  batches:", [[i for i, _ in b] for b in it], [idx for _, idx in s3.batches(lengths, v)])
sys.stdout.flush()
