"""`--engine` and `--max-vram`: which engine renders, and bad combinations refused up front."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from ttsbatch.audio.watermark import THRESHOLD
from ttsbatch.cli import app
from ttsbatch.engine.select import FAST_BATCH, choose_engine
from ttsbatch.errors import InputError

from .conftest import SAMPLES

runner = CliRunner()
QUICK = ["--device", "cpu", "--tokens-per-char", "0.2", "--ignore-eos", "--quiet", "--cfm-steps", "2"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_auto_is_fast_on_cuda_and_stock_on_cpu():
    assert choose_engine("auto", "cuda", None, None).name == "fast"
    assert choose_engine("auto", "cuda:1", None, 24).batch_size == FAST_BATCH
    assert choose_engine("auto", "cpu", None, None) == choose_engine("stock", "cpu", None, None)
    assert choose_engine("auto", "cpu", None, None).batch_size == 1
    assert choose_engine("fast", "cpu", 7, None).batch_size == 7
    with pytest.raises(InputError, match="--max-vram applies to the fast engine"):
        choose_engine("stock", "cuda", None, 24)
    with pytest.raises(InputError, match="positive"):
        choose_engine("fast", "cuda", None, 0)


def test_fast_engine_renders_a_marked_book_on_the_cpu(tiny_checkpoint, tmp_path):
    out = tmp_path / "story.wav"
    r = run(SAMPLES / "story.txt", "-o", out, "--model-dir", tiny_checkpoint, "--engine", "fast", *QUICK)
    assert r.exit_code == 0, r.output
    score = re.search(r"watermark score (\d\.\d\d)", r.stderr)
    assert score and float(score.group(1)) >= THRESHOLD, r.stderr
    index = [json.loads(line) for line in (tmp_path / ".story.wav.ttsbatch" / "index.jsonl").read_text().splitlines()]
    assert index and {e["engine"] for e in index} == {"fast"}
    # Stock and fast sample differently, so their chunks never stand in for each other.
    r2 = run(SAMPLES / "story.txt", "-o", out, "--model-dir", tiny_checkpoint, "--engine", "stock", *QUICK)
    assert r2.exit_code == 0, r2.output
    assert "0 reused" in r2.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engine", "turbo"], "--engine turbo: expected one of auto, stock, fast"),
        (["--engine", "stock", "--max-vram", "24"], "--max-vram applies to the fast engine"),
    ],
)
def test_bad_engine_options_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, args, message):
    r = run(SAMPLES / "story.txt", "-o", tmp_path / "x.wav", "--model-dir", tiny_checkpoint, *QUICK, *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert not (tmp_path / "x.wav").exists()
