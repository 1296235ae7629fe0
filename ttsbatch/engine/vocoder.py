"""S3Gen's HiFiGAN vocoder (chatterbox's ``HiFTGenerator.decode``) as a few pure functions.

After ``conv_pre`` the vocoder is three upsampling stages at 8x, 40x and 120x the mel frame
rate, each a transposed conv, the source branch (a strided conv of the source's STFT and a
ResBlock) and the mean of three ResBlocks; a ResBlock unit is Snake -> dilated conv -> mask
-> Snake -> conv -> mask -> residual add. Eager, every Snake, mask and add is its own kernel
and its own trip through memory between the cuDNN convs, at up to 120x the frame rate.

Here each stage is one function of tensors (weights prepared once, Snake's ``1 / alpha`` as
stock computes it) that ``torch.compile`` turns into the stage's convs with the elementwise
work fused around them, and ``post`` is conv_post with stock's magnitude/phase and the polar
form its inverse STFT starts with. The masks are built inside from each row's valid length,
so they are fused too. Rows are marked unbacked and time dynamic, so one graph per region
serves every batch size (one row included) and every bucket.

Each stage has its own copy of the function's code (:func:`stage_function`): dynamo keeps
graphs per code object, and one function called with three geometries (strides, paddings,
kernel sizes, channels) would be recompiled with them turned into symbols; per stage, each
compiles once with its geometry static, as the convs want it.

Layout (``conv2d``): cuDNN runs an fp32 (TF32) conv on a Hopper GPU in NHWC, so every conv
of a channels-first (B, C, T) tensor is wrapped in two transposes (NCHW -> NHWC and back:
~0.5 s of a 2-hour book's GPU time for the NHWC -> NCHW ones alone, twenty-eighth session's
trace). With ``conv2d`` the regions take (B, C, 1, T) tensors and call ``conv2d`` with (1, k)
kernels (weights channels-last): the same math (PyTorch runs a conv1d as that conv2d), and,
compiled, Inductor keeps them channels-last inside each region, the convs in cuDNN's layout
and its elementwise kernels over the same (``force_layout_optimization``: Inductor's own
heuristic skips graphs with dynamic shapes).
**Not working compiled yet** (``BatchedS3Gen(vocoder_conv2d=True)``, off): on an H100 every
try failed Inductor's generated stride check on a (B, 256, 1, T) buffer (expected
channels-first, cuDNN's was channels-last), whether the regions' inputs were channels-last
or channels-first and the transposed conv inside them or not, so the regions fell back to
eager. The eager run measured what it is worth (64 book-like chunks,
``scripts/gpu_vocoder_layout.py``): cuDNN's layout work 10 ms (its convertTensor 8.9, transposes
1.2) against conv1d's 35.6 ms of transposes, its conv kernels about as fast as conv1d's (the 12
longest kernels of each: 38.5 ms of convs against 44.6): ~25 ms of the compiled batch's 127.

Numerics: convs in ``dtype`` with fp32 outputs; Snake, masks and the residual stream fp32;
``conv_post`` fp32 (its output is exponentiated; it is ~2% of the FLOPs). In fp32 the
functions are stock's math: the CPU tests compare them with stock ``S3Gen.inference``. The
sine source, the f0 predictor and the (i)STFT stay outside, fp32.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .regions import Regions

# ---------------------------------------------------------------------------------------------
# The regions: pure functions of tensors (compiled as they are on CUDA)


def snake(x, alpha, inv_alpha):
    """chatterbox's ``Snake``: x + 1 / (alpha + 1e-9) * sin(alpha * x)^2, the reciprocal
    prepared (``inv_alpha``, computed as stock computes it per call). alpha (1, C, 1) fp32."""
    return x + inv_alpha * torch.pow(torch.sin(x * alpha), 2)


def _conv(x, w, b, geometry):
    """``conv1d`` in the weights' dtype, fp32 out; geometry (stride, padding, dilation). With
    a 4-D weight (C_out, C_in, 1, k) the same conv as ``conv2d`` over (B, C, 1, T)."""
    if w.dim() == 4:
        stride, padding, dilation = geometry
        return F.conv2d(x.to(w.dtype), w, b, (1, stride), (0, padding), (1, dilation)).float()
    return F.conv1d(x.to(w.dtype), w, b, *geometry).float()


def _conv_transpose(x, w, b, up):
    """``conv_transpose1d`` (``up``: stride, padding, output padding, groups, dilation), as
    ``conv_transpose2d`` over (B, C, 1, T) with a 4-D weight."""
    if w.dim() == 4:
        stride, padding, out_padding, groups, dilation = up
        return F.conv_transpose2d(x, w, b, (1, stride), (0, padding), (0, out_padding), groups, (1, dilation))
    return F.conv_transpose1d(x, w, b, *up)


def _valid(lengths, x):
    """(B, 1, T) fp32 ((B, 1, 1, T) for a 4-D x): 1 where a frame of x is within its row's
    length, else 0."""
    keep = torch.arange(x.shape[-1], device=x.device) < lengths.unsqueeze(1)
    return keep.view(keep.shape[0], *([1] * (x.dim() - 2)), keep.shape[1]).float()


def _resblock(x, mask, units, geometries):
    """``ResBlock.forward`` with every conv's output masked (so the next conv's zero padding
    is what stock sees at the row's end). units: per dilation (alpha1, inv_alpha1, w1, b1,
    alpha2, inv_alpha2, w2, b2); geometries: per dilation the two convs' geometry."""
    for (a1, i1, w1, b1, a2, i2, w2, b2), (g1, g2) in zip(units, geometries):
        xt = _conv(snake(x, a1, i1), w1, b1, g1) * mask
        xt = _conv(snake(xt, a2, i2), w2, b2, g2) * mask
        x = xt + x
    return x


