"""The fast engine: batched, graph-captured T3 (``t3_fast``) feeding batched S3Gen (``s3gen_batched``).

Same interface as :class:`~ttsbatch.engine.stock.StockEngine`, plus :meth:`synthesize_stream`.
T3 runs every request of a call through continuous batching (on CUDA on a thread and
stream of its own, so it decodes while S3Gen vocodes). As requests finish, their speech
tokens are cleaned up the way stock does and collected; once enough are waiting (or T3 is
done), batched S3Gen turns them into waveforms, bucketed by length (one host wait per
collection), and they are yielded, while the T3 rows they left are already refilled.

Memory: T3's KV cache gets ``t3_share`` of the budget (``max_vram_gb``, else the free GPU
memory); S3Gen's activations live in the rest (its largest attention tensor capped to fit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..config import GenerationOptions
from .stock import SynthesisRequest, SynthesisResult


def speech_tokens_for_s3gen(tokens: Sequence[int]) -> list[int]:
    """Stock's clean-up of T3 output before S3Gen (``drop_invalid_tokens`` then ``< 6561``).

    Everything up to the first start-of-speech (6561) is dropped, everything from the first
    end-of-speech (6562) on is dropped, then ids outside the S3 vocabulary. Stock's version
    fails when an id occurs twice; this one uses the first occurrence.
    """
    from chatterbox.models.s3tokenizer import EOS, SOS, SPEECH_VOCAB_SIZE

    sos, eos = SOS, EOS
    toks = list(tokens)
    if sos in toks:
        toks = toks[toks.index(sos) + 1 :]
    if eos in toks:
        toks = toks[: toks.index(eos)]
    return [t for t in toks if t < SPEECH_VOCAB_SIZE]


@dataclass
class HostTimeline:
    """Where the S3Gen (consumer) thread's wall time goes, summed over calls, from
    ``time.perf_counter``: with S3Gen's own launch and wait times (``StageTimes.launch_s``,
    ``sync_s``), the split that tells a book run held up by T3 from one held up by S3Gen's
    launches or its GPU work, without a profiler (``bench`` reports it)."""

    t3_wait_s: float = 0.0  # blocked on T3's next collection (T3 is behind)
    consumer_s: float = 0.0  # the caller's time between results (the pipeline storing and encoding)
    collections: int = 0
    late_joined: int = 0  # chunks that joined a collection's last batch (``s3gen_join_late``)
    t3_done_at: float | None = None  # perf_counter when T3's thread handed over its last collection
    t3_cpu_s: float = 0.0  # T3's thread's CPU seconds (overlapped: its decoding's Python and launches)
    done_at: float | None = None  # perf_counter when the last call's last result was handed over
    # (what, start, end, items) in perf_counter seconds: "t3_wait" (blocked on T3's next
    # collection) and "s3gen" (launching a collection and handing its results over), in order
    spans: list = field(default_factory=list)


class FastEngine:
    """Chunks in, waveforms out: fast T3 for all chunks at once, batched S3Gen behind it."""

    name = "fast"

    def __init__(
        self,
        model,
        max_rows: int | None = None,
        max_vram_gb: float | None = None,
        check_every: int = 8,
        use_graphs: bool | None = None,
        s3gen_batch: int | None = None,
        t3_share: float = 0.5,
        compile_s3gen: bool = False,
        compile_estimator: bool | None = None,
        compile_t3: bool | None = None,
        compile_vocoder: bool | None = None,
        overlap: bool | None = None,
        s3gen_collect: int | None = None,
        compile_encoder: bool = False,
        s3gen_attention: str = "auto",
        s3gen_graphs: bool = False,
        s3gen_ffn: str = "region",
        s3gen_bucket_frames: int | None = None,
        s3gen_handoff: str = "collection",
        s3gen_pack: bool | None = None,
        s3gen_take: str = "ready",
        t3_min_rows: int = 1,
        s3gen_join_late: bool = False,
        s3gen_conv: str | None = None,
        stream_priority: str = "t3",
        t3_look_ahead: int = 0,
        vocoder_conv2d: bool = False,
        s3gen_chain: bool = True,
    ):
        """``max_rows``: T3 rows (None: from memory); ``max_vram_gb``: cap on GPU memory for
        both models' work; ``check_every``: T3 steps between host looks at "all done?";
        ``use_graphs``: CUDA graphs for T3's decode step (None: on CUDA); ``s3gen_batch``:
        S3Gen's largest batch (None: 64 on CUDA, 8 on CPU); ``s3gen_collect``: finished
        chunks collected before S3Gen runs, after a first collection of one batch (None: 4
        batches, so that its length buckets fill); ``compile_s3gen``: torch.compile S3Gen's
        stages and capture its CFM loop per shape (CUDA, experimental); ``compile_estimator``:
        torch.compile the CFM estimator's regions, one dynamic-shape graph each (None: on CUDA;
        ``ttsbatch warmup`` persists the compiled code); ``compile_t3``: torch.compile T3's
        layers the same way (None: on CUDA); ``compile_vocoder``: HiFiGAN's upsampling stages
        the same way (None: on CUDA; fp32 convs, exactly eager's result); ``overlap``: T3 on a thread and CUDA stream
        of its own, decoding the next chunks while S3Gen vocodes, the streams' priorities set
        by ``stream_priority`` (None: on CUDA);
        ``compile_encoder``: S3Gen's flow encoder's conformer layers as one compiled region,
        one graph for every layer, batch and bucket (off: as the whole encoder in one region it
        took S3Gen alone on an H100 from 254.6x to 255.3x real time, ``scripts/gpu_s3gen.py
        --encoder-compiled``; in 2-hour books on an H200 it saved the book 0.8-2.4 s, but
        loading its compiled code from the cache cost each process 3.5-6 s more before its first
        chunk, twenty-fourth session, most of it dynamo tracing the whole encoder again: 4.5 s
        on the dev machine's CPU against 0.5 s for one layer, ``scripts/encoder_trace_time.py``);
        ``s3gen_attention``: the CFM estimator's attention kernel, "auto" (FlashAttention 4
        where flash-attn-4 is installed and runs: a Hopper GPU; else PyTorch's FA2), "fa2" or
        "fa4" (warning if it cannot run; ``BatchedS3Gen``); ``s3gen_graphs``: S3Gen's CFM Euler step
        captured as one CUDA graph per (batch, bucket) around the compiled regions (batches
        padded to a power of two): a replay per step instead of ~560 launches from S3Gen's
        thread (CUDA; off: the whole loop captured lost 4-6 s in a 2-hour book on an H100,
        its mid-book captures costing 5-7 s; BENCHMARKS.md, twelfth and fourteenth sessions); ``s3gen_ffn``: the estimator's transformer-block
        tail as the compiled region ("region") or as one Triton kernel that keeps the
        feed-forward's hidden on the chip ("triton"; "triton-noproj" leaves the output
        projection to the region, "triton-ffn" the projection and norm3; ``cfm_ffn``; CUDA
        only); ``s3gen_bucket_frames``: S3Gen's
        length buckets every this many item frames (even; 2: every batch padded to its longest
        item only) instead of ``DEFAULT_BUCKETS`` (64-256 apart): in the 2-hour benchmark book
        padding is 16.7% of S3Gen's frames with the default buckets, 11.3% with 2
        (``scripts/s3gen_padding.py``); the compiled regions take any length, CUDA graphs
        (``s3gen_graphs``) capture one per padded length; ``s3gen_handoff``: S3Gen's audio handed
        to the caller a whole collection at a time ("collection": one host wait per
        collection) or a padded batch at a time as each batch's copy completes ("batch",
        ``BatchedS3Gen.synthesize_iter``: the caller stores and encodes the first batches
        while the GPU renders the rest, so less is left after the GPU's last batch; it lost
        0.5 s of a 2-hour book's synthesis to the extra handoffs, fourteenth session) or
        "drain": by collection until T3 has started every chunk (``FastT3.draining``), then by
        batch, so the store works on the book's last collection while S3Gen renders its last
        batch (with ``s3gen_join_late`` that collection is a batch larger and its handoff at
        once left 1.7-1.9 s of storing after the engine, against 0.9-1.1 s, twenty-second session);
        ``s3gen_pack``: the CFM estimator over each batch's items end to end, a few masked frames
        between them, instead of rows padded to the batch's bucket (exact: ``PackedLayout``;
        None: where the attention is varlen flash, as on CUDA); ``s3gen_take``: when S3Gen's
        next collection starts, with ``overlap``: "full" waits until ``s3gen_collect`` chunks
        have finished (the first collection: one batch); "ready" takes every finished chunk, up
        to ``s3gen_collect``, as soon as S3Gen is free and at least one batch's worth have
        finished (or T3 is done), so S3Gen does not wait for T3 while a batch's worth is
        there (a 2-hour book on an H200 waited 3.5-8.3 s for full collections, seventeenth
        and eighteenth sessions; with "ready" and ``stream_priority="t3"`` it waited 1.5 s and
        the book took 36.8 s against 37.7 s, twenty-fourth session: the default); in steady
        state, with S3Gen the slower side, both make full collections; "drain" is "full" until T3 has started every chunk and "ready" while its
        last rows drain (S3Gen then vocodes the last chunks while T3 finishes the others,
        instead of all of them after T3: a 20-minute book's last collection waited 1.0 s for
        T3's drain, twenty-first session). Without ``overlap`` all are "full". ``t3_min_rows``: T3's smallest
        batch as its rows drain at the end (``FastT3.generate``'s ``min_rows``; 1: compacted
        down to the live rows, a graph captured for each smaller batch; an H200 spent ~0.8 s
        capturing 7 of them at a 20-minute book's end, twenty-first session). ``s3gen_join_late``:
        with ``overlap``, once T3 has finished every chunk, the chunks not yet taken (at most
        one S3Gen batch's worth) join the last batch of the collection S3Gen is launching
        (``BatchedS3Gen.join_limit``: up to a quarter over ``s3gen_batch``) instead of making
        a collection of their own after it: T3's last rows are the book's longest chunks, and
        an H200 spent 0.8-1.0 s of S3Gen's thread on a last collection of 3-8 chunks in every
        2-hour book of the twenty-second session. Joined, the engine ended ~0.5 s sooner, but
        the store got the whole last collection at once and took 0.7-0.9 s longer after it, so
        the book did not gain: off until measured with ``s3gen_handoff="drain"``. ``s3gen_conv``:
        the CFM estimator's causal convs as GEMMs over their shifted inputs, the stream kept
        as flat rows ("gemm": ``cfm_estimator._conv_mm``), or as the backend's convolutions
        over a channels-first view ("native"); None: "gemm" on CUDA, where on an H200 a batch
        of 64 book chunks' CFM took 615 instead of 688 ms and S3Gen's thread launched a 2-hour
        book for 26.7-28.4 s instead of 31.5-32.7 (twenty-third session), "native" on the CPU. ``stream_priority``: with ``overlap``, whose CUDA
        stream the GPU's scheduler favours: "t3" (T3's the highest priority, S3Gen's the
        lowest: the default), "s3gen" (the other way round) or "same". With the GEMM convs T3
        bounds the book: with "s3gen" it finished a 2-hour book at 30.7-32.9 s and S3Gen waited
        5-9.5 s for it (twenty-third and twenty-fourth sessions); with "t3" it finished at
        29.5 s and the book took 37.0 s against 37.7 (one H200, twenty-fourth session).
        ``t3_look_ahead``: T3 decode steps queued after each host look's copies and before its
        wait (``FastT3.generate``'s ``look_ahead``), so T3's stream is not idle while its
        thread harvests, refills and launches (0: none). Measured on an H100 (twenty-sixth
        session): 2 ran a 2-hour book in 38.60 s against 38.80-39.34 with 0, within the noise,
        and finished T3 1.8 s later (its extra steps), so it stays off. ``vocoder_conv2d``:
        HiFiGAN's convs as (1, k) conv2d over channels-last (B, C, 1, T) tensors, without
        cuDNN's layout transposes around each fp32 conv (``vocoder``'s module docstring).
        Experimental, off: on an H100 the compiled regions fail Inductor's stride check and
        fall back to eager, 240 ms a batch of 64 chunks against 127 compiled with conv1d;
        eager, cuDNN's layout work took 10 ms against conv1d's 36, worth ~25 ms a batch if it
        compiled (``scripts/gpu_vocoder_layout.py``, twenty-eighth session). ``s3gen_chain``:
        each CFM transformer block's tail and the next block's head in one compiled region
        (``cfm_estimator.block_out_in``), so that the feed-forward's residual add and the next
        norm1 are one kernel; False: two regions, as before the twenty-ninth session."""
        import torch

        from .s3gen_batched import BatchedS3Gen
        from .t3_fast import FastT3

        self.model = model
        self.device = model.device  # where it runs (the pipeline stores beside a GPU, inline on the CPU)
        self.sample_rate = model.sample_rate
        self.max_rows = max_rows
        self.max_vram_gb = max_vram_gb
        self.check_every = check_every
        self.t3_min_rows = max(1, int(t3_min_rows))
        self.t3_look_ahead = int(t3_look_ahead)
        self.t3 = FastT3(model, use_graphs=use_graphs, compile_layers=compile_t3)
        cuda = self.t3.device.type == "cuda"
        self.s3gen_batch = s3gen_batch or (64 if cuda else 8)
        self.collect = s3gen_collect or 4 * self.s3gen_batch
        self.overlap = cuda if overlap is None else overlap
        # The two models' streams at different priorities, so the GPU's scheduler starts the
        # favoured one's blocks first. While S3Gen was the slower side, S3Gen's stream came
        # first (an H100, 2-hour book, T3 and S3Gen only, scripts/gpu_book_stages.py: 48.4 s
        # with both at the same priority, 42.0 s so); since S3Gen's convs are GEMMs T3 bounds
        # the book, and T3 first finishes it sooner (stream_priority above).
        if stream_priority not in ("s3gen", "t3", "same"):
            raise ValueError(f"stream_priority must be 's3gen', 't3' or 'same', got {stream_priority!r}")
        self.stream_priority = stream_priority
        self._t3_stream = self._s3_stream = None
        if cuda and self.overlap:
            low, high = torch.cuda.Stream.priority_range()  # numerically: low is the larger number
            t3_p, s3_p = {"s3gen": (low, high), "t3": (high, low), "same": (low, low)}[stream_priority]
            self._t3_stream = torch.cuda.Stream(self.t3.device, priority=t3_p)
            self._s3_stream = torch.cuda.Stream(self.t3.device, priority=s3_p)
        self.t3_vram_gb = None
        if s3gen_handoff not in ("collection", "batch", "drain"):
            raise ValueError(f"s3gen_handoff must be 'collection', 'batch' or 'drain', got {s3gen_handoff!r}")
        self.handoff = s3gen_handoff
        if s3gen_take not in ("full", "ready", "drain"):
            raise ValueError(f"s3gen_take must be 'full', 'ready' or 'drain', got {s3gen_take!r}")
        self.take = s3gen_take
        self.join_late = bool(s3gen_join_late)
        bucket_kw = {}
        if s3gen_bucket_frames is not None:
            from .s3gen_batched import DEFAULT_BUCKETS

            step = int(s3gen_bucket_frames)
            if step < 2 or step % 2:
                raise ValueError(f"s3gen_bucket_frames must be a positive even frame count, got {s3gen_bucket_frames}")
            bucket_kw["buckets"] = range(step, DEFAULT_BUCKETS[-1] + step, step)
        # made before the memory is measured: its prepared weights (bf16 copies of the CFM
        # estimator's) are held like the models' own
        self.s3 = BatchedS3Gen(
            model, max_batch=self.s3gen_batch, compile=compile_s3gen, cuda_graphs=compile_s3gen or s3gen_graphs,
            compile_regions=cuda if compile_estimator is None else compile_estimator,
            compile_vocoder=cuda if compile_vocoder is None else compile_vocoder, compile_encoder=compile_encoder,
            attention=s3gen_attention, ffn=s3gen_ffn, pack=s3gen_pack, conv=s3gen_conv, vocoder_conv2d=vocoder_conv2d,
            chain=s3gen_chain,
            **bucket_kw,
        )
        if cuda:
            gib = 1 << 30
            free, _ = torch.cuda.mem_get_info(self.t3.device)
            held = torch.cuda.memory_reserved(self.t3.device) / gib  # weights and earlier buffers
            budget = free / gib + held
            if max_vram_gb is not None:
                budget = min(budget, max_vram_gb)
            spare = max(0.0, budget - held)
            self.t3_vram_gb = held + spare * t3_share  # a cap on the whole process, as FastT3 takes it
            # S3Gen's peak is ~5.5x its largest attention tensor (measured on an H100, batch 64,
            # 6 s chunks, 10 s prompt): cap that tensor so S3Gen stays in the rest, with margin
            attn_gib = max(0.25, min(4.0, spare * (1 - t3_share) / 10))
            self.s3.max_attn_bytes = int(attn_gib * (1 << 30))
        self._voice_key = None
        self._voice = None
        self.timeline = HostTimeline()

    def regions(self) -> dict:
        """The engine's compiled-region sets by name (``engine.regions.Regions``): what warm-up
        compiles and what the benchmark reports failures of."""
        out = {"t3_layers": self.t3.w.regions, "t3_sampling": self.t3.w.sampling}
        if self.s3.fused is not None:
            out["cfm_estimator"] = self.s3.fused.r
        out["vocoder"] = self.s3.vocoder.r
        if self.s3.encoder.compiled or self.s3.encoder.error:
            out["s3gen_encoder"] = self.s3.encoder
        return out

    def voice_ref(self, conds):
        """S3Gen's per-voice tensors, computed once per voice (``conds`` object)."""
        if self._voice_key is not conds.gen:
            self._voice = self.s3.prepare_voice(conds.gen)
            self._voice_key = conds.gen
        return self._voice

    def speech_token_stream(
        self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions
    ) -> Iterator[tuple[int, list[int]]]:
        """T3 only: ``(request index, tokens without EOS)`` as each request finishes."""
        return self.t3.generate(
            conds,
            requests,
            gen,
            max_rows=self.max_rows,
            check_every=self.check_every,
            max_vram_gb=self.t3_vram_gb,
            sort=False,  # the caller's order (document order): chunks finish about when the track needs them
            min_rows=self.t3_min_rows,
            look_ahead=self.t3_look_ahead,
        )

    def _finished(self, requests, conds, gen) -> Iterator[tuple[int, list[int]]]:
        """T3's finished requests as they finish: ``(index, tokens cleaned for S3Gen)``."""
        for i, tokens in self.speech_token_stream(requests, conds, gen):
            yield i, speech_tokens_for_s3gen(tokens)

    def _groups(self, requests, conds, gen) -> Iterator[list[tuple[int, list[int]]]]:
        """T3's finished requests grouped into S3Gen's collections, ``[(index, cleaned tokens),
        ...]``: the first one batch (the first audio comes early), then ``collect`` ("full") or
        whatever has finished once a batch's worth has, up to ``collect`` ("ready"; "drain":
        once T3 has started every request). With
        ``overlap`` T3 runs on a thread of its own; without, as the collections are asked for."""
        if not self.overlap:
            return self._s3gen_batches(requests, conds, gen)
        def least() -> int:  # "drain": full collections until T3 has nothing left to start
            return self.s3gen_batch if self.take == "ready" or (self.take == "drain" and self.t3.draining) else self.collect

        return ReadyGroups(self._finished(requests, conds, gen), self._t3_stream, least=least, most=self.collect,
                           first=self.s3gen_batch, timeline=self.timeline)

    def _s3gen_batches(self, requests, conds, gen) -> Iterator[list[tuple[int, list[int]]]]:
        """T3's finished requests grouped for S3Gen as T3 makes them on this thread (``_groups``
        without ``overlap``): ``[(index, cleaned tokens), ...]``.

        A request with nothing left to say comes as a group of its own with empty tokens."""
        waiting: list[tuple[int, list[int]]] = []
        want = self.s3gen_batch  # the first collection is small: the first audio comes early
        for i, kept in self._finished(requests, conds, gen):
            if not kept:  # end-of-speech at once: nothing to say
                yield [(i, [])]
                continue
            waiting.append((i, kept))
            if len(waiting) >= want:
                yield waiting
                waiting, want = [], self.collect
        if waiting:
            yield waiting

    def synthesize_stream(
        self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions
    ) -> Iterator[tuple[int, SynthesisResult]]:
        """``(request index, result)`` for each request, a batch of S3Gen at a time."""
        voice = self.voice_ref(conds)
        tl = self.timeline
        groups = self._groups(requests, conds, gen)
        rest = getattr(groups, "rest", None) if self.join_late else None  # ReadyGroups.rest, with overlap
        while True:
            t = time.perf_counter()
            items = next(groups, None)  # without overlap: T3's own decoding, counted as waiting for it
            got = time.perf_counter()
            tl.t3_wait_s += got - t
            tl.spans.append(("t3_wait", t, got, len(items or ())))
            if items is None:
                tl.done_at = time.perf_counter()
                if not self.overlap:
                    tl.t3_done_at = tl.done_at
                return
            for i, kept in items:
                if not kept:  # end-of-speech at once: nothing to say
                    yield i, SynthesisResult(np.zeros(0, dtype=np.float32), 0)
            items = [(i, kept) for i, kept in items if kept]
            if not items:
                continue
            tl.collections += 1
            n = 0
            for res in self._vocode(items, requests, voice, gen, rest):
                t = time.perf_counter()
                yield res
                n += res[1].tokens > 0  # chunks vocoded (a late one with nothing to say is not)
                tl.consumer_s += time.perf_counter() - t
            tl.spans.append(("s3gen", got, time.perf_counter(), n))

    def synthesize(self, requests: Sequence[SynthesisRequest], conds, gen: GenerationOptions) -> list[SynthesisResult]:
        results: list[SynthesisResult | None] = [None] * len(requests)
        for i, result in self.synthesize_stream(requests, conds, gen):
            results[i] = result
        return results  # type: ignore[return-value]

    def _on_s3_stream(self):
        """S3Gen's stream as the current one, after what the caller's stream has queued (the
        voice's tensors); warm-up comes through here too, so S3Gen's memory stays in one
        stream's pool of the caching allocator."""
        import contextlib

        import torch

        if self._s3_stream is None:
            return contextlib.nullcontext()
        self._s3_stream.wait_stream(torch.cuda.current_stream(self._s3_stream.device))
        return torch.cuda.stream(self._s3_stream)

    def _vocode(self, items, requests, voice, gen: GenerationOptions, rest=None) -> Iterator[tuple[int, SynthesisResult]]:
        # The whole collection, then its results (s3gen_handoff="collection"). Handing them
        # over a padded batch at a time, each batch waited for before the next was launched,
        # was tried once on an H100 (2-hour book): 65.3 s against 58.3, on a machine whose
        # CPU-only phases ran 23-33% slower than the other run's: not shown to help.
        # s3gen_handoff="batch" launches the batches back to back and hands each over once
        # its copy is complete, looked for between launches (BatchedS3Gen.synthesize_iter).
        # ``rest`` (ReadyGroups.rest, with s3gen_join_late): once T3 is done, its last chunks
        # join the collection's last batch, with S3Gen's indices after the collection's
        items, said_nothing = list(items), []

        def late():
            joined = []
            for i, kept in rest(self.s3gen_batch):
                if kept:
                    items.append((i, kept))
                    joined.append((kept, requests[i].seed))
                else:  # end-of-speech at once: nothing to say
                    said_nothing.append(i)
            self.timeline.late_joined += len(joined)
            return joined

        toks = [k for _, k in items]
        kw = dict(n_timesteps=gen.cfm_steps, seeds=[requests[i].seed for i, _ in items],
                  late=late if rest is not None else None)

        def whole():
            yield list(enumerate(self.s3.synthesize(toks, voice, **kw)))

        by_batch = self.handoff == "batch" or (self.handoff == "drain" and self.t3.draining)
        batches = self.s3.synthesize_iter(toks, voice, **kw) if by_batch else whole()
        while True:
            with self._on_s3_stream():  # while S3Gen's work is launched, not around the caller's
                batch = next(batches, None)
            if batch is None:
                for i in said_nothing:
                    yield i, SynthesisResult(np.zeros(0, dtype=np.float32), 0)
                return
            for j, wav in batch:
                i, kept = items[j]
                yield i, SynthesisResult(np.ascontiguousarray(wav, dtype=np.float32), len(kept))


class ReadyGroups:
    """``items``, produced on a thread of their own (on CUDA ``stream``), handed over as lists
    by iterating: each is every item made and not yet handed over, up to ``most``, once at
    least ``least`` are (fewer only when the producer is done); the first list, if ``first``
    is given, is ``first`` items once they are made. ``least`` may be a function, asked again
    as items come (``s3gen_take="drain"``). The producer never waits for the consumer (T3's
    finished requests are a few token ids each). An iterator (its thread starts with the
    first ``next``); :meth:`rest` hands over the last items outside a group (S3Gen's late
    joiners).

    The producer's exceptions are raised in the consumer once the items made before them are
    handed over; closing the consumer early stops the producer at its next item and waits for
    it. ``timeline``: its ``t3_done_at`` is set when the producer has made its last item.
    """

    def __init__(
        self, items: Iterator, stream=None, least=1, most: int | None = None, first: int | None = None,
        timeline: HostTimeline | None = None,
    ):
        import collections
        import threading

        self.items, self.stream, self.least, self.most, self.first = items, stream, least, most, first
        self.timeline = timeline
        self._ready: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._end: list = []  # [exception or None] once the producer has finished
        self._gen = None  # the groups' generator, made by the first next

    def __iter__(self):
        return self

    def __next__(self) -> list:
        if self._gen is None:
            self._gen = self._groups()
        return next(self._gen)

    def close(self) -> None:
        """Stops the producer at its next item and waits for its thread (an early stop)."""
        if self._gen is not None:
            self._gen.close()

    def rest(self, most: int) -> list:
        """Every item not yet handed over, if the producer has made its last one cleanly and
        they are at most ``most``; else nothing (they come in the groups as usual). Asked by
        S3Gen's thread before the last batch of a collection: the book's last few chunks join
        that batch instead of making a small collection of their own."""
        with self._cond:
            if self._end != [None] or not self._ready or len(self._ready) > most:
                return []
            out = list(self._ready)
            self._ready.clear()
            return out

    def _groups(self) -> Iterator[list]:
        import threading

        ready, cond, end, items, timeline = self._ready, self._cond, self._end, self.items, self.timeline
        stop = threading.Event()

        def produce():
            import contextlib

            import torch

            error = None
            try:
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    for x in items:
                        with cond:
                            ready.append(x)
                            cond.notify()
                        if stop.is_set():
                            return
                    if timeline is not None:
                        timeline.t3_done_at = time.perf_counter()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                error = e
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
                if timeline is not None:
                    timeline.t3_cpu_s += time.thread_time()  # a new thread's clock starts at 0
                with cond:
                    end.append(error)
                    cond.notify()

        thread = threading.Thread(target=produce, name="ttsbatch-t3", daemon=True)
        thread.start()
        least, most, first = self.least, self.most, self.first
        at_least = least if callable(least) else (lambda: least)  # asked again as items come
        lo, hi = (lambda: first, first) if first is not None else (at_least, most)
        try:
            while True:
                with cond:
                    cond.wait_for(lambda: len(ready) >= lo() or end)
                    n = len(ready) if hi is None else min(len(ready), hi)
                    group = [ready.popleft() for _ in range(n)]
                    lo, hi = at_least, most
                    error = end[0] if end and not ready else None
                if group:
                    yield group
                elif error is not None:
                    raise error
                else:  # the producer is done and everything is handed over
                    return
        finally:
            stop.set()
            thread.join()
