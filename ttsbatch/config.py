"""Options as frozen dataclasses, and TOML presets that set the same fields.

A preset is a TOML file with one table per options group, e.g.::

    [generation]
    temperature = 0.7
    [stitch]
    paragraph_pause_ms = 800

Built-in presets live in ``presets/`` (``--preset audiobook``); a path to a .toml file works too.
Command-line flags override the preset, which overrides these defaults.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import InputError


@dataclass(frozen=True)
class TextOptions:
    """How a document becomes chunks of text."""

    max_chars: int = 300  # no chunk is longer than this (Chatterbox degrades on long inputs)
    merge_chars: int = 120  # sentences are merged while the chunk is shorter than this
    normalize_punctuation: bool = True  # Chatterbox's own punctuation rules (punc_norm)
    ascii_fold: bool = True  # replace characters the English tokenizer cannot say (é -> e, emoji -> dropped)
    language: str = "english"  # abbreviation list for sentence splitting


# What one Chatterbox chunk can hold (chatterbox-tts's T3Config: max_text_tokens = 2048,
# max_speech_tokens = 4096; past them T3's position tables end, an IndexError mid-book). Its
# tokenizer makes at most one token of a character, and T3 adds a start and a stop token.
MAX_CHUNK_CHARS = 2000
MAX_SPEECH_TOKENS = 4096


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling parameters of Chatterbox; they are part of every chunk's id."""

    exaggeration: float = 0.5  # emotion intensity, 0..2
    cfg_weight: float = 0.5  # classifier-free guidance weight, 0 disables CFG
    temperature: float = 0.8  # softmax temperature of T3 sampling
    min_p: float = 0.05  # drop tokens whose probability is below min_p * the top probability
    top_p: float = 1.0  # nucleus sampling mass, 1.0 disables
    repetition_penalty: float = 1.2  # HF-style penalty on tokens already generated
    max_new_tokens: int = 1000  # hard cap of speech tokens per chunk (25 tokens = 1 s)
    tokens_per_char: float = 0.0  # >0: budget of speech tokens per character of text (benchmarks)
    ignore_eos: bool = False  # keep sampling past end-of-speech until the budget (random weights)
    cfm_steps: int = 10  # Euler steps of S3Gen's flow-matching decoder

    def token_budget(self, n_chars: int) -> int:
        """Speech tokens allowed for a chunk of ``n_chars`` characters."""
        if self.tokens_per_char > 0:
            return max(1, min(self.max_new_tokens, round(self.tokens_per_char * n_chars)))
        return self.max_new_tokens


@dataclass(frozen=True)
class StitchOptions:
    """How finished chunks are joined into one track."""

    sentence_pause_ms: int = 250  # silence between chunks of one paragraph
    paragraph_pause_ms: int = 700  # silence after the last chunk of a paragraph
    chapter_pause_ms: int = 2000  # silence after the last chunk of a chapter
    fade_ms: int = 10  # fade in/out at every join so nothing clicks
    trim_silence: bool = True  # trim each chunk's leading/trailing silence first
    silence_threshold_db: float = -45.0  # below this (dBFS) counts as silence when trimming
    keep_ms: int = 20  # silence kept at each trimmed edge


@dataclass(frozen=True)
class ExportOptions:
    """How the stitched track is encoded."""

    sample_rate: int = 0  # output sample rate; 0 keeps the model's 24 kHz
    mp3_bitrate: str = "128k"  # for .mp3
    aac_bitrate: str = "96k"  # for .m4a / .m4b


@dataclass(frozen=True)
class Options:
    """Everything a run needs besides files: one group per stage."""

    text: TextOptions = field(default_factory=TextOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    stitch: StitchOptions = field(default_factory=StitchOptions)
    export: ExportOptions = field(default_factory=ExportOptions)


PRESET_DIRS = (
    Path(__file__).resolve().parent.parent / "presets",  # a source checkout
    Path(__file__).resolve().parent / "_presets",  # an installed wheel
)


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    names = set()
    for d in PRESET_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def _preset_path(name: str) -> Path:
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"preset file not found: {name}")
        return path
    for d in PRESET_DIRS:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


@dataclass(frozen=True)
class Limit:
    """The numbers one option may take; anything else fails before the model loads, not mid-book."""

    low: float | None = None  # smallest allowed value (None: no bound)
    high: float | None = None  # largest allowed value (None: no bound)
    low_open: bool = False  # True: ``low`` itself is not allowed (temperature > 0)
    why: str = ""  # said after the range, where the bound is not obvious

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        if self.low is not None and self.high is not None and not self.low_open:
            return f"between {self.low:g} and {self.high:g}"
        if self.low is not None and self.high is not None:
            return f"more than {self.low:g} and at most {self.high:g}"
        if self.low is not None:
            return f"more than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"at most {self.high:g}"


