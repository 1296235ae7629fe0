"""Fault injection for crash tests: ``TTSBATCH_FAULT=name[:n]`` kills the process (SIGKILL) the
n-th time (default 1st) the named point is reached. Unset, ``point`` costs one dict lookup.

Points: ``before-rename`` (an atomic write has its temporary file complete, not yet renamed),
``chunk-stored`` (a chunk is in the store), ``encoded`` (the output is encoded under its
temporary name, not yet renamed into place).
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get("TTSBATCH_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
