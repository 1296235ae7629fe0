"""The CFM estimator's chained block region against the unchained pair, on a GPU.

``cfm_estimator.block_out_in`` (``s3gen_chain``, on) runs a transformer block's tail and the
next block's head as one compiled region; unchained, ``block_out`` ends with the residual add
after the feed-forward and ``block_in`` starts with norm1, two kernels and one more trip
through memory. This times both at a book batch's shapes (~80,000 rows: 64 chunks of ~4 s with
the 10-s prompt, both CFG halves), compiled as the engine compiles them (rows dynamic), with
CUDA events, alternating, and checks that both give the same q/k/v.

    python3 scripts/gpu_cfm_chain.py [--rows 80000] [--iters 200]

Prints one line per variant (ms per call) and the difference.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=80_000)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()

    from ttsbatch.engine import cfm_estimator as ce

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    C, inner, ff, N = 256, 512, 1024, a.rows  # the estimator's widths

    def w(*shape, scale=0.05):
        return (torch.randn(*shape, device=dev) * scale).to(bf)

    o, x = w(N, inner, scale=1.0), torch.randn(N, C, device=dev)
    wo, bo, w1, b1, w2, b2 = w(C, inner), w(C), w(ff, C), w(ff), w(C, ff), w(C)
    nw3, nw1 = torch.ones(C, device=dev), 1 + 0.1 * torch.randn(C, device=dev)
    nb3, nb1 = torch.zeros(C, device=dev), 0.1 * torch.randn(C, device=dev)
    w_qkv = w(3 * inner, C)
    r = ce.regions(compile=True)

    def unchained():
        r.dyn((o, 0), (x, 0))
        h = r.block_out(o, x, wo, bo, nw3, nb3, w1, b1, w2, b2, eps=1e-5, approximate="none")
        r.dyn((h, 0))
        return h, r.block_in(h, nw1, nb1, w_qkv, None, eps=1e-5)

    def chained():
        r.dyn((o, 0), (x, 0))
        return r.block_out_in(o, x, wo, bo, nw3, nb3, w1, b1, w2, b2, nw1, nb1, w_qkv, None, eps=1e-5, eps1=1e-5,
                              approximate="none")

    with torch.inference_mode():
        for _ in range(3):
            (h0, q0), (h1, q1) = unchained(), chained()
        torch.cuda.synchronize()
        print(f"rows {N}: residual max diff {(h0 - h1).abs().max().item():.3g}, qkv max diff "
              f"{(q0.float() - q1.float()).abs().max().item():.3g} (|qkv| up to {q0.abs().max().item():.3g})")
        times = {"unchained": [], "chained": []}
        for _ in range(a.iters):
            for name, fn in (("unchained", unchained), ("chained", chained)):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                times[name].append((s, e))
        torch.cuda.synchronize()
    ms = {k: sorted(s.elapsed_time(e) for s, e in v) for k, v in times.items()}
    for k, v in ms.items():
        print(f"{k:>10}: median {v[len(v) // 2]:.3f} ms, min {v[0]:.3f} ms a block ({torch.cuda.get_device_name()})")
    d = ms["unchained"][len(ms["unchained"]) // 2] - ms["chained"][len(ms["chained"]) // 2]
    # a 2-hour book: 42 chained blocks a step, 10 steps, ~28 batches of this size
    print(f"chained saves {d:.3f} ms a block: ~{d * 42 * 10 * 28 / 1000:.2f} s of a 2-hour book's GPU time at this batch size")


if __name__ == "__main__":
    main()
