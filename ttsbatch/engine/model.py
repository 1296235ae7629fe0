"""Loading Chatterbox: from the hub, from a local directory, or a random checkpoint we write.

The checkpoint format is chatterbox-tts's own five files::

    ve.safetensors  t3_cfg.safetensors  s3gen.safetensors  tokenizer.json  conds.pt

Sizes are read off the tensors, so a ``tiny`` random checkpoint (for CPU tests) loads
through exactly the same code as the real one. chatterbox-tts hardcodes widths (1024 in
T3's conditioning encoder, every S3Gen width), so "tiny" means fewer layers, not narrower
ones: T3 gets its depth and MLP width from a registered Llama config, and S3Gen's stacks of
blocks (ModuleLists) are cut to the number of blocks the checkpoint holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError, ModelError

if TYPE_CHECKING:  # torch and chatterbox are imported lazily: the CLI's --help stays fast
    import torch

log = logging.getLogger("ttsbatch")

REPO_ID = "ResembleAI/chatterbox"
CHECKPOINT_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt")
RANDOM_MARK = "ttsbatch_random_weights"  # safetensors metadata key set by write_random_checkpoint

# Depth of each size of random checkpoint. "full" is the real model's shape.
SIZES = {
    "tiny": dict(t3_layers=2, t3_mlp=1024, s3_blocks=1),
    "full": dict(t3_layers=30, t3_mlp=4096, s3_blocks=None),
}


def quiet_imports() -> None:
    """Import chatterbox once, with the deprecation noise of its dependencies silenced."""
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*LoRACompatibleLinear.*")
    for name in ("transformers", "diffusers", "chatterbox", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import chatterbox.models.t3.t3 as t3_module
    import transformers

    # Stock T3 asks SDPA attention for attention weights, and transformers warns about it.
    transformers.utils.logging.set_verbosity_error()

    # T3.inference wraps its loop in a tqdm bar per sentence; ours is one bar per book.
    t3_module.tqdm = lambda it, **_: it


@dataclass
class LoadedModel:
    """The parts of Chatterbox the engines use, on one device."""

    t3: "torch.nn.Module"
    s3gen: "torch.nn.Module"
    ve: "torch.nn.Module"
    tokenizer: object  # chatterbox EnTokenizer
    builtin_voice: object | None  # chatterbox Conditionals from conds.pt, or None
    device: str
    model_id: str  # identity of the weights: part of every chunk id
    random_size: str | None  # "tiny"/"full" for a random checkpoint (it speaks noise), else None
    directory: Path

    @property
    def sample_rate(self) -> int:
        from chatterbox.models.s3gen import S3GEN_SR

        return S3GEN_SR


# ---------------------------------------------------------------------------------------------
# Building the modules with the depth a checkpoint has


def _llama_config_name(layers: int, mlp: int) -> str:
    """Register (once) and return the name of a Llama config of T3 with this depth and MLP."""
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    base = LLAMA_CONFIGS["Llama_520M"]
    if layers == base["num_hidden_layers"] and mlp == base["intermediate_size"]:
        return "Llama_520M"
    name = f"ttsbatch_L{layers}_M{mlp}"
    LLAMA_CONFIGS.setdefault(name, {**base, "num_hidden_layers": layers, "intermediate_size": mlp})
    return name


def build_t3(layers: int, mlp: int, text_vocab: int = 704):
    """A chatterbox T3 with ``layers`` Llama layers and MLP width ``mlp`` (random init)."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config(text_tokens_dict_size=text_vocab)
    hp.llama_config_name = _llama_config_name(layers, mlp)
    return T3(hp)


def _t3_shape(state: dict) -> tuple[int, int, int]:
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("tfmr.layers."))
    mlp = state["tfmr.layers.0.mlp.gate_proj.weight"].shape[0]
    text_vocab = state["text_emb.weight"].shape[0]
    return layers, mlp, text_vocab


# Stacks of blocks in S3Gen whose length a checkpoint may choose (the tiny one keeps one each).
S3GEN_STACKS = (
    "tokenizer.encoder.blocks",
    "flow.encoder.encoders",
    "flow.encoder.up_encoders",
    "flow.decoder.estimator.mid_blocks",
    "flow.decoder.estimator.down_blocks.0.1",
    "flow.decoder.estimator.up_blocks.0.1",
)


