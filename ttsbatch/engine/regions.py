"""Compiled regions: small pure functions, each compiled once for every shape it will see.

Both fast models are chains of narrow GEMMs and small elementwise ops that eager PyTorch
runs as one kernel (and one trip through memory) each. Their repeated parts are written as
functions of tensors (weights are arguments), so ``torch.compile`` fuses each one into a
few kernels and one compiled graph serves every layer or block that shares its code. The
caller marks the row dimensions dynamic (:meth:`Regions.dyn`) so that new batch sizes and
lengths do not recompile; ``fullgraph`` makes a graph break an error instead of a slow path.

If compiling fails (no working Triton, say: common on Windows), every region falls back to
its eager function with one warning: slower, never a failed book.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("ttsbatch")


class Regions:
    """``functions`` (name -> function) as attributes, eager or compiled; ``what`` names
    them in the fallback warning."""

    def __init__(self, functions: dict, what: str, compile: bool = False, backend="inductor", mode: str | None = None,
                 options: dict | None = None):
        """``mode``: torch.compile's (e.g. "max-autotune-no-cudagraphs": Triton GEMM templates
        with the elementwise work fused into their epilogues, minutes of autotuning per region
        the first time). Never a CUDA-graph mode: the callers capture graphs themselves.
        ``options``: function name -> Inductor options for that region alone (with Inductor,
        without ``mode``: torch.compile takes one or the other)."""
        options = options or {}
        self._functions = dict(functions)
        self.what = what
        self.compiled = compile
        self.error: str | None = None  # why compiling failed, if it did
        for name, fn in self._functions.items():
            if compile:
                kw = {"options": options[name]} if name in options and backend == "inductor" and mode is None else {"mode": mode}
                fn = _Guarded(self, fn, torch.compile(fn, fullgraph=True, backend=backend, **kw))
            setattr(self, name, fn)

    def fall_back(self, e: BaseException) -> None:
        """Compiling failed: every region eager from now on."""
        root = e  # dynamo wraps the compiler's own error (BackendCompilerFailed): name that one
        for _ in range(8):
            inner = getattr(root, "inner_exception", None) or root.__cause__
            if inner is None:
                break
            root = inner
        self.error = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:300]}"
        log.warning("compiling %s failed (%s); running it uncompiled (slower)", self.what, self.error)
        self.compiled = False
        for name, fn in self._functions.items():
            setattr(self, name, fn)

    def dyn(self, *tensors_dims):
        """Mark (tensor, dims...) dynamic before a compiled call (no-op eager)."""
        if self.compiled:
            for t, *dims in tensors_dims:
                for d in dims:
                    torch._dynamo.mark_dynamic(t, d)

    def unbacked(self, dim: int, *tensors, shape_id: str):
        """Mark ``dim`` of each tensor as one unbacked size ``shape_id`` before a compiled call
        (no-op eager): unlike :meth:`dyn`, a size of 1 shares the graph too (dynamo gives a
        merely dynamic size of 1 a graph of its own)."""
        if self.compiled:
            for t in tensors:
                torch._dynamo.decorators.mark_unbacked(t, dim, shape_id=shape_id)


class _Guarded:
    """A compiled region whose first call may fall back (``Regions.fall_back``): until it has
    once run compiled, an exception from it is taken for a compiler failure and the call is
    run eagerly instead. Later exceptions are the region's own and propagate."""

    def __init__(self, regions: Regions, eager, compiled):
        self.regions, self.eager, self.compiled, self.proven = regions, eager, compiled, False

    def __call__(self, *args, **kwargs):
        if self.proven:
            return self.compiled(*args, **kwargs)
        if not self.regions.compiled:  # another region's failure made them all eager (a caller may hold this one)
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # a compiler failure (Triton missing, a backend error, ...)
            self.regions.fall_back(e)
            return self.eager(*args, **kwargs)
        self.proven = True
        return out
