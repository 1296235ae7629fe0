"""The CFM estimator's transformer-block tail as one Triton kernel: the feed-forward's hidden
never leaves the chip.

``cfm_estimator.block_out`` is: output projection (512 -> 256) + residual, LayerNorm, the
feed-forward's first GEMM (256 -> 1,024) with GELU, its second (1,024 -> 256) + residual.
Compiled, that is cuBLAS GEMMs with Inductor's elementwise kernels between them, and each
row moves ~12 KB through memory for ~1.3 MFLOP of work (the fp32 residual stream read and
written twice, the 1,024-wide hidden written and read back, the projections' outputs): at a
book's shapes it runs at ~240 TFLOP/s, a quarter of the H100's bf16 peak, bound by memory
(BENCHMARKS.md, eleventh session).

Here a program takes ``BM`` rows through all of it: the output projection into fp32
registers, + bias, rounded as cuBLAS rounds it, + the residual; the result is stored (it is
the second residual) and normalized in registers; then the hidden is made ``BH`` columns at a
time (GEMM, bias, GELU, rounded to bf16) and at once multiplied into the second GEMM's
accumulator, so it is never written; last the bias, the rounding and the stored residual.
A row moves ~3 KB: its attention output (1 KB bf16), its residual in and out (fp32).
``proj=False`` leaves the output projection to the caller (x is then the first residual's
result): the variant to measure if the larger kernel spills.

Numerics are the compiled region's on CUDA, rounding for rounding: bf16 operands, fp32
accumulation, each GEMM's output (with its bias) rounded to bf16 before the fp32 residual add,
LayerNorm in fp32, GELU's tanh form (cuBLASLt's epilogue there) on the fp32 pre-activation.
Only the summation order differs. Tests run it under Triton's interpreter on the CPU; the
engine uses it on CUDA only (``BatchedS3Gen(ffn="triton")``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# (BM rows, BK inner columns per out-projection step, BH hidden columns per step, warps, stages)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the CPU tests

# Tried in this order on the first call (Tuned); each is a Triton compile (~1-2 s, cached on disk).
CONFIGS = [(64, 64, 64, 8, 1), (64, 64, 32, 8, 1), (64, 64, 128, 8, 1), (64, 64, 64, 8, 2), (128, 64, 64, 8, 1)]
# ffn's: (BM rows, BH hidden columns per step, warps, stages)
# The ones ptxas (sm_90, Triton 3.x) compiles without spills, 208-216 registers (8 warps over
# 64 rows; 4 warps or 128 rows spill 128-816 bytes): /tmp/ffn2_compile.py-style, in BENCHMARKS.md
FFN_CONFIGS = [(64, 64, 8, 2), (64, 128, 8, 1), (64, 32, 8, 2), (64, 64, 8, 1), (64, 32, 8, 3)]


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
    return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def _dot(a, b, acc, F32: tl.constexpr):
    # F32: Triton's interpreter multiplies bf16 tiles wrongly (as raw 16-bit integers); their
    # values are exact in fp32, so an fp32 product is the tensor cores' (to summation order)
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _feed_forward(h, W1, B1, W2, B2, C: tl.constexpr, HID: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, F32: tl.constexpr):
    """The normalized rows h (BM, C) through the feed-forward, ``BH`` hidden columns at a
    time (GEMM, bias, GELU, rounded to bf16), each at once multiplied into the second GEMM's
    accumulator so the hidden is never written; then its bias and rounding: (BM, C) fp32."""
    acc = tl.zeros((BM, C), dtype=tl.float32)
    for j0 in range(0, HID, BH):
        js = j0 + tl.arange(0, BH)
        g = _dot(h, W1.load([j0, 0]).T, tl.zeros((BM, BH), dtype=tl.float32), F32)  # w1 (HID, C)
        g = _gelu_tanh(g + tl.load(B1 + js).to(tl.float32)[None, :]).to(W1.dtype)
        acc = _dot(g, W2.load([0, j0]).T, acc, F32)  # w2 (C, HID)
    return (acc + tl.load(B2 + tl.arange(0, C)).to(tl.float32)[None, :]).to(W1.dtype).to(tl.float32)


@triton.jit
def _block_out(
    O, X, WO, BO, NW, NB, W1, B1, W2, B2, Y, N, eps,
    C: tl.constexpr, INNER: tl.constexpr, HID: tl.constexpr, PROJ: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, F32: tl.constexpr,
):
    """O, WO, W1, W2 are TMA descriptors (tiles (BM, BK), (C, BK), (BH, C), (C, BH)): the
    tiles go from memory to shared memory without passing through registers, which the two
    (BM, C) fp32 accumulators and the normalized rows fill."""
    pid = tl.program_id(0)
    row0 = pid * BM
    rows = row0 + tl.arange(0, BM)
    rmask = rows < N
    cols = tl.arange(0, C)
    tile = rows[:, None] * C + cols[None, :]
    if PROJ:
        acc = tl.zeros((BM, C), dtype=tl.float32)
        for k0 in range(0, INNER, BK):
            a = O.load([row0, k0])  # (BM, BK); rows past N read as zeros
            acc = _dot(a, WO.load([0, k0]).T, acc, F32)  # wo (C, INNER): its tile transposed
        bo = tl.load(BO + cols).to(tl.float32)
        x = (acc + bo[None, :]).to(W1.dtype).to(tl.float32) + tl.load(X + tile, mask=rmask[:, None], other=0.0)
        tl.store(Y + tile, x, mask=rmask[:, None])  # the second residual, read back at the end
    else:
        x = tl.load(X + tile, mask=rmask[:, None], other=0.0)
    mean = tl.sum(x, axis=1) / C
    d = x - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    h = (d * rstd[:, None] * tl.load(NW + cols)[None, :] + tl.load(NB + cols)[None, :]).to(W1.dtype)
    y = _feed_forward(h, W1, B1, W2, B2, C, HID, BM, BH, F32)
    # the residual read again (from L2) rather than held in registers through the loop
    if PROJ:
        tl.debug_barrier()  # it was stored above by other threads of this program
        x = tl.load(Y + tile, mask=rmask[:, None], other=0.0)
    else:
        x = tl.load(X + tile, mask=rmask[:, None], other=0.0)
    tl.store(Y + tile, y + x, mask=rmask[:, None])


@triton.jit
def _ffn(
    H, X, W1, B1, W2, B2, Y, N,
    C: tl.constexpr, HID: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, F32: tl.constexpr,
):
    """The feed-forward alone: Y = X + W2 gelu(W1 H + b1) + b2, the hidden kept on the chip.
    H (the normalized rows, bf16), W1 and W2 are TMA descriptors (tiles (BM, C), (BH, C),
    (C, BH)): every GEMM operand comes from shared memory, and registers hold only the
    (BM, C) fp32 accumulator and one (BM, BH) hidden tile. ``_block_out`` also held the
    normalized rows and the LayerNorm's fp32 rows in registers, and spilled (ptxas, sm_90)."""
    pid = tl.program_id(0)
    row0 = pid * BM
    rows = row0 + tl.arange(0, BM)
    rmask = rows < N
    cols = tl.arange(0, C)
    h = H.load([row0, 0])  # (BM, C); rows past N read as zeros
    y = _feed_forward(h, W1, B1, W2, B2, C, HID, BM, BH, F32)
    tile = rows[:, None] * C + cols[None, :]
    tl.store(Y + tile, y + tl.load(X + tile, mask=rmask[:, None], other=0.0), mask=rmask[:, None])


