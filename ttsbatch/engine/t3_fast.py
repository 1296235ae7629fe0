"""Batched T3 decoding over the stock module's weights (gpt-fast style), with continuous batching.

The model classes and weights come from chatterbox-tts; only the decode loop is ours:

- :class:`T3Weights`: the Llama weights of ``model.t3`` (q/k/v and gate/up fused), the speech
  embeddings and head, and the RoPE table computed by the HF module's own rotary embedding.
  On CUDA the layer weights, matmuls and KV cache are bf16 (the residual stream, norms,
  RoPE, embeddings and speech head stay fp32); on the CPU all fp32. The fp32 module stays
  untouched as the reference.
- :class:`DecodeState`: preallocated buffers. A static KV cache ``(layers, seqs, heads,
  max_len, head_dim)``; per-sequence positions; per-row step counters, token budgets,
  ``done`` flags, seeds, a "seen" mask for the repetition penalty, sampling options and an
  output token buffer. A *row* is one sentence; with CFG it owns two *sequences*
  (``2*row`` conditional, ``2*row+1`` unconditional), as stock's batch of two.
- :func:`prefill` embeds many sentences at once (right-padded, causal mask per length) and
  writes their KV into their rows' slots; the other rows are not touched.
- :func:`decode_one_token` = :func:`sample_rows` (draw and record) + :func:`forward_tokens`:
  a pure function of the buffers (the first ``n`` rows, the first ``kv_len`` cache
  positions), so it can be captured in a CUDA graph per (rows bucket, kv-length bucket).
- :class:`FastT3` runs continuous batching: requests are length-sorted (longest first),
  rows are filled, decoded, and every ``check_every`` steps the host reads the ``done``
  flags once, yields finished rows and refills them with the next requests.

Stock semantics kept (chatterbox ``T3.inference``): the prefill is ``[cond_emb,
text_emb + text_pos, BOS + speech_pos(0), BOS + speech_pos(0)]`` (BOS twice: stock's
quirk); the unconditional row has its text embedding zeroed before the position embedding
is added; step ``i`` feeds ``speech_emb(token_i) + speech_pos(i + 1)``; logits are
``cond + cfg * (cond - uncond)`` then the filters of :mod:`.sampling`; the repetition
penalty counts BOS. With ``cfg_weight <= 0`` stock's two rows are identical and its mix is
``cond``, so rows run without a pair.

Output: per request the list of sampled speech token ids, **without** the end-of-speech
token (stock includes it and ``drop_invalid_tokens`` removes it later). With ``ignore_eos``
the list is exactly ``budget`` long and may contain any id the head can produce.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .capture import empty_cache, failure_line, recording, synchronize
from .regions import Regions
from .sampling import SamplingParams, cfg_mix, check_options, sample_tokens, split_seed

log = logging.getLogger("ttsbatch")

LEN_BUCKET = 256  # KV length granularity of captured graphs (and of the cache's max_len)
MAX_ROWS = 256  # never more rows than this, whatever the memory
CPU_ROWS = 8  # default rows on the CPU
# Below this much free GPU memory a decode-step capture first empties the allocator's cache:
# while capturing, the allocator cannot free cached blocks to make room for the step's
# activations, and emptying it otherwise would cost the other thread's allocations
CAPTURE_FREE_BYTES = 1 << 30
RESERVE_BYTES = 3 << 30  # GPU memory left for prefill activations, S3Gen and the allocator
# Most (sequences x padded length) per prefill forward: its activations must fit the margin
# pick_rows leaves (1 GiB under --max-vram; at 24k tokens they overshot a cap by 0.22 GiB on
# an H100). Refills are a few thousand tokens anyway; only a first fill is split more.
PREFILL_TOKENS = 8192
PREFILL_LEN_STEP = 64  # graphed prefill lengths are padded to a multiple of this (eager ones: _prefill_pad)
# Prefills of at most this many (padded rows x pairs x padded length) positions run from CUDA
# graphs (FastT3.prefill): batch 1 (prompts up to 1,024 positions) and small refills
GRAPHED_PREFILL_TOKENS = 2048
# With the Triton decode kernels on, steps of at most this many sequences (batch 1 with CFG)
# run the fused GEMV layers of decode_gemv; more sequences, the compiled layers (on an H200 at
# 4 sequences the fused path was slower than the compiled one: scripts/gpu_t3_profile.py).
FUSED_MAX_SEQS = 2


def _staged(values: Sequence[Sequence[int]], dtype: torch.dtype, dev: torch.device) -> torch.Tensor:
    """Lists of numbers as one (len(values), n) tensor on ``dev``, copied from pinned host
    memory without a host sync. ``torch.tensor(..., device="cuda")`` is a blocking copy that
    waits for everything queued on the stream (PyTorch's ``memcpy_and_sync``); a refill made
    ~10 of them, the first waiting for the whole prefill, and in a book each wait also handed
    the GIL to S3Gen's thread (T3's refills took 7.4-10.1 s of its host time in a 2-hour book
    on an H200, twenty-fourth session)."""
    t = torch.tensor(values, dtype=dtype)
    if dev.type == "cuda":
        t = t.pin_memory().to(dev, non_blocking=True)
    return t


def _prefill_pad(n: int, dev: torch.device) -> int:
    """The padded length of an eager prefill of ``n`` positions: a multiple of 16 on CUDA
    (whole tiles; the compiled layers take any length), ``n`` on the CPU."""
    return _round_up(n, 16) if dev.type == "cuda" else n


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def row_buckets(max_rows: int) -> list[int]:
    """Batch sizes graphs are captured for: powers of two below ``max_rows``, and ``max_rows``."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


def prefill_row_bucket(n: int) -> int:
    """Rows a graphed prefill of ``n`` rows runs (the rest repeat its last row): 1, 2, 3, 4, 6,
    8, 12, 16, 24, ... (at most a third of the work padding, few graphs)."""
    b = 1
    while True:
        for c in (b, b + b // 2):
            if c >= n:
                return c
        b *= 2


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    wqkv: torch.Tensor  # (3 * heads * head_dim, dim): q, k, v stacked
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor  # (2 * mlp, dim): gate, up stacked
    wdown: torch.Tensor


class T3Weights:
    """The decode-time weights of a chatterbox T3 (a Llama backbone), in one dtype on one device."""

    def __init__(self, t3, dtype: torch.dtype | None = None):
        cfg = t3.cfg
        if getattr(t3, "is_gpt", False) or getattr(cfg, "model_type", "llama") != "llama":
            raise NotImplementedError("the fast T3 supports the Llama backbone (English Chatterbox) only")
        if t3.hp.input_pos_emb != "learned":
            raise NotImplementedError("the fast T3 needs learned position embeddings")
        device = t3.device
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.t3 = t3  # the fp32 reference module: conditioning and text embeddings come from it
        self.device, self.dtype = device, dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        if self.n_kv_heads != self.n_heads:
            raise NotImplementedError("the fast T3 expects as many KV heads as query heads (T3 has)")
        self.dim = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5

        def cast(t, dt=dtype):
            return t.detach().to(device=device, dtype=dt).contiguous()

        f32 = torch.float32

        with torch.no_grad():
            self.layers = []
            for layer in t3.tfmr.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(
                    LayerWeights(
                        ln1=cast(layer.input_layernorm.weight, f32),
                        wqkv=cast(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])),
                        wo=cast(a.o_proj.weight),
                        ln2=cast(layer.post_attention_layernorm.weight, f32),
                        wgu=cast(torch.cat([m.gate_proj.weight, m.up_proj.weight])),
                        wdown=cast(m.down_proj.weight),
                    )
                )
            # Small or gathered by row: kept in fp32 whatever the compute dtype (see _layer).
            self.norm = cast(t3.tfmr.norm.weight, f32)
            self.speech_emb = cast(t3.speech_emb.weight, f32)
            self.speech_pos = cast(t3.speech_pos_emb.emb.weight, f32)
            self.speech_head = cast(t3.speech_head.weight, f32)
            self.speech_head_bias = cast(t3.speech_head.bias, f32) if t3.speech_head.bias is not None else None
        self.vocab = self.speech_head.shape[0]
        self.n_layers = len(self.layers)
        self.regions = layer_regions()  # eager; FastT3(compile_layers=True) compiles them
        self.sampling = sampling_regions()  # the same
        # decode attention: SDPA over the padded cache, or (CUDA) the Triton kernel that
        # writes this step's K/V and reads only live keys (FastT3(decode_kernel=...))
        self.decode_kernel = False
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope(self, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (max_len, head_dim), fp32, from the HF module's rotary embedding (Llama 3 scaling)."""
        if max_len not in self._rope:
            with torch.no_grad():
                probe = torch.zeros(1, device=self.device, dtype=torch.float32)
                positions = torch.arange(max_len, device=self.device)[None]
                cos, sin = self.t3.tfmr.rotary_emb(probe, position_ids=positions)
            self._rope = {max_len: (cos[0].float().contiguous(), sin[0].float().contiguous())}
        return self._rope[max_len]

    def kv_bytes_per_seq(self, max_len: int) -> int:
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * max_len * itemsize


# ---------------------------------------------------------------------------------------------
# The transformer, on our buffers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, operation for operation."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def layer_in(x, ln1, wqkv, cos, sin, eps: float, n_heads: int, head_dim: int):
    """input_layernorm, the q/k/v projections (one GEMM) and RoPE: x (N, T, D) fp32,
    cos/sin (N, T, hd) -> q, k, v (N, H, T, hd) in the weights' dtype."""
    n, t, _ = x.shape
    dt = wqkv.dtype
    h = rms_norm(x, ln1, eps).to(dt)
    qkv = F.linear(h, wqkv).view(n, t, 3, n_heads, head_dim)
    q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))
    cos, sin = cos[:, None], sin[:, None]  # (N, 1, T, hd)
    q, k = q.float(), k.float()
    q = (q * cos + _rotate_half(q) * sin).to(dt)
    k = (k * cos + _rotate_half(k) * sin).to(dt)
    return q, k, v


