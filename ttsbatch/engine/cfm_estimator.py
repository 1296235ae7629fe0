"""S3Gen's CFM estimator (chatterbox's ``ConditionalDecoder``) as a few pure functions.

The estimator is 14 causal resnet blocks and 56 transformer blocks over a 256-channel
stream: narrow GEMMs between long chains of small elementwise ops (LayerNorm, Mish, GELU,
masks, fp32 residuals, autocast's casts). Eager, each op is a kernel and a trip through
memory; that, not the GEMMs, is where most of the estimator's time went (~14% of bf16 peak;
compiled as below, 21%: 209 against 135 TFLOP/s on an H100, BENCHMARKS.md).

Here the repeated parts are functions of tensors (weights are arguments, prepared once in
the compute dtype, q/k/v as one GEMM) so that ``torch.compile`` can fuse each one into a
few kernels and reuse **one** compiled graph for every block, every bucket and every batch
size: the row dimensions are marked dynamic, and each region has its own code object, so a
new length bucket neither recompiles nor breaks a graph (``bench`` prints dynamo's
counters). The attention between the regions stays outside them (varlen flash attention on
CUDA, SDPA with the key-padding bias elsewhere).

Numerics mirror stock under autocast (what ``BatchedS3Gen`` ran before): GEMMs and convs in
the compute dtype, LayerNorm in fp32 with fp32 output, the residual stream in fp32. In fp32
the functions are stock's math; the CPU tests compare them with the stock modules.

Only the configuration chatterbox-tts 0.1.7 ships is handled (:func:`supported` checks it);
anything else runs the stock modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .regions import Regions

# ---------------------------------------------------------------------------------------------
# The regions: pure functions of tensors (compiled as they are on CUDA)


def _conv_block(x, mask, w, b, nw, nb, eps: float):
    """``CausalBlock1D``: causal conv (k=3) -> LayerNorm over channels -> Mish, masked.
    x (B, C, T) fp32 or compute dtype, mask (B, 1, T) fp32; returns (B, Cout, T) fp32."""
    y = F.conv1d(F.pad((x * mask).to(w.dtype), (w.shape[-1] - 1, 0)), w, b)
    y = F.layer_norm(y.float().transpose(1, 2), y.shape[1:2], nw, nb, eps).transpose(1, 2)
    return F.mish(y) * mask


def _resnet(x, mask, temb, c1w, c1b, n1w, n1b, mw, mb, c2w, c2b, n2w, n2b, rw, rb, eps: float):
    """``CausalResnetBlock1D`` (channels first): x (B, Cin, T), temb (B, E) the time
    embedding (the compute dtype under autocast, as stock's)."""
    h = _conv_block(x, mask, c1w, c1b, n1w, n1b, eps)
    h = h + F.linear(F.mish(temb).to(mw.dtype), mw, mb).unsqueeze(-1)
    h = _conv_block(h, mask, c2w, c2b, n2w, n2b, eps)
    return h + F.conv1d((x * mask).to(rw.dtype), rw, rb)


# The stream between regions is kept in rows layout (B, T, C), the transformer blocks'
# layout; the convs' channels-first view is taken inside the regions, where a compiler fuses
# the transposes into the elementwise kernels instead of copying. One function (one code
# object, one compiled graph) per resnet site: their inputs differ in channels and layout.
# The concatenations around the stream ([x | mu | spks | cond] before the first resnet, [x |
# skip] before the up-block's) are made inside the regions that read them: eager, each was one
# more copy of every row in fp32 per Euler step; inside, the region's first kernels read both
# parts where they are.
def resnet_down(x, static, mask, temb, *w, eps: float):
    """The first resnet: x (B, 80, T) and the rest of the packed input [mu | spks | cond]
    (B, Cin - 80, T), channels first -> (B, T, C) rows."""
    return _resnet(torch.cat([x, static], dim=1), mask, temb, *w, eps=eps).transpose(1, 2).contiguous()


def resnet_mid(x, mask, temb, *w, eps: float):
    """A mid-block resnet: (B, T, C) -> (B, T, C)."""
    return _resnet(x.transpose(1, 2), mask, temb, *w, eps=eps).transpose(1, 2).contiguous()


def resnet_up(x, skip, mask, temb, *w, eps: float):
    """The up-block resnet: the stream and the skip, (B, T, C) each, -> (B, T, C) (stock: [x |
    skip] on channels)."""
    return _resnet(torch.cat([x, skip], dim=-1).transpose(1, 2), mask, temb, *w, eps=eps).transpose(1, 2).contiguous()


def block_in(x, nw, nb, w_qkv, b_qkv, eps: float):
    """norm1 and the q, k, v projections as one GEMM: x (N, C) fp32 -> (N, 3 * inner)."""
    h = F.layer_norm(x, x.shape[-1:], nw, nb, eps)
    return F.linear(h.to(w_qkv.dtype), w_qkv, b_qkv)


def block_out(o, x, wo, bo, nw, nb, w1, b1, w2, b2, eps: float, approximate: str):
    """attention output projection + residual, norm3, feed-forward (GELU) + residual:
    o (N, inner) compute dtype, x (N, C) fp32 -> (N, C) fp32."""
    x = F.linear(o, wo, bo).float() + x
    h = F.layer_norm(x, x.shape[-1:], nw, nb, eps).to(w1.dtype)
    if b1 is not None and approximate == "none":
        # bias + GELU in the GEMM's epilogue (cuBLASLt): compiled, a separate GELU kernel
        # re-read and re-wrote the (rows, 4C) hidden, and this region took 0.70 ms instead of
        # 0.53 at a book's shapes (H100, scripts/gpu_cfm_block.py). On CUDA the epilogue is
        # GELU's tanh form, within 5e-4 of the exact one: below bf16's spacing at these
        # magnitudes (the region's error against fp32 was 0.0209 vs 0.0205). On the CPU it
        # is the exact GELU, stock's math.
        h = torch._addmm_activation(b1, h, w1.t(), use_gelu=True)
    else:
        h = F.gelu(F.linear(h, w1, b1), approximate=approximate)
    return F.linear(h, w2, b2).float() + x


def block_out_in(o, x, wo, bo, nw, nb, w1, b1, w2, b2, nw1, nb1, w_qkv, b_qkv, eps: float, eps1: float, approximate: str):
    """``block_out`` then the next block's ``block_in``, one region (``chain``, the default):
    -> (x (N, C) fp32, the next block's qkv). Apart, the feed-forward's residual add and the
    next norm1 were two kernels, the add re-read by the norm: 1.45 + 0.71 s of a 2-hour
    book's GPU time on an H100, against 0.99 s for the same pair fused after the attention's
    output projection (``triton_per_fused__to_copy_add_native_layer_norm``, twenty-ninth
    session's trace). Together Inductor fuses them so (on an H200: 1.29 s against 1.58 s for
    the pair). The same ops in the same order."""
    x = block_out(o, x, wo, bo, nw, nb, w1, b1, w2, b2, eps=eps, approximate=approximate)
    return x, block_in(x, nw1, nb1, w_qkv, b_qkv, eps=eps1)


def block_proj(o, x, wo, bo):
    """The attention output projection + residual alone (``block_out``'s start), for the fused
    feed-forward kernel that leaves it out (``cfm_ffn``, ``proj=False``)."""
    return F.linear(o, wo, bo).float() + x


def block_norm3(o, x, wo, bo, nw, nb, eps: float):
    """The attention output projection + residual and norm3 (``block_out`` up to its
    feed-forward), for the feed-forward kernel that takes the normalized rows
    (``cfm_ffn.ffn``): -> (x (N, C) fp32, the residual; h (N, C) in wo's dtype)."""
    x = F.linear(o, wo, bo).float() + x
    return x, F.layer_norm(x, x.shape[-1:], nw, nb, eps).to(wo.dtype)


def causal_conv(x, mask, w, b):
    """``CausalConv1d(x * mask)`` (the down/up-sampling convs): (B, T, C) -> (B, T, C) fp32
    (the conv's output is in the compute dtype, as stock's under autocast; fp32 so that every
    input of the next region has one dtype: the next op casts it back, exactly)."""
    y = F.conv1d(F.pad((x.transpose(1, 2) * mask).to(w.dtype), (w.shape[-1] - 1, 0)), w, b)
    return y.float().transpose(1, 2).contiguous()


def final(x, mask, cw, cb, nw, nb, pw, pb, eps: float):
    """``final_block`` then ``final_proj``, masked as stock: (B, T, C) -> (B, 80, T) fp32."""
    h = _conv_block(x.transpose(1, 2), mask, cw, cb, nw, nb, eps)
    return F.conv1d((h * mask).to(pw.dtype), pw, pb).float() * mask


# The convolutions as GEMMs (``conv="gemm"``, the default on CUDA). A profile of one S3Gen batch on an
# H200 had the 120 mid-block resnets of its 10 steps take 118 ms, more than half of what the
# 560 transformer-block tails took: cuDNN ran the convs at ~690 TFLOP/s, but its NCHW <-> NHWC
# transposes and Inductor's kernels around the channels-first view took four fifths of the
# resnet's 1.0 ms (scripts/gpu_resnet_variants.py). Here the stream stays as flat rows
# (B * T, C), the transformer blocks' own layout, and a causal conv of k taps is one GEMM over
# its input's k shifted copies laid side by side, (B * T, k * Cin) @ (k * Cin, Cout); the
# whole resnet then took 0.50 ms (with :data:`MM_OPTIONS`). Two small per-call tensors stand
# in for the row structure: ``keep`` (B * T, k), 1 where tap j's frame t - k + 1 + j is in the
# same row (a row's start: the conv's zero padding), and ``rows_b`` (B * T,), each row's batch
# entry (for the time embedding): :func:`rows_aux`. The same products summed in another
# order: stock's math to fp32 rounding.


def rows_aux(B: int, T: int, k: int, dtype, device):
    """(keep, rows_b) for B rows of T frames and convs of k taps (see above)."""
    t = torch.arange(T, device=device)
    keep = torch.stack([t >= k - 1 - j for j in range(k)], dim=1).to(dtype).repeat(B, 1)
    return keep, torch.div(torch.arange(B * T, device=device), T, rounding_mode="floor")


def _taps(x, keep, k: int):
    """(M, C) masked rows -> (M, k * C): x[t - k + 1], ..., x[t - 1], x[t] side by side, zero
    where the frame is before its row's start."""
    M = x.shape[0]
    xp = F.pad(x, (0, 0, k - 1, 0))
    return torch.cat([xp[j : j + M] * keep[:, j : j + 1] for j in range(k - 1)] + [x], dim=1)


def _conv_mm(x, mask, keep, w, b):
    """``CausalConv1d(x * mask)`` over rows: x (M, Cin), mask (M, 1), w (Cout, k * Cin) (the
    conv's weight with its taps outermost, :func:`_conv_weight`) -> (M, Cout) in w's dtype."""
    return F.linear(_taps((x * mask).to(w.dtype), keep, w.shape[1] // x.shape[1]), w, b)


def _mish(x):
    """Mish, x tanh(softplus(x)), as x n / (n + 2) with n = e^x (e^x + 2): the same function
    (to fp32 rounding: 2e-6 over [-30, 30]) with one exponential instead of three
    transcendentals; compiled, the conv blocks' LayerNorm + Mish kernels took 50 instead of
    82-95 us (H200). Past x = 20 it is x, as softplus's own threshold makes it."""
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2.0)
    return torch.where(x > 20.0, x, x * n / (n + 2.0))


def _conv_block_mm(x, mask, keep, w, b, nw, nb, eps: float):
    """``CausalBlock1D`` over rows (:func:`_conv_block`'s math): -> (M, Cout) fp32."""
    y = F.layer_norm(_conv_mm(x, mask, keep, w, b).float(), (w.shape[0],), nw, nb, eps)
    return _mish(y) * mask


def _resnet_mm(x, mask, keep, rows_b, temb, c1w, c1b, n1w, n1b, mw, mb, c2w, c2b, n2w, n2b, rw, rb, eps: float):
    """``CausalResnetBlock1D`` over rows (:func:`_resnet`'s math): x (M, Cin) -> (M, C)."""
    h = _conv_block_mm(x, mask, keep, c1w, c1b, n1w, n1b, eps)
    h = h + F.linear(F.mish(temb).to(mw.dtype), mw, mb)[rows_b]
    h = _conv_block_mm(h, mask, keep, c2w, c2b, n2w, n2b, eps)
    return h + F.linear((x * mask).to(rw.dtype), rw, rb)


def resnet_down_mm(x, static, mask, keep, rows_b, temb, *w, eps: float):
    """:func:`resnet_down` with GEMM convs: x (B, 80, T) and the rest of the packed input ->
    (B * T, C) rows; ``mask`` (B, 1, T)."""
    x = torch.cat([x, static], dim=1)
    return _resnet_mm(x.transpose(1, 2).reshape(-1, x.shape[1]), mask.reshape(-1, 1), keep, rows_b, temb, *w, eps=eps)


def resnet_mid_mm(x, mask, keep, rows_b, temb, *w, eps: float):
    """:func:`resnet_mid` with GEMM convs: (M, C) -> (M, C)."""
    return _resnet_mm(x, mask.reshape(-1, 1), keep, rows_b, temb, *w, eps=eps)


def resnet_up_mm(x, skip, mask, keep, rows_b, temb, *w, eps: float):
    """:func:`resnet_up` with GEMM convs: the stream and the skip, (M, C) each, -> (M, C)."""
    return _resnet_mm(torch.cat([x, skip], dim=-1), mask.reshape(-1, 1), keep, rows_b, temb, *w, eps=eps)


def causal_conv_mm(x, mask, keep, w, b):
    """:func:`causal_conv` with a GEMM: (M, C) -> (M, C) fp32."""
    return _conv_mm(x, mask.reshape(-1, 1), keep, w, b).float()


def final_mm(x, mask, keep, cw, cb, nw, nb, pw, pb, eps: float):
    """:func:`final` with GEMM convs: (M, C) rows, ``mask`` (B, 1, T) -> (B, 80, T) fp32."""
    m = mask.reshape(-1, 1)
    h = _conv_block_mm(x, m, keep, cw, cb, nw, nb, eps)
    y = F.linear((h * m).to(pw.dtype), pw, pb).float() * m
    return y.view(mask.shape[0], mask.shape[2], -1).transpose(1, 2).contiguous()


CONV_REGIONS = ("resnet_down", "resnet_mid", "resnet_up", "causal_conv", "final")
MM_REGIONS = tuple(n + "_mm" for n in CONV_REGIONS)  # compiled instead of CONV_REGIONS with conv="gemm"
REGIONS = CONV_REGIONS + ("block_in", "block_out", "block_out_in", "block_proj", "block_norm3") + MM_REGIONS
FFN_REGIONS = ("block_proj", "block_norm3")  # compiled only beside a cfm_ffn kernel
CHAIN_REGIONS = ("block_out_in",)  # only where a stack has two blocks or more, without a cfm_ffn kernel


# ---------------------------------------------------------------------------------------------
# Weights, prepared once


def _w(t, dtype):
    return None if t is None else t.detach().to(dtype).contiguous()


def _ln(norm):
    return norm.weight.detach().float().contiguous(), norm.bias.detach().float().contiguous(), float(norm.eps)


@dataclass(frozen=True)
class _Resnet:
    args: tuple  # the weight arguments of _resnet after (x, mask, temb), in order
    eps: float


@dataclass(frozen=True)
class _Block:
    nw1: torch.Tensor
    nb1: torch.Tensor
    w_qkv: torch.Tensor  # to_q, to_k, to_v stacked: one GEMM
    b_qkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    nw3: torch.Tensor
    nb3: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    eps1: float
    eps3: float
    approximate: str
    heads: int
    scale: float


def _conv_weight(w, dtype, gemm: bool):
    """A conv's weight (Cout, Cin, k) as the conv takes it, or with ``gemm`` as :func:`_conv_mm`
    takes it: (Cout, k * Cin), tap-major (the column block j multiplies x[t - k + 1 + j])."""
    if not gemm:
        return _w(w, dtype)
    return w.detach().permute(0, 2, 1).reshape(w.shape[0], -1).to(dtype).contiguous()


def _resnet_weights(r, dtype, gemm: bool = False) -> _Resnet:
    c1, n1 = r.block1.block[0], r.block1.block[2]
    c2, n2 = r.block2.block[0], r.block2.block[2]
    lin = r.mlp[1]
    n1w, n1b, eps = _ln(n1)
    n2w, n2b, _ = _ln(n2)
    res = r.res_conv.weight
    args = (
        _conv_weight(c1.weight, dtype, gemm), _w(c1.bias, dtype), n1w, n1b, _w(lin.weight, dtype), _w(lin.bias, dtype),
        _conv_weight(c2.weight, dtype, gemm), _w(c2.bias, dtype), n2w, n2b,
        _w(res[..., 0] if gemm else res, dtype), _w(r.res_conv.bias, dtype),  # 1x1: a plain linear in rows
    )
    return _Resnet(args, eps)


def _block_weights(b, dtype) -> _Block:
    a = b.attn1
    qkv = [a.to_q, a.to_k, a.to_v]
    biases = [m.bias for m in qkv]
    b_qkv = None if all(x is None for x in biases) else torch.cat(
        [x if x is not None else torch.zeros(m.out_features, device=m.weight.device) for x, m in zip(biases, qkv)]
    )
    nw1, nb1, eps1 = _ln(b.norm1)
    nw3, nb3, eps3 = _ln(b.norm3)
    act, out = b.ff.net[0], b.ff.net[2]
    return _Block(
        nw1, nb1, _w(torch.cat([m.weight for m in qkv]), dtype), _w(b_qkv, dtype),
        _w(a.to_out[0].weight, dtype), _w(a.to_out[0].bias, dtype), nw3, nb3,
        _w(act.proj.weight, dtype), _w(act.proj.bias, dtype), _w(out.weight, dtype), _w(out.bias, dtype),
        eps1, eps3, act.approximate, int(a.heads), float(a.scale),
    )


def supported(est) -> bool:
    """Whether ``est`` is the ``ConditionalDecoder`` configuration these functions mirror:
    causal, one time resolution, plain transformer blocks (norm1, self-attention, norm3,
    GELU feed-forward), non-meanflow."""
    try:
        from chatterbox.models.s3gen.decoder import CausalBlock1D, CausalConv1d, CausalResnetBlock1D
        from diffusers.models.activations import GELU
    except ImportError:  # pragma: no cover - chatterbox always brings both
        return False
    if getattr(est, "meanflow", False) or len(est.down_blocks) != 1 or len(est.up_blocks) != 1:
        return False
    levels = [(r, tbs, s) for r, tbs, s in est.down_blocks] + [(r, tbs, None) for r, tbs in est.mid_blocks]
    levels += [(r, tbs, s) for r, tbs, s in est.up_blocks]
    for resnet, tbs, conv in levels:
        if type(resnet) is not CausalResnetBlock1D or (conv is not None and type(conv) is not CausalConv1d):
            return False
        for blk in (resnet.block1, resnet.block2):
            if type(blk) is not CausalBlock1D or not isinstance(blk.block[2], torch.nn.LayerNorm):
                return False
        for b in tbs:
            a = b.attn1
            if (
                b.use_ada_layer_norm or b.use_ada_layer_norm_zero or b.attn2 is not None or b.only_cross_attention
                or b._chunk_size is not None or a.residual_connection or a.rescale_output_factor != 1.0
                or a.group_norm is not None or a.spatial_norm is not None or a.norm_q is not None
                or a.norm_k is not None or not isinstance(b.norm1, torch.nn.LayerNorm)
                or not isinstance(b.norm3, torch.nn.LayerNorm) or type(b.ff.net[0]) is not GELU
                or len(b.ff.net) != 3
            ):
                return False
    return type(est.final_block) is CausalBlock1D


# Inductor inlines a pointwise result into each of its readers unless it is read more often
# than ``realize_reads_threshold`` (4): the taps' concatenation reads the conv block's output
# three times, and inlined, its LayerNorm, Mish and masks were computed three times per element
# in one kernel of ~0.7 ms a call, where written once the whole mid-block resnet took 0.50 ms
# against the cuDNN region's 1.0 (H200, scripts/gpu_resnet_variants.py, 2 x 45,000 rows).
MM_OPTIONS = {name: {"realize_reads_threshold": 1} for name in MM_REGIONS}


def regions(compile: bool = False, backend="inductor", mode: str | None = None) -> Regions:
    """The estimator's regions (:data:`REGIONS`), eager or compiled (see ``engine.regions``)."""
    return Regions({name: globals()[name] for name in REGIONS}, "S3Gen's CFM estimator", compile, backend, mode, MM_OPTIONS)


class FusedEstimator:
    """``ConditionalDecoder.forward`` over the packed input [x | mu | spks | cond] (B, 320, T),
    with the attention given as a callable ``attend(qkv, heads, scale) -> (N, inner)`` built
    per call by the caller (it knows the rows' layout and valid lengths)."""

    def __init__(self, est, dtype: torch.dtype, regions: Regions, ffn=None, ffn_input: str = "o", conv: str = "gemm",
                 chain: bool = True):
        """``ffn``: a kernel (``cfm_ffn.Tuned``) to run in ``block_out``'s place. ``ffn_input``
        says what it takes: "o", ``block_out``'s own arguments; "x", the same with the
        residual already through the output projection (the ``block_proj`` region's result);
        "h", the ``block_norm3`` region's normalized rows and residual, then the
        feed-forward's weights (``cfm_ffn.ffn``). ``conv``: the causal convs as the backend's own
        convolutions over a channels-first view ("native": cuDNN, oneDNN on the CPU) or as GEMMs
        over their shifted inputs, the stream as flat rows ("gemm", the ``*_mm`` regions).
        ``chain``: each block's tail and the next block's head in one region
        (:func:`block_out_in`) where a stack goes on and no ``ffn`` kernel runs; else
        ``block_out`` and ``block_in`` apart (the same math, one more kernel a block)."""
        if ffn_input not in ("o", "x", "h"):
            raise ValueError(f"ffn_input must be 'o', 'x' or 'h', got {ffn_input!r}")
        if conv not in ("native", "gemm"):
            raise ValueError(f"conv must be 'native' or 'gemm', got {conv!r}")
        self.est = est
        self.r = regions
        self.ffn, self.ffn_input = ffn, ffn_input
        self.conv = conv
        self.chain = bool(chain)
        self.dtype = dtype
        self.mel_channels = est.final_proj.out_channels  # x's part of a packed input
        g = conv == "gemm"
        (r0, tbs0, down), = est.down_blocks
        (r1, tbs1, up), = est.up_blocks
        self.down = (_resnet_weights(r0, dtype, g), [_block_weights(b, dtype) for b in tbs0],
                     (_conv_weight(down.weight, dtype, g), _w(down.bias, dtype)))
        self.mid = [(_resnet_weights(r, dtype, g), [_block_weights(b, dtype) for b in tbs]) for r, tbs in est.mid_blocks]
        self.up = (_resnet_weights(r1, dtype, g), [_block_weights(b, dtype) for b in tbs1],
                   (_conv_weight(up.weight, dtype, g), _w(up.bias, dtype)))
        fb = est.final_block.block
        nw, nb, eps = _ln(fb[2])
        pw = est.final_proj.weight
        self.final = (_conv_weight(fb[0].weight, dtype, g), _w(fb[0].bias, dtype), nw, nb,
                      _w(pw[..., 0] if g else pw, dtype), _w(est.final_proj.bias, dtype))
        self.final_eps = eps
        # the causal convs' taps (rows_aux's keep serves them all: one kernel size)
        sizes = {m.kernel_size[0] for m in est.modules() if isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1}
        if g and len(sizes) != 1:
            raise ValueError(f"conv='gemm' needs one kernel size for the estimator's causal convs, found {sorted(sizes)}")
        self.taps = sizes.pop() if sizes else 1
        self._aux = None  # ((B, T, device, stream), rows_aux's tensors) of the last call

    def _rows_aux(self, B: int, T: int, device):
        """:func:`rows_aux`, kept for the last (B, T): a batch's 10 Euler steps share it (six
        launches a step from S3Gen's launch-bound thread). Under a CUDA graph capture they are
        made afresh and not kept: the graph owns them (a kept pair is freed when the next
        shape replaces it, under a graph that would still read it)."""
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return rows_aux(B, T, self.taps, self.dtype, device)
        # and per stream: a pair made on one stream and freed after use on another could be
        # reused by the first while the second still reads it
        key = (B, T, device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)
        if self._aux is None or self._aux[0] != key:
            self._aux = (key, rows_aux(B, T, self.taps, self.dtype, device))
        return self._aux[1]

    def _blocks(self, blocks, x, attend):
        """Transformer blocks over the (B, T, C) stream, as (B * T, C) rows."""
        B, T, C = x.shape
        return self._row_blocks(blocks, x.reshape(B * T, C), attend).view(B, T, C)

    def _row_blocks(self, blocks, h, attend):
        """Transformer blocks over (M, C) rows."""
        qkv = None  # the block's q, k, v when the last block's region made them (chain)
        for i, b in enumerate(blocks):
            self.r.dyn((h, 0))
            if qkv is None:
                qkv = self.r.block_in(h, b.nw1, b.nb1, b.w_qkv, b.b_qkv, eps=b.eps1)
            o = attend(qkv, b.heads, b.scale)
            qkv = None
            self.r.dyn((o, 0))
            if self.ffn is None and self.chain and i + 1 < len(blocks):
                n = blocks[i + 1]
                h, qkv = self.r.block_out_in(o, h, b.wo, b.bo, b.nw3, b.nb3, b.w1, b.b1, b.w2, b.b2, n.nw1, n.nb1,
                                             n.w_qkv, n.b_qkv, eps=b.eps3, eps1=n.eps1, approximate=b.approximate)
            elif self.ffn is None:
                h = self.r.block_out(o, h, b.wo, b.bo, b.nw3, b.nb3, b.w1, b.b1, b.w2, b.b2, eps=b.eps3, approximate=b.approximate)
            elif self.ffn_input == "h":
                h, n = self.r.block_norm3(o, h, b.wo, b.bo, b.nw3, b.nb3, eps=b.eps3)
                h = self.ffn(n, h, b.w1, b.b1, b.w2, b.b2)
            else:
                if self.ffn_input == "x":
                    h = self.r.block_proj(o, h, b.wo, b.bo)
                h = self.ffn(o, h, b.wo, b.bo, b.nw3, b.nb3, b.w1, b.b1, b.w2, b.b2, eps=b.eps3)
        return h

    def __call__(self, x, mask, t, attend, static=None):
        """x (B, 320, T) packed input, mask (B, 1, T) fp32, t (B,) -> (B, 80, T) fp32; or x
        (B, 80, T) alone and ``static`` the rest of the packed input [mu | spks | cond] (B,
        240, T), concatenated by the first region (a batch's Euler steps share ``static``).

        With ``conv="native"`` the stream between regions is (B, T, C); with "gemm" it is
        (B * T, C) rows from the first resnet to the last conv, and the GEMM convs' regions
        (``*_mm``) take ``rows_aux``'s tensors after the mask."""
        est, r = self.est, self.r
        temb = est.time_mlp(est.time_embeddings(t).to(t.dtype))  # (B, 1024), tiny: stock modules
        if self.conv == "gemm":
            keep, rows_b = self._rows_aux(x.shape[0], x.shape[2], x.device)
            resnet_aux, conv_aux, aux_marks, stream_dims = (keep, rows_b), (keep,), ((keep, 0), (rows_b, 0)), (0,)
            resnet_down, resnet_mid, resnet_up = r.resnet_down_mm, r.resnet_mid_mm, r.resnet_up_mm
            causal_conv, final, blocks = r.causal_conv_mm, r.final_mm, self._row_blocks
        else:
            resnet_aux, conv_aux, aux_marks, stream_dims = (), (), (), (0, 1)
            resnet_down, resnet_mid, resnet_up = r.resnet_down, r.resnet_mid, r.resnet_up
            causal_conv, final, blocks = r.causal_conv, r.final, self._blocks
        if static is None:  # a packed input: the regions take its parts
            x, static = x[:, : self.mel_channels], x[:, self.mel_channels :]
        rw, tbs, conv = self.down
        r.dyn((x, 0, 2), (static, 0, 2), (mask, 0, 2), (temb, 0), *aux_marks)
        x = resnet_down(x, static, mask, *resnet_aux, temb, *rw.args, eps=rw.eps)
        skip = blocks(tbs, x, attend)
        r.dyn((skip, *stream_dims))
        x = causal_conv(skip, mask, *conv_aux, *conv)
        for rw, tbs in self.mid:
            r.dyn((x, *stream_dims))
            x = resnet_mid(x, mask, *resnet_aux, temb, *rw.args, eps=rw.eps)
            x = blocks(tbs, x, attend)
        rw, tbs, conv = self.up
        r.dyn((x, *stream_dims), (skip, *stream_dims))
        x = resnet_up(x, skip, mask, *resnet_aux, temb, *rw.args, eps=rw.eps)
        x = blocks(tbs, x, attend)
        r.dyn((x, *stream_dims))
        x = causal_conv(x, mask, *conv_aux, *conv)
        r.dyn((x, *stream_dims))
        return final(x, mask, *conv_aux, *self.final, eps=self.final_eps)


def sdpa_attend(bias: torch.Tensor, B: int, T: int):
    """Attention over (B * T) rows with an additive bias: the portable path (CPU, or no flash
    kernel). ``bias`` is stock's key bias (B * heads, 1, T), or a full (B, 1, T, T) one for
    packed rows (``s3gen_batched.PackedLayout``: each item's queries over its own keys)."""

    def attend(qkv, heads, scale):
        inner = qkv.shape[-1] // 3
        D = inner // heads
        q, k, v = (t.reshape(B, T, heads, D).transpose(1, 2) for t in qkv.split(inner, dim=-1))
        mask = bias if bias.dim() == 4 else bias.view(B, heads, 1, T)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
        return o.transpose(1, 2).reshape(B * T, inner)

    return attend


def flash_attend(flash, cu: torch.Tensor, used: torch.Tensor, T: int):
    """Varlen flash attention over the padded layout (row i's keys start at i * T; only its
    first ``used[i]`` are valid): the key-padding mask without a mask tensor."""

    def attend(qkv, heads, scale):
        N = qkv.shape[0]
        inner = qkv.shape[-1] // 3
        q, k, v = (t.reshape(N, heads, inner // heads) for t in qkv.split(inner, dim=-1))
        return flash(q, k, v, cu, used, T, scale).reshape(N, inner)

    return attend


