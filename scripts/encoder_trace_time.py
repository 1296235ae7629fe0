"""Where the compiled flow encoder's start cost goes: dynamo's tracing, measured on the CPU.

`compile_encoder=true` saved a 2-hour book 0.8-2.4 s on an H200 but cost each process 3.5-6 s
before its first chunk (BENCHMARKS.md, twenty-fourth session), with the compiled code in the
cache. Inductor's cache holds compiled graphs, not dynamo's trace of the Python, so every
process traces again. This script times that trace alone (backend "eager": dynamo, no
Inductor) on the full-size random checkpoint, for the engine's region (the whole encoder, one
graph) and for one conformer layer as a region of its own, which every layer of a stack can
share:

    python scripts/encoder_trace_time.py --model-dir /tmp/ttsbatch-full

Prints dynamo's compile times for each; no GPU needed (tracing is host work).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    args = ap.parse_args()

    from torch._dynamo.utils import compilation_time_metrics, counters

    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.s3gen_batched import BatchedS3Gen, length_mask
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    model = load_model(args.model_dir, "cpu")
    gen = VoiceCache(model).get(BUILTIN, 0.5).gen
    g = torch.Generator().manual_seed(0)
    shapes = (((12, 30, 31), 32), ((50, 7), 64), ((40, 20), 48))

    def tracing_s() -> float:  # dynamo's bytecode tracing so far in this process, every graph
        return sum(compilation_time_metrics.get("bytecode_tracing", []))

    # 1. the engine's region: the whole encoder (both stacks, every layer) as one graph
    torch._dynamo.reset()
    counters.clear()
    whole = BatchedS3Gen(model, compile_encoder=True, regions_backend="eager")
    v = whole.prepare_voice(gen)
    for lengths, n_tok in shapes:
        toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lengths]
        tokens, lens = whole._stage_tokens(toks, v, n_tok)
        T = tokens.shape[1]
        t = time.perf_counter()
        with torch.inference_mode():
            whole._enc_fn(tokens, lens, whole._pos_emb(0, T), whole._pos_emb(1, 2 * T))
        print(f"whole encoder, items {lengths}: {time.perf_counter() - t:.2f} s")
    print(f"  graphs {counters['stats'].get('unique_graphs')}, ops captured {counters['stats'].get('calls_captured')}, "
          f"dynamo's bytecode tracing {tracing_s():.2f} s")

    # 2. one conformer layer as a region: one graph for every layer of both stacks
    torch._dynamo.reset()
    counters.clear()
    traced_before = tracing_s()
    enc = model.s3gen.flow.encoder

    def layer_fn(layer, x, att, pos):
        return layer(x, att, pos, att)[0]

    layer_region = torch.compile(layer_fn, fullgraph=True, backend="eager")
    d = enc.encoders[0].size if hasattr(enc.encoders[0], "size") else 512
    for lengths, n_tok in shapes:
        toks = [torch.randint(0, 6561, (n,), generator=g).tolist() for n in lengths]
        tokens, lens = whole._stage_tokens(toks, v, n_tok)
        B, T = tokens.shape
        t = time.perf_counter()
        with torch.inference_mode():
            for stack, n in ((enc.encoders, T), (enc.up_encoders, 2 * T)):
                x = torch.randn(B, n, d)
                att = length_mask(lens * (n // T), n).unsqueeze(1)
                pos = whole._pos_emb(0 if n == T else 1, n)
                torch._dynamo.decorators.mark_unbacked(x, 0)
                torch._dynamo.decorators.mark_unbacked(att, 0)
                for tensor, dims in ((x, (1,)), (att, (2,)), (pos, (1,))):
                    for dim in dims:
                        torch._dynamo.mark_dynamic(tensor, dim)
                for layer in stack:
                    layer_region(layer, x, att, pos)
        print(f"one layer a region, items {lengths}: {time.perf_counter() - t:.2f} s")
    print(f"  graphs {counters['stats'].get('unique_graphs')}, recompiles {sum(counters['recompiles'].values())}, "
          f"dynamo's bytecode tracing {tracing_s() - traced_before:.2f} s")


if __name__ == "__main__":
    main()
