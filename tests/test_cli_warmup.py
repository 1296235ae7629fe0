"""`ttsbatch warmup`: the model loads, the voice is prepared into the cache, every path runs once."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from ttsbatch.cli import app

from .conftest import SAMPLES

runner = CliRunner()


def test_warmup_prepares_the_voice_cache_and_reports(tiny_checkpoint, tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED",
                 "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):  # unset here, restored afterwards
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    cache = tmp_path / "cache"
    args = ["warmup", "--voice", str(SAMPLES / "voice.wav"), "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--cache-dir", str(cache)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "ttsbatch: warm on cpu (stock engine)" in r.stderr
    voices = list((cache / "voices").glob("*.pt"))
    assert len(voices) == 1  # the voice's conditioning, reused by later runs
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "compile" / "triton")
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] == str(cache / "compile" / "fa4")
    assert os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"] == "1"
    r2 = runner.invoke(app, [*args, "--engine", "fast"])
    assert r2.exit_code == 0, r2.output
    assert "(fast engine)" in r2.stderr
    assert list((cache / "voices").glob("*.pt")) == voices


def test_warmup_with_a_bad_voice_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    bad = tmp_path / "v.wav"
    bad.write_bytes(b"not audio")
    r = runner.invoke(app, ["warmup", "--voice", str(bad), "--model-dir", str(tiny_checkpoint), "--device", "cpu", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


def test_warmup_renders_one_chunk_per_default_bucket_when_the_buckets_are_fine():
    """With fine S3Gen buckets (``s3gen_bucket_frames``) the warm-up renders one chunk near
    each default bucket, not one per bucket (1,024 with every even length); with the default
    buckets, one per bucket as before."""
    import types

    from ttsbatch.engine.s3gen_batched import DEFAULT_BUCKETS, BatchedS3Gen
    from ttsbatch.warmup import WarmupReport, warm_engine

    def engine(buckets):
        calls = []
        s3 = types.SimpleNamespace(is_cuda=True, buckets=tuple(buckets))
        s3.bucket_for = types.MethodType(BatchedS3Gen.bucket_for, s3)
        return types.SimpleNamespace(s3=s3, calls=calls, synthesize=lambda reqs, conds, gen: calls.append(reqs))

    default = engine(DEFAULT_BUCKETS)
    warm_engine(default, None, WarmupReport("cuda", "fast", "test"))
    assert [r.budget for r in default.calls[1]] == [b // 2 for b in DEFAULT_BUCKETS]
    fine = engine(range(2, DEFAULT_BUCKETS[-1] + 2, 2))
    warm_engine(fine, None, WarmupReport("cuda", "fast", "test"))
    assert [r.budget for r in fine.calls[1]] == [b // 2 for b in DEFAULT_BUCKETS]
    assert fine.calls[0][0].budget == 12  # the first short chunk, as ever
