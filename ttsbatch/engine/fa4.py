"""FlashAttention 4's varlen forward for the CFM estimator, launched without its Python front end.

FA4 (flash-attn-4, a CuTe DSL kernel for Hopper) is 1.3-1.5x PyTorch's FA2 per call at the
estimator's shapes (BENCHMARKS.md, eleventh session), but ``flash_attn_varlen_func`` spends
hundreds of microseconds of Python per call before its kernel starts: an autograd Function,
~1,000 lines of checks, a compile key built from ~40 values, tensors wrapped. The estimator
calls it 56 times per Euler step with the same layout (the same ``cu_seqlens`` and
``seqused_k`` tensors, the same scale, queries of the same shape and strides), and in a book
that Python, on S3Gen's thread and under the GIL the other threads want, cost more than the
faster kernel saved (55.6 s against 53.4 s with FA2).

The compiled kernel itself takes torch tensors directly (FA4 compiles with TVM FFI; its
layouts are dynamic, so one compiled kernel serves every shape). :class:`FA4Varlen` makes
the first call of a layout through the public function, with FA4's compile cache wrapped so
that the compiled callable and its exact arguments are recorded; every later call with the
same ``cu``/``used`` objects, scale, shape, strides and dtype calls that callable directly
with new q, k, v and output tensors in the recorded slots. Same kernel, same arguments:
the output is the public function's, bit for bit (GPU test).

A layout is the caller's two index tensors *as objects* (held by the plan, so an id is never
reused while planned): the estimator builds them once per Euler step, so one call in 56 takes
the public path. If recording does not find exactly the arguments it expects (another FA4
version), every call takes the public path: slower, never wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("ttsbatch")


@dataclass
class _Plan:
    cu: torch.Tensor  # the layout's tensors, held: identity is the key
    used: torch.Tensor
    T: int
    scale: float
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    launch: object  # FA4's compiled callable
    args: list  # its recorded positional arguments
    slots: tuple  # positions of q, k, v and the output in args


class _Recorder:
    """Stands in for one compiled callable of FA4's cache: calls it and keeps the arguments."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __call__(self, *args):
        self.calls.append((self.fn, args))
        return self.fn(*args)


class _RecordingCache:
    """FA4's compile cache (a dict-like keyed by compile key), handing out recorders."""

    def __init__(self, cache, calls: list):
        self.cache, self.calls = cache, calls

    def __contains__(self, key):
        return key in self.cache

    def __getitem__(self, key):
        return _Recorder(self.cache[key], self.calls)

    def __setitem__(self, key, value):
        self.cache[key] = value

    def __getattr__(self, name):  # anything else FA4 asks of its cache
        return getattr(self.cache, name)


class FA4Varlen:
    """``(q, k, v, cu, used, T, scale) -> out`` as ``BatchedS3Gen._flash_fa2``: varlen attention
    over the padded layout (row i's queries and keys start at ``cu[i]``, its first ``used[i]``
    keys valid), q/k/v (N, heads, D). ``interface`` is ``flash_attn.cute.interface`` (a
    stand-in in the CPU tests)."""

    def __init__(self, interface=None):
        if interface is None:
            from flash_attn.cute import interface
        self.iface = interface
        self.plan: _Plan | None = None
        self.direct = True  # False once recording failed: the public path from then on
        self.public_calls = 0
        self.direct_calls = 0

    def __call__(self, q, k, v, cu, used, T, scale):
        p = self.plan
        if (
            p is not None and p.cu is cu and p.used is used and p.T == T and p.scale == scale
            and q.shape == p.shape and k.shape == p.shape and v.shape == p.shape and q.stride() == p.stride and k.stride() == p.stride and v.stride() == p.stride
            and q.dtype == p.dtype and k.dtype == p.dtype and v.dtype == p.dtype and q.device == p.device
        ):
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            args = list(p.args)
            for i, t in zip(p.slots, (q, k, v, out)):
                args[i] = t
            p.launch(*args)
            self.direct_calls += 1
            return out
        return self._public(q, k, v, cu, used, T, scale)

    def _public(self, q, k, v, cu, used, T, scale):
        """The public function; when direct launches are on, recorded for the calls after it."""
        self.public_calls += 1
        fwd = self.iface._flash_attn_fwd if self.direct else None
        cache = getattr(fwd, "compile_cache", None)
        calls: list = []
        if cache is not None:
            fwd.compile_cache = _RecordingCache(cache, calls)
        try:
            out = self.iface.flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, seqused_k=used,
                softmax_scale=scale,
            )
        finally:
            if cache is not None:
                fwd.compile_cache = cache
        out = out[0] if isinstance(out, tuple) else out
        if cache is not None:
            self.plan = self._record(calls, q, k, v, out, cu, used, T, scale)
        return out

    def _record(self, calls, q, k, v, out, cu, used, T, scale) -> _Plan | None:
        """The plan for this layout from the one kernel launch the public call made, or None
        (and the public path for good) if the launch is not the one expected."""
        slots = None
        if len(calls) == 1:
            launch, args = calls[0]
            found = []
            for t in (q, k, v, out):
                hits = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.data_ptr() == t.data_ptr()
                        and a.shape == t.shape and a.stride() == t.stride()]
                found.append(hits[0] if len(hits) == 1 else None)
            if None not in found and len(set(found)) == 4:
                slots = tuple(found)
        if slots is None:
            self.direct = False
            log.warning("FlashAttention 4: its launch was not recorded as expected (%d launches); every call "
                        "takes its public path", len(calls))
            return None
        args = list(args)
        for i in slots:  # filled per call: holding this call's tensors would keep their memory
            args[i] = None
        return _Plan(cu, used, T, scale, tuple(q.shape), q.stride(), q.dtype, q.device, launch, args, slots)
