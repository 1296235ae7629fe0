"""Model loading: random checkpoints in the real format, sizes read off the tensors, clear errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ttsbatch.config import GenerationOptions
from ttsbatch.engine import model as M
from ttsbatch.engine.stock import StockEngine, SynthesisRequest
from ttsbatch.engine.voice import BUILTIN, VoiceCache, conditionals_from_wav, read_voice
from ttsbatch.errors import InputError, ModelError

from .conftest import SAMPLES


def test_random_checkpoint_is_the_five_file_format(tiny_checkpoint):
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == sorted(M.CHECKPOINT_FILES)
    assert M.random_size_of(tiny_checkpoint) == "tiny"


def test_tiny_loads_through_the_real_path_and_sizes_come_from_tensors(tiny_checkpoint, caplog, monkeypatch):
    monkeypatch.setattr(M, "_CACHE", {})  # load for real, not from this process's cache
    with caplog.at_level(logging.WARNING, logger="ttsbatch"):
        m = M.load_model(tiny_checkpoint, "cpu")
    assert "noise" in caplog.text  # random weights are labelled
    assert m.random_size == "tiny"
    assert len(m.t3.tfmr.layers) == 2
    assert m.t3.tfmr.layers[0].mlp.gate_proj.weight.shape == (1024, 1024)
    assert len(m.s3gen.flow.encoder.encoders) == 1
    assert len(m.s3gen.flow.decoder.estimator.mid_blocks) == 1
    # Every tensor of the file landed in the module: nothing silently left at random init.
    from safetensors.torch import load_file

    for name, module in (("t3_cfg", m.t3), ("s3gen", m.s3gen), ("ve", m.ve)):
        saved = load_file(tiny_checkpoint / f"{name}.safetensors")
        state = module.state_dict()
        assert set(saved) <= set(state)
        for k, v in saved.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_full_size_shapes_are_inferred_from_a_full_state_dict():
    """The real model's shapes (built on the meta device: no memory) are recognised as Llama_520M."""
    with torch.device("meta"):
        t3 = M.build_t3(30, 4096)
        s3 = M.build_s3gen()
    assert M._t3_shape(t3.state_dict()) == (30, 4096, 704)
    assert M._llama_config_name(30, 4096) == "Llama_520M"
    depths = M._stack_depths(s3.state_dict())
    assert depths["flow.encoder.encoders"] == 6
    assert depths["flow.encoder.up_encoders"] == 4
    assert depths["flow.decoder.estimator.mid_blocks"] == 12
    assert depths["tokenizer.encoder.blocks"] == 6


def test_model_dir_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        M.resolve_model_dir(tmp_path / "nope")
    with pytest.raises(InputError, match="missing ve.safetensors"):
        M.resolve_model_dir(tmp_path)


def test_no_hub_access_says_what_to_do():
    # conftest sets HF_HUB_OFFLINE=1 and an empty HF_HOME: nothing cached, nothing downloadable.
    with pytest.raises(ModelError, match="--model-dir"):
        M.resolve_model_dir(None)


def test_cuda_requested_without_gpu_is_a_model_error():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ModelError, match="no CUDA GPU"):
        M.pick_device("cuda")


def test_voice_conditioning_equals_stock_prepare_conditionals(tiny_checkpoint):
    """Our conditioning (from a checked array) is stock ChatterboxTTS.prepare_conditionals, exactly."""
    from chatterbox.tts import ChatterboxTTS

    m = M.load_model(tiny_checkpoint, "cpu")
    voice = read_voice(SAMPLES / "voice.wav")
    ours = conditionals_from_wav(m, voice.wav, voice.sample_rate, exaggeration=0.7)
    stock = ChatterboxTTS(m.t3, m.s3gen, m.ve, m.tokenizer, "cpu")
    stock.prepare_conditionals(str(SAMPLES / "voice.wav"), exaggeration=0.7)
    torch.testing.assert_close(ours.t3.speaker_emb, stock.conds.t3.speaker_emb, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.t3.cond_prompt_speech_tokens, stock.conds.t3.cond_prompt_speech_tokens)
    torch.testing.assert_close(ours.t3.emotion_adv, stock.conds.t3.emotion_adv)
    for k, v in stock.conds.gen.items():
        if torch.is_tensor(v):
            torch.testing.assert_close(ours.gen[k], v, rtol=1e-5, atol=1e-5)


