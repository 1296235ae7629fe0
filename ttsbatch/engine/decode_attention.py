"""T3's decode attention as one Triton kernel: write this step's K/V, attend over live keys only.

One query per sequence (the token being decoded) attends over its KV cache, positions
``0..pos``. The padded path (``scaled_dot_product_attention`` over the cache up to the
longest row's bucket, with a mask) reads every row's padding; at 256 rows it was 73% of a
decode step's kernel time on an H100 (``scripts/gpu_t3_profile.py``). This kernel reads
each sequence's live keys only and does the cache write for the new position (two
``index_put`` kernels per layer before) in the same launch.

Split-KV ("flash decoding"): each program takes one (sequence, head) and a ``chunk`` of key
positions; with few sequences (batch 1) the keys are split over many programs so the GPU
has work, and a second small kernel merges the splits by their log-sum-exp. With many
sequences there is one split and the first kernel writes the output itself. (Merging in the
attention kernel instead, by the last program of each (sequence, head) to finish, counted
with an atomic add, saved 30 launches per batch-1 step but was slower once the launches
overlapped: 1.036 ms per step against 0.977 on an H200, scripts/gpu_t3_profile.py.)

With programmatic dependent launch (``pdl``) a program requests its first block of cached
keys and values before waiting for the q/k/v projection: they were written by earlier steps.

Shared prefixes (``template``): sequences may read their first ``shared[s]`` positions from
one table of keys and values instead of their own cache. T3's prompts share a lot: every
sentence of a voice starts with the same conditioning, and with CFG the unconditional
sequence's text embedding is zeroed, so its whole prompt before the speech BOS is a prefix
of one sequence per voice (``t3_fast``'s voice template). Those positions are read by every
sequence from one small table that stays in L2, not once per sequence from HBM.

Numerics: q.k, the softmax and the weighted sum of V accumulate in fp32 (as FlashAttention
does); the output is cast to the cache's dtype. On the CPU the engine keeps SDPA; tests run
this kernel there under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import pdl

# Key positions per loop iteration and warps per program: small programs, many resident on
# an SM, keep the most loads in flight. scripts/gpu_decode_attn_sweep.py on an H100, 512
# sequences of the book's live lengths, voice template on: 1 warp x 32 positions 166 us a
# layer, 2 x 32 198, 2 x 64 187, 4 x 64 (before) 238; a software-pipelined loop (tl.range,
# 2-3 stages) did no better than the best; at batch 1, 4.8 us against 5.4.
BLOCK_N = 32
TARGET_PROGRAMS = 2048  # split the keys until about this many programs run (an H100 has 132 SMs)
MAX_SPLITS = 16
PREFETCH = None  # request each split's first key block before the q/k/v: None = with PDL (tests force it)
NUM_WARPS = 1


@triton.jit
def _load_kv(kc, vc, tk, tv, offs, d, mask, shared, sc_l, st_l, SHARED: tl.constexpr):
    """Keys and values at positions ``offs``: from the sequence's cache, or below ``shared``
    from the template (each position from one of them: the other load is masked off)."""
    if SHARED:
        in_t = (offs < shared)[:, None]
        own = mask & ~in_t
        tmp = mask & in_t
        k = tl.load(kc + offs[:, None] * sc_l + d[None, :], mask=own, other=0.0)
        v = tl.load(vc + offs[:, None] * sc_l + d[None, :], mask=own, other=0.0)
        k += tl.load(tk + offs[:, None] * st_l + d[None, :], mask=tmp, other=0.0)
        v += tl.load(tv + offs[:, None] * st_l + d[None, :], mask=tmp, other=0.0)
    else:
        k = tl.load(kc + offs[:, None] * sc_l + d[None, :], mask=mask, other=0.0)
        v = tl.load(vc + offs[:, None] * sc_l + d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _update(k, v, kn, vn, q, offs, end, pos, m, l, acc):
    """The online softmax over one block of keys at ``offs``: the new position's k/v are taken
    from the inputs, not read back from the cache; past ``end`` nothing counts (zeros,
    whatever a prefetch read there)."""
    live = (offs < end)[:, None]
    at_pos = (offs == pos)[:, None]
    k = tl.where(at_pos, kn[None, :], tl.where(live, k, 0.0)).to(tl.float32)
    v = tl.where(at_pos, vn[None, :], tl.where(live, v, 0.0)).to(tl.float32)
    qk = tl.where(offs < end, tl.sum(k * q[None, :], 1), float("-inf"))
    m_new = tl.maximum(m, tl.max(qk, 0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(qk - m_new)
    l = l * alpha + tl.sum(p, 0)
    acc = acc * alpha + tl.sum(p[:, None] * v, 0)
    return m_new, l, acc


# The sizes that change with the batch (the key bound, the split count and its chunk) are
# plain arguments, not constexprs, and not specialized on their values: one compiled kernel
# serves every (rows, kv_len) a book meets. As constexprs each new (chunk, split count) was
# a Triton compile of ~1 s on T3's thread, in a graph capture's warm-up runs mid-book: the
# warm-up's at most 16 rows split their keys, a book's 256 rows do not (the likely reason a
# machine's first book process ran 4.5-9 s slower than its next ones, which found those
# kernels in Triton's disk cache: BENCHMARKS.md, eighteenth session).
@triton.jit(do_not_specialize=["kv_len", "chunk", "nsplit"])
def _attend_split(
    Q, KN, VN, KC, VC, Pos, O, OP, MP, LP, COS, SIN, TK, TV, Shared,
    sq_s, sq_h, sk_s, sk_h, sv_s, sv_h, sc_s, sc_h, sc_l, so_s, so_h, st_h, st_l,
    scale, H, kv_len, chunk, nsplit,
    BLOCK: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr,
    PREFETCH: tl.constexpr, PDL: tl.constexpr, SHARED: tl.constexpr,
):
    pid = tl.program_id(0)  # sequence * H + head
    split = tl.program_id(1)
    s = pid // H
    h = pid % H
    d = tl.arange(0, D)
    kc = KC + s * sc_s + h * sc_h
    vc = VC + s * sc_s + h * sc_h
    tk = TK + h * st_h
    tv = TV + h * st_h
    # positions below ``shared`` come from the template (set before the step: no kernel of
    # it writes the count or the template, so both may be read before the PDL wait)
    if SHARED:
        shared = tl.load(Shared + s).to(tl.int32)
    else:
        shared = 0
    start = split * chunk
    first = start + tl.arange(0, BLOCK)
    in_first = (first < kv_len)[:, None]
    if PDL:  # launched early (see ``pdl``)
        gdc_launch_dependents()
    if PREFETCH:
        # the split's first block of cached keys, requested before waiting: positions written
        # by earlier decode steps (the new one, ``pos``, is replaced below; past it is masked)
        k_first, v_first = _load_kv(kc, vc, tk, tv, first, d, in_first, shared, sc_l, st_l, SHARED)
    if PDL:
        gdc_wait()  # everything below may come from the previous kernel
    pos = tl.load(Pos + s).to(tl.int32)
    q = tl.load(Q + s * sq_s + h * sq_h + d)
    kn = tl.load(KN + s * sk_s + h * sk_h + d)
    if ROPE:  # rotary embedding of q and the new k at pos, in fp32, rounded as the layer rounds it
        rot = (d + D // 2) % D  # rotate_half: (-x2, x1)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        c = tl.load(COS + pos * D + d)
        sn = tl.load(SIN + pos * D + d)
        qr = tl.load(Q + s * sq_s + h * sq_h + rot).to(tl.float32)
        kr = tl.load(KN + s * sk_s + h * sk_h + rot).to(tl.float32)
        q = (q.to(tl.float32) * c + sign * qr * sn).to(Q.dtype.element_ty)
        kn = (kn.to(tl.float32) * c + sign * kr * sn).to(KN.dtype.element_ty)
    q = q.to(tl.float32) * scale
    vn = tl.load(VN + s * sv_s + h * sv_h + d)
    if (pos >= start) & (pos < start + chunk):  # this split owns the new position: cache it
        tl.store(kc + pos * sc_l + d, kn)
        tl.store(vc + pos * sc_l + d, vn)
    end = tl.minimum(start + chunk, pos + 1)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for i in range(0, chunk // BLOCK):  # the chunk is the same for every row; its live length is not
        n0 = start + i * BLOCK
        if n0 < end:  # past a row's live keys nothing is read or computed
            offs = n0 + tl.arange(0, BLOCK)
            if PREFETCH and i == 0:
                k = k_first
                v = v_first
            else:
                k, v = _load_kv(kc, vc, tk, tv, offs, d, ((offs < end) & (offs != pos))[:, None], shared, sc_l, st_l, SHARED)
            m, l, acc = _update(k, v, kn, vn, q, offs, end, pos, m, l, acc)
    if nsplit == 1:
        tl.store(O + s * so_s + h * so_h + d, (acc / l).to(O.dtype.element_ty))
    else:
        tl.store(OP + (pid * nsplit + split) * D + d, acc)
        tl.store(MP + pid * nsplit + split, m)
        tl.store(LP + pid * nsplit + split, l)


@triton.jit(do_not_specialize=["nsplit"])
def _merge_splits(O, OP, MP, LP, so_s, so_h, H, nsplit, MAXS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    # nsplit (<= MAXS) an argument: one compiled kernel for every split count (see _attend_split)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    s = pid // H
    h = pid % H
    sp = tl.arange(0, MAXS)
    live = sp < nsplit
    d = tl.arange(0, D)
    m = tl.load(MP + pid * nsplit + sp, mask=live, other=float("-inf"))
    l = tl.load(LP + pid * nsplit + sp, mask=live, other=0.0)
    w = tl.exp(m - tl.max(m, 0))  # an empty or absent split (m = -inf) weighs 0; split 0 is never empty
    o = tl.load(OP + (pid * nsplit + sp)[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + s * so_s + h * so_h + d, out.to(O.dtype.element_ty))


def splits_for(seqs: int, heads: int, kv_len: int) -> int:
    """How many programs share one (sequence, head)'s keys: enough for ~TARGET_PROGRAMS in all,
    a power of two, each with at least one block of keys."""
    want = -(-TARGET_PROGRAMS // (seqs * heads))
    n = 1
    while n < want and n < MAX_SPLITS and (2 * n) * BLOCK_N <= kv_len:
        n *= 2
    return n


@functools.lru_cache(maxsize=None)
def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A pointer argument the kernel will not read, of the dtype it has when it does: one
    element (Triton's interpreter copies every tensor argument), made once per dtype and
    device, not at every layer of every step (never read or written, so any stream may pass it)."""
    return torch.empty(1, dtype=dtype, device=device)


def attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, kv_len: int, scale: float, rope=None, template=None) -> torch.Tensor:
    """Write ``k_new``/``v_new`` into the caches at ``pos`` and attend: out (S, H, 1, D).

    q, k_new, v_new: (S, H, 1, D); k_cache, v_cache: (>= S, H, L, D), the last dim
    contiguous; pos: (S,) int, each sequence's position this step (keys ``0..pos`` are
    read, ``pos`` from ``k_new``/``v_new``); kv_len: a bound on ``pos + 1`` for every
    sequence (static per captured graph: it sizes the split). ``rope``: None, or the (cos,
    sin) tables (>= L, D) fp32 contiguous, to apply the rotary embedding at ``pos`` to
    ``q`` and ``k_new`` first (they come unrotated; the cache gets the rotated k).
    ``template``: None, or ``(k_tmpl, v_tmpl, shared)``: keys/values (H, Lt, D) shared by
    many sequences and ``shared`` (S,) int, how many leading positions each sequence reads
    from them instead of its own cache (0: none; never past ``pos``).
    """
    S, H, _, D = q.shape
    if any(t.stride(-1) != 1 for t in (q, k_new, v_new, k_cache)) or k_cache.stride() != v_cache.stride():
        raise ValueError("attend_and_cache: the head dimension must be contiguous and both caches laid out alike")
    out = torch.empty((S, H, 1, D), dtype=k_cache.dtype, device=q.device)
    nsplit = splits_for(S, H, kv_len)
    chunk = -(-kv_len // nsplit)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    # Arguments a call does not use get placeholders of the dtypes they have when used:
    # Triton compiles one kernel per signature, pointer dtypes included, so `out` (bf16) in
    # place of the split buffers (fp32) made one split (a book's first step at ~200 rows) a
    # kernel of its own that the warm-up (few rows, many splits) never compiled: 1.5-2.0 s
    # in a machine's first book (BENCHMARKS.md, twenty-seventh session).
    if nsplit > 1:
        op = torch.empty((S * H * nsplit, D), dtype=torch.float32, device=q.device)
        mp = torch.empty((S * H * nsplit,), dtype=torch.float32, device=q.device)
        lp = torch.empty_like(mp)
    else:
        op = mp = lp = _placeholder(torch.float32, q.device)  # unused
    if rope is not None:
        cos, sin = rope
        if cos.shape[-1] != D or not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("attend_and_cache: the rope tables must be contiguous (L, head_dim)")
    else:
        cos = sin = _placeholder(torch.float32, q.device)  # unused
    if template is not None:
        tk, tv, shared = template
        if tk.shape[0] != H or tk.shape[-1] != D or tk.stride(-1) != 1 or tk.stride() != tv.stride():
            raise ValueError("attend_and_cache: the template must be (heads, L, head_dim), laid out alike, head dim contiguous")
        st_h, st_l = tk.stride(0), tk.stride(1)
    else:
        tk = tv = _placeholder(k_cache.dtype, q.device)  # unused
        shared = _placeholder(torch.int32, q.device)
        st_h = st_l = 0
    launch = pdl.launch_options(q.device)
    _attend_split[(S * H, nsplit)](
        q, k_new, v_new, k_cache, v_cache, pos, out, op, mp, lp, cos, sin, tk, tv, shared,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), st_h, st_l,
        scale, H, kv_len, chunk, nsplit, BLOCK=BLOCK_N, D=D, ROPE=rope is not None,
        PREFETCH=launch["PDL"] if PREFETCH is None else PREFETCH, SHARED=template is not None,
        num_warps=NUM_WARPS, **launch,
    )
    if nsplit > 1:
        _merge_splits[(S * H,)](out, op, mp, lp, out.stride(0), out.stride(1), H, nsplit, MAXS=MAX_SPLITS, D=D, num_warps=1, **launch)
    return out