def _cut_stacks(module, stacks: dict[str, int]) -> None:
    """Shorten the named ModuleLists (and the mid blocks' inner transformer stacks)."""
    import torch.nn as nn

    for path, n in stacks.items():
        parent_path, _, name = path.rpartition(".")
        parent = module.get_submodule(parent_path)
        stack = getattr(parent, name) if not name.isdigit() else parent[int(name)]
        if n < len(stack):
            cut = nn.ModuleList(list(stack)[:n])
            if name.isdigit():
                parent[int(name)] = cut
            else:
                setattr(parent, name, cut)


def _stack_depths(state: dict, prefix_list=S3GEN_STACKS) -> dict[str, int]:
    """How many blocks the checkpoint holds for each stack (mid blocks' inner stacks included)."""
    depths: dict[str, int] = {}
    for path in prefix_list:
        idx = {int(k[len(path) + 1 :].split(".")[0]) for k in state if k.startswith(path + ".")}
        if idx:
            depths[path] = 1 + max(idx)
    mid = depths.get("flow.decoder.estimator.mid_blocks", 0)
    for i in range(mid):
        path = f"flow.decoder.estimator.mid_blocks.{i}.1"
        idx = {int(k[len(path) + 1 :].split(".")[0]) for k in state if k.startswith(path + ".")}
        if idx:
            depths[path] = 1 + max(idx)
    return depths


def build_s3gen(blocks: int | None = None):
    """A chatterbox S3Gen; with ``blocks``, every stack of blocks is cut to that many."""
    from chatterbox.models.s3gen import S3Gen

    s3 = S3Gen()
    if blocks is not None:
        stacks = {p: blocks for p in S3GEN_STACKS}
        _cut_stacks(s3, stacks)
        mid = len(s3.flow.decoder.estimator.mid_blocks)
        _cut_stacks(s3, {f"flow.decoder.estimator.mid_blocks.{i}.1": blocks for i in range(mid)})
    return s3


# ---------------------------------------------------------------------------------------------
# Random checkpoints


def write_char_tokenizer(path: Path) -> None:
    """A character-level tokenizer.json in EnTokenizer's format: [STOP]=0 and [START]=255 as T3 expects."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    special = {"[STOP]": 0, "[START]": 255, "[UNK]": 1, "[SPACE]": 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5, "[MASK]": 6}
    vocab = dict(special)
    free = (i for i in range(704) if i not in special.values())
    for c in range(33, 127):
        vocab[chr(c)] = next(free)
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.add_special_tokens(list(special))  # matched whole before the per-character split
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(path))


def synthetic_voice(seconds: float = 10.0, sr: int = 24000, seed: int = 0):
    """A buzzing harmonic tone with a gliding pitch: a stand-in reference voice, no speech in it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 12))
    sig = 0.3 * sig / np.abs(sig).max() + 0.01 * rng.standard_normal(len(t))
    return sig.astype(np.float32)


def write_random_checkpoint(directory: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of ``size`` in the real five-file format."""
    import torch
    from safetensors.torch import save_file

    quiet_imports()
    from chatterbox.models.voice_encoder import VoiceEncoder

    if size not in SIZES:
        raise InputError(f"unknown checkpoint size {size!r}; choose one of: {', '.join(SIZES)}")
    shape = SIZES[size]
    directory = Path(directory)
    existing = [f for f in CHECKPOINT_FILES if (directory / f).exists()]
    if existing and not _written_by_us(directory):
        # real weights (or a fine-tuned voice) must never be replaced by noise
        raise InputError(f"{directory} holds {', '.join(existing)} of a checkpoint that is not a random one; "
                         "not overwriting it: name an empty directory")
    directory.mkdir(parents=True, exist_ok=True)
    # One metadata entry only: safetensors stores metadata from a hash map whose order changes
    # from process to process, and the checkpoint's identity (``fingerprint``) reads the bytes.
    meta = {RANDOM_MARK: size}
    torch.manual_seed(seed)
    t3 = build_t3(shape["t3_layers"], shape["t3_mlp"]).eval()
    s3 = build_s3gen(shape["s3_blocks"]).eval()
    ve = VoiceEncoder().eval()
    for name, module in (("t3_cfg", t3), ("s3gen", s3), ("ve", ve)):
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(directory / f"{name}.safetensors"), metadata=meta)
    write_char_tokenizer(directory / "tokenizer.json")

    # The built-in voice: computed through the real conditioning path from a synthetic voice.
    from .voice import conditionals_from_wav

    model = LoadedModel(t3, s3, ve, None, None, "cpu", "random", size, directory)
    # S3Gen re-decodes the voice prompt with every chunk: a short built-in prompt keeps CPU tests fast.
    seconds = 3.0 if size == "tiny" else 10.0
    conds = conditionals_from_wav(model, synthetic_voice(seconds), 24000, exaggeration=0.5)
    conds.save(directory / "conds.pt")
    return directory


def _written_by_us(directory: Path) -> bool:
    """Is ``directory`` a random checkpoint of ours? (An unreadable one counts as not.)"""
    try:
        return random_size_of(directory) is not None
    except Exception:  # missing or damaged t3_cfg.safetensors: not provably ours
        return False


def random_size_of(directory: Path) -> str | None:
    """The size of a random checkpoint written by us, or None for real weights."""
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "t3_cfg.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get(RANDOM_MARK)


# ---------------------------------------------------------------------------------------------
# Finding and loading weights


def resolve_model_dir(model_dir: Path | None) -> Path:
    """The directory with the five files: ``model_dir`` as given, or the hub's cached snapshot."""
    if model_dir is not None:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise InputError(f"--model-dir {model_dir}: no such directory")
        missing = [f for f in CHECKPOINT_FILES if f != "conds.pt" and not (model_dir / f).is_file()]
        if missing:
            raise InputError(f"--model-dir {model_dir}: missing {', '.join(missing)}")
        return model_dir
    try:
        from huggingface_hub import hf_hub_download

        path = None
        for name in CHECKPOINT_FILES:
            path = hf_hub_download(repo_id=REPO_ID, filename=name)
        return Path(path).parent
    except Exception as e:  # no network, offline mode, no cache, hub errors: all end the same way
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"cannot get the Chatterbox weights ({REPO_ID}) from the Hugging Face hub: {reason[:160]}. "
            "Run once with network access to download them, or pass --model-dir DIR "
            f"holding {', '.join(CHECKPOINT_FILES)}"
        ) from None


