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


def test_engine_options_reach_the_fast_engine(tiny_checkpoint, tmp_path):
    """--engine-opt KEY=VALUE is passed to the fast engine of the book part (typed: numbers,
    true/false, words) and reported beside its numbers; --switch-interval-ms holds for the
    run only."""
    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--book", str(SAMPLES / "story.txt"),
                            "--parts", "book", "--sentences", "1", "--tokens-per-char", "0.2", "--max-chars", "300",
                            "--engine-opt", "s3gen_batch=1", "--engine-opt", "s3gen-attention=auto", "--engine-opt", "overlap=false",
                            "--switch-interval-ms", "0.5", "--json", str(out)])
    assert r.exit_code == 0, r.output
    fast = json.loads(out.read_text())["book"]["fast"]
    assert fast["switch_interval_ms"] == 0.5  # read during the run
    assert fast["gc"]["frozen"] == 0 and fast["gc"]["objects"] > 100_000  # nothing frozen without --gc-freeze
    assert sys.getswitchinterval() == pytest.approx(0.005)  # and put back after it
    assert fast["engine_options"] == {"s3gen_batch": 1, "s3gen_attention": "auto", "overlap": False}
    assert fast["s3gen_items"] >= 2 and fast["s3gen_batches"] == fast["s3gen_items"]  # one chunk per S3Gen batch


def test_gc_freeze_moves_the_loaded_objects_out_of_the_collectors_reach(tiny_checkpoint, tmp_path):
    """--gc-freeze: what is alive before the book (the models, the engine) is frozen for the
    run, the run's collections are timed, and the process is unfrozen after it."""
    import gc

    out = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--book", str(SAMPLES / "story.txt"),
                            "--parts", "book", "--sentences", "1", "--tokens-per-char", "0.2", "--max-chars", "120",
                            "--gc-freeze", "--json", str(out)])
    assert r.exit_code == 0, r.output
    g = json.loads(out.read_text())["book"]["fast"]["gc"]
    assert g["frozen"] > 100_000  # torch, the models: far more than the run makes
    assert g["objects"] < g["frozen"]  # gc.get_objects() leaves the frozen ones out
    assert gc.get_freeze_count() == 0


def test_bench_rejects_an_unknown_engine_option():
    r = runner.invoke(app, ["bench", "--parts", "book", "--engine-opt", "warp_speed=9"])
    assert r.exit_code == 2
    assert "--engine-opt warp_speed=9: expected KEY=VALUE with KEY one of" in r.stderr
    assert "s3gen_graphs" in r.stderr


def test_bench_rejects_unknown_parts():
    r = runner.invoke(app, ["bench", "--parts", "t3,gpu"])
    assert r.exit_code == 2
    assert "--parts t3,gpu: expected t3, book or both" in r.stderr


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


def test_gpu_busy_reads_nvml_through_ctypes_before_spawning_nvidia_smi(monkeypatch):
    """Without pynvml the utilization comes from the driver's NVML library (a call per
    sample), not from an nvidia-smi process per sample; with neither, no sampling."""
    import ctypes

    from ttsbatch import bench_book

    class FakeNvml:
        def nvmlInit_v2(self):
            return 0

        def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
            return 0 if index == 0 else 1

        def nvmlDeviceGetUtilizationRates(self, handle, util):
            util._obj.gpu = 73
            return 0

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml fails
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeNvml())
    source, read = bench_book.GpuBusy._reader()
    assert source == "nvml" and read() == 73
    monkeypatch.setenv("TTSBATCH_BUSY_READER", "nvidia-smi")  # the old reader, forced for comparison
    monkeypatch.setattr(bench_book.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert bench_book.GpuBusy._reader()[0] == "nvidia-smi"
    monkeypatch.delenv("TTSBATCH_BUSY_READER")

    def missing(name):
        raise OSError(name)

    monkeypatch.setattr(ctypes, "CDLL", missing)
    monkeypatch.setattr(bench_book.shutil, "which", lambda name: None)
    assert bench_book.GpuBusy._reader() == (None, None)
    busy = bench_book.GpuBusy()
    with busy:
        pass
    assert busy.source is None and busy.busy(0, 1e12) is None
