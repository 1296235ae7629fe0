"""The GPU-busy measure from a trace (``ttsbatch.gpu_trace``), on hand-made activities.

The recording itself needs a CUDA GPU: ``tests/gpu/test_gpu_trace_gpu.py``."""

from __future__ import annotations

from ttsbatch.gpu_trace import Activity, GpuTrace, busy_ns, summarize


def A(start, end, stream=7, name="k"):
    return Activity(start, end, stream, name)


def test_overlapping_streams_count_once_and_gaps_not_at_all():
    acts = [A(0, 40, 7), A(30, 60, 13), A(35, 50, 7), A(80, 100, 13)]  # busy 0-60 and 80-100
    assert busy_ns(acts, 0, 100) == 80
    assert busy_ns(acts, 0, 200) == 80  # idle after the last activity counts against it


def test_the_window_clips_activities_that_cross_its_edges():
    acts = [A(0, 40), A(30, 60), A(80, 100)]
    assert busy_ns(acts, 50, 90) == 10 + 10  # 50-60 and 80-90
    assert busy_ns(acts, 60, 80) == 0
    # activities wholly after the window, while the busy time so far ends before its end
    assert busy_ns([A(0, 10), A(50, 60), A(70, 90)], 0, 20) == 10
    assert busy_ns([A(0, 10), A(50, 60)], 5, 20) == 5
    assert busy_ns([A(0, 10), A(50, 60)], 20, 40) == 0
    assert busy_ns([], 0, 10) == 0


def test_summary_sums_streams_and_kernels_over_the_whole_trace():
    ms = 1_000_000
    acts = [A(0, 40 * ms, 7, "gemm"), A(30 * ms, 60 * ms, 13, "attention"), A(60 * ms, 70 * ms, 13, "gemm"),
            A(80 * ms, 100 * ms, 7, "copy")]
    s = summarize(acts, 0, 100 * ms)
    assert s["activities"] == 4 and s["busy"] == 0.9 and s["window_s"] == 0.1
    assert s["kernels"][0] == ("gemm", 0.05, 2)
    assert list(s["streams"]) == ["7", "13"]  # stream 7 ran 60 ms, stream 13 40 ms
    assert s["streams"]["13"] == dict(seconds=0.04, busy=0.4, longest=[("attention", 0.03), ("gemm", 0.01)])
    assert s["streams"]["7"]["busy"] == 0.6
    whole = summarize(acts)  # default window: first start to last end
    assert whole["busy"] == 0.9 and whole["window_s"] == 0.1
    assert summarize(acts, 0, 200 * ms)["busy"] == 0.45
    assert summarize([]) == dict(activities=0, busy=None)


def test_kernel_times_are_summed_per_name_in_seconds():
    ms = 1_000_000
    acts = [A(0, 300 * ms, 1, "cfm"), A(300 * ms, 400 * ms, 2, "t3"), A(500 * ms, 700 * ms, 1, "cfm")]
    s = summarize(acts)
    assert s["kernels"] == [("cfm", 0.5, 2), ("t3", 0.1, 1)]
    assert s["streams"]["1"] == dict(seconds=0.5, busy=round(500 / 700, 3), longest=[("cfm", 0.5)])
    assert s["busy"] == round(600 / 700, 3)


def test_a_disabled_trace_records_nothing():
    with GpuTrace(enabled=False) as t:
        pass
    assert t.activities == [] and t.clock_skew_s() is None
    assert t.report(0.0, 1.0)["window"] == "first to last activity"


def test_the_window_falls_back_to_the_activities_when_the_clocks_disagree():
    t = GpuTrace(enabled=False)
    t._ref = (100.0, 10**18)  # perf_counter 100 s is unix 1e9 s
    t.activities = [A(10**18 + 2 * 10**6, 10**18 + 4 * 10**6), A(10**18 + 8 * 10**6, 10**18 + 10 * 10**6)]
    r = t.report(100.0, 100.010)  # the clocks agree: the window is 0-10 ms
    assert r["window"] == "first to last batch" and r["busy"] == 0.4 and r["clock_skew_s"] == 0.002
    t.activities = [A(5, 10), A(20, 30)]  # nanoseconds since some other epoch
    r = t.report(100.0, 100.010)
    assert r["window"] == "first to last activity" and r["busy"] == round(15 / 25, 3)