def ffn(h, x, w1, b1, w2, b2, config=None, out=None):
    """``x + linear(gelu_tanh(linear(h, w1, b1)), w2, b2)`` with each GEMM's output rounded to
    h's dtype as the compiled region rounds it: h (N, C) bf16 (norm3's output), x (N, C) fp32
    (the residual) -> (N, C) fp32. ``config``: (BM, BH, warps, stages), default
    ``FFN_CONFIGS[0]``."""
    N, C = x.shape
    BM, BH, warps, stages = config or FFN_CONFIGS[0]
    y = torch.empty_like(x) if out is None else out
    _ffn[(triton.cdiv(N, BM),)](
        TensorDescriptor.from_tensor(h, [BM, C]), x, TensorDescriptor.from_tensor(w1, [BH, C]), b1,
        TensorDescriptor.from_tensor(w2, [C, BH]), b2, y, N,
        C=C, HID=w1.shape[0], BM=BM, BH=BH, F32=_INTERPRETED, num_warps=warps, num_stages=stages,
    )
    return y


def block_out(o, x, wo, bo, nw, nb, w1, b1, w2, b2, eps: float, proj: bool = True, config=None, out=None):
    """``cfm_estimator.block_out`` with GELU's tanh form: o (N, INNER) bf16, x (N, C) fp32 ->
    (N, C) fp32. ``proj=False``: o is ignored and x is already ``linear(o, wo, bo) + x``.
    ``config``: one of :data:`CONFIGS` (default: the first)."""
    N, C = x.shape
    HID = w1.shape[0]
    BM, BK, BH, warps, stages = config or CONFIGS[0]
    y = torch.empty_like(x) if out is None else out
    o = o if proj else w1  # unused without the projection (any bf16 tensor for the descriptor)
    _block_out[(triton.cdiv(N, BM),)](
        TensorDescriptor.from_tensor(o, [BM, BK]), x, TensorDescriptor.from_tensor(wo, [C, BK]), bo, nw, nb,
        TensorDescriptor.from_tensor(w1, [BH, C]), b1, TensorDescriptor.from_tensor(w2, [C, BH]), b2, y, N, eps,
        C=C, INNER=wo.shape[1], HID=HID, PROJ=proj, BM=BM, BK=BK, BH=BH, F32=_INTERPRETED,
        num_warps=warps, num_stages=stages,
    )
    return y


