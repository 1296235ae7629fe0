"""``GpuTrace`` on a CUDA GPU: it records kernels, its clock agrees with ``perf_counter``, and
an idle gap the host makes shows as idle (run on the device machine)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.gpu


def _burst(x, seconds: float) -> None:
    """Keep the GPU busy about ``seconds`` (back-to-back matmuls), then wait for it."""
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(20):
            x = x @ x
            x = x / x.norm()
        torch.cuda.synchronize()


def test_a_host_gap_between_bursts_reads_as_idle():
    import torch

    from ttsbatch.gpu_trace import GpuTrace

    x = torch.randn(2048, 2048, device="cuda")
    _burst(x, 0.05)  # kernels loaded before the trace starts
    with GpuTrace() as trace:
        a = time.perf_counter()
        _burst(x, 0.2)
        b = time.perf_counter()
        time.sleep(0.2)  # the GPU idles
        c = time.perf_counter()
        _burst(x, 0.2)
        d = time.perf_counter()
    assert len(trace.activities) > 100
    skew = trace.clock_skew_s()
    assert skew is not None and 0 <= skew < 0.05, skew  # the trace's clock is perf_counter's, shifted
    first = trace.report(a, b)
    assert first["window"] == "first to last batch" and first["busy"] > 0.85, first
    assert trace.report(b + 0.01, c - 0.01)["busy"] < 0.05
    whole = trace.report(a, d)["busy"]
    assert 0.4 < whole < 0.8, whole  # ~0.4 s busy of ~0.6 s
