"""Shared fixtures: caches in a tmp dir, no hub access, and one tiny random checkpoint per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

# huggingface_hub reads these once, at import: set them before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Triton decides at import whether its kernels (and its own jit'd helpers such as tl.zeros) are
# compiled or interpreted, and torch._dynamo imports it: so without a GPU, turn the interpreter
# on before anything does, and the decode-attention kernels run on CPU tensors
# (tests/test_decode_attention.py). With a GPU the kernels compile as in production.
import torch  # noqa: E402  (importing torch does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter holds a kernel's scalar arguments as one-element arrays and
    # turns them into loop bounds with int(), which numpy 2 refuses for a 1-d array: a loop
    # bounded by an argument (decode_attention's chunk) fails there, though it compiles and
    # runs on a GPU. Its __index__ takes the one element instead.
    import triton.runtime.interpreter as _interpreter

    _patch_tensor = getattr(_interpreter, "_patch_lang_tensor", None)
    if _patch_tensor is not None:

        def _patch_lang_tensor(tensor, scope):
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        _interpreter._patch_lang_tensor = _patch_lang_tensor

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Every test gets its own cache dir and never reaches the model hub."""
    monkeypatch.setenv("TTSBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight checkpoint of the tiny size, in the real five-file format (written once)."""
    from ttsbatch.engine.model import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"), "tiny", seed=0)


@pytest.fixture
def no_host_sync():
    """``with no_host_sync(): ...`` runs the block under CUDA sync-debug "error" (after a
    device sync): any host sync inside it raises. For the GPU tests of the no-sync paths."""
    import torch

    @contextlib.contextmanager
    def guard():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return guard


def pytest_collection_modifyitems(config, items):
    """gpu-marked tests run only where CUDA is available (the device machine)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
