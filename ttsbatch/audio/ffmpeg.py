"""The one place that runs ffmpeg: the static binary shipped by imageio-ffmpeg.

No system ffmpeg (and no ffprobe) is assumed anywhere; probing parses ``ffmpeg -i``'s banner.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ModelError


class FFmpegError(InputError):
    """ffmpeg refused a file or an option; the message carries the tail of its stderr."""


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the static ffmpeg binary inside the imageio-ffmpeg wheel (or $IMAGEIO_FFMPEG_EXE,
    which imageio-ffmpeg hands back unchecked: whether it runs shows when it is started, see
    :func:`starting_ffmpeg`)."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # missing wheel or binary: the environment is broken, not the input
        raise ModelError(f"cannot find ffmpeg ({e}); reinstall with `uv sync`") from None


def _fix() -> str:
    if os.environ.get("IMAGEIO_FFMPEG_EXE"):
        return "it comes from $IMAGEIO_FFMPEG_EXE: point that at an ffmpeg binary, or unset it"
    return "reinstall with `uv sync`"


@contextlib.contextmanager
def starting_ffmpeg():
    """Around starting an ffmpeg process: a binary that is missing, not executable or cannot run
    on this machine (another architecture, no memory to fork) is the environment's error, one
    line naming it (the OSError's text names the path), not a traceback."""
    try:
        yield
    except OSError as e:
        raise ModelError(f"cannot run ffmpeg ({e}); {_fix()}") from None


def ff_path(path: Path) -> str:
    """A path as ffmpeg must see it: "file:" stops a name like "http:x.mp3" or "concat:a|b"
    from being read as a protocol (ffmpeg takes the text before a colon as one)."""
    return "file:" + str(path)


def stderr_tail(stderr: bytes, lines: int = 4) -> str:
    """ffmpeg's complaint on one line. The cause is often first (a bad option) and the
    consequence last (cannot open output), so keep both ends; drop "[codec @ 0x..]" noise."""
    text = [re.sub(r"^(\[[^]]* @ 0x[0-9a-f]+\] )+", "", line).strip()
            for line in stderr.decode("utf-8", "replace").splitlines()]
    text = list(dict.fromkeys(line for line in text if line))  # unique, in order
    if len(text) > lines:
        text = text[: lines // 2] + text[-(lines - lines // 2):]
    return " | ".join(text)[:500] or "no output"


def run_ffmpeg(args: list[str], input: bytes | None = None, what: str = "ffmpeg") -> bytes:
    """Run ``ffmpeg <args>`` and return its stdout; failures become FFmpegError with stderr's tail.

    Like whisper's audio.py: ``check=True``, stderr captured, and a one-line error for the user.
    ``-nostdin`` keeps ffmpeg from eating the terminal when no input is piped.
    """
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", *args]
    try:
        with starting_ffmpeg():
            return subprocess.run(cmd, input=input, capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise FFmpegError(f"{what} failed: {stderr_tail(e.stderr)}") from None


@dataclass(frozen=True)
class Probe:
    """What ``ffmpeg -i`` says about a file's first audio stream."""

    duration_s: float | None  # container duration, None when ffmpeg does not know it
    sample_rate: int
    channels_desc: str  # e.g. "mono", "stereo" (informational)


_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_AUDIO = re.compile(r"Stream #\S+.*?Audio: .*?(\d+) Hz, ([^,\n]+)")


def probe(path: Path) -> Probe:
    """Duration and sample rate of ``path`` without ffprobe: ``ffmpeg -i`` prints both.

    ffmpeg exits non-zero when no output is named, so the exit code means nothing here;
    a file it cannot read has no "Audio:" stream line, which is what we check.
    """
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-i", ff_path(path)]
    with starting_ffmpeg():
        stderr = subprocess.run(cmd, capture_output=True).stderr.decode("utf-8", "replace")
    audio = _AUDIO.search(stderr)
    if audio is None:
        if "Stream #" in stderr:
            raise InputError(f"{path}: has no audio stream")
        raise InputError(f"{path}: not a readable audio file ({stderr_tail(stderr.encode(), 1)})")
    d = _DURATION.search(stderr)
    duration = int(d[1]) * 3600 + int(d[2]) * 60 + float(d[3]) if d else None
    return Probe(duration, int(audio[1]), audio[2].strip())
