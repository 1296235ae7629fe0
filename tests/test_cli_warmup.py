"""`ttsbatch warmup`: the model loads, the voice is prepared into the cache, every path runs once."""

from __future__ import annotations

import os

from typer.testing import CliRunner

from ttsbatch.cli import app

from .conftest import SAMPLES

runner = CliRunner()


def test_warmup_prepares_the_voice_cache_and_reports(tiny_checkpoint, tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # unset here, restored afterwards
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