def layer_out(o, x, wo, ln2, wgu, wdown, eps: float):
    """o_proj + residual, post_attention_layernorm, SwiGLU MLP + residual: o (N, H, T, hd),
    x (N, T, D) fp32 -> x (N, T, D) fp32."""
    n, t, _ = x.shape
    o = o.transpose(1, 2).reshape(n, t, -1)
    x = x + F.linear(o, wo).float()
    h = rms_norm(x, ln2, eps).to(wo.dtype)
    gate, up = F.linear(h, wgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wdown).float()


def layer_regions(compile: bool = False, backend="inductor") -> Regions:
    """A layer's two halves around the attention, eager or compiled (``engine.regions``):
    one graph each for all 30 layers, every row count and (prefill) every length."""
    return Regions({"layer_in": layer_in, "layer_out": layer_out}, "T3's layers", compile, backend)


def sampling_regions(compile: bool = False, backend="inductor") -> Regions:
    """The decode step's sampling (:func:`sample_rows`), eager or compiled. A set of its own:
    if it fails to compile, the layers stay compiled."""
    return Regions({"sample": _sample_and_record}, "T3's sampling", compile, backend)


def _layer(w: T3Weights, lw: LayerWeights, x: torch.Tensor, cos, sin, attend) -> torch.Tensor:
    """One Llama decoder layer on x (N, T, D); ``attend(q, k, v)`` (N, H, T, hd) does the attention.

    Precision: the residual stream ``x``, the norms and RoPE are fp32; matmul inputs, weights,
    q/k/v and the KV cache are ``w.dtype`` (bf16 on CUDA). In fp32 every cast is a no-op and
    this is HF's LlamaDecoderLayer operation for operation. (A bf16 residual stream would
    round the layers' small updates away; keeping it fp32 costs nothing measurable.)
    The halves around the attention are ``w.regions`` (compiled with ``FastT3(compile_layers=True)``).
    """
    r = w.regions
    rows = (0, 1) if x.shape[1] > 1 else (0,)  # a length of 1 (decode) stays static
    r.dyn((x, *rows), (cos, *rows), (sin, *rows))
    q, k, v = r.layer_in(x, lw.ln1, lw.wqkv, cos, sin, eps=w.eps, n_heads=w.n_heads, head_dim=w.head_dim)
    o = attend(q, k, v)
    r.dyn((o, 0, 2) if x.shape[1] > 1 else (o, 0), (x, *rows))
    return r.layer_out(o, x, lw.wo, lw.ln2, lw.wgu, lw.wdown, eps=w.eps)


def _additive(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as SDPA's additive float mask (0 where valid, -inf elsewhere)."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


def _head(w: T3Weights, x: torch.Tensor) -> torch.Tensor:
    return F.linear(rms_norm(x, w.norm, w.eps), w.speech_head, w.speech_head_bias).float()


# ---------------------------------------------------------------------------------------------
# Buffers


class DecodeState:
    """Everything one decode step reads and writes, allocated once (shapes never change)."""

    def __init__(self, w: T3Weights, rows: int, max_len: int, max_new: int, pairs: int, eos: int):
        dev = w.device
        self.rows, self.max_len, self.max_new, self.pairs, self.eos = rows, max_len, max_new, pairs, eos
        seqs = rows * pairs
        self.seqs = seqs
        shape = (w.n_layers, seqs, w.n_kv_heads, max_len, w.head_dim)
        self.k = torch.zeros(shape, dtype=w.dtype, device=dev)
        self.v = torch.zeros(shape, dtype=w.dtype, device=dev)
        self.cos, self.sin = w.rope(max_len)
        self.logits = torch.zeros(seqs, w.vocab, dtype=torch.float32, device=dev)
        self.pos = torch.zeros(seqs, dtype=torch.int64, device=dev)  # next cache position (= KV length)
        self.step = torch.zeros(rows, dtype=torch.int64, device=dev)  # tokens sampled so far
        self.budget = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.done = torch.ones(rows, dtype=torch.bool, device=dev)  # free rows count as done
        self.ignore_eos = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.seed_lo = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.seed_hi = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(rows, w.vocab, dtype=torch.bool, device=dev)
        self.out = torch.zeros(rows, max_new, dtype=torch.int64, device=dev)
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=dev)  # last token drawn
        self.params = SamplingParams(rows, dev)
        # The voice template (the Triton decode kernel only): K/V of the voice's unconditional
        # prompt, which every sentence's sequences share a prefix of (FastT3._ensure_template);
        # ``shared``: how many leading positions each sequence reads from it, not its own cache
        self.shared = torch.zeros(seqs, dtype=torch.int32, device=dev)
        self.tk = self.tv = None
        if w.decode_kernel:
            tshape = (w.n_layers, w.n_kv_heads, max_len, w.head_dim)
            self.tk = torch.zeros(tshape, dtype=w.dtype, device=dev)
            self.tv = torch.zeros(tshape, dtype=w.dtype, device=dev)
        self.template: tuple[torch.Tensor, int] | None = None  # (the voice's cond embedding, positions held)
        # (rows bucket, kv bucket, use_top_p) -> a decode step's replay(); ("prefill", rows bucket,
        # padded length) -> (meta, replay()) of a prefill (FastT3.prefill)
        self.graphs: dict[tuple, object] = {}
        self.prefill_x: torch.Tensor | None = None  # the graphed prefills' input buffer (FastT3.prefill)

    def fits(self, rows: int, max_len: int, max_new: int, pairs: int, eos: int) -> bool:
        """Whether these buffers serve a call needing this much (a call may use fewer rows)."""
        return (self.pairs, self.eos) == (pairs, eos) and self.rows >= rows and self.max_len >= max_len and self.max_new >= max_new

    def small_state(self) -> dict[str, torch.Tensor]:
        """The per-row tensors (not the KV cache): for snapshots around graph warm-up."""
        names = ("logits", "pos", "step", "budget", "done", "ignore_eos", "seen", "out", "tokens", "shared")
        return {n: getattr(self, n) for n in names}


@dataclass
class RowInput:
    """One sentence ready for prefill: its sequences' embeddings and its options."""

    embeds: torch.Tensor  # (pairs, L, D), fp32
    budget: int
    seed: int
    ignore_eos: bool
    gen: object  # GenerationOptions
    shared: tuple[int, ...] = ()  # per sequence: leading positions the voice template holds (none if empty)