def supported(C: int, inner: int, hid: int, has_bias: bool) -> bool:
    """The shapes the kernel takes: powers of two (whole tiles; the estimator's 256, 512 and
    1,024) and every bias present (the estimator's linears all have one)."""
    def pow2(n):
        return n >= 32 and n & (n - 1) == 0

    return has_bias and pow2(C) and pow2(inner) and pow2(hid) and C <= 256


class Tuned:
    """A kernel of this module with the fastest of its configurations, timed once, on the
    first call, at a book's scale (``rows``: a batch of 64 chunks with CFG is ~100,000; the
    first call may be a warm-up's single chunk) with the call's weights and dtypes (CUDA
    events; ~1 s). ``kernel``: "block_out" (:func:`block_out`, ``proj`` passed on; its
    arguments) or "ffn" (:func:`ffn`; its arguments)."""

    def __init__(self, proj: bool = True, configs=None, rows: int = 64 * 1024, kernel: str = "block_out"):
        if kernel not in ("block_out", "ffn"):
            raise ValueError(f"kernel must be 'block_out' or 'ffn', got {kernel!r}")
        self.kernel = kernel
        self.proj = proj
        self.configs = list(configs or (FFN_CONFIGS if kernel == "ffn" else CONFIGS))
        self.rows = rows
        self.config = None
        self.timings: dict = {}

    def __call__(self, *args, **kwargs):
        if self.config is None:
            self.config = self._tune(*args, **kwargs)
        return self._run(args, kwargs, self.config)

    def _run(self, args, kwargs, config, out=None):
        if self.kernel == "ffn":
            return ffn(*args, config=config, out=out, **kwargs)
        return block_out(*args, proj=self.proj, config=config, out=out, **kwargs)

    def _tune(self, *args, **kwargs):
        from triton.testing import do_bench

        from .capture import capture_lock

        with capture_lock:  # do_bench synchronizes the device: never beside another thread's capture
            return self._time_configs(do_bench, args, kwargs)

    def _time_configs(self, do_bench, args, kwargs):
        first, x, *weights = args  # the rows' inputs (o or h, and the residual), then weights
        g = torch.Generator(device=x.device).manual_seed(0)
        first = torch.randn(self.rows, first.shape[1], device=first.device, generator=g).to(first.dtype)
        x = torch.randn(self.rows, x.shape[1], device=x.device, generator=g).to(x.dtype)
        args = (first, x, *weights)
        y = torch.empty_like(x)
        best = None
        for cfg in self.configs:
            try:
                ms = do_bench(lambda: self._run(args, kwargs, cfg, out=y), warmup=3, rep=10)
            except Exception as e:  # noqa: BLE001 - a config that does not fit (registers, shared memory)
                self.timings[cfg] = f"{type(e).__name__}"
                continue
            self.timings[cfg] = round(ms, 4)
            if best is None or ms < best[0]:
                best = (ms, cfg)
        if best is None:
            raise RuntimeError(f"no configuration of the fused {self.kernel} ran: {self.timings}")
        return best[1]
