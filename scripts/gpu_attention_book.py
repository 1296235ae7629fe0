#!/usr/bin/env python
"""The CFM estimator's attention over the book's own packed layouts, alone (CUDA GPU, FA4).

    python scripts/gpu_attention_book.py --model-dir /tmp/ttsbatch-full [--book bench/book.txt]

``bench --parts s3gen`` measures the CFM at 281 TFLOP/s on the book, against a ceiling of 431
with every product at its isolated rate (``gpu_cfm_ceiling.py``: FA4 369 TFLOP/s over 128
sequences of 704 frames). The twenty-ninth session's trace put the book's FA4 time at ~7.06
s, ~265 TFLOP/s. This asks whether that gap is the layout's: every batch the engine makes of
the book (its collections, batches, padded batch sizes and packed layouts, as
``bench --parts s3gen`` renders them) gets its attention call timed alone, FA4 through the
engine's own launcher (``fa4.FA4Varlen``) on q/k/v strided as the estimator's qkv split makes
them, then the book's attention time is that times the estimator's blocks times the Euler
steps. Beside it, the same items:

- ``packed_aid``: the engine's layout with FA4's varlen tile-to-sequence table built at
  these 128 sequences (``BIN_BATCH_SEARCH_THRESH`` at 0 for the layout's public call; FA4
  builds it only above 256 sequences). Measured slower (thirty-first session): not the engine's;
- ``aligned``: each item's query range padded to a multiple of 128 rows (FA4's tile), so no
  range starts inside a tile (the same tiles are computed; only their placement changes);
- ``uniform``: 2B sequences, each the batch's root-mean-square item length, no packing: the
  same useful work laid out as ``gpu_cfm_ceiling.py`` measures it.

Useful FLOPs are each real item's (not the batch's padding copies): 4 x heads x 64 x L^2 per
item per CFG half per block (stock's c2). Writes $OUT/attention_book.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_cfm_ceiling import timed_ms  # noqa: E402  (scripts/ is on the path when a script runs)
from gpu_fa4_variants import lookup_aid  # noqa: E402

TILE = 128  # FA4's query tile on Hopper


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--book", type=Path, default=ROOT / "bench" / "book.txt")
    ap.add_argument("--max-chars", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from ttsbatch.bench_book import book_chunks
    from ttsbatch.bench_s3gen import cfm_flop_model, random_speech_tokens
    from ttsbatch.config import load_options
    from ttsbatch.engine import fa4
    from ttsbatch.engine.fast import FastEngine
    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.s3gen_batched import pack_layout
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    options = load_options(None, {"generation": {"tokens_per_char": 1.0, "ignore_eos": True}})
    gen = options.generation
    _, chunks = book_chunks(args.book, options, args.max_chars)
    model = load_model(args.model_dir, "cuda")
    toks = random_speech_tokens([gen.token_budget(len(c.text)) for c in chunks], model.t3.hp.speech_tokens_dict_size)
    engine = FastEngine(model)
    s3 = engine.s3
    voice = engine.voice_ref(VoiceCache(model).get(BUILTIN, gen.exaggeration))
    flops = cfm_flop_model(model.s3gen.flow.decoder.estimator, "cuda")
    heads, dim = 8, 64
    blocks = flops.c2 // (4 * heads * dim)  # the attention's two products per frame pair, per block
    calls = blocks * gen.cfm_steps
    fa, fa_aid = fa4.FA4Varlen(), fa4.FA4Varlen()
    scale = dim**-0.5

    def attend_ms(cu: np.ndarray, used: np.ndarray, n_rows: int, max_len: int, fa=fa) -> float:
        qkv = torch.randn(n_rows, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
        q, k, v = (t.reshape(n_rows, heads, dim) for t in qkv.split(heads * dim, dim=-1))
        cu_d = torch.as_tensor(cu, dtype=torch.int32, device="cuda")
        used_d = torch.as_tensor(used, dtype=torch.int32, device="cuda")
        if fa is fa_aid:  # the table is built in the layout's public call, the first of the warm-up
            with lookup_aid(fa.iface):
                return timed_ms(lambda: fa(q, k, v, cu_d, used_d, max_len, scale))
        return timed_ms(lambda: fa(q, k, v, cu_d, used_d, max_len, scale))

    rows, totals = [], dict(packed=0.0, packed_aid=0.0, aligned=0.0, uniform=0.0)
    useful = 0
    for a in range(0, len(toks), engine.collect):
        span = toks[a : a + engine.collect]
        for bucket, sub in s3.batches([len(t) for t in span], voice):
            B = len(sub)
            Bp = s3._padded_batch(B, s3.batch_limit(bucket, voice))
            items = [span[i] for i in sub] + [span[sub[0]]] * (Bp - B)
            T_mel = 2 * (voice.n_prompt_tokens + bucket // 2)
            L = np.array([2 * (voice.n_prompt_tokens + len(t)) for t in items])
            lay = pack_layout(L.tolist(), T_mel, s3.pack_gap, "cuda")
            bounds = lay.bounds.cpu().numpy()
            t_packed = attend_ms(bounds[0], bounds[1, :-1], 2 * lay.n, lay.max_len)  # as the engine: used without cu's end
            t_aid = attend_ms(bounds[0], bounds[1, :-1], 2 * lay.n, lay.max_len, fa=fa_aid)
            # each range (an item and its gap) padded to whole tiles
            span_al = -(-(L + s3.pack_gap) // TILE) * TILE
            starts = np.concatenate([[0], np.cumsum(span_al)[:-1]])
            n_al = int(span_al.sum())
            cu = np.concatenate([starts, n_al + starts, [2 * n_al]])
            used = np.concatenate([L, L])
            t_aligned = attend_ms(cu, used, 2 * n_al, int(span_al.max()))
            rms = int(round(float(np.sqrt((L.astype(np.float64) ** 2).mean()))))
            cu_u = np.arange(0, 2 * Bp * rms + 1, rms)
            t_uniform = attend_ms(cu_u, np.full(2 * Bp, rms), 2 * Bp * rms, rms)
            real = L[:B].astype(np.int64)
            work = int(4 * heads * dim * 2 * (real**2).sum()) * calls  # both CFG halves, every block and step
            useful += work
            for name, t in (("packed", t_packed), ("packed_aid", t_aid), ("aligned", t_aligned), ("uniform", t_uniform)):
                totals[name] += t * calls / 1e3
            rows.append(dict(bucket=bucket, items=B, padded_to=Bp, frames_mean=round(float(L.mean()), 1), max_len=lay.max_len,
                             packed_ms=round(t_packed, 4), packed_aid_ms=round(t_aid, 4), aligned_ms=round(t_aligned, 4), uniform_ms=round(t_uniform, 4),
                             packed_tflops=round(work / calls / (t_packed / 1e3) / 1e12, 1)))
            print(rows[-1], flush=True)
    res = dict(gpu=torch.cuda.get_device_name(), book=str(args.book), chunks=len(chunks), batches=len(rows), blocks=blocks,
               steps=gen.cfm_steps, useful_pflop=round(useful / 1e15, 3), direct_calls=fa.direct_calls + fa_aid.direct_calls, public_calls=fa.public_calls + fa_aid.public_calls,
               book_s={k: round(v, 3) for k, v in totals.items()},
               book_tflops={k: round(useful / v / 1e12, 1) for k, v in totals.items()}, rows=rows)
    print({k: v for k, v in res.items() if k != "rows"}, flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "attention_book.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