def stage(x, s_stft, lengths, up_w, up_b, down_w, down_b, source, kernels, *, slope: float, up: tuple,
          reflect: tuple, down: tuple, source_geometry: tuple, kernel_geometries: tuple):
    """One upsampling stage of ``HiFTGenerator.decode``, each conv's output masked to the
    row's ``lengths`` (B,) at the stage's output rate: leaky ReLU -> transposed conv (``up``:
    stride, padding, output padding, groups, dilation) -> reflection pad (``reflect``, the last
    stage) -> + the source branch (strided conv of ``s_stft`` (B, n_fft + 2, F) fp32, then a
    ResBlock) -> the mean of the kernels' ResBlocks. x (B, C, T) fp32 -> (B, C / 2, T') fp32."""
    x = F.leaky_relu(x, slope)
    x = _conv_transpose(x.to(up_w.dtype), up_w, up_b, up).float()
    if reflect:  # (reflection padding of the last dim takes a 2-D or 3-D tensor)
        x = F.pad(x.squeeze(2), reflect, mode="reflect").unsqueeze(2) if x.dim() == 4 else F.pad(x, reflect, mode="reflect")
    mask = _valid(lengths, x)
    x = x * mask
    si = _conv(s_stft, down_w, down_b, down) * mask
    x = x + _resblock(si, mask, source, source_geometry)
    xs = None
    for units, geometries in zip(kernels, kernel_geometries):
        y = _resblock(x, mask, units, geometries)
        xs = y if xs is None else xs + y
    return xs / len(kernels)


def post(x, w, b, *, padding: int, bins: int):
    """leaky ReLU (stock's default slope) -> ``conv_post`` -> stock's magnitude (exp of the
    first ``bins`` channels) and phase (sin of the rest) -> the clip and polar form its
    inverse STFT starts with: (real, imag), each (B, bins, F) fp32."""
    x = _conv(F.leaky_relu(x), w, b, (1, padding, 1))
    magnitude = torch.clip(torch.exp(x[:, :bins]), max=1e2)
    phase = torch.sin(x[:, bins:])
    return magnitude * torch.cos(phase), magnitude * torch.sin(phase)