def fingerprint(directory: Path) -> str:
    """A fast identity of the weights: size and first/last MiB of each file (not a full hash of GBs)."""
    h = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        path = Path(directory) / name
        if not path.exists():
            continue
        size = path.stat().st_size
        h.update(f"{name}:{size}:".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"--device {device}: expected auto, cpu or cuda")
    return device


_CACHE: dict[tuple, LoadedModel] = {}


def load_model(model_dir: Path | None = None, device: str = "auto") -> LoadedModel:
    """Load Chatterbox from ``model_dir`` (or the hub) onto ``device``; cached per process."""
    directory = resolve_model_dir(model_dir)
    device = pick_device(device)
    key = (str(directory.resolve()), device, fingerprint(directory))
    if key in _CACHE:
        return _CACHE[key]

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    quiet_imports()
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.models.voice_encoder import VoiceEncoder
    from chatterbox.tts import Conditionals

    try:
        t3_state = load_file(directory / "t3_cfg.safetensors")
        if "model" in t3_state:
            t3_state = t3_state["model"][0]
        t3 = build_t3(*_t3_shape(t3_state))
        t3.load_state_dict(t3_state)

        s3_state = load_file(directory / "s3gen.safetensors")
        s3 = build_s3gen()
        _cut_stacks(s3, _stack_depths(s3_state))
        s3.load_state_dict(s3_state, strict=False)  # as stock: the tokenizer's mel filters are not saved

        ve = VoiceEncoder()
        ve.load_state_dict(load_file(directory / "ve.safetensors"))
        tokenizer = EnTokenizer(str(directory / "tokenizer.json"))
        conds = None
        if (directory / "conds.pt").exists():
            conds = Conditionals.load(directory / "conds.pt", map_location="cpu")
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        # a truncated or foreign file: safetensors' own error and torch.load's unpickling ones included
        raise ModelError(f"cannot load the checkpoint in {directory}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None

    t3.to(device).eval()
    s3.to(device).eval()
    ve.to(device).eval()
    if conds is not None:
        conds = conds.to(device)

    random_size = random_size_of(directory)
    if random_size:
        log.warning("random-weight checkpoint (%s) in %s: the audio is noise, not speech", random_size, directory)
    model = LoadedModel(t3, s3, ve, tokenizer, conds, device, fingerprint(directory), random_size, directory)
    _CACHE[key] = model
    return model


def describe(model: LoadedModel) -> str:
    """One line for logs."""
    n3 = sum(p.numel() for p in model.t3.parameters()) / 1e6
    ns = sum(p.numel() for p in model.s3gen.parameters()) / 1e6
    kind = f"RANDOM {model.random_size} weights (noise)" if model.random_size else "Chatterbox weights"
    return json.dumps({"weights": kind, "t3_M": round(n3, 1), "s3gen_M": round(ns, 1), "device": model.device})
