"""The ``ttsbatch`` command. Commands are thin: each docstring is its --help."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from .errors import InputError, TtsbatchError
from .progress import resolve_mode

log = logging.getLogger("ttsbatch")


class BookIsDefault(TyperGroup):
    """``ttsbatch BOOK ...`` means ``ttsbatch book BOOK ...``: the book is the main job."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["book", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=BookIsDefault,
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn books and subtitle files into watermarked speech with Chatterbox.\n\n"
    "ttsbatch BOOK.txt --voice ref.wav -o book.mp3  (same as: ttsbatch book ...)",
)
checkpoint_app = typer.Typer(help="Make checkpoints for tests and benchmarks.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Size(str, Enum):
    tiny = "tiny"
    full = "full"


class JsonLogFormatter(logging.Formatter):
    """Log records as the same JSON events as --progress json, so stderr stays parseable."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"event": "log", "level": record.levelname.lower(), "message": record.getMessage()})


def setup_logging(quiet: bool, json_events: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if json_events else logging.Formatter("ttsbatch: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so work in flight unwinds cleanly."""


def _on_sigterm(signum, frame):
    raise Terminated()


class ProgressMode(str, Enum):
    auto = "auto"
    bar = "bar"
    json = "json"
    none = "none"


_json_errors = False  # set by commands running with --progress json


# Options that `book` and `srt` share, declared once so that their help says the same.
VoiceOpt = Annotated[Optional[Path], typer.Option("--voice", "-v", help="Reference voice (wav/flac/mp3/ogg, 2+ s). Default: the model's built-in voice.")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (default, audiobook, draft) or a .toml file.")]
ModelDirOpt = Annotated[Optional[Path], typer.Option("--model-dir", help="Local checkpoint directory (the five Chatterbox files). Default: download ResembleAI/chatterbox.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where the model runs.")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="If another ttsbatch is working in the same work dir, wait for it instead of exiting.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; warnings and errors only.")]
ProgressOpt = Annotated[ProgressMode, typer.Option("--progress", help="auto: a bar when stderr is a terminal; bar; json: one JSON event per line on stderr; none.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="auto: fast on a CUDA GPU, stock elsewhere; stock: Chatterbox as shipped; fast: ttsbatch's batched engine.")]
MaxVramOpt = Annotated[Optional[float], typer.Option("--max-vram", metavar="GB", help="Cap on GPU memory for the fast engine (e.g. 24 to fit a 24 GB card).")]
BatchSizeOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Chunks per engine call. Default: 1 for stock, 4096 for fast.")]
# generation flags; None (not given) keeps the preset's value
ExaggerationOpt = Annotated[Optional[float], typer.Option(help="Emotion exaggeration (0-2).")]
CfgWeightOpt = Annotated[Optional[float], typer.Option(help="Classifier-free guidance weight.")]
TemperatureOpt = Annotated[Optional[float], typer.Option(help="Sampling temperature.")]
MinPOpt = Annotated[Optional[float], typer.Option(help="Min-p sampling threshold.")]
TopPOpt = Annotated[Optional[float], typer.Option(help="Top-p (nucleus) sampling mass.")]
RepetitionPenaltyOpt = Annotated[Optional[float], typer.Option(help="Repetition penalty.")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(help="Most speech tokens per chunk (25 = 1 s).")]
TokensPerCharOpt = Annotated[Optional[float], typer.Option(help="Speech-token budget per character (benchmarks, random weights).")]
IgnoreEosOpt = Annotated[Optional[bool], typer.Option("--ignore-eos/--stop-at-eos", help="Sample until the budget even past end-of-speech.")]
CfmStepsOpt = Annotated[Optional[int], typer.Option(help="Flow-matching steps of S3Gen.")]


def fail(message: str, code: int) -> typer.Exit:
    if _json_errors:
        typer.echo(json.dumps({"event": "error", "message": message, "exit_code": code}), err=True)
    else:
        typer.echo(f"ttsbatch: error: {message}", err=True)
    return typer.Exit(code)


def user_errors(fn):
    """Turn TtsbatchError into one line on stderr and its exit code; Ctrl-C into 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.getsignal(signal.SIGTERM)
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        except TtsbatchError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted; what is finished is stored: run the same command again to resume", 130) from None
        except Terminated:
            raise fail("terminated; what is finished is stored: run the same command again to resume", 143) from None
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def generation_overrides(**flags) -> dict:
    """Flags given on the command line (None = not given) as option overrides."""
    groups = {
        "generation": (
            "exaggeration",
            "cfg_weight",
            "temperature",
            "min_p",
            "top_p",
            "repetition_penalty",
            "max_new_tokens",
            "tokens_per_char",
            "ignore_eos",
            "cfm_steps",
        ),
        "text": ("max_chars",),
    }
    out: dict[str, dict] = {}
    for group, names in groups.items():
        values = {n: flags[n] for n in names if flags.get(n) is not None}
        if values:
            out[group] = values
    return out


@app.command("book")
@user_errors
def book(
    book_path: str = typer.Argument(..., metavar="BOOK", help="Text to speak: .txt, .md, .epub, or - for standard input."),
    voice: VoiceOpt = None,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output file, format by extension (.wav .flac .mp3 .m4a .m4b .ogg), or - for standard output (with --format). Default: BOOK with .mp3."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="Output format when writing to standard output: wav, flac, mp3, m4a, ogg."),
    input_format: str = typer.Option("txt", "--input-format", help="How to read standard input: txt, md or epub."),
    preset: PresetOpt = None,
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = Device.auto,
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Where finished chunks are kept for resuming. Default: .OUTPUT.ttsbatch beside the output (in the cache dir for standard input/output)."),
    wait: WaitOpt = False,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (chapters, every chunk, estimated length) without loading the model."),
    quiet: QuietOpt = False,
    progress: ProgressOpt = ProgressMode.auto,
    engine: EngineOpt = "auto",
    max_vram: MaxVramOpt = None,
    batch_size: BatchSizeOpt = None,
    exaggeration: ExaggerationOpt = None,
    cfg_weight: CfgWeightOpt = None,
    temperature: TemperatureOpt = None,
    min_p: MinPOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    max_chars: Optional[int] = typer.Option(None, help="Longest chunk of text, in characters."),
    max_new_tokens: MaxNewTokensOpt = None,
    tokens_per_char: TokensPerCharOpt = None,
    ignore_eos: IgnoreEosOpt = None,
    cfm_steps: CfmStepsOpt = None,
):
    """Speak a book: BOOK text in, one watermarked audio file out. Rerun the same command to resume."""
    from .config import load_options
    from .store import cache_dir, default_work_dir
    from .text.chunking import chunk_document_report, estimate_seconds
    from .text.readers import MAX_INPUT_BYTES, read_document, read_text

    global _json_errors
    mode = progress.value
    _json_errors = mode == "json"
    setup_logging(quiet, json_events=mode == "json")
    if quiet and mode in ("bar", "json"):
        raise InputError(f"conflicting options: --quiet and --progress {mode}")
    overrides = generation_overrides(
        exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature, min_p=min_p, top_p=top_p,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, tokens_per_char=tokens_per_char,
        ignore_eos=ignore_eos, cfm_steps=cfm_steps, max_chars=max_chars,
    )
    options = load_options(preset, overrides)
    check_options(options)
    check_max_vram(max_vram)

    # Where the text comes from and where the audio goes.
    from_stdin, to_stdout = book_path == "-", output == "-"
    if to_stdout and not fmt:
        raise InputError("-o - writes to standard output: say which format with --format (wav, flac, mp3, m4a, ogg)")
    if fmt and not to_stdout:
        raise InputError("conflicting options: --format is for -o -; otherwise the extension of -o decides")
    if from_stdin:
        if input_format not in ("txt", "md", "epub"):
            raise InputError(f"--input-format {input_format}: expected txt, md or epub")
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        doc = read_text(data, "stdin", input_format)
        source = Path("stdin")
        identity = hashlib.sha256(data).hexdigest()[:16]
    else:
        source = Path(book_path)
        doc = read_document(source)
        identity = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    if to_stdout:
        fmt = fmt.lower().lstrip(".")
        out_path = None
    else:
        out_path = Path(output) if output else (Path("book") if from_stdin else source).with_suffix(".mp3")
        if not from_stdin and out_path.resolve() == source.resolve():
            raise InputError(f"output {out_path} would overwrite the input")

    chunks, skipped = chunk_document_report(doc, options.text)
    unsaid = unsaid_in((p for ch in doc.chapters for p in ch.paragraphs), options.text)
    if not chunks:
        raise InputError(f"{source}: nothing speakable in it{f': {unsaid}, and {ENGLISH_ONLY}' if unsaid else ''}")
    from .audio.export import SUPPORTED_FORMATS, check_writable_output
    from .engine.voice import BUILTIN, read_voice

    # checked before --dry-run returns: a plan that says nothing of a bad -o or --voice misleads
    if out_path is not None:
        check_writable_output(out_path)
        check_not_the_voice(out_path, voice)
    elif f".{fmt}" not in SUPPORTED_FORMATS:
        raise InputError(f"--format {fmt}: unsupported; choose one of {', '.join(sorted(f[1:] for f in SUPPORTED_FORMATS))}")
    check_work_dir(work_dir)
    the_voice = read_voice(voice) if voice else BUILTIN
    if dry_run:
        print_plan(doc, chunks, skipped, estimate_seconds(chunks), unsaid)
        return
    if unsaid:
        log.warning("not spoken: %s, as %s", unsaid, ENGLISH_ONLY)
    for what in doc.left_out:
        log.info("left out: %s", what)

    if out_path is not None:
        work = work_dir or default_work_dir(out_path)
    else:
        work = work_dir or cache_dir() / "work" / f"{identity}-{fmt}"
        out_path = work / f"output.{fmt}"

    from .engine.select import load_for_run
    from .pipeline import render_book

    run = load_for_run(model_dir, device.value, engine, batch_size, max_vram, cache_dir())
    if to_stdout:
        work.mkdir(parents=True, exist_ok=True)
    report = render_book(
        doc,
        chunks,
        source=source,
        output=out_path,
        work_dir=work,
        voice=the_voice,
        options=options,
        model=run.model,
        engine=run.engine,
        watermarker=run.watermarker,
        batch_size=run.batch_size,
        progress=resolve_mode(mode, quiet),
        cache_dir=cache_dir(),
        lock_timeout=-1 if wait else 0,
    )
    if to_stdout:
        with open(out_path, "rb") as f:
            shutil.copyfileobj(f, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        out_path.unlink()
    if skipped:
        log.info("skipped %d piece(s) of text with nothing speakable", skipped)
    done = {
        "output": "-" if to_stdout else str(out_path), "audio_s": round(report.audio_seconds, 2),
        "rendered": report.chunks_rendered, "reused": report.chunks_cached, "skipped": skipped,
        "seconds": round(report.synth_seconds, 2), "watermark_score": round(report.watermark_score or 0, 3),
    }
    if mode == "json":
        typer.echo(json.dumps({"event": "done", **done}), err=True)
    else:
        typer.echo(
            f"ttsbatch: wrote {done['output']} ({report.audio_seconds:.1f} s audio; {report.chunks_rendered} chunks rendered, "
            f"{report.chunks_cached} reused; watermark score {report.watermark_score:.2f})",
            err=True,
        )


def check_work_dir(work_dir: Path | None) -> None:
    """A ``--work-dir`` that is a file: one line before the model loads (not "File exists" after)."""
    if work_dir is not None and work_dir.exists() and not work_dir.is_dir():
        raise InputError(f"--work-dir {work_dir}: is a file, not a directory")


def check_options(options) -> None:
    """Option combinations that cannot work: one clear line each (single values: ``config.LIMITS``)."""
    g = options.generation
    if g.ignore_eos and g.tokens_per_char <= 0 and g.max_new_tokens >= 1000:
        raise InputError("conflicting options: --ignore-eos needs a token budget (--tokens-per-char or a small --max-new-tokens)")


def check_max_vram(max_vram: float | None) -> None:
    """A cap of no memory or less: one line, not an engine that cannot hold one row."""
    if max_vram is not None and not max_vram > 0:
        raise InputError(f"--max-vram must be more than 0 GB, got {max_vram:g}")


def check_not_the_voice(output: Path, voice: Path | None) -> None:
    """Refuse an output that is the voice file: the run would replace the user's recording."""
    if voice is not None and output.resolve() == Path(voice).resolve():
        raise InputError(f"output {output} would overwrite the voice file")


ENGLISH_ONLY = "Chatterbox's English model says only Latin letters and digits"


def unsaid_in(texts, text_options) -> str | None:
    """What of ``texts`` goes unsaid for being in another script ("4 letters in ..."); None if nothing.

    Folding to ASCII turns letters the English model cannot say into spaces: a Greek quote in
    an English book goes unsaid, a Russian book is silent. Said once, before the run, so that
    words are never lost without a word.
    """
    from .text.normalize import describe_unsaid, unsaid_letters

    if not text_options.ascii_fold:
        return None
    counts = unsaid_letters("\n".join(texts))
    return describe_unsaid(counts) if counts else None


def print_plan(doc, chunks, skipped: int, seconds: float, unsaid: str | None = None) -> None:
    """The --dry-run listing: chapters, then every chunk one per line, then the estimate."""
    named = ", by ".join(x for x in (doc.title, doc.author) if x)
    named = f" ({named})" if named else ""
    typer.echo(f"# {doc.name}{named}: {len(doc.chapters)} chapter(s), {len(chunks)} chunk(s)")
    for i, ch in enumerate(doc.chapters):
        n = sum(1 for c in chunks if c.chapter == i)
        typer.echo(f"chapter {i + 1}: {ch.title or '(untitled)'} [{n} chunks]")
    typer.echo("")
    for c in chunks:
        typer.echo(f"{c.index + 1:5d} {c.text}")
    typer.echo("")
    if skipped:
        typer.echo(f"skipped: {skipped} piece(s) with nothing speakable")
    if unsaid:
        typer.echo(f"not spoken: {unsaid}, as {ENGLISH_ONLY}")
    for what in doc.left_out:
        typer.echo(f"left out: {what}")
    h, rem = divmod(int(round(seconds)), 3600)
    typer.echo(f"estimated audio: {h}:{rem // 60:02d}:{rem % 60:02d} ({seconds:.0f} s)")


@app.command("verify")
@user_errors
def verify(
    files: list[Path] = typer.Argument(..., metavar="FILE...", help="Audio files to check."),
):
    """Report whether each FILE carries the Perth watermark. Exit 1 if any does not."""
    from .audio.watermark import Watermarker, verify_file

    setup_logging(quiet=True)
    for f in files:  # all of them before the first report: a typo in the last is not found last
        if f.is_dir():
            raise InputError(f"{f} is a directory, not an audio file")
        if not f.is_file():
            raise InputError(f"no such file: {f}")
    wm = Watermarker("cpu")
    unmarked = 0
    for f in files:
        r = verify_file(f, wm)
        state = "watermarked" if r.marked else "NOT watermarked"
        typer.echo(f"{f}: {state} (score {r.score:.2f}, {r.duration_s:.1f} s, {r.windows} window(s) checked)")
        unmarked += not r.marked
    if unmarked:
        raise typer.Exit(1)


@checkpoint_app.command("random")
@user_errors
def checkpoint_random(
    directory: Path = typer.Argument(..., metavar="DIR", help="Directory to write the five files into."),
    size: Size = typer.Option(Size.tiny, "--size", help="tiny: 2-layer T3, one block per S3Gen stack (CPU tests); full: the real shapes (GPU benchmarks)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
):
    """Write a random-weight checkpoint in Chatterbox's real five-file format. It speaks noise."""
    from .engine.model import write_random_checkpoint

    setup_logging(quiet=False)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a directory")
    write_random_checkpoint(directory, size.value, seed)
    typer.echo(f"wrote a random {size.value} checkpoint to {directory} (noise, not speech)")


@app.command("warmup")
@user_errors
def warmup_cmd(
    voice: Optional[Path] = typer.Option(None, "--voice", "-v", help="Reference voice to prepare (its conditioning is cached). Default: the built-in voice."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Local checkpoint directory. Default: download ResembleAI/chatterbox now."),
    device: Device = typer.Option(Device.auto, "--device", help="Where the model runs."),
    engine: str = typer.Option("auto", "--engine", help="auto, stock or fast (as for a book)."),
    max_vram: Optional[float] = typer.Option(None, "--max-vram", metavar="GB", help="Cap on the fast engine's GPU memory."),
    cache: Optional[Path] = typer.Option(None, "--cache-dir", help="Where voice and compiler caches go. Default: the user cache dir (or $TTSBATCH_CACHE_DIR)."),
):
    """Download the model, prepare the voice and run every engine path once, so the next run starts at full speed."""
    from .engine.voice import BUILTIN, read_voice
    from .store import cache_dir
    from .warmup import warmup

    setup_logging(quiet=False)
    check_max_vram(max_vram)
    root = cache or cache_dir()
    the_voice = read_voice(voice) if voice else BUILTIN
    rep = warmup(model_dir, device.value, the_voice, engine, max_vram, root)
    typer.echo(
        f"ttsbatch: warm on {rep.device} ({rep.engine} engine): model {rep.load_s:.1f} s, voice {rep.voice_s:.1f} s, "
        f"first chunk {rep.first_chunk_s:.1f} s, {rep.chunks} chunks in all; caches in {root}",
        err=True,
    )
    if rep.compiled is not None:
        c = rep.compiled
        typer.echo(
            f"ttsbatch: compiled {c['graphs']} graphs ({c['cache_hits']} from the cache, {c['cache_misses']} new), "
            f"{c['graph_breaks']} graph breaks",
            err=True,
        )


@app.command("bench")
@user_errors
def bench(
    book: Optional[Path] = typer.Option(None, "--book", help="Text of a real book for the end-to-end part. Default: samples/story.txt (T3 part only is meaningful then)."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="Checkpoint directory (e.g. from `ttsbatch checkpoint random DIR --size full`). Default: the hub's."),
    device: Device = typer.Option(Device.auto, "--device", help="Where the model runs."),
    max_vram: Optional[float] = typer.Option(None, "--max-vram", metavar="GB", help="Cap on the fast engine's GPU memory."),
    sentences: int = typer.Option(16, "--sentences", min=1, help="Chunks of the book rendered by stock Chatterbox for the comparison."),
    fast_sentences: Optional[int] = typer.Option(None, "--fast-sentences", min=1, help="Chunks for the fast T3 at scale (default: 256 on a GPU, one wave of rows; more keeps the rows refilled, as a book does)."),
    tokens_per_char: float = typer.Option(1.0, "--tokens-per-char", help="Speech-token budget per character, the same for stock and fast."),
    max_chars: Optional[int] = typer.Option(None, "--max-chars", help="Use only the first N characters of the book (a shorter book)."),
    parts: str = typer.Option("t3,book", "--parts", help="Comma-separated: t3 (stock vs fast T3 tokens/s, batch 1, full batch, profile), s3gen (the S3Gen stage alone over the book's chunks, the CFM estimator's TFLOP/s), book (the whole book to MP3)."),
    switch_interval_ms: Optional[float] = typer.Option(None, "--switch-interval-ms", min=0.01, help="Python's GIL switch interval for the run (Python's default: 5 ms), for experiments: S3Gen's, T3's and the store's threads share the GIL."),
    engine_opt: list[str] = typer.Option([], "--engine-opt", metavar="KEY=VALUE", help="A fast-engine option for the book and s3gen parts, e.g. s3gen_attention=fa4 or s3gen_graphs=true (repeatable; for experiments)."),
    mark_group: Optional[int] = typer.Option(None, "--mark-group", min=1, help="Chunks the store threads watermark with Perth at once in the book part (default 32; 1: chunk by chunk, for experiments)."),
    track_process: Optional[bool] = typer.Option(None, "--track-process/--track-thread", help="Stitch and encode the book part's track in a process of its own (the default on a GPU), or on a thread of the run's, for experiments."),
    store_workers_at_end: Optional[int] = typer.Option(None, "--store-workers-at-end", min=1, help="Threads that mark and store the book part's last chunks once the engine is done (default 2, as beside the engine; more are made at the end), for experiments."),
    gpu_trace: bool = typer.Option(False, "--gpu-trace", help="Record every kernel the GPU runs in the book part (torch.profiler) and report its busy time from the trace, beside NVML's samples, and the kernels that took longest (slows the run a little; its RSS is not comparable)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every number here."),
):
    """Measure: stock Chatterbox and ttsbatch side by side in one process, on the same text and token budget."""
    from .bench_book import parse_engine_options

    setup_logging(quiet=True)
    check_max_vram(max_vram)
    engine_options = parse_engine_options(engine_opt)
    wanted = {p.strip() for p in parts.split(",") if p.strip()}
    if not wanted or wanted - {"t3", "s3gen", "book"}:
        raise InputError(f"--parts {parts}: expected some of t3, s3gen, book")
    results: dict = {}
    from . import pipeline

    # the pipeline's settings these options change, for this run only
    overrides = {"MARK_GROUP": mark_group, "TRACK_PROCESS": track_process, "STORE_WORKERS_AT_END": store_workers_at_end}
    saved, switch = {name: getattr(pipeline, name) for name in overrides}, sys.getswitchinterval()
    if switch_interval_ms is not None:
        sys.setswitchinterval(switch_interval_ms / 1000)
    for name, value in overrides.items():
        if value is not None:
            setattr(pipeline, name, value)
    try:
        _bench_parts(wanted, results, model_dir, device, sentences, fast_sentences, tokens_per_char, max_vram, book, max_chars,
                     engine_options, gpu_trace)
    finally:
        sys.setswitchinterval(switch)
        for name, value in saved.items():
            setattr(pipeline, name, value)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2, default=str))


def _bench_parts(wanted, results, model_dir, device, sentences, fast_sentences, tokens_per_char, max_vram, book, max_chars,
                 engine_options, gpu_trace=False) -> None:
    from .bench import run_bench
    from .bench_book import run_book_bench

    if "t3" in wanted:
        results["t3"] = run_bench(model_dir, device.value, n_sentences=sentences, n_fast=fast_sentences,
                                  tokens_per_char=tokens_per_char, max_vram_gb=max_vram, book=book)
    from .bench import SAMPLE

    if "s3gen" in wanted:
        from .bench_s3gen import run_s3gen_bench

        results["s3gen"] = run_s3gen_bench(model_dir, book or SAMPLE, device=device.value, tokens_per_char=tokens_per_char,
                                           max_chars=max_chars, engine_options=engine_options)
    if "book" in wanted:
        results["book"] = run_book_bench(model_dir, book or SAMPLE, device=device.value, max_vram_gb=max_vram,
                                         tokens_per_char=tokens_per_char, stock_sentences=sentences, max_chars=max_chars,
                                         engine_options=engine_options, gpu_trace=gpu_trace)


from .cli_srt import srt as _srt  # noqa: E402  (cli_srt uses the helpers above)

app.command("srt")(_srt)


def main() -> None:
    app()