@functools.cache
def stage_function(i: int):
    """:func:`stage` with a code object of its own for stage ``i`` (named ``stage_i``): dynamo
    caches graphs, and remembers which inputs changed between calls, per code object (see the
    module docstring). Made once per process, so every ``BatchedS3Gen`` shares its graphs."""
    name = f"stage_{i}"
    code = stage.__code__.replace(co_name=name, co_qualname=name)
    fn = types.FunctionType(code, stage.__globals__, name, stage.__defaults__, stage.__closure__)
    fn.__kwdefaults__ = stage.__kwdefaults__
    return fn


# ---------------------------------------------------------------------------------------------
# Weights and geometry, prepared once


def _w(t, dtype, conv2d: bool = False):
    """A weight as a plain tensor (weight norm's parametrization evaluated once) in ``dtype``;
    a conv's (C_out, C_in, k) as (C_out, C_in, 1, k) in channels-last memory with ``conv2d``
    (biases stay 1-D)."""
    if t is None:
        return None
    t = t.detach().to(dtype)
    if conv2d and t.dim() == 3:
        return t.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _geometry(conv) -> tuple:
    """A ``Conv1d``'s (stride, padding, dilation) as Python ints (some are numpy ints)."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"unsupported HiFiGAN conv: {conv}")
    return int(conv.stride[0]), int(conv.padding[0]), int(conv.dilation[0])


def _snake(act, conv2d: bool = False):
    """(alpha, 1 / (alpha + eps)) of a ``Snake``, (1, C, 1) fp32 ((1, C, 1, 1) with ``conv2d``),
    as its forward computes them."""
    alpha = act.alpha.detach().float().view(1, -1, 1, 1) if conv2d else act.alpha.detach().float().view(1, -1, 1)
    if act.alpha_logscale:
        alpha = torch.exp(alpha)
    return alpha.contiguous(), (1.0 / (alpha + act.no_div_by_zero)).contiguous()


def _resblock_weights(rb, dtype, conv2d: bool = False):
    """A ``ResBlock``'s (units, geometries), as :func:`_resblock` takes them."""
    units, geometries = [], []
    for c1, c2, a1, a2 in zip(rb.convs1, rb.convs2, rb.activations1, rb.activations2):
        units.append((*_snake(a1, conv2d), _w(c1.weight, dtype, conv2d), _w(c1.bias, dtype),
                      *_snake(a2, conv2d), _w(c2.weight, dtype, conv2d), _w(c2.bias, dtype)))
        geometries.append((_geometry(c1), _geometry(c2)))
    return tuple(units), tuple(geometries)


@dataclass(frozen=True)
class _Stage:
    weights: tuple  # the tensor arguments of stage() after (x, s_stft, lengths), in order
    geometry: dict  # its keyword arguments: Python ints, static in a compiled graph
    rate: int  # upsampling factor: a row's valid length is lengths * rate + extra after it
    extra: int


def _stage_weights(hift, i: int, dtype, conv2d: bool = False) -> _Stage:
    up, down = hift.ups[i], hift.source_downs[i]
    if up.groups != 1 or up.padding_mode != "zeros":
        raise ValueError(f"unsupported HiFiGAN upsampling conv: {up}")
    source_units, source_geometry = _resblock_weights(hift.source_resblocks[i], dtype, conv2d)
    kernels = [_resblock_weights(rb, dtype, conv2d) for rb in hift.resblocks[i * hift.num_kernels : (i + 1) * hift.num_kernels]]
    last = i == hift.num_upsamples - 1
    reflect = tuple(int(p) for p in hift.reflection_pad.padding) if last else ()
    weights = (
        _w(up.weight, dtype, conv2d), _w(up.bias, dtype), _w(down.weight, dtype, conv2d), _w(down.bias, dtype),
        source_units, tuple(units for units, _ in kernels),
    )
    geometry = dict(
        slope=float(hift.lrelu_slope),
        up=(int(up.stride[0]), int(up.padding[0]), int(up.output_padding[0]), 1, int(up.dilation[0])),
        reflect=reflect, down=_geometry(down), source_geometry=source_geometry,
        kernel_geometries=tuple(g for _, g in kernels),
    )
    return _Stage(weights, geometry, int(up.stride[0]), sum(reflect))


