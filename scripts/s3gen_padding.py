#!/usr/bin/env python
"""How much of S3Gen's frame work in a book is padding: CPU only, no model.

    python scripts/s3gen_padding.py [BOOK] [--prompt-tokens 250] [--tokens-per-char 1.0]

The book is chunked as ``ttsbatch`` chunks it (default options); each chunk's speech tokens
are its normalized characters times the budget (``bench`` runs random weights at 1.0 a
character: they never stop early). Chunks reach S3Gen as ``FastEngine`` collects them (the
first ``batch`` chunks, then ``4 x batch`` at a time, in document order) and are batched by
``BatchedS3Gen.batches`` itself (longest first, neighbours by length, padded to the longest
item's bucket). Every item carries the voice prompt (``--prompt-tokens``, 250 for a 10-s
reference). Prints, for the engine's buckets and for variants (padding to the longest item's
own length, finer buckets, larger collections), the padded frames over the real ones: the
CFM estimator's GEMMs and convolutions scale with frames, its attention with padded query
frames times used keys (varlen attention skips the padded keys, not the padded queries).
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path


def collections(lengths: list[int], first: int, collect: int) -> list[list[int]]:
    out, i = [lengths[:first]], first
    while i < len(lengths):
        out.append(lengths[i : i + collect])
        i += collect
    return out


def padding(lengths, prompt_tokens: int, buckets, batch: int, collect: int) -> dict:
    """Real and padded frame work of the book's S3Gen batches."""
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen

    # BatchedS3Gen's own batching, on an object that has only what it reads
    s3 = types.SimpleNamespace(buckets=tuple(buckets))
    s3.bucket_for = types.MethodType(BatchedS3Gen.bucket_for, s3)
    s3.batch_limit = lambda bucket, voice: batch
    voice = types.SimpleNamespace(n_prompt_tokens=prompt_tokens)
    real = padded = attn_real = attn_padded = 0
    n_batches = 0
    shapes = set()
    for col in collections(lengths, batch, collect):
        for bucket, idxs in BatchedS3Gen.batches(s3, col, voice):
            n_batches += 1
            t_pad = 2 * prompt_tokens + bucket
            shapes.add(t_pad)
            for i in idxs:
                t = 2 * (prompt_tokens + col[i])
                real += t
                padded += t_pad
                attn_real += t * t
                attn_padded += t_pad * t
    return dict(batches=n_batches, shapes=len(shapes), frames=padded / real - 1, attention=attn_padded / attn_real - 1)


def main() -> None:
    from ttsbatch.config import TextOptions
    from ttsbatch.engine.s3gen_batched import DEFAULT_BUCKETS
    from ttsbatch.text.chunking import chunk_document
    from ttsbatch.text.readers import read_document

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("book", nargs="?", default="bench/book.txt")
    ap.add_argument("--prompt-tokens", type=int, default=250)
    ap.add_argument("--tokens-per-char", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()

    chunks = chunk_document(read_document(Path(a.book)), TextOptions())
    lengths = [max(1, round(len(c.text) * a.tokens_per_char)) for c in chunks]
    print(f"{a.book}: {len(chunks)} chunks, {sum(lengths)} speech tokens, prompt {a.prompt_tokens} tokens")
    longest = 2 * max(lengths)
    variants = [
        ("the engine's buckets", DEFAULT_BUCKETS, 4 * a.batch),
        ("buckets every 32 frames", range(32, longest + 32, 32), 4 * a.batch),
        ("the longest item's own length", range(2, longest + 2, 2), 4 * a.batch),
        ("the engine's buckets, collections of 8 batches", DEFAULT_BUCKETS, 8 * a.batch),
        ("own length, collections of 8 batches", range(2, longest + 2, 2), 8 * a.batch),
        ("the engine's buckets, the whole book at once", DEFAULT_BUCKETS, len(lengths)),
    ]
    for name, buckets, collect in variants:
        r = padding(lengths, a.prompt_tokens, buckets, a.batch, collect)
        print(f"{name:>48}: {r['batches']} batches, {r['shapes']} padded lengths, padding "
              f"{100 * r['frames']:.1f}% of the frames, {100 * r['attention']:.1f}% of the attention")


if __name__ == "__main__":
    main()