def prefill(w: T3Weights, st: DecodeState, rows: Sequence[int], inputs: Sequence[RowInput], max_tokens: int | None = None) -> None:
    """Run the prompts of ``inputs`` and make ``rows`` start decoding them; other rows are untouched."""
    if not rows:
        return
    dev = w.device
    if max_tokens is None:
        max_tokens = PREFILL_TOKENS
    # Chunks of rows whose padded size (as _prefill_group pads) stays under max_tokens.
    group: list[int] = []
    longest = 0
    for i in range(len(rows)):
        L = _prefill_pad(inputs[i].embeds.shape[1], dev)
        if group and (len(group) + 1) * st.pairs * max(longest, L) > max_tokens:
            _prefill_group(w, st, [rows[j] for j in group], [inputs[j] for j in group])
            group, longest = [], 0
        group.append(i)
        longest = max(longest, L)
    _prefill_group(w, st, [rows[j] for j in group], [inputs[j] for j in group])
    _start_rows(w, st, rows, inputs)


def _prefill_attention(dev: torch.device):
    """SDPA backends for the prefill. On CUDA, not cuDNN: PyTorch builds a cuDNN graph for
    every new (sequences, length) shape, and refills come in ever new shapes; profiled on an
    H100 that cost ~2.6 ms of host time per layer call, 16 s of a 2-hour book. The prefill
    is causal with no mask (:func:`prefill_layers`): FlashAttention in bf16, the
    memory-efficient kernel in fp32, neither with a per-shape set-up."""
    if dev.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _prefill_group(w: T3Weights, st: DecodeState, rows: Sequence[int], inputs: Sequence[RowInput]) -> None:
    dev, P = w.device, st.pairs
    lens = [x.embeds.shape[1] for x in inputs for _ in range(P)]
    Lmax = max(lens)
    if Lmax > st.max_len:
        raise ValueError(f"prompt of {Lmax} positions does not fit a cache of {st.max_len}")
    Lmax = min(_prefill_pad(Lmax, dev), st.max_len)  # padded positions: see prefill_layers
    n = len(lens)
    x = torch.zeros(n, Lmax, w.dim, dtype=torch.float32, device=dev)
    for i, inp in enumerate(inputs):
        x[i * P : (i + 1) * P, : inp.embeds.shape[1]] = inp.embeds
    seq_idx, length = _staged([[r * P + j for r in rows for j in range(P)], lens], torch.int64, dev)
    prefill_layers(w, st, x, seq_idx, length)


def prefill_layers(w: T3Weights, st: DecodeState, x: torch.Tensor, seq_idx: torch.Tensor, length: torch.Tensor,
                   cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The prefill's device work, a pure function of tensors (so a small one can be a CUDA
    graph, FastT3.prefill): the prompts x (n, Lmax, D) fp32, zero-padded, through the layers into the KV
    cache of sequences ``seq_idx`` (n,); their logits at position ``length - 1``; their
    positions set to ``length``. ``cache``: other (layers, sequences, H, L, hd) K and V
    tensors to write instead (the voice template), and no logits or positions.

    Right-padded prompts need only the causal mask: a valid query's keys (at or before it)
    are all valid; padded queries attend padding, and what they compute is never read (their
    K/V land past the prompt and are rewritten before a step reads them). Without a mask,
    SDPA runs FlashAttention in bf16 (the masked memory-efficient kernel ran at ~15 TFLOP/s,
    17% of a full batch's refill on an H200)."""
    dev, n, Lmax = x.device, x.shape[0], x.shape[1]
    cos, sin = st.cos[:Lmax][None].expand(n, -1, -1), st.sin[:Lmax][None].expand(n, -1, -1)
    kc, vc = (st.k, st.v) if cache is None else cache

    def attend(q, k, v, li):
        kc[li, seq_idx, :, :Lmax] = k
        vc[li, seq_idx, :, :Lmax] = v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=w.scale)

    with _prefill_attention(dev):  # once for all layers
        for li, lw in enumerate(w.layers):
            x = _layer(w, lw, x, cos, sin, functools.partial(attend, li=li))
    if cache is not None:
        return
    last = x[torch.arange(n, device=dev), length - 1]  # (n, D)
    st.logits[seq_idx] = _head(w, last)
    st.pos[seq_idx] = length


def _start_rows(w: T3Weights, st: DecodeState, rows: Sequence[int], inputs: Sequence[RowInput]) -> None:
    """Reset the per-row state of ``rows`` for their new sentences."""
    dev, P = w.device, st.pairs
    seeds = [split_seed(int(x.seed)) for x in inputs]
    idx, budget, ignore_eos, seed_lo, seed_hi = _staged(
        [list(rows), [int(x.budget) for x in inputs], [int(x.ignore_eos) for x in inputs],
         [s[0] for s in seeds], [s[1] for s in seeds]], torch.int64, dev)
    seqs, shared = _staged([[r * P + j for r in rows for j in range(P)],
                            [x.shared[j] if x.shared else 0 for x in inputs for j in range(P)]], torch.int64, dev)
    # A constant goes in with index_fill_, never as ``t[idx] = 0``: advanced-index assignment
    # of a Python scalar copies it to the GPU first, a blocking copy (the refill GPU test).
    st.step.index_fill_(0, idx, 0)
    st.budget[idx] = budget
    st.ignore_eos[idx] = ignore_eos.bool()
    st.seed_lo[idx] = seed_lo
    st.seed_hi[idx] = seed_hi
    st.seen.index_fill_(0, idx, False)
    st.shared[seqs] = shared.to(torch.int32)
    st.seen[:, w.t3.hp.start_speech_token].index_fill_(0, idx, True)  # stock's generated_ids start with BOS
    st.out.index_fill_(0, idx, 0)
    st.tokens.index_fill_(0, idx, 0)
    # Options: one GenerationOptions per call in practice; grouped so any mix works.
    by_gen: dict[int, list[int]] = {}
    for r, x in zip(rows, inputs):
        by_gen.setdefault(id(x.gen), []).append(r)
    gens = {id(x.gen): x.gen for x in inputs}
    for key, rs in by_gen.items():
        st.params.set_rows(idx if len(by_gen) == 1 else _staged([rs], torch.int64, dev)[0], gens[key])
    st.done.index_fill_(0, idx, False)


def record_tokens(st: DecodeState, n: int, tok: torch.Tensor) -> None:
    """Append ``tok`` (n,) to the live rows among the first ``n``: output, seen mask, step, done."""
    _record(tok, *_record_state(st, n), eos=st.eos)


def sample_rows(w: T3Weights, st: DecodeState, n: int, use_top_p: bool) -> torch.Tensor:
    """One token per row for the first ``n`` rows, from ``st.logits`` (CFG mix, filters,
    draw), appended as :func:`record_tokens` does; one region (``w.sampling.sample``,
    compiled with the layers: eagerly it is ~70 small kernels a step, ~0.2 ms at batch 1 on an
    H100). The rows' dimension is dynamic: one graph for one row, one for any count above.

    With top-p on, eagerly: Inductor (torch 2.11) failed to generate code for the top-p
    filter's cumsum over a dynamic number of rows (a SplitScan) on an H200."""
    rec = _record_state(st, n)
    args = (st.logits[: n * st.pairs], st.seed_lo[:n], st.seed_hi[:n], *_params(st, n), *rec)
    if use_top_p:
        return _sample_and_record(*args, eos=st.eos, use_top_p=True)
    r = w.sampling
    if n > 1:
        r.dyn(*((t, 0) for t in args))
    r.dyn((rec[0], 1))  # the output's length: a call with other budgets gets other buffers
    return r.sample(*args, eos=st.eos, use_top_p=use_top_p)


def _params(st: DecodeState, n: int) -> tuple:
    p = st.params
    return p.cfg[:n], p.temperature[:n], p.min_p[:n], p.top_p[:n], p.repetition_penalty[:n]


def _record_state(st: DecodeState, n: int) -> tuple:
    return st.out[:n], st.seen[:n], st.step[:n], st.budget[:n], st.done[:n], st.ignore_eos[:n], st.tokens[:n]


