"""T3's decode layers for a few sequences (batch 1 with CFG: two) as Triton GEMVs with the
elementwise work fused in.

With two sequences a decode step is a chain of matrix-vector products over 1 GB of bf16
weights, and every small elementwise kernel between them (norms, casts, SiLU, residual
adds) costs a launch and a trip through memory. Profiled on an H100 (scripts/gpu_t3_profile.py,
rows 1) the compiled layers ran ~13 kernels per layer, ~490 per step, and cuBLAS moved the
weights at ~1.45 TB/s. Here a layer is four GEMVs, each reading its weight once:

- ``norm_linear``: RMSNorm of the fp32 residual stream folded into the q/k/v or gate/up
  projection: the product runs over ``ln * x`` while the same pass sums the squares of x,
  and each row's sum is scaled by its 1/rms at the end;
- ``linear_residual``: the o-projection plus the residual add;
- ``swiglu_linear_residual``: SiLU(gate) * up as the prologue of the down projection, plus
  the residual add;

and RoPE moves into the attention kernel (``decode_attention.attend_and_cache(rope=...)``).

Numerics follow the eager layer (``t3_fast.layer_in``/``layer_out``) cast for cast, with one
exception: products accumulate in fp32 and are rounded to the weights' dtype before the fp32
residual add; SiLU and the gate product are rounded as eager bf16 rounds them; but the
norm's output is not rounded to bf16 before its GEMV (eager rounds it because cuBLAS takes
bf16): that is closer to the fp32 model, not further. In fp32 every cast is a no-op and the
result is the eager layer's up to summation order.
On the CPU tests run these kernels under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PLAIN, NORM, SWIGLU = 0, 1, 2  # prologues
MAX_SEQS = 4  # most sequences per call (rows x pairs): products of four rows already fill the registers


@triton.jit
def _gemv(
    X, LN, W, R, Y,
    S, N, sx, sw, sr, sy, eps,
    K: tl.constexpr, PRO: tl.constexpr, RES: tl.constexpr,
    SB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Y[s, n] = (sum_k f(X)[s, k] * W[n, k]) rounded to W's dtype (+ R[s, n] in fp32)."""
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    nmask = n < N
    rows = tl.arange(0, SB)
    rmask = rows < S
    wdt = W.dtype.element_ty
    acc = tl.zeros((SB, BN, BK), tl.float32)  # reduced over k once, after the loop
    ss = tl.zeros((SB, BK), tl.float32)  # NORM: the rows' sums of squares, in the same pass
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        xm = rmask[:, None] & kmask[None, :]
        xp = X + rows[:, None] * sx + kk[None, :]
        if PRO == 1:  # ln * x now; the row's 1/rms (a scalar per row) scales the sum at the end
            g = tl.load(LN + kk, mask=kmask, other=0.0)
            xv = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
            ss += xv * xv
            h = g[None, :] * xv
        elif PRO == 2:  # silu(gate) * up, each rounded to the dtype as eager rounds them
            gt = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
            up = tl.load(xp + K, mask=xm, other=0.0).to(tl.float32)
            a = (gt / (1.0 + tl.exp(-gt))).to(wdt).to(tl.float32)
            h = (a * up).to(wdt).to(tl.float32)
        else:
            h = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
        w = tl.load(W + n[:, None] * sw + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += h[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, 2)
    if PRO == 1:
        y = y / tl.sqrt(tl.sum(ss, 1) / K + eps)[:, None]
    y = y.to(wdt)
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


def block_sizes(s: int, n: int, k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(SB, BN, BK, num_warps) for S sequences through an (n, k) weight.

    On a GPU, from a sweep on an H200 (scripts/gpu_gemv.py, two sequences, 30 layers'
    weights): a whole K=1024 row in one tile, and few output features per program, so that
    each SM runs several programs (each streams BN rows of the weight); for the down
    projection (K=4096) two features per program and 8 warps. Four sequences take half the
    features per program (the products held in registers double). Under the interpreter
    (CPU): big blocks, as few Python-level programs as possible.
    """
    sb = _seq_block(s)
    if device.type != "cuda":
        return sb, 64, min(k, 256), 4
    bk = min(k, 1024)
    if k > 1024:
        bn, warps = 2, 8
        if sb > 2:
            bk = 512
    else:
        bn, warps = (8 if n >= 4096 else 4), 4
        if sb > 2:
            bn, warps = bn // 2, 8
    return sb, bn, bk, warps


def _launch(x, w, pro: int, k: int, ln=None, eps: float = 0.0, res=None) -> torch.Tensor:
    s, n = x.shape[0], w.shape[0]
    if s > MAX_SEQS:
        raise ValueError(f"decode GEMV: at most {MAX_SEQS} sequences, got {s}")
    if w.shape[1] != k:
        raise ValueError(f"decode GEMV: the input has {k} features, the weight takes {w.shape[1]}")
    if x.stride(-1) != 1 or w.stride(-1) != 1 or (res is not None and res.stride(-1) != 1):
        raise ValueError("decode GEMV: the last dimension of every operand must be contiguous")
    y = torch.empty((s, n), dtype=torch.float32 if res is not None else w.dtype, device=x.device)
    r = res if res is not None else y  # unused pointers still need a tensor
    sb, bn, bk, warps = block_sizes(s, n, k, x.device)
    _gemv[(triton.cdiv(n, bn),)](
        x, ln if ln is not None else w, w, r, y, s, n, x.stride(0), w.stride(0), r.stride(0), y.stride(0), eps,
        K=k, PRO=pro, RES=res is not None, SB=sb, BN=bn, BK=bk, num_warps=warps,
    )
    return y


def norm_linear(x: torch.Tensor, ln: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.linear(rms_norm(x, ln, eps).to(w.dtype), w)``: x (S, K) fp32 -> (S, N) in w's dtype."""
    return _launch(x, w, NORM, x.shape[1], ln=ln, eps=eps)


def linear_residual(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res + F.linear(x, w).float()``: x (S, K) in w's dtype, res (S, N) fp32 -> (S, N) fp32."""
    return _launch(x, w, PLAIN, x.shape[1], res=res)


def swiglu_linear_residual(gu: torch.Tensor, w: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``res + F.linear(F.silu(gate) * up, w).float()`` with ``gate, up = gu.chunk(2, -1)``:
    gu (S, 2K) in w's dtype, res (S, N) fp32 -> (S, N) fp32."""
    return _launch(gu, w, SWIGLU, gu.shape[1] // 2, res=res)
