"""`ttsbatch bench` on the CPU with the tiny checkpoint: it runs both sides and reports them.

Only the plumbing is checked here (the numbers mean something on a GPU with the full
checkpoint; see BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys

import pytest

from typer.testing import CliRunner

from ttsbatch.cli import app

from .conftest import SAMPLES

runner = CliRunner()


def test_book_bench_runs_stock_and_the_real_pipeline(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--book", str(SAMPLES / "story.txt"),
                            "--parts", "book", "--sentences", "2", "--tokens-per-char", "0.2", "--max-chars", "300", "--json", str(out)])
    assert r.exit_code == 0, r.output
    b = json.loads(out.read_text())["book"]
    assert b["stock"]["chunks"] == 2 and b["stock"]["audio_s"] > 0
    fast = b["fast"]
    assert fast["watermark_score"] >= 0.5 and fast["output_bytes"] > 0  # the MP3 was written and verified
    assert 0 < fast["chunk_audio_s"] <= fast["audio_s"]  # the output adds pauses to the chunks
    assert fast["s3gen_items"] <= b["chunks"] and fast["t3"]["steps"] > 0
    tail = fast["tail_s"]  # the track's end split into its parts
    assert {"finish", "finish_append", "finish_encode", "publish", "verify"} <= set(tail)
    assert tail["finish_append"] + tail["finish_encode"] <= tail["finish"] + 0.02
    assert b["chars"] < 600  # --max-chars cut the book
    assert "speedup_vs_stock" in b
    # S3Gen's thread, span by span: a wait for T3's collection before each collection's work
    spans = fast["host_timeline"]["spans"]
    assert [s[0] for s in spans] == ["t3_wait", "s3gen"] * fast["host_timeline"]["collections"] + ["t3_wait"]
    assert all(0 <= a <= b <= fast["wall_s"] for _, a, b, _ in spans)
    assert all(x[2] <= y[1] for x, y in zip(spans, spans[1:]))  # one after another
    assert sum(n for what, _, _, n in spans if what == "s3gen") == fast["s3gen_items"]


def test_engine_options_reach_the_fast_engine(tiny_checkpoint, tmp_path):
    """--engine-opt KEY=VALUE is passed to the fast engine of the book part (typed: numbers,
    true/false, words) and reported beside its numbers; --switch-interval-ms and the
    pipeline's settings (--mark-group, --track-thread, --store-workers-at-end) hold for the
    run only; --gpu-trace is taken (a CUDA GPU's, so nothing on the CPU)."""
    from ttsbatch import pipeline

    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--book", str(SAMPLES / "story.txt"),
                            "--parts", "book", "--sentences", "1", "--tokens-per-char", "0.2", "--max-chars", "300",
                            "--engine-opt", "s3gen_batch=1", "--engine-opt", "s3gen-attention=auto", "--engine-opt", "overlap=false",
                            "--switch-interval-ms", "0.5", "--mark-group", "1", "--track-thread", "--store-workers-at-end", "3",
                            "--gpu-trace", "--json", str(out)])
    assert r.exit_code == 0, r.output
    fast = json.loads(out.read_text())["book"]["fast"]
    assert fast["switch_interval_ms"] == 0.5  # read during the run
    assert fast["gc"]["objects"] > 100_000  # the GC report of the run
    assert sys.getswitchinterval() == pytest.approx(0.005)  # and put back after it
    assert fast["mark_group"] == 1 and pipeline.MARK_GROUP == 32
    assert fast["track_process"] is False and pipeline.TRACK_PROCESS is True
    assert fast["store_workers_at_end"] == 3 and pipeline.STORE_WORKERS_AT_END == 2
    assert fast["engine_options"] == {"s3gen_batch": 1, "s3gen_attention": "auto", "overlap": False}
    assert fast["s3gen_items"] >= 2 and fast["s3gen_batches"] == fast["s3gen_items"]  # one chunk per S3Gen batch
    assert fast["gpu_trace"] is None  # --gpu-trace traces a CUDA GPU only


def test_bench_rejects_an_unknown_engine_option():
    r = runner.invoke(app, ["bench", "--parts", "book", "--engine-opt", "warp_speed=9"])
    assert r.exit_code == 2
    assert "--engine-opt warp_speed=9: expected KEY=VALUE with KEY one of" in r.stderr
    assert "s3gen_graphs" in r.stderr


def test_bench_rejects_unknown_parts():
    r = runner.invoke(app, ["bench", "--parts", "t3,gpu"])
    assert r.exit_code == 2
    assert "--parts t3,gpu: expected some of t3, s3gen, book" in r.stderr


def test_t3_bench_runs_the_fast_engine_on_the_asked_number_of_sentences(tiny_checkpoint, tmp_path):
    """--fast-sentences sets the fast engine's at-scale run (more sentences than rows: refills)."""
    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--parts", "t3", "--sentences", "2",
                            "--fast-sentences", "6", "--tokens-per-char", "0.1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    t3 = json.loads(out.read_text())["t3"]
    assert t3["fast_sentences"] == 6
    assert t3["fast_scale"]["tokens"] > t3["fast_same"]["tokens"] > 0  # 6 sentences against the same 2
    assert t3["stock"]["tokens"] == t3["fast_same"]["tokens"]  # the same budget on both sides