def test_voice_cache_computes_once_and_persists(tiny_checkpoint, tmp_path, monkeypatch):
    m = M.load_model(tiny_checkpoint, "cpu")
    voice = read_voice(SAMPLES / "voice.wav")
    calls = []
    import ttsbatch.engine.voice as V

    real = V.conditionals_from_wav
    monkeypatch.setattr(V, "conditionals_from_wav", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = VoiceCache(m, tmp_path)
    a = cache.get(voice, 0.5)
    assert cache.get(voice, 0.5) is a
    cache.get(voice, 0.9)  # another exaggeration reuses the computed conditioning
    assert len(calls) == 1
    VoiceCache(m, tmp_path).get(voice, 0.5)  # a new process: read from disk
    assert len(calls) == 1
    assert list((tmp_path / "voices").glob("*.pt"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not audio at all" * 100), "not readable audio"),
        (lambda p: _wav(p, np.zeros(24000 * 3)), "silent"),
        (lambda p: _wav(p, 0.3 * np.sin(np.arange(24000) / 10)), "at least 2 s"),
    ],
)
def test_unusable_voice_files_are_input_errors(tmp_path, make, message):
    path = tmp_path / "v.wav"
    make(path)
    with pytest.raises(InputError, match=message):
        read_voice(path)


def test_stereo_voice_any_rate_is_read_as_mono(tmp_path):
    import soundfile as sf

    t = np.arange(44100 * 3) / 44100
    sf.write(tmp_path / "s.flac", np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 300 * t)], 1) * 0.3, 44100)
    v = read_voice(tmp_path / "s.flac")
    assert v.wav.ndim == 1 and v.sample_rate == 44100 and len(v.wav) == len(t)


def _wav(path, x, sr=24000):
    import soundfile as sf

    sf.write(path, np.asarray(x, dtype=np.float32), sr)


def test_stock_engine_is_seeded_and_keeps_the_budget(tiny_checkpoint):
    m = M.load_model(tiny_checkpoint, "cpu")
    conds = VoiceCache(m).get(BUILTIN, 0.5)
    eng = StockEngine(m)
    gen = GenerationOptions(ignore_eos=True)
    a, b, c = eng.synthesize(
        [SynthesisRequest("Hello there.", 7, 20), SynthesisRequest("Hello there.", 7, 20), SynthesisRequest("Hello there.", 8, 20)],
        conds,
        gen,
    )
    assert np.array_equal(a.wav, b.wav)  # same seed, same audio, whatever ran before
    assert not np.array_equal(a.wav, c.wav)
    assert 0 < a.tokens <= 20
    # S3Gen makes 2 mel frames per token and HiFiGAN 480 samples per frame: 960 samples per token.
    assert len(a.wav) == a.tokens * 960
    tokens = eng.speech_tokens(SynthesisRequest("Hello there.", 7, 20), conds, gen)
    assert tokens.numel() == 20  # ignore_eos: exactly the budget


def test_random_checkpoint_identity_is_the_same_in_every_process(tiny_checkpoint, tmp_path):
    """Chunk ids and seeds hang on the checkpoint's fingerprint (its bytes): a checkpoint
    written again with the same seed, in another process, must be byte-identical, or every
    run on a fresh tiny checkpoint would sample different audio."""
    import subprocess
    import sys

    from ttsbatch.engine.model import CHECKPOINT_FILES, fingerprint

    other = tmp_path / "again"
    code = f"from ttsbatch.engine.model import write_random_checkpoint as w; w({str(other)!r}, 'tiny', seed=0)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    for name in CHECKPOINT_FILES:
        assert (other / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert fingerprint(other) == fingerprint(tiny_checkpoint)
