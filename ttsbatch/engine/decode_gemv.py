"""T3's decode layers for a few sequences (batch 1 with CFG: two) as Triton GEMVs with the
elementwise work fused in.

With two sequences a decode step is a chain of matrix-vector products over 1 GB of bf16
weights, and every small elementwise kernel between them (norms, casts, SiLU, residual
adds) costs a launch and a trip through memory. Profiled on an H100 (scripts/gpu_t3_profile.py,
rows 1) the compiled layers ran ~13 kernels per layer, ~400 per step, and cuBLAS moved the
weights at ~1.45 TB/s. Here a layer is four GEMVs, each reading its weight once:

- ``norm_linear``: RMSNorm of the fp32 residual stream folded into the q/k/v projection:
  the product runs over ``ln * x`` while the same pass sums the squares of x, and each
  row's sum is scaled by its 1/rms at the end;
- ``norm_swiglu``: the same for the gate/up projection, each program taking matching rows
  of both halves so that SiLU(gate) * up is its epilogue;
- ``linear_residual``: the o- and the down projection, plus the residual add;

and RoPE moves into the attention kernel (``decode_attention.attend_and_cache(rope=...)``).

Numerics follow the eager layer (``t3_fast.layer_in``/``layer_out``) cast for cast, with one
exception: products accumulate in fp32 and are rounded to the weights' dtype (before the fp32
residual add); SiLU and the gate product are rounded as eager bf16 rounds them; but the
norm's output is not rounded to bf16 before its GEMV (eager rounds it because cuBLAS takes
bf16): that is closer to the fp32 model, not further. In fp32 every cast is a no-op and the
result is the eager layer's up to summation order.
On the CPU tests run these kernels under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from . import pdl

PLAIN, NORM = 0, 1  # prologues
MAX_SEQS = 2  # most sequences per call (rows x pairs): batch 1 with CFG; at four the GEMVs fell behind cuBLAS


@triton.jit
def _gemv(
    X, LN, W, R, Y,
    S, N, sx, sw, sr, sy, eps,
    K: tl.constexpr, PRO: tl.constexpr, RES: tl.constexpr, GLU: tl.constexpr,
    SB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
):
    """Y[s, n] = (sum_k f(X)[s, k] * W[n, k]) rounded to W's dtype (+ R[s, n] in fp32).

    GLU: W holds 2N rows (gate, then up); Y[s, n] = silu(gate[s, n]) * up[s, n], each
    product rounded to W's dtype first, as eager rounds F.linear's output, F.silu and the
    product.

    PDL (see ``pdl``): the first weight tile is requested before waiting for the previous
    kernel, whose output X (and R) is read only after the wait."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    nmask = n < N
    rows = tl.arange(0, SB)
    rmask = rows < S
    wdt = W.dtype.element_ty
    acc = tl.zeros((SB, BN, BK), tl.float32)  # reduced over k once, after the loop
    acc_up = tl.zeros((SB, BN, BK), tl.float32)  # GLU only
    ss = tl.zeros((SB, BK), tl.float32)  # NORM: the rows' sums of squares, in the same pass
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        wm = nmask[:, None] & kmask[None, :]
        w = tl.load(W + n[:, None] * sw + kk[None, :], mask=wm, other=0.0)
        if GLU:
            wu = tl.load(W + (n + N)[:, None] * sw + kk[None, :], mask=wm, other=0.0)
        if PDL:
            if k0 == 0:
                gdc_wait()
        xm = rmask[:, None] & kmask[None, :]
        xv = tl.load(X + rows[:, None] * sx + kk[None, :], mask=xm, other=0.0).to(tl.float32)
        if PRO == 1:  # ln * x now; the row's 1/rms (a scalar per row) scales the sum at the end
            ss += xv * xv
            xv = tl.load(LN + kk, mask=kmask, other=0.0)[None, :] * xv
        acc += xv[:, None, :] * w.to(tl.float32)[None, :, :]
        if GLU:
            acc_up += xv[:, None, :] * wu.to(tl.float32)[None, :, :]
    y = tl.sum(acc, 2)
    if PRO == 1:
        inv = 1.0 / tl.sqrt(tl.sum(ss, 1) / K + eps)
        y = y * inv[:, None]
    y = y.to(wdt)
    if GLU:
        up = tl.sum(acc_up, 2)
        if PRO == 1:
            up = up * inv[:, None]
        gate = y.to(tl.float32)
        a = (gate / (1.0 + tl.exp(-gate))).to(wdt).to(tl.float32)
        y = (a * up.to(wdt).to(tl.float32)).to(wdt)
    om = rmask[:, None] & nmask[None, :]
    if RES:
        r = tl.load(R + rows[:, None] * sr + n[None, :], mask=om, other=0.0)
        tl.store(Y + rows[:, None] * sy + n[None, :], y.to(tl.float32) + r, mask=om)
    else:
        tl.store(Y + rows[:, None] * sy + n[None, :], y, mask=om)


def _seq_block(s: int) -> int:
    b = 1
    while b < s:
        b *= 2
    return max(b, 2)


def block_sizes(s: int, n: int, k: int, device: torch.device, glu: bool = False) -> tuple[int, int, int, int]:
    """(SB, BN, BK, num_warps) for S sequences through an (n, k) weight (n outputs; with
    ``glu``, 2n weight rows).

    On a GPU, from a sweep on an H200 (scripts/gpu_gemv.py --configs, two sequences, 30
    layers' weights, programmatic dependent launch on): a whole row of K=1024 in one tile
    (down, K=4096: half a row), and few output features per program, so that each SM runs
    several programs (each streams BN rows of the weight). Per call there: q/k/v 4.0 us
    (cuBLAS 5.1), o 2.3 (7.6), gate/up 7.9 (6.7, without the norm and SwiGLU), down 4.4 (6.9).
    Under the interpreter (CPU): big blocks, as few Python-level programs as possible.
    """
    sb = _seq_block(s)
    if device.type != "cuda":
        return sb, 64, min(k, 256), 4
    if glu:  # two tiles of BN rows (gate and up) per program
        return sb, 8, min(k, 1024), 4
    if k > 1024:
        return sb, 4, 2048, 4
    if n <= 1024:
        return sb, 8, min(k, 1024), 4
    return sb, 4, min(k, 1024), 4