def test_gc_timer_counts_and_times_the_collections_inside_it():
    import gc

    from ttsbatch.bench_book import GcTimer

    with GcTimer() as t:
        junk = [[i] for i in range(50_000)]  # container objects: generation-0 collections
        gc.collect()  # and one full collection
    after = t.report()
    del junk
    gc.collect()
    assert after["collections"][0] > 0 and after["collections"][2] >= 1
    assert 0 < after["seconds"] and after["longest_ms"] > 0
    assert t.report() == after  # outside the block nothing is counted


def test_gpu_busy_reads_nvml_else_nvidia_smi_else_nothing(monkeypatch):
    """The utilization comes from NVML through pynvml (a call per sample) where it is
    installed, else from nvidia-smi (a process per sample); with neither, no sampling."""
    import types

    from ttsbatch import bench_book

    class Util:
        gpu = 73

    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: ("gpu", i),
                                 nvmlDeviceGetUtilizationRates=lambda h: Util if h == ("gpu", 0) else None)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    source, read = bench_book.GpuBusy._reader()
    assert source == "pynvml" and read() == 73
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails
    monkeypatch.setattr(bench_book.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert bench_book.GpuBusy._reader()[0] == "nvidia-smi"
    monkeypatch.setattr(bench_book.shutil, "which", lambda name: None)
    assert bench_book.GpuBusy._reader() == (None, None)
    busy = bench_book.GpuBusy()
    with busy:
        pass
    assert busy.source is None and busy.busy(0, 1e12) is None


def test_s3gen_bench_renders_every_chunk_and_reports_the_cfm_rate(tiny_checkpoint, tmp_path):
    """--parts s3gen: the S3Gen stage alone over the book's chunks, its stages split, and the
    CFM estimator's useful work counted from the items' lengths."""
    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--book", str(SAMPLES / "story.txt"),
                            "--parts", "s3gen", "--tokens-per-char", "0.1", "--max-chars", "300", "--json", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())["s3gen"]
    assert s["chunks"] >= 2 and s["batches"] >= 1
    # every chunk rendered: 2 mel frames a token, 480 samples a frame at 24 kHz
    assert 0.6 * s["tokens"] < s["s3gen_tokens"] < s["tokens"]  # T3's special ids dropped, as the engine does
    assert s["chunk_audio_s"] == pytest.approx(s["s3gen_tokens"] * 0.04, abs=0.01)
    assert s["x_realtime"] == pytest.approx(s["chunk_audio_s"] / s["wall_s"], rel=0.02, abs=0.006)  # both rounded
    assert all(v > 0 for v in s["stages_s"].values())
    # the useful frames are each item's prompt + its own frames; the estimator ran over at least those
    assert s["cfm_useful_frames"] == s["chunks"] * s["prompt_frames"] + 2 * s["s3gen_tokens"]
    assert s["cfm_frames"] >= s["cfm_useful_frames"]
    m = s["cfm_flop_model"]
    assert m["c2"] > 0 and m["c1"] > 0  # the attention's work is counted, and the GEMMs'
    # the useful work is the model's over each item's frames (prompt + its own), 2 CFG halves, 10 steps
    L = s["prompt_frames"] + 2 * s["s3gen_tokens"] / s["chunks"]  # the items' mean length
    # (at least the model at the mean length: the attention's term is convex)
    assert s["cfm_useful_flop"] >= 20 * s["chunks"] * (m["c0"] + m["c1"] * L + m["c2"] * L * L) * (1 - 1e-9)
    assert s["cfm_useful_flop"] <= 20 * s["chunks"] * (m["c0"] + m["c1"] * L + m["c2"] * L * L) * 1.1
    assert s["cfm_tflops"] == pytest.approx(s["cfm_useful_flop"] / 1e12 / s["stages_s"]["cfm"], rel=0.01, abs=5e-4)  # both rounded
    assert s["peak_tflops"] is None and "ceiling" not in s  # a CPU has no bf16 peak in the table


def test_cfm_flop_model_matches_the_flop_counter_at_other_lengths(tiny_checkpoint):
    """The quadratic fitted at three lengths is exact at others: the estimator's FLOPs are a
    constant, a per-frame and a per-frame-pair term (the attention)."""
    from ttsbatch.bench_s3gen import cfm_flop_model, estimator_flops
    from ttsbatch.engine.model import load_model

    est = load_model(tiny_checkpoint, "cpu").s3gen.flow.decoder.estimator
    m = cfm_flop_model(est)
    for L in (5, 37, 100):
        assert m(L) == estimator_flops(est, L, "cpu")
    assert m.item(37, 10) == 2 * 10 * m(37)


def test_peak_tflops_by_gpu_name():
    from ttsbatch.bench_s3gen import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None