class FusedVocoder:
    """``HiFTGenerator.decode`` from the mel and the source's STFT to the spectrum its inverse
    STFT takes, over prepared weights (``dtype``: the convs but conv_post's) and :func:`regions`
    (made with the same ``conv2d``: see the module docstring)."""

    def __init__(self, hift, dtype: torch.dtype, regions: Regions, conv2d: bool = False):
        self.r = regions
        self.conv2d = conv2d
        self.pre = (_w(hift.conv_pre.weight, dtype), _w(hift.conv_pre.bias, dtype), _geometry(hift.conv_pre))
        self.stages = [_stage_weights(hift, i, dtype, conv2d) for i in range(hift.num_upsamples)]
        cp = hift.conv_post
        self.post = (_w(cp.weight, torch.float32, conv2d), _w(cp.bias, torch.float32))  # exponentiated after: fp32
        self.post_geometry = dict(padding=_geometry(cp)[1], bins=int(hift.istft_params["n_fft"]) // 2 + 1)

    def __call__(self, mel, mel_mask, s_stft, n_frames):
        """mel (B, 80, T) and its mask (B, 1, T) fp32, s_stft (B, n_fft + 2, F) fp32 zero past
        each row's STFT frames, n_frames (B,) -> (real, imag) (B, n_fft / 2 + 1, F) fp32."""
        w, b, g = self.pre
        x = _conv(mel, w, b, g) * mel_mask  # conv_pre at the frame rate: one conv, nothing to fuse
        if self.conv2d:  # (B, C, 1, T): the regions make it channels-last inside (see _layout)
            x, s_stft = x.unsqueeze(2), s_stft.unsqueeze(2)
        lengths = n_frames
        for i, st in enumerate(self.stages):
            lengths = lengths * st.rate + st.extra
            x = self._layout(x)
            self._dyn(x, s_stft, lengths)
            x = getattr(self.r, f"stage_{i}")(x, s_stft, lengths, *st.weights, **st.geometry)
        x = self._layout(x)
        self._dyn(x)
        real, imag = self.r.post(x, *self.post, **self.post_geometry)
        return (real.squeeze(2), imag.squeeze(2)) if self.conv2d else (real, imag)

    def _layout(self, x):
        """With ``conv2d``, a region's input channels-first contiguous, as dynamo sees it: for a
        channels-last (B, C, 1, T) tensor with T dynamic, dynamo's fake input came out
        channels-first (the size-1 dim leaves the stride order ambiguous), and the compiled
        region's stride check failed on the real one (an H100, twenty-eighth session). Inside,
        Inductor's layout optimization makes it channels-last once, before the first conv."""
        return x.contiguous() if self.conv2d else x

    def _dyn(self, *tensors):
        """Before a compiled call: the rows (dim 0) of every tensor one unbacked size, so that a
        batch of one row shares the graph (dynamo gives a size of 1 a graph of its own when the
        size is merely dynamic), and time (the last dim) dynamic. No-op eager."""
        self.r.unbacked(0, *tensors, shape_id="rows")
        self.r.dyn(*((t, t.dim() - 1) for t in tensors if t.dim() > 1))


def regions(n_stages: int, compile: bool = False, backend="inductor", conv2d: bool = False) -> Regions:
    """The vocoder's regions: ``stage_0`` .. ``stage_{n_stages - 1}`` and ``post``, eager or
    compiled (see ``engine.regions``); with ``conv2d``, Inductor keeps their tensors in
    channels-last memory (its layout optimization forced on)."""
    functions = {f"stage_{i}": stage_function(i) for i in range(n_stages)}
    functions["post"] = post
    options = {name: {"force_layout_optimization": True} for name in functions} if conv2d else None
    return Regions(functions, "S3Gen's HiFiGAN vocoder", compile, backend, options=options)