def _launch(x, w, pro: int, k: int, ln=None, eps: float = 0.0, res=None, glu: bool = False, blocks=None, out=None) -> torch.Tensor:
    """One GEMV; ``blocks`` = (BN, BK, num_warps) overrides :func:`block_sizes` (for sweeps);
    ``out``: where to write (else a new tensor)."""
    s, n = x.shape[0], w.shape[0] // (2 if glu else 1)
    if s > MAX_SEQS:
        raise ValueError(f"decode GEMV: at most {MAX_SEQS} sequences, got {s}")
    if w.shape[1] != k:
        raise ValueError(f"decode GEMV: the input has {k} features, the weight takes {w.shape[1]}")
    if x.stride(-1) != 1 or w.stride(-1) != 1 or (res is not None and res.stride(-1) != 1):
        raise ValueError("decode GEMV: the last dimension of every operand must be contiguous")
    dt = torch.float32 if res is not None else w.dtype
    if out is not None and (out.shape != (s, n) or out.dtype != dt or out.stride(-1) != 1):
        raise ValueError(f"decode GEMV: out must be ({s}, {n}) {dt} with contiguous rows")
    y = out if out is not None else torch.empty((s, n), dtype=dt, device=x.device)
    r = res if res is not None else y  # unused pointers still need a tensor
    sb, bn, bk, warps = block_sizes(s, n, k, x.device, glu)
    if blocks is not None:
        bn, bk, warps = blocks
    _gemv[(triton.cdiv(n, bn),)](
        x, ln if ln is not None else w, w, r, y, s, n, x.stride(0), w.stride(0), r.stride(0), y.stride(0), eps,
        K=k, PRO=pro, RES=res is not None, GLU=glu, SB=sb, BN=bn, BK=bk, num_warps=warps, **pdl.launch_options(x.device),
    )
    return y


def norm_linear(x: torch.Tensor, ln: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.linear(rms_norm(x, ln, eps).to(w.dtype), w)``: x (S, K) fp32 -> (S, N) in w's dtype."""
    return _launch(x, w, NORM, x.shape[1], ln=ln, eps=eps)


def norm_swiglu(x: torch.Tensor, ln: torch.Tensor, wgu: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.silu(gate) * up`` with ``gate, up = F.linear(rms_norm(x, ln, eps).to(dt), wgu).chunk(2, -1)``:
    x (S, K) fp32, wgu (2M, K) -> (S, M) in wgu's dtype. Each program takes the same rows of
    the gate and the up halves, so the product happens in its epilogue."""
    return _launch(x, wgu, NORM, x.shape[1], ln=ln, eps=eps, glu=True)


def norm_linear_bias(x: torch.Tensor, ln: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, eps: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(rms_norm(x, ln, eps), w, bias).float()`` for an fp32 ``w`` (T3's final norm and
    speech head): x (S, K) fp32 -> (S, N) fp32, into ``out`` if given. A bias goes in as a
    residual with row stride 0."""
    if w.dtype != torch.float32:
        raise ValueError("norm_linear_bias: for fp32 weights (the output is not rounded)")
    res = bias.expand(x.shape[0], -1) if bias is not None else None
    return _launch(x, w, NORM, x.shape[1], ln=ln, eps=eps, res=res, out=out)


@triton.jit
def _embed(TOK, STEP, EMB, PEMB, X, P, last_pos, sx, D: tl.constexpr, PDL: tl.constexpr):
    """X[s] = EMB[TOK[s // P]] + PEMB[min(STEP[s // P], last_pos)]: one program per sequence."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    s = tl.program_id(0)
    r = s // P
    tok = tl.load(TOK + r)
    sp = tl.minimum(tl.load(STEP + r), last_pos)
    d = tl.arange(0, D)
    x = tl.load(EMB + tok * D + d) + tl.load(PEMB + sp * D + d)
    tl.store(X + s * sx + d, x)


def embed_tokens(tok: torch.Tensor, step: torch.Tensor, emb: torch.Tensor, pos_emb: torch.Tensor, pairs: int) -> torch.Tensor:
    """``emb[tok] + pos_emb[step.clamp(max=len(pos_emb) - 1)]`` repeated for each sequence of a
    row: tok, step (n,) -> (n * pairs, D) fp32, one kernel (eager: gather, gather, clamp, add,
    and the copy for the pairs)."""
    n, D = tok.shape[0], emb.shape[1]
    if not (emb.is_contiguous() and pos_emb.is_contiguous()) or emb.dtype != torch.float32 or D & (D - 1):
        raise ValueError("embed_tokens: contiguous fp32 tables with a power-of-two width")
    x = torch.empty((n * pairs, D), dtype=torch.float32, device=emb.device)
    _embed[(n * pairs,)](tok, step, emb, pos_emb, x, pairs, pos_emb.shape[0] - 1, x.stride(0), D=D, num_warps=4,
                         **pdl.launch_options(emb.device))
    return x


def linear_residual(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res + F.linear(x, w).float()``: x (S, K) in w's dtype, res (S, N) fp32 -> (S, N) fp32."""
    return _launch(x, w, PLAIN, x.shape[1], res=res)