@dataclass(frozen=True)
class OneOf:
    """An option that takes one of a few values."""

    choices: tuple
    why: str = ""

    def allows(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return f"one of {', '.join(map(str, self.choices))}"


@dataclass(frozen=True)
class Bitrate:
    """A ``"128k"``-style bitrate in kbit/s, within what the encoder accepts."""

    low_kbps: int
    high_kbps: int
    why: str = ""

    def allows(self, value: str) -> bool:
        digits = value[:-1] if value.endswith("k") else ""
        return digits.isdigit() and self.low_kbps <= int(digits) <= self.high_kbps

    def describe(self) -> str:
        return f'a bitrate like "128k" between {self.low_kbps}k and {self.high_kbps}k'


_ms = Limit(0)
LIMITS: dict[tuple[str, str], Limit | OneOf | Bitrate] = {
    ("text", "max_chars"): Limit(20, MAX_CHUNK_CHARS, why="a Chatterbox chunk reads at most 2,048 text tokens"),
    ("text", "merge_chars"): Limit(0, MAX_CHUNK_CHARS),
    ("generation", "exaggeration"): Limit(0, 2),
    ("generation", "cfg_weight"): Limit(0),
    ("generation", "temperature"): Limit(0, low_open=True),
    ("generation", "min_p"): Limit(0, 1),
    ("generation", "top_p"): Limit(0, 1, low_open=True),
    ("generation", "repetition_penalty"): Limit(0, low_open=True),
    ("generation", "max_new_tokens"): Limit(1, MAX_SPEECH_TOKENS, why="a Chatterbox chunk holds at most that many speech tokens"),
    ("generation", "tokens_per_char"): Limit(0),
    ("generation", "cfm_steps"): Limit(1, 1000),
    ("stitch", "sentence_pause_ms"): _ms,
    ("stitch", "paragraph_pause_ms"): _ms,
    ("stitch", "chapter_pause_ms"): _ms,
    ("stitch", "fade_ms"): _ms,
    ("stitch", "keep_ms"): _ms,
    ("stitch", "silence_threshold_db"): Limit(-120, 0),
    # Standard rates every output codec takes (ffmpeg refuses e.g. "-ar 30000" for MP3, after
    # the whole book is synthesized).
    ("export", "sample_rate"): OneOf((0, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000), why="0 keeps 24000"),
    ("export", "mp3_bitrate"): Bitrate(8, 320),  # LAME's range
    ("export", "aac_bitrate"): Bitrate(16, 512),  # ffmpeg's AAC encoder's
}


def _name(group: str, name: str, source: str) -> str:
    """How the user wrote the option: ``--max-chars`` on the command line, ``[text] max_chars`` in a preset."""
    return f"--{name.replace('_', '-')}" if source == "option" else f"{source}: [{group}] {name}"


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _coerce(group: str, f: dataclasses.Field, value: Any, source: str = "preset") -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(f"{_name(group, f.name, source)} must be {kind.__name__}, got {value!r}")
    if kind is float and value != value:  # NaN passes every comparison
        raise InputError(f"{_name(group, f.name, source)} must be a number, got nan")
    rule = LIMITS.get((group, f.name))
    if rule is not None and not rule.allows(value):
        why = f": {rule.why}" if rule.why else ""
        raise InputError(f"{_name(group, f.name, source)} must be {rule.describe()}, got {_shown(value)}{why}")
    return value


def apply_overrides(options: Options, overrides: dict[str, dict[str, Any]], source: str = "preset") -> Options:
    """Return ``options`` with ``{group: {field: value}}`` applied; unknown names are errors."""
    groups = {f.name: f for f in fields(Options)}
    for group, values in overrides.items():
        if group not in groups or not isinstance(values, dict):
            raise InputError(f"{source}: unknown section [{group}]; expected one of {', '.join(groups)}")
        current = getattr(options, group)
        known = {f.name: f for f in fields(current)}
        changes = {}
        for name, value in values.items():
            if name not in known:
                raise InputError(f"{source}: unknown option {name!r} in [{group}]")
            changes[name] = _coerce(group, known[name], value, source)
        options = replace(options, **{group: replace(current, **changes)})
    return options


def load_options(preset: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Options:
    """Defaults, then the preset (a built-in name or a .toml path), then explicit overrides."""
    options = Options()
    if preset:
        path = _preset_path(preset)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"preset {path}: not valid TOML ({e})") from None
        options = apply_overrides(options, data, source=f"preset {path.name}")
    if overrides:
        options = apply_overrides(options, overrides, source="option")
    return options


def as_dict(obj: Any) -> dict:
    """A plain dict of a dataclass (for ids, manifests and logs)."""
    return dataclasses.asdict(obj)