def _draw(logits, seen, seed_lo, seed_hi, step, cfg, temperature, min_p, top_p, repetition_penalty, *, use_top_p: bool):
    n = seen.shape[0]
    lg = logits.view(n, -1, logits.shape[-1])
    mixed = cfg_mix(lg[:, 0], lg[:, 1], cfg) if lg.shape[1] == 2 else lg[:, 0]
    params = dict(temperature=temperature, min_p=min_p, top_p=top_p, repetition_penalty=repetition_penalty)
    return sample_tokens(mixed, seen, params, seed_lo, seed_hi, step, use_top_p)


def _record(tok, out, seen, step, budget, done, ignore_eos, tokens, *, eos: int) -> None:
    active = ~done
    col = step.clamp(max=out.shape[1] - 1)[:, None]
    out.scatter_(1, col, torch.where(active, tok, out.gather(1, col)[:, 0])[:, None])
    t = tok[:, None]
    seen.scatter_(1, t, seen.gather(1, t) | active[:, None])
    new_step = step + active.to(torch.int64)
    stop = (tok == eos) & ~ignore_eos
    step.copy_(new_step)
    done.copy_(done | (active & (stop | (new_step >= budget))))
    tokens.copy_(tok)


def _sample_and_record(logits, seed_lo, seed_hi, cfg, temperature, min_p, top_p, repetition_penalty,
                       out, seen, step, budget, done, ignore_eos, tokens, *, eos: int, use_top_p: bool):
    """The region behind :func:`sample_rows`: draw from the rows' state, then record."""
    tok = _draw(logits, seen, seed_lo, seed_hi, step, cfg, temperature, min_p, top_p, repetition_penalty, use_top_p=use_top_p)
    _record(tok, out, seen, step, budget, done, ignore_eos, tokens, eos=eos)
    return tok


def forward_tokens(w: T3Weights, st: DecodeState, n: int, kv_len: int, tok: torch.Tensor) -> None:
    """Feed ``tok`` (n,) to the first ``n`` rows (both sequences of a pair) at their positions.

    Token number ``step`` gets ``speech_pos(step)`` (``st.step`` was already advanced), its
    K/V go to each sequence's position ``pos``, attention reads cache positions ``<= pos``
    among the first ``kv_len``; the next logits land in ``st.logits``; live sequences advance.
    """
    P = st.pairs
    s = n * P
    pos = st.pos[:s].clamp(max=st.max_len - 1)
    if w.decode_kernel and s <= FUSED_MAX_SEQS:
        # batch 1: Triton kernels from the embedding to the logits (decode_gemv)
        from .decode_gemv import embed_tokens, norm_linear_bias

        x = embed_tokens(tok, st.step[:n], w.speech_emb, w.speech_pos, P)
        x = _fused_layers(w, st, x, pos, kv_len)
        norm_linear_bias(x, w.norm, w.speech_head, w.speech_head_bias, w.eps, out=st.logits[:s])
    else:
        spos = st.step[:n].clamp(max=w.speech_pos.shape[0] - 1)
        x = w.speech_emb[tok] + w.speech_pos[spos]  # (n, D)
        # both sequences of a pair; contiguous also for one row (a view with stride 0 there would
        # be a new input layout for the compiled layers)
        x = x[:, None, :].expand(n, P, w.dim).reshape(s, 1, w.dim).contiguous()
        x = _layers(w, st, x, pos, kv_len)
        st.logits[:s] = _head(w, x[:, 0])
    live = (~st.done[:n])[:, None].expand(n, P).reshape(s)
    st.pos[:s] = st.pos[:s] + live.to(torch.int64)


