"""T3's decode attention as one Triton kernel: write this step's K/V, attend over live keys only.

One query per sequence (the token being decoded) attends over its KV cache, positions
``0..pos``. The padded path (``scaled_dot_product_attention`` over the cache up to the
longest row's bucket, with a mask) reads every row's padding; at 256 rows it was 73% of a
decode step's kernel time on an H100 (``scripts/gpu_t3_profile.py``). This kernel reads
each sequence's live keys only and does the cache write for the new position (two
``index_put`` kernels per layer before) in the same launch.

Split-KV ("flash decoding"): each program takes one (sequence, head) and a ``chunk`` of key
positions; with few sequences (batch 1) the keys are split over many programs so the GPU
has work, and the splits are merged by their log-sum-exp: by the last program of each
(sequence, head) to finish (``MERGE_LAST``: a counter per (sequence, head), taken with an
atomic add and reset by that program) or by a second small kernel. With many sequences
there is one split and the first kernel writes the output itself.

Numerics: q.k, the softmax and the weighted sum of V accumulate in fp32 (as FlashAttention
does); the output is cast to the cache's dtype. On the CPU the engine keeps SDPA; tests run
this kernel there under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import pdl

BLOCK_N = 64  # key positions per loop iteration (a 64 x 64 tile of bf16: 8 KB)
TARGET_PROGRAMS = 2048  # split the keys until about this many programs run (an H100 has 132 SMs)
MAX_SPLITS = 16
# merge the splits in the attention kernel (its last program per (sequence, head)) rather than
# in a kernel of its own: at batch 1 that is 30 launches fewer per decode step
MERGE_LAST = True


@triton.jit
def _attend_split(
    Q, KN, VN, KC, VC, Pos, O, OP, MP, LP, CNT, COS, SIN,
    sq_s, sq_h, sk_s, sk_h, sv_s, sv_h, sc_s, sc_h, sc_l, so_s, so_h,
    scale, H,
    CHUNK: tl.constexpr, NSPLIT: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr,
    MERGE: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:  # launched early (see ``pdl``); everything read here may come from the previous kernel
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)  # sequence * H + head
    split = tl.program_id(1)
    s = pid // H
    h = pid % H
    d = tl.arange(0, D)
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
    kc = KC + s * sc_s + h * sc_h
    vc = VC + s * sc_s + h * sc_h
    start = split * CHUNK
    if (pos >= start) & (pos < start + CHUNK):  # this split owns the new position: cache it
        tl.store(kc + pos * sc_l + d, kn)
        tl.store(vc + pos * sc_l + d, vn)
    end = tl.minimum(start + CHUNK, pos + 1)
    m = tl.full((), float("-inf"), tl.float32)
    l = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for i in range(0, CHUNK // BLOCK):  # the chunk is static; a row's live length is not
        n0 = start + i * BLOCK
        if n0 < end:  # past a row's live keys nothing is read or computed
            offs = n0 + tl.arange(0, BLOCK)
            live = offs < end
            at_pos = (offs == pos)[:, None]
            ptr = offs[:, None] * sc_l + d[None, :]
            # the new position is taken from the inputs, not read back from the cache
            k = tl.load(kc + ptr, mask=live[:, None] & ~at_pos, other=0.0)
            k = tl.where(at_pos, kn[None, :], k).to(tl.float32)
            v = tl.load(vc + ptr, mask=live[:, None] & ~at_pos, other=0.0)
            v = tl.where(at_pos, vn[None, :], v).to(tl.float32)
            qk = tl.where(live, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(qk - m_new)
            l = l * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m = m_new
    if NSPLIT == 1:
        tl.store(O + s * so_s + h * so_h + d, (acc / l).to(O.dtype.element_ty))
    else:
        tl.store(OP + (pid * NSPLIT + split) * D + d, acc)
        tl.store(MP + pid * NSPLIT + split, m)
        tl.store(LP + pid * NSPLIT + split, l)
        if MERGE:
            # every thread's partials are written (barrier) and released at GPU scope (the
            # atomic) before the count; the program that counts last acquires them all
            tl.debug_barrier()
            arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == NSPLIT - 1:
                _merge(O, OP, MP, LP, s * so_s + h * so_h, pid, NSPLIT, D, True)
                tl.store(CNT + pid, 0)  # ready for the next launch (ordered after this one)


@triton.jit
def _merge(O, OP, MP, LP, o_off, pid, NSPLIT: tl.constexpr, D: tl.constexpr, FRESH: tl.constexpr):
    sp = tl.arange(0, NSPLIT)
    d = tl.arange(0, D)
    if FRESH:  # written by other programs of this launch: read through L2, not a stale L1 line
        m = tl.load(MP + pid * NSPLIT + sp, cache_modifier=".cg")
        l = tl.load(LP + pid * NSPLIT + sp, cache_modifier=".cg")
        o = tl.load(OP + (pid * NSPLIT + sp)[:, None] * D + d[None, :], cache_modifier=".cg")
    else:
        m = tl.load(MP + pid * NSPLIT + sp)
        l = tl.load(LP + pid * NSPLIT + sp)
        o = tl.load(OP + (pid * NSPLIT + sp)[:, None] * D + d[None, :])
    w = tl.exp(m - tl.max(m, 0))  # an empty split (m = -inf) weighs 0; split 0 is never empty
    out = tl.sum(o * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(O + o_off + d, out.to(O.dtype.element_ty))


@triton.jit
def _merge_splits(O, OP, MP, LP, so_s, so_h, H, NSPLIT: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    _merge(O, OP, MP, LP, (pid // H) * so_s + (pid % H) * so_h, pid, NSPLIT, D, False)


def splits_for(seqs: int, heads: int, kv_len: int) -> int:
    """How many programs share one (sequence, head)'s keys: enough for ~TARGET_PROGRAMS in all,
    a power of two, each with at least one block of keys."""
    want = -(-TARGET_PROGRAMS // (seqs * heads))
    n = 1
    while n < want and n < MAX_SPLITS and (2 * n) * BLOCK_N <= kv_len:
        n *= 2
    return n


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """The persistent split counters of ``device`` (zero between launches): allocated once,
    outside any CUDA graph capture, so a captured launch keeps its address."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("attend_and_cache: run it once before capturing a CUDA graph (split counters)")
        c = torch.zeros(max(n, TARGET_PROGRAMS), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def attend_and_cache(q, k_new, v_new, k_cache, v_cache, pos, kv_len: int, scale: float, rope=None) -> torch.Tensor:
    """Write ``k_new``/``v_new`` into the caches at ``pos`` and attend: out (S, H, 1, D).

    q, k_new, v_new: (S, H, 1, D); k_cache, v_cache: (>= S, H, L, D), the last dim
    contiguous; pos: (S,) int, each sequence's position this step (keys ``0..pos`` are
    read, ``pos`` from ``k_new``/``v_new``); kv_len: a bound on ``pos + 1`` for every
    sequence (static per captured graph: it sizes the split). ``rope``: None, or the (cos,
    sin) tables (>= L, D) fp32 contiguous, to apply the rotary embedding at ``pos`` to
    ``q`` and ``k_new`` first (they come unrotated; the cache gets the rotated k).
    """
    S, H, _, D = q.shape
    if any(t.stride(-1) != 1 for t in (q, k_new, v_new, k_cache)) or k_cache.stride() != v_cache.stride():
        raise ValueError("attend_and_cache: the head dimension must be contiguous and both caches laid out alike")
    out = torch.empty((S, H, 1, D), dtype=k_cache.dtype, device=q.device)
    nsplit = splits_for(S, H, kv_len)
    chunk = -(-kv_len // nsplit)
    chunk = -(-chunk // BLOCK_N) * BLOCK_N
    if nsplit > 1:
        op = torch.empty((S * H * nsplit, D), dtype=torch.float32, device=q.device)
        mp = torch.empty((S * H * nsplit,), dtype=torch.float32, device=q.device)
        lp = torch.empty_like(mp)
    else:
        op = mp = lp = out  # unused
    merge_last = nsplit > 1 and MERGE_LAST
    cnt = _counters(q.device, S * H) if merge_last else pos  # unused without
    if rope is not None:
        cos, sin = rope
        if cos.shape[-1] != D or not (cos.is_contiguous() and sin.is_contiguous()):
            raise ValueError("attend_and_cache: the rope tables must be contiguous (L, head_dim)")
    else:
        cos = sin = q  # unused
    on = pdl.enabled(q.device)
    launch = {"launch_pdl": True} if on else {}
    _attend_split[(S * H, nsplit)](
        q, k_new, v_new, k_cache, v_cache, pos, out, op, mp, lp, cnt, cos, sin,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        scale, H, CHUNK=chunk, NSPLIT=nsplit, BLOCK=BLOCK_N, D=D, ROPE=rope is not None,
        MERGE=merge_last, PDL=on, num_warps=4, **launch,
    )
    if nsplit > 1 and not merge_last:
        _merge_splits[(S * H,)](out, op, mp, lp, out.stride(0), out.stride(1), H, NSPLIT=nsplit, D=D, PDL=on, num_warps=1, **launch)
    return out
