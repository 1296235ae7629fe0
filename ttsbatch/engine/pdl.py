"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

A batch-1 decode step is ~200 small kernels in one CUDA graph; between two of them the GPU
sits idle for about a microsecond (the next grid launches only when the last block of the
previous one has finished), and each GEMV then waits again for its first weight bytes. On
Hopper a kernel launched with PDL may start while its predecessor is still running: each of
our kernels signals ``gdc_launch_dependents`` as it starts, so the next kernel's blocks are
scheduled as soon as every block of this one is, load what does not depend on the
predecessor (their weights), and block in ``gdc_wait`` until the predecessor has completed
and its writes are visible.

The rule every kernel here keeps: before ``gdc_wait`` it writes nothing and reads only what
no kernel of the running decode step writes: weights, and (the attention) KV-cache entries
of earlier steps. Those are safe because every step starts with kernels launched the usual
way (the sampling, compiled by Inductor), which start only once everything before them has
completed. Never another kernel's output, never a buffer the allocator may hand back. Since
each kernel waits for its predecessor, which waited for its own, the chain orders everything
after it. CUDA graphs keep the programmatic edges (CUDA >= 12.3).

``TTSBATCH_PDL=0`` turns it off (for comparisons); it is off below compute capability 9.0
and on the CPU (Triton's interpreter runs programs one by one).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """Whether the decode kernels on ``device`` launch with PDL."""
    if device.type != "cuda" or os.environ.get("TTSBATCH_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for launching one of the decode kernels on ``device``: its ``PDL``
    constexpr (whether it signals and waits) and, when on, Triton's ``launch_pdl``."""
    on = enabled(device)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
