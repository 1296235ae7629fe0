"""Does T3's decode attention compile again when a step has one split? (CUDA GPU, no wheels needed)

The warm-up decodes few rows (many splits per sequence); a book's first step decodes ~200
(one split). Each case is launched once with a fresh Triton cache: the first call compiles,
the second must find the same kernel. Prints the seconds of each first call and the kernels
in the cache. ``--as-before``: the unused split buffers passed as the output's bf16, as
before the twenty-seventh session (the second call compiled a kernel of its own, 1.5-2 s).

    python3 scripts/gpu_attend_signature.py [--as-before]
"""

import os
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-sig-")

import torch  # noqa: E402

from ttsbatch.engine import decode_attention as da  # noqa: E402

if "--as-before" in sys.argv:
    real = da._placeholder
    da._placeholder = lambda dtype, device: real(torch.bfloat16 if dtype == torch.float32 else dtype, device)

dev = torch.device("cuda")
H, D, L = 16, 64, 768
tk, tv = (torch.randn(H, 256, D, device=dev, dtype=torch.bfloat16) for _ in range(2))


def step(S: int) -> tuple[int, float]:
    k_cache, v_cache = (torch.randn(S, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    q, k_new, v_new = (torch.randn(S, H, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    pos = torch.full((S,), 500, device=dev)
    shared = torch.full((S,), 100, device=dev, dtype=torch.int32)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    da.attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, 512, D**-0.5, template=(tk, tv, shared))
    torch.cuda.synchronize()
    return da.splits_for(S, H, 512), time.perf_counter() - t0


def kernels() -> int:
    return sum(f.endswith(".cubin") for _, _, fs in os.walk(os.environ["TRITON_CACHE_DIR"]) for f in fs)


for S in (16, 402, 8):  # the warm-up's rows, a book's first step, the warm-up's again
    splits, s = step(S)
    print(f"sequences {S:4d}: {splits:2d} split(s), first call {s:.3f} s, kernels compiled so far {kernels()}")
