"""``ttsbatch srt``: subtitles in, one track with each cue spoken at its time out.

Registered in cli.py (after its helpers are defined) with ``app.command("srt")(srt)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import cli as _cli
from .cli import (
    ENGLISH_ONLY, BatchSizeOpt, CfgWeightOpt, CfmStepsOpt, Device, DeviceOpt, EngineOpt, ExaggerationOpt, IgnoreEosOpt, MaxNewTokensOpt,
    MaxVramOpt, MinPOpt, ModelDirOpt, PresetOpt, ProgressMode, ProgressOpt, QuietOpt, RepetitionPenaltyOpt, TemperatureOpt,
    TokensPerCharOpt, TopPOpt, VoiceOpt, WaitOpt, check_max_vram, check_not_the_voice, check_options, check_work_dir, generation_overrides, log, setup_logging,
    unsaid_in, user_errors,
)
from .errors import InputError


@user_errors
def srt(
    subs_path: Path = typer.Argument(..., metavar="SUBS", help="Subtitles to speak: .srt or .vtt."),
    voice: VoiceOpt = None,
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file, format by extension (.wav .flac .mp3 .m4a .m4b .ogg). Default: SUBS with .wav."),
    max_stretch: float = typer.Option(1.3, "--max-stretch", help="Speed speech up (pitch kept) at most this much to fit its cue, 1.0-2.0; 1.0 never stretches."),
    shift: bool = typer.Option(False, "--shift", help="When speech still runs over, move every later cue later (default: delay only the cues it collides with)."),
    keep_sounds: bool = typer.Option(False, "--keep-sounds", help="Also speak sound descriptions (\\[laughs], (door creaks)) and music lines (♪ ... ♪)."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Track length in seconds. Default: the last cue's end."),
    sample_rate: Optional[int] = typer.Option(None, "--sample-rate", help="Output sample rate in Hz. Default: the model's 24000."),
    preset: PresetOpt = None,
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = Device.auto,
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Where finished chunks are kept for resuming. Default: .OUTPUT.ttsbatch beside the output."),
    wait: WaitOpt = False,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every cue and what will be spoken, without loading the model."),
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
    max_chars: Optional[int] = typer.Option(None, help="Longest chunk of text, in characters (longer cues are split)."),
    max_new_tokens: MaxNewTokensOpt = None,
    tokens_per_char: TokensPerCharOpt = None,
    ignore_eos: IgnoreEosOpt = None,
    cfm_steps: CfmStepsOpt = None,
):
    """Dub subtitles: SUBS (.srt/.vtt) in, one watermarked track out, each cue spoken at its start.

    Speech that does not fit before the next cue is sped up (at most --max-stretch), then runs
    over and delays what follows; two voices never overlap. Beside the output: OUT.srt (times of
    the speech produced; OUT.adjusted.srt if OUT.srt is the input) and OUT.timing.json.
    Rerun the same command to resume.
    """
    from .audio.timing import MAX_STRETCH_LIMIT, FitOptions
    from .config import load_options
    from .progress import resolve_mode
    from .store import cache_dir, default_work_dir
    from .text.subtitles import read_subtitles

    mode = progress.value
    _cli._json_errors = mode == "json"
    setup_logging(quiet, json_events=mode == "json")
    if quiet and mode in ("bar", "json"):
        raise InputError(f"conflicting options: --quiet and --progress {mode}")
    overrides = generation_overrides(
        exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature, min_p=min_p, top_p=top_p,
        repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, tokens_per_char=tokens_per_char,
        ignore_eos=ignore_eos, cfm_steps=cfm_steps, max_chars=max_chars,
    )
    if sample_rate is not None:
        if not 8000 <= sample_rate <= 192000:
            raise InputError("--sample-rate must be between 8000 and 192000 Hz")
        overrides["export"] = {"sample_rate": sample_rate}
    options = load_options(preset, overrides)
    check_options(options)
    check_max_vram(max_vram)
    if not 1.0 <= max_stretch <= MAX_STRETCH_LIMIT:
        raise InputError(f"--max-stretch must be between 1.0 and {MAX_STRETCH_LIMIT}")
    if duration is not None and not duration > 0:
        raise InputError("--duration must be more than 0 seconds")
    fit = FitOptions(max_stretch=max_stretch, shift=shift)
    output = output or subs_path.with_suffix(".wav")
    if output.resolve() == subs_path.resolve():
        raise InputError(f"output {output} would overwrite the input")

    cues = read_subtitles(subs_path, keep_sounds=keep_sounds, text_options=options.text)
    spoken = [c for c in cues if not c.skipped]
    from .audio.export import check_writable_output
    from .engine.voice import BUILTIN, read_voice

    # checked before --dry-run returns: a plan that says nothing of a bad -o or --voice misleads
    check_writable_output(output)
    check_not_the_voice(output, voice)
    check_work_dir(work_dir)
    the_voice = read_voice(voice) if voice else BUILTIN
    unsaid = unsaid_in((c.raw for c in cues), options.text)
    late = [c for c in spoken if duration is not None and c.start >= duration]
    # speech is never cut: the track runs past --duration to hold them (timing.py)
    past = f"--duration {duration:g} s ends before {len(late)} cue(s) start (the last at {max(c.start for c in late):.3f} s); the track runs on to hold them" if late else None
    if dry_run:
        print_cues(cues, unsaid)
        if past:
            typer.echo(past)
        return
    if past:
        log.warning("%s", past)
    if not spoken:
        why = f": {unsaid}, and {ENGLISH_ONLY}" if unsaid else ""
        raise InputError(f"{subs_path}: no cue has anything speakable ({len(cues)} cue(s), all skipped; see --dry-run){why}")
    if unsaid:
        log.warning("not spoken: %s, as %s", unsaid, ENGLISH_ONLY)

    from .dub import render_subtitles
    from .engine.select import load_for_run

    run = load_for_run(model_dir, device.value, engine, batch_size, max_vram, cache_dir())
    report = render_subtitles(
        cues,
        source=subs_path,
        output=output,
        work_dir=work_dir or default_work_dir(output),
        voice=the_voice,
        options=options,
        fit=fit,
        model=run.model,
        engine=run.engine,
        watermarker=run.watermarker,
        duration=duration,
        batch_size=run.batch_size,
        progress=resolve_mode(mode, quiet),
        cache_dir=cache_dir(),
        lock_timeout=-1 if wait else 0,
    )
    t = report.totals
    if t["skipped"]:
        reasons = ", ".join(f"{n} {why}" for why, n in t["skipped_by_reason"].items())
        log.info("skipped %d cue(s) with nothing to speak (%s)", t["skipped"], reasons)
    if t["overrun_cues"]:
        log.info("%s", overrun_line(t, report.report_path))
    done = {
        "output": str(output), "srt": str(report.srt_path), "report": str(report.report_path),
        "audio_s": round(report.audio_seconds, 2), "rendered": report.chunks_rendered, "reused": report.chunks_cached,
        "seconds": round(report.synth_seconds, 2), "watermark_score": round(report.watermark_score or 0, 3),
        **{k: t[k] for k in ("spoken", "skipped", "stretched", "overrun_cues", "delayed_cues")},
    }
    if mode == "json":
        typer.echo(json.dumps({"event": "done", **done}), err=True)
        return
    typer.echo(
        f"ttsbatch: wrote {output} ({report.audio_seconds:.1f} s audio; {t['spoken']} cues spoken, {t['skipped']} skipped, "
        f"{t['stretched']} sped up, {t['overrun_cues']} ran over; {report.chunks_rendered} chunks rendered, "
        f"{report.chunks_cached} reused; watermark score {report.watermark_score:.2f}) and {report.srt_path.name}, "
        f"{report.report_path.name}",
        err=True,
    )


def overrun_line(totals: dict, report_path) -> str:
    """What running over did to the track, in one line: the cues it delayed, or (the last cue
    ran over, so nothing followed it) a track longer than planned."""
    head = f"{totals['overrun_cues']} cue(s) ran over their window by {totals['overrun_seconds']:.2f} s in all"
    if totals["delayed_cues"]:
        what = f"{totals['delayed_cues']} cue(s) start late, by up to {totals['max_delay']:.2f} s"
    else:
        what = "no cue starts late: the track runs past its planned end"
    return f"{head}; {what}; see {report_path}"


def _clock(seconds: float) -> str:
    ms = round(seconds * 1000)
    h, rem = divmod(ms, 3_600_000)
    return f"{h}:{rem // 60_000:02d}:{rem % 60_000 // 1000:02d}.{rem % 1000:03d}"


def print_cues(cues, unsaid: str | None = None) -> None:
    """The --dry-run listing: one line per cue (time, then the spoken text or why it is skipped)."""
    skipped = sum(1 for c in cues if c.skipped)
    typer.echo(f"# {len(cues)} cue(s): {len(cues) - skipped} spoken, {skipped} skipped")
    for c in cues:
        what = c.text if not c.skipped else f"[skipped: {c.skipped}] {' '.join(c.raw.split())}"
        typer.echo(f"{c.index + 1:5d} {_clock(c.start)} --> {_clock(c.end)}  {what}")
    if unsaid:
        typer.echo(f"not spoken: {unsaid}, as {ENGLISH_ONLY}")
