"""Perth on a CUDA GPU, as a GPU run's store threads use it (run on the device machine).

``Watermarker.apply_batch`` marks padded groups of chunks in one pass; on the GPU it must
still make what ``apply`` makes of each chunk alone, and the mark must read back. Tolerance
1e-3 of full scale, 2% of what the mark moves (~5e-2): cuDNN runs Perth's convolutions in
TF32 (PyTorch's default, per chunk as much as batched) and may pick another algorithm for a
batch; cuFFT's batched plans round differently too. (On the CPU: 1e-6.)
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

SR = 24000


def test_apply_batch_on_gpu_is_apply_signal_by_signal():
    from ttsbatch.audio.watermark import Watermarker

    wm = Watermarker("cuda")
    rng = np.random.default_rng(1)
    wavs = [(0.1 * rng.standard_normal(int(SR * s))).astype(np.float32) for s in rng.uniform(0.3, 12.0, 40)]
    wavs.append(np.zeros(0, np.float32))
    alone = [wm.apply(x, SR) if len(x) else x for x in wavs]
    batched = wm.apply_batch(wavs, SR)
    for x, a, b in zip(wavs, alone, batched):
        assert len(b) == len(x)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-3)
    assert all(wm.is_marked(b, SR) for b in batched[:5])