def _layers(w: T3Weights, st: DecodeState, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The decode step's layers for x (s, 1, D): the (compiled) layer halves around the
    Triton attention kernel or SDPA over the padded cache."""
    s = x.shape[0]
    cos, sin = st.cos[pos][:, None], st.sin[pos][:, None]  # (s, 1, hd)
    if w.decode_kernel:
        from .decode_attention import attend_and_cache

        def attend_at(li):
            return lambda q, k, v: attend_and_cache(q, k, v, st.k[li], st.v[li], pos, kv_len, w.scale, template=_template(st, li, s))
    else:
        seq = torch.arange(s, device=x.device)
        valid = (torch.arange(kv_len, device=x.device)[None, :] <= pos[:, None])[:, None, None, :]  # (s,1,1,kv)
        mask = _additive(valid, w.dtype)  # built once per step, not once per layer

        def attend_at(li):
            def attend(q, k, v):
                st.k[li, seq, :, pos] = k[:, :, 0]
                st.v[li, seq, :, pos] = v[:, :, 0]
                kc = st.k[li, :s, :, :kv_len]
                vc = st.v[li, :s, :, :kv_len]
                return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=w.scale)

            return attend

    for li, lw in enumerate(w.layers):
        x = _layer(w, lw, x, cos, sin, attend_at(li))
    return x


def _fused_layers(w: T3Weights, st: DecodeState, x: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The decode step's layers for a few sequences, x (s, D) fp32: five or six Triton kernels
    a layer (``decode_gemv``: the norms, SwiGLU and residual adds inside the GEMVs; RoPE and
    the cache write inside the attention), against ~13 for the compiled layers."""
    from .decode_attention import attend_and_cache
    from .decode_gemv import linear_residual, norm_linear, norm_swiglu

    s, H, hd = x.shape[0], w.n_heads, w.head_dim
    for li, lw in enumerate(w.layers):
        qkv = norm_linear(x, lw.ln1, lw.wqkv, w.eps).view(s, 3, H, 1, hd)
        o = attend_and_cache(qkv[:, 0], qkv[:, 1], qkv[:, 2], st.k[li], st.v[li], pos, kv_len, w.scale, rope=(st.cos, st.sin),
                             template=_template(st, li, s))
        x = linear_residual(o.view(s, H * hd), lw.wo, x)
        x = linear_residual(norm_swiglu(x, lw.ln2, lw.wgu, w.eps), lw.wdown, x)
    return x


def _template(st: DecodeState, li: int, s: int):
    """The decode kernel's ``template`` argument for layer ``li`` and the first ``s`` sequences."""
    return None if st.tk is None else (st.tk[li], st.tv[li], st.shared[:s])


def decode_one_token(w: T3Weights, st: DecodeState, n: int, kv_len: int, use_top_p: bool) -> None:
    """One step for the first ``n`` rows: draw, record, feed. Pure function of the buffers."""
    tok = sample_rows(w, st, n, use_top_p)
    forward_tokens(w, st, n, kv_len, tok)


# ---------------------------------------------------------------------------------------------
# Conditioning and prompts


def cond_embedding(t3, t3_cond) -> torch.Tensor:
    """T3's conditioning embedding (len_cond, D), fp32, computed as stock does (without mutating ``t3_cond``)."""
    c = copy.copy(t3_cond)
    with torch.inference_mode():
        return t3.prepare_conditioning(c)[0].float()


def prompt_embeds(t3, cond_emb: torch.Tensor, text_tokens: torch.Tensor, pairs: int) -> torch.Tensor:
    """The prefill of one sentence: (pairs, L, D) fp32, stock's layout (see the module docstring)."""
    with torch.inference_mode():
        tt = _staged([text_tokens.tolist()], torch.long, t3.device)  # (1, T), no host sync
        te = t3.text_emb(tt)[0]
        tpos = t3.text_pos_emb(tt)  # (T, D): positions 0..T-1
        bos = torch.full((1, 1), t3.hp.start_speech_token, dtype=torch.long, device=t3.device)
        # position 0's embedding: stock's get_fixed_embedding(0), without its blocking torch.tensor(0, device=...)
        bos_e = t3.speech_emb(bos)[0] + t3.speech_pos_emb.emb.weight[:1]  # (1, D)
        rows = [torch.cat([cond_emb, te + tpos, bos_e, bos_e])]
        if pairs == 2:
            rows.append(torch.cat([cond_emb, torch.zeros_like(te) + tpos, bos_e, bos_e]))
        return torch.stack(rows).float()


def text_token_ids(model, text: str) -> torch.Tensor:
    """Stock tokenization of one sentence: [START] text [STOP] (1-D, on the CPU)."""
    hp = model.t3.hp
    ids = model.tokenizer.text_to_tokens(text).view(-1).to(torch.long).cpu()
    return torch.cat([torch.tensor([hp.start_text_token]), ids, torch.tensor([hp.stop_text_token])])


# ---------------------------------------------------------------------------------------------
# Continuous batching


def _tokens_without_eos(tokens: list[int], eos: int, ignore_eos: bool) -> list[int]:
    if not ignore_eos and tokens and tokens[-1] == eos:
        return tokens[:-1]
    return tokens


class FastT3:
    """The batched, graph-captured T3 of one loaded model. Reuse one per model (see :func:`fast_t3`)."""

    def __init__(
        self,
        model,
        dtype: torch.dtype | None = None,
        use_graphs: bool | str | None = None,
        compile_layers: bool | None = None,
        layers_backend="inductor",
        decode_kernel: bool | None = None,
    ):
        """``use_graphs``: None = on CUDA only; ``"emulate"`` runs the capture bookkeeping
        (warm-up steps on a snapshot, then restore) but replays eagerly: for CPU tests.
        ``compile_layers``: torch.compile each layer's two halves around the attention (one
        graph each for every layer and shape; the decode step's graph captures the compiled
        kernels). None: on CUDA (measured on an H100: 1.6x the tokens/s at batch 1, 1.3x at
        256 rows); on the CPU the eager functions are as fast and need no compiler.
        ``decode_kernel``: the decode step's attention as one Triton kernel that also writes
        the new K/V and reads only each sequence's live keys (``decode_attention``), instead
        of two ``index_put`` and SDPA over the padded cache. None: on CUDA, if it compiles."""
        self.model = model
        with torch.inference_mode(False), torch.no_grad():
            self.w = T3Weights(model.t3, dtype)
        if compile_layers is None:
            compile_layers = self.w.device.type == "cuda"
        if compile_layers:
            self.w.regions = layer_regions(compile=True, backend=layers_backend)
            self.w.sampling = sampling_regions(compile=True, backend=layers_backend)
        self.device = self.w.device
        self.decode_kernel_error: str | None = None  # why the Triton decode kernel is off, if it failed
        if decode_kernel is None:
            decode_kernel = self.device.type == "cuda"
        if decode_kernel:
            self.decode_kernel_error = _check_decode_kernel(self.w)
            if self.decode_kernel_error is not None:
                log.warning("the Triton decode kernels failed (%s); T3 decodes with SDPA (slower)", self.decode_kernel_error)
        self.w.decode_kernel = bool(decode_kernel) and self.decode_kernel_error is None
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs is True and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.use_graphs = use_graphs
        self.graph_error: str | None = None  # why graphs were turned off, if capture failed
        self.state: DecodeState | None = None
        self.rows_used = 0  # rows of the last generate call (the buffers may hold more)
        self._graph_pool = None
        self._cond_cache: dict[int, tuple[object, torch.Tensor]] = {}
        self.trace: list[tuple] = []  # ("start"/"finish", request, row) and ("move", request, from, to): for tests
        # the host's seconds in generate: launching refills' prefills and decode steps, and
        # waiting in the host looks for the device to finish them (on CUDA, time T3's stream
        # spent behind its own work or, beside S3Gen, behind S3Gen's)
        self.stats = dict(steps=0, row_steps=0, host_checks=0, graphs_captured=0, capture_s=0.0, prefills=0, compactions=0,
                          prefill_s=0.0, step_launch_s=0.0, look_wait_s=0.0)
        self.capture_log: list[tuple[float, float, str]] = []  # (start, end in perf_counter seconds, what) per capture
        self.draining = False  # generate has started every request: its rows only finish now

    # -- sizes ---------------------------------------------------------------------------------

    def pick_rows(self, max_len: int, pairs: int, max_vram_gb: float | None = None, n_requests: int | None = None) -> int:
        """Rows that fit: from free GPU memory (minus a reserve), capped by ``max_vram_gb``; 8 on the CPU."""
        limit = MAX_ROWS if n_requests is None else max(1, min(MAX_ROWS, n_requests))
        if self.device.type != "cuda":
            return min(CPU_ROWS, limit)
        per_row = self.bytes_per_row(_round_up(max_len, LEN_BUCKET), pairs)
        # blocks PyTorch holds cached but unused (S3Gen's activations from an earlier call, a
        # warm-up's batch padded to the longest bucket) would count as held under the cap:
        # give them back first (on an H100 a book after the warm-up got 102 rows, not 204)
        empty_cache()  # not beside S3Gen's capture (engine/capture.py)
        free, _total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_reserved(self.device)
        if self.state is not None:  # the buffers of a previous call will be freed first
            free += self.state_bytes(self.state)
            held -= self.state_bytes(self.state)
        avail = free - RESERVE_BYTES
        if max_vram_gb is not None:
            avail = min(avail, int(max_vram_gb * (1 << 30)) - held - (1 << 30))
        if self.w.decode_kernel:  # the voice template: one sequence's worth of K/V
            avail -= self.w.kv_bytes_per_seq(_round_up(max_len, LEN_BUCKET))
        rows = int(avail // per_row)
        if rows < 1:
            from ..errors import ModelError

            need = (per_row + RESERVE_BYTES) / (1 << 30)
            cap = f" (--max-vram {max_vram_gb} GB)" if max_vram_gb is not None else ""
            raise ModelError(
                f"not enough GPU memory for one sentence of {max_len} positions: about {need:.1f} GiB "
                f"needed, {max(avail + RESERVE_BYTES, 0) / (1 << 30):.1f} GiB available{cap}"
            )
        return min(rows, limit)

    def bytes_per_row(self, max_len: int, pairs: int) -> int:
        V = self.w.vocab
        # KV cache + logits per sequence; seen mask, output, and sampling temporaries (int64 noise, sort) per row
        return pairs * (self.w.kv_bytes_per_seq(max_len) + V * 4) + V * (1 + 8 * 8) + 4096 * 8

    @staticmethod
    def state_bytes(st: DecodeState) -> int:
        tmpl = 0 if st.tk is None else 2 * st.tk.numel() * st.tk.element_size()
        return 2 * st.k.numel() * st.k.element_size() + tmpl + st.logits.numel() * 4 + st.seen.numel() + st.out.numel() * 8

    def new_state(self, rows: int, max_len: int, max_new: int, pairs: int, eos: int | None = None) -> DecodeState:
        """Buffers for at least ``rows`` sentences (the current ones when they fit)."""
        eos = self.model.t3.hp.stop_speech_token if eos is None else eos
        if self.state is not None and self.state.fits(rows, max_len, max_new, pairs, eos):
            return self.state
        self.state = None  # free the old buffers (and their graphs) before allocating
        self._graph_pool = None
        if self.device.type == "cuda":
            empty_cache()
        max_len = _round_up(max_len, LEN_BUCKET if self.device.type == "cuda" else 64)
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable in and out of inference mode
            self.state = DecodeState(self.w, rows, max_len, max_new, pairs, eos)
        return self.state

    # -- prompts -------------------------------------------------------------------------------

    def cond_emb(self, conds) -> torch.Tensor:
        key = id(conds.t3)
        hit = self._cond_cache.get(key)
        if hit is None or hit[0] is not conds.t3:
            hit = (conds.t3, cond_embedding(self.model.t3, conds.t3))
            self._cond_cache = {key: hit}
        return hit[1]

    def row_input(self, conds, req, gen, pairs: int, text_ids: torch.Tensor | None = None) -> RowInput:
        ids = text_token_ids(self.model, req.text) if text_ids is None else text_ids
        cond = self.cond_emb(conds)
        emb = prompt_embeds(self.model.t3, cond, ids, pairs)
        shared: tuple[int, ...] = ()
        t = self.state.template if self.state is not None else None
        if t is not None and t[0] is cond:
            # the conditioning is every sequence's prefix; the uncond sequence's whole prompt
            # but its two speech BOS positions is the template's (see _ensure_template)
            n_cond, L = cond.shape[0], emb.shape[1]
            shared = (n_cond, L - 2 if L - 2 <= t[1] else n_cond)[:pairs]
        return RowInput(emb, int(req.budget), int(req.seed), bool(gen.ignore_eos), gen, shared)

    def _ensure_template(self, st: DecodeState, conds, text_len: int) -> None:
        """Fill ``st``'s voice template for prompts of up to ``text_len`` text tokens.

        With CFG the unconditional sequence's text embedding is zeroed (stock's
        ``prepare_input_embeds``), so its prompt up to the speech BOS is the conditioning
        followed by the text position embeddings: the same for every sentence of a voice
        but for its length, and with causal attention a shorter one's K/V are a prefix of a
        longer one's. The template is that prompt, prefilled once per voice; the decode
        kernel reads those positions from it (and the conditioning's of the conditional
        sequences), one table in L2 instead of a copy per sequence in HBM: ~40% of a full
        batch's attention bytes with the book's sentences."""
        if st.tk is None:
            return
        cond = self.cond_emb(conds)
        t = st.template
        need = cond.shape[0] + text_len
        if t is not None and t[0] is cond and t[1] >= need:
            return
        t3 = self.model.t3
        # room for longer prompts of later calls: fewer refills of the template
        text_len = min(_round_up(need, LEN_BUCKET), st.max_len) - cond.shape[0]
        text_len = min(text_len, t3.text_pos_emb.emb.num_embeddings)
        st.template = None
        with torch.inference_mode():
            tpos = t3.text_pos_emb(torch.zeros(1, text_len, dtype=torch.long, device=self.device))
            x = torch.cat([cond, tpos.float()])[None]  # (1, L, D)
            L = x.shape[1]
            pad = min(_prefill_pad(L, self.device), st.max_len)
            # two identical rows written to the one template: a single row would get compiled
            # layer graphs of its own (dynamo specializes a dimension of size 1)
            x = F.pad(x, (0, 0, 0, pad - L)).expand(2, -1, -1).contiguous()
            zero = torch.zeros(2, dtype=torch.int64, device=self.device)
            prefill_layers(self.w, st, x, zero, zero + L, cache=(st.tk[:, None], st.tv[:, None]))
        st.template = (cond, L)

    # -- one step ------------------------------------------------------------------------------

    def step(self, st: DecodeState, n: int, kv_len: int, use_top_p: bool) -> None:
        """One decode step of the first ``n`` rows: a graph replay on CUDA, eager elsewhere."""
        if not self.use_graphs:
            decode_one_token(self.w, st, n, kv_len, use_top_p)
            return
        key = (n, kv_len, use_top_p)
        replay = st.graphs.get(key)
        if replay is None:
            replay = self._capture(st, n, kv_len, use_top_p)
            st.graphs[key] = replay
        replay()

    def _capture(self, st: DecodeState, n: int, kv_len: int, use_top_p: bool):
        """Capture one decode step; warm-up runs on a snapshot of the small state, restored after.

        Warm-up steps also write K/V at positions past every live row's length: the real
        steps rewrite those before anything reads them (a step writes its K/V, then attends).
        """
        saved = {k: v.clone() for k, v in st.small_state().items()}

        def run():
            decode_one_token(self.w, st, n, kv_len, use_top_p)

        what = f"rows={n}, kv_len={kv_len}"
        try:
            replay = self._graph_of(run, what)
        except Exception as e:  # decode eagerly rather than not at all; tests and bench report it
            self._graphs_failed(e, what)
            replay = run
        for k, v in saved.items():
            getattr(st, k).copy_(v)
        return replay

    def _graph_of(self, run, what: str = ""):
        """``run`` (no arguments) run twice on a side stream (compiling, allocating), then
        captured on it: the replay. ``use_graphs="emulate"``: the two runs, then ``run`` itself.

        Captured by ``capture.recording``, not ``torch.cuda.graph``, whose device-wide sync and
        cache flushes stalled S3Gen at each of a 2-hour book's 11 T3 captures (H200, eighteenth
        session). ``stats["capture_s"]``: the host seconds captures took."""
        t0 = time.perf_counter()
        if self.use_graphs == "emulate":
            for _ in range(2):
                run()
            self._captured(t0, what)
            return run
        cur = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(cur)
        runs = []  # the host seconds of each warm-up run, then of the capture (in the log's line)
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
                runs.append(time.perf_counter())
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        free, _ = torch.cuda.mem_get_info(self.device)
        if free < CAPTURE_FREE_BYTES:  # a capture cannot return cached blocks to the driver
            empty_cache()
        graph = torch.cuda.CUDAGraph()
        # thread_local (in capture.recording): the "global" mode made every capture wait for
        # S3Gen and Perth, 14.5 s of a 2-hour book (py-spy on an H100)
        try:
            with recording(graph, self._graph_pool, stream):
                run()
        finally:
            cur.wait_stream(stream)  # the warm-up runs' writes come before the replays
        laps = [b - a for a, b in zip([t0, *runs], [*runs, time.perf_counter()])]
        self._captured(t0, f"{what} (runs {laps[0]:.3f} + {laps[1]:.3f} s, capture {laps[2]:.3f} s)")
        return graph.replay

    def _captured(self, t0: float, what: str) -> None:
        t1 = time.perf_counter()
        self.stats["graphs_captured"] += 1
        self.stats["capture_s"] += t1 - t0
        self.capture_log.append((t0, t1, what))

    def _graphs_failed(self, e: Exception, what: str) -> None:
        synchronize(self.device)
        self.graph_error = failure_line(e)
        log.warning("CUDA graph capture failed (%s): %s; decoding without graphs", what, self.graph_error)
        self.use_graphs = False

    # -- prefill -------------------------------------------------------------------------------

    def prefill(self, st: DecodeState, rows: Sequence[int], inputs: Sequence[RowInput]) -> None:
        """:func:`prefill`; a small one (at most GRAPHED_PREFILL_TOKENS, padded) from a CUDA
        graph when graphs are on: one graph per (rows bucket, padded prompt length), the rows
        padded to :func:`prefill_row_bucket` by repeating the last.

        A prefill is ~150 kernels, and for one row the host launching them was the
        bottleneck: 13.9 ms per sentence at batch 1 on an H200 (scripts/gpu_batch1.py), a
        quarter of its time with the bench's sentences; from a graph, 2.7 ms. Big refills
        keep the eager prefill: their GPU work covers the launches (the full-batch rate did
        not change with them graphed), and a graph's activations stay reserved (they broke
        a --max-vram cap by 0.4 GiB on an H100).

        Tried and removed (BENCHMARKS.md, eighth session): copying the voice's shared prompt
        KV (the conditioning, the uncond row's zeroed text) instead of computing it. It cut
        the refills' matmul time in half, but the two groups it needs doubled the host's
        launches, and with its cache gathers a refill took 50-64 ms against 36 on an H200.
        (The decode steps do read those positions from one shared table instead of each
        row's copy: the voice template, :meth:`_ensure_template`.)"""
        if self.use_graphs:
            Lmax = self._prefill_len(st, inputs)
            if prefill_row_bucket(len(rows)) * st.pairs * Lmax <= GRAPHED_PREFILL_TOKENS:
                for inp in inputs:
                    if inp.embeds.shape[1] > st.max_len:
                        raise ValueError(f"prompt of {inp.embeds.shape[1]} positions does not fit a cache of {st.max_len}")
                self._prefill_graphed(st, rows, inputs)
                _start_rows(self.w, st, rows, inputs)
                return
        prefill(self.w, st, rows, inputs)

    @staticmethod
    def _prefill_len(st: DecodeState, inputs: Sequence[RowInput]) -> int:
        return min(_round_up(max(x.embeds.shape[1] for x in inputs), PREFILL_LEN_STEP), st.max_len)

    def _prefill_graphed(self, st: DecodeState, rows: Sequence[int], inputs: Sequence[RowInput]) -> None:
        P, n = st.pairs, len(rows)
        b, Lmax = prefill_row_bucket(n), self._prefill_len(st, inputs)
        if st.prefill_x is None:  # one buffer for every (rows, length) graph: views of its start
            st.prefill_x = torch.zeros(GRAPHED_PREFILL_TOKENS, self.w.dim, device=self.device)
        x = st.prefill_x[: b * P * Lmax].view(b * P, Lmax, self.w.dim)
        key = ("prefill", b, Lmax)
        entry = st.graphs.get(key)
        meta = entry[0] if entry else torch.zeros(2, b * P, dtype=torch.int64, device=self.device)
        x.zero_()
        for j, inp in enumerate(inputs):
            x[j * P : (j + 1) * P, : inp.embeds.shape[1]] = inp.embeds
        if b > n:  # padding rows: copies of the last row, written to the same sequences
            x[n * P :].view(b - n, P, Lmax, -1).copy_(x[(n - 1) * P : n * P][None].expand(b - n, -1, -1, -1))
        pad = [rows[-1]] * (b - n)
        lens = [inp.embeds.shape[1] for inp in inputs] + [inputs[-1].embeds.shape[1]] * (b - n)
        meta.copy_(_staged([[r * P + j for r in list(rows) + pad for j in range(P)],
                            [L for L in lens for _ in range(P)]], torch.int64, self.device))
        if entry is None:
            run = functools.partial(prefill_layers, self.w, st, x, meta[0], meta[1])
            what = f"prefill of {b} rows x {Lmax} positions"
            try:
                replay = self._graph_of(run, what)
            except Exception as e:  # prefill and decode without graphs
                self._graphs_failed(e, what)
                prefill_layers(self.w, st, x, meta[0], meta[1])
                return
            st.graphs[key] = entry = (meta, replay)
        entry[1]()

    # -- continuous batching -------------------------------------------------------------------

    def generate(
        self,
        conds,
        requests: Sequence,
        gen,
        max_rows: int | None = None,
        check_every: int = 8,
        max_vram_gb: float | None = None,
        sort: bool = True,
        eos_token: int | None = None,
        refill_min: int | None = None,
        min_rows: int = 1,
        look_ahead: int = 0,
    ) -> Iterator[tuple[int, list[int]]]:
        """Speech tokens for every request, yielded as ``(request index, tokens)`` when each is done.

        Requests are taken longest text first (``sort=False``: in the given order); rows that
        finish are refilled with the next requests once ``refill_min`` of them are free (None:
        1/16 of the rows), or sooner when nothing else would run or the rest of the queue
        fits: a prefill costs the same host time for one row as for many (in a 2-hour book
        in document order, refilling row by row meant 700 prefills). The host reads the
        ``done`` flags once every ``check_every`` steps (sooner when every row's budget, or
        enough of them for a refill, runs out sooner: :func:`_steps_to_run`). Once nothing is
        left to start, live rows are compacted into smaller batches (:func:`row_buckets`),
        none smaller than ``min_rows``: each new batch size is a graph to capture, and the
        rows' tokens do not depend on it. ``look_ahead``: decode steps launched after a look's
        copies and before its wait, so T3's stream has work queued while the host harvests,
        refills and launches the next steps (a row that finished by the look idles through
        them; rows that finish in them are harvested at the next look).
        """
        check_options(gen)
        if not requests:
            return
        if check_every < 1:
            raise ValueError("check_every must be >= 1")
        if look_ahead < 0:
            raise ValueError("look_ahead must be >= 0")
        t3 = self.model.t3
        hp = t3.hp
        pairs = 2 if gen.cfg_weight > 0 else 1
        eos = hp.stop_speech_token if eos_token is None else int(eos_token)
        pos_limit = self.w.speech_pos.shape[0] - 1
        for i, r in enumerate(requests):
            if not 1 <= int(r.budget) <= pos_limit:
                from ..errors import InputError

                raise InputError(f"request {i}: token budget {r.budget} outside 1..{pos_limit}")
        len_cond = self.cond_emb(conds).shape[0]
        ids = [text_token_ids(self.model, r.text) for r in requests]
        prompt_len = [len_cond + len(x) + 2 for x in ids]
        need = max(p + int(r.budget) for p, r in zip(prompt_len, requests))
        max_new = max(int(r.budget) for r in requests)
        order = list(range(len(requests)))
        if sort:
            order.sort(key=lambda i: (-len(ids[i]), -int(requests[i].budget), i))
        rows = max_rows or self.pick_rows(need, pairs, max_vram_gb, len(requests))
        rows = max(1, min(rows, len(requests)))
        use_top_p = gen.top_p < 1.0
        cuda = self.device.type == "cuda"
        self.rows_used = rows
        st = self.new_state(rows, need, max_new, pairs, eos)
        self._ensure_template(st, conds, max(len(x) for x in ids))
        st.done.fill_(True)
        buckets = [b for b in row_buckets(rows) if b >= min(min_rows, rows)]
        refill_min = max(1, rows // 16) if refill_min is None else max(1, int(refill_min))
        kv_cap = st.max_len
        kv_step = LEN_BUCKET if self.device.type == "cuda" else 64

        queue = deque(order)
        prepared: dict[int, RowInput] = {}  # prompts embedded ahead of their refill
        lookahead = min(rows, 2 * refill_min)
        slot_req: list[int | None] = [None] * rows
        slot_pos = [0] * rows  # host bound of the highest position a row has written
        slot_left = [0] * rows  # host bound of steps a row has left
        self.trace = []
        self.draining = False

        def advance() -> list[tuple[int, list[int]]]:
            """Refill free rows, run up to ``check_every`` steps, harvest the finished rows."""
            free = [s for s in range(rows) if slot_req[s] is None]
            if queue and free and (len(free) >= min(refill_min, len(queue)) or len(free) == rows):
                take = free[: len(queue)]
                reqs = [queue.popleft() for _ in take]
                inputs = [prepared.pop(i, None) or self.row_input(conds, requests[i], gen, pairs, ids[i]) for i in reqs]
                t0 = time.perf_counter()
                self.prefill(st, take, inputs)
                self.stats["prefill_s"] += time.perf_counter() - t0
                self.stats["prefills"] += 1
                for s, i in zip(take, reqs):
                    slot_req[s] = i
                    slot_pos[s] = prompt_len[i]
                    slot_left[s] = int(requests[i].budget)
                    self.trace.append(("start", i, s))
            elif not queue:
                self.draining = True
                self._compact(st, slot_req, slot_pos, slot_left, buckets)
            live = [s for s in range(rows) if slot_req[s] is not None]
            n = _bucket(max(live) + 1, buckets)
            k = _steps_to_run(sorted(slot_left[s] for s in live), check_every, rows - len(live), min(refill_min, len(queue)) if queue else None)
            # steps past the look: none once every live row's budget runs out by it
            ahead = max(0, min(look_ahead, max(slot_left[s] for s in live) - k))
            kv_len = min(kv_cap, _round_up(max(slot_pos[s] for s in live) + k + ahead, kv_step))
            t0 = time.perf_counter()
            for _ in range(k):
                self.step(st, n, kv_len, use_top_p)
            self.stats["step_launch_s"] += time.perf_counter() - t0
            # while the GPU runs them, the prompts of the next refill (host work that otherwise
            # kept the GPU waiting: 0.3 ms a sentence, 4% of a full batch's time on an H100)
            for i in itertools.islice(queue, lookahead):
                if i not in prepared:
                    prepared[i] = self.row_input(conds, requests[i], gen, pairs, ids[i])
            self.stats["steps"] += k
            self.stats["row_steps"] += k * len(live)
            for s in live:
                slot_pos[s] += k
                slot_left[s] -= k
            # One host sync per k steps: which rows are done, how far they got, and their
            # tokens so far (all rows' up to the most steps launched for any: ~0.1 ms of copy
            # at 256 rows, where fetching the finished rows' after the look was a second sync)
            # (as lists: indexing the tensor element by element cost ~0.6 ms a check at 256 rows)
            t0 = time.perf_counter()
            width = min(st.out.shape[1], max(int(requests[slot_req[s]].budget) - slot_left[s] for s in live))
            flags = torch.stack([st.done[:n].to(torch.int64), st.step[:n]]).to("cpu", non_blocking=cuda)
            tokens = st.out[:n, :width].to("cpu", non_blocking=cuda, copy=True)  # a copy on the CPU too: steps may follow
            if ahead:
                t1 = time.perf_counter()
                for _ in range(ahead):
                    self.step(st, n, kv_len, use_top_p)
                self.stats["steps"] += ahead
                self.stats["row_steps"] += ahead * len(live)
                for s in live:
                    slot_pos[s] += ahead
                    slot_left[s] -= ahead
                self.stats["step_launch_s"] += time.perf_counter() - t1
                t0 += time.perf_counter() - t1
                self.trace.append(("ahead", ahead))
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()
            done_now, steps_now = flags.tolist()
            self.stats["look_wait_s"] += time.perf_counter() - t0
            self.stats["host_checks"] += 1
            finished = [s for s in live if done_now[s]]
            out = []
            for s in finished:
                i = slot_req[s]
                out.append((i, _tokens_without_eos(tokens[s, : steps_now[s]].tolist(), eos, gen.ignore_eos)))
                slot_req[s] = None
                self.trace.append(("finish", i, s))
            return out

        while queue or any(r is not None for r in slot_req):
            with torch.inference_mode():  # not held across yields: the caller runs in its own mode
                finished = advance()
            yield from finished

    def _compact(self, st: DecodeState, slot_req, slot_pos, slot_left, buckets) -> None:
        """With nothing left to start, move live rows down so a smaller batch bucket covers them."""
        live = [s for s in range(len(slot_req)) if slot_req[s] is not None]
        if not live or _bucket(len(live), buckets) >= _bucket(max(live) + 1, buckets):
            return
        free = [s for s in range(len(live)) if slot_req[s] is None]
        movers = [s for s in live if s >= len(live)]
        for src, dst in zip(movers, free):
            move_row(st, src, dst)
            slot_req[dst], slot_req[src] = slot_req[src], None
            slot_pos[dst], slot_left[dst] = slot_pos[src], slot_left[src]
            self.trace.append(("move", slot_req[dst], src, dst))
        self.stats["compactions"] += 1


def _steps_to_run(left: list[int], check_every: int, free: int, refill_min: int | None) -> int:
    """Decode steps before the host next looks at the rows: ``check_every``, fewer when every
    live row's budget (``left``, sorted, the host's bounds) runs out sooner, or when enough
    rows will have finished for the next refill (``refill_min`` free rows; None: nothing
    left to refill with). Not fewer because one row is about to finish: a look is a host
    sync, and in document order some row finishes at almost every step (a 2-hour book
    looked 861 times in 1,215 steps, T3 at half its speed); a finished row just idles, its
    state frozen by its ``done`` flag, until the look that harvests it."""
    k = min(check_every, left[-1])
    if refill_min is not None and free < refill_min <= free + len(left):
        k = min(k, left[refill_min - free - 1])
    return max(1, k)


def _check_decode_kernel(w: T3Weights) -> str | None:
    """Compile and run the Triton decode kernels once on a tiny problem, against SDPA and
    eager: None if they work, else why not (no Triton compiler, say: the engine then uses
    SDPA and the compiled layers)."""
    try:
        from .decode_attention import attend_and_cache

        g = torch.Generator(device=w.device).manual_seed(0)
        H, D, L = w.n_heads, w.head_dim, 128
        q, k, v = (torch.randn(2, H, 1, D, device=w.device, dtype=w.dtype, generator=g) for _ in range(3))
        kc, vc = (torch.randn(2, H, L, D, device=w.device, dtype=w.dtype, generator=g) for _ in range(2))
        pos = torch.tensor([5, L - 1], device=w.device)
        kr, vr = kc.clone(), vc.clone()
        kr[[0, 1], :, pos] = k[:, :, 0]
        vr[[0, 1], :, pos] = v[:, :, 0]
        valid = (torch.arange(L, device=w.device)[None, :] <= pos[:, None])[:, None, None, :]
        ref = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), attn_mask=valid, scale=w.scale)
        out = attend_and_cache(q, k, v, kc, vc, pos, L, w.scale)
        err = (out.float() - ref).abs().max().item()
        if not (err < 0.05 and torch.equal(kc, kr) and torch.equal(vc, vr)):
            return f"wrong result (max |diff| {err:.3g})"
        # and with a voice template: sequence 0's first 3 positions from it, not its cache
        kc[0, :, :3] = vc[0, :, :3] = 100.0
        shared = torch.tensor([3, 0], dtype=torch.int32, device=w.device)
        out = attend_and_cache(q, k, v, kc, vc, pos, L, w.scale, template=(kr[0], vr[0], shared))
        err = (out.float() - ref).abs().max().item()
        if not err < 0.05:
            return f"wrong result with a template (max |diff| {err:.3g})"
        # and the fused layer of the batch-1 path (decode_gemv, RoPE in the attention), on layer 0
        x = torch.randn(2, 1, w.dim, device=w.device, generator=g)
        st = DecodeState(w, 1, 128, 1, 2, 0)
        pos = torch.tensor([5, 6], device=w.device)
        ref = _layers_probe(w, st, x, pos, fused=False)
        err = (_layers_probe(w, st, x, pos, fused=True) - ref).abs().max().item()
        if not err <= 0.05 * max((ref - x).abs().max().item(), 1e-3):
            return f"wrong fused layer result (max |diff| {err:.3g})"
        # and the batch-1 path's embedding and head kernels
        from .decode_gemv import embed_tokens, norm_linear_bias

        tok, step = torch.tensor([3], device=w.device), torch.tensor([w.speech_pos.shape[0] + 5], device=w.device)
        emb = embed_tokens(tok, step, w.speech_emb, w.speech_pos, 2)
        if not torch.equal(emb, (w.speech_emb[3] + w.speech_pos[-1]).expand(2, -1)):
            return "wrong embedding kernel result"
        ref = _head(w, x[:, 0])
        err = (norm_linear_bias(x[:, 0], w.norm, w.speech_head, w.speech_head_bias, w.eps) - ref).abs().max().item()
        if not err <= 1e-3 * max(ref.abs().max().item(), 1.0):
            return f"wrong head kernel result (max |diff| {err:.3g})"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means: use SDPA
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _layers_probe(w: T3Weights, st: DecodeState, x: torch.Tensor, pos: torch.Tensor, fused: bool) -> torch.Tensor:
    """Layer 0 on x (2, 1, D) at positions ``pos``: the fused kernels or the (eager) layer
    halves with the Triton attention, each on a zeroed cache."""
    st.k.zero_()
    st.v.zero_()
    one = copy.copy(w)
    one.layers, one.regions, one.decode_kernel = w.layers[:1], layer_regions(), True
    if fused:
        return _fused_layers(one, st, x[:, 0], pos, 128)[:, None]
    return _layers(one, st, x, pos, 128)


def move_row(st: DecodeState, src: int, dst: int) -> None:
    """Copy row ``src`` (its sequences' KV and its state) to row ``dst``, and free ``src``."""
    P = st.pairs
    s_seq = slice(src * P, (src + 1) * P)
    d_seq = slice(dst * P, (dst + 1) * P)
    st.k[:, d_seq] = st.k[:, s_seq]
    st.v[:, d_seq] = st.v[:, s_seq]
    st.logits[d_seq] = st.logits[s_seq]
    st.pos[d_seq] = st.pos[s_seq]
    st.shared[d_seq] = st.shared[s_seq]
    for name in ("step", "budget", "done", "ignore_eos", "seed_lo", "seed_hi", "seen", "out", "tokens"):
        t = getattr(st, name)
        t[dst] = t[src]
    for name in SamplingParams.NAMES:
        t = getattr(st.params, name)
        t[dst] = t[src]
    st.done[src] = True


_FAST: dict[int, FastT3] = {}


def fast_t3(model, **kwargs) -> FastT3:
    """The FastT3 of ``model`` (built once per loaded model and kept)."""
    key = id(model)
    hit = _FAST.get(key)
    if hit is None or hit.model is not model or kwargs:
        hit = FastT3(model, **kwargs)
        _FAST[key] = hit
    return hit


def generate_tokens(
    model,
    conds,
    requests: Sequence,
    gen,
    max_rows: int | None = None,
    check_every: int = 8,
    max_vram_gb: float | None = None,
    sort: bool = True,
) -> Iterator[tuple[int, list[int]]]:
    """``(request index, speech tokens without EOS)`` for each request, as each finishes."""
    return fast_t3(model).generate(
        conds, requests, gen, max_rows=max_rows, check_every=check_every, max_vram_gb=max_vram_gb, sort=sort
    )
