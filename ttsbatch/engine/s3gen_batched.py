"""Batched S3Gen: flow encoder, CFM decoder (Euler + CFG) and HiFiGAN over many chunks at once.

Stock ``S3Gen.inference`` handles one chunk at a time and re-derives everything each call.
Here the voice is prepared once (:meth:`BatchedS3Gen.prepare_voice`) and chunks are grouped
by length into batches (:meth:`BatchedS3Gen.batches`), each padded to a mel-length bucket
and run with per-item masks; every item's output is trimmed back to its own length.

Semantics are stock's, per chunk (chatterbox-tts 0.1.7): the voice's prompt tokens go in front
of the item's tokens, the encoder runs over both, the prompt mel is the CFM condition for the
prompt frames, the CFM output is cut after the prompt frames, and HiFiGAN runs on the item's
own frames only (then stock's 40 ms trim/fade-in). Padding never leaks into an item:

- encoder: attention masks the padded keys; the look-ahead conv (the only non-causal conv)
  sees zeros past each item's end, as stock's ``F.pad`` gives it (padded frames are zeroed
  first); the rest is per-frame or causal.
- CFM estimator: causal convs, per-frame LayerNorm, attention with the padded keys masked.
  Where its attention is varlen flash (CUDA) it runs over the batch's items end to end
  instead (:class:`PackedLayout`: a few masked frames between items, each item's queries
  over its own keys): no padded frames at all, the same result (tested against stock).
- HiFiGAN: every conv's output is zeroed past the item's end at its resolution, so the next
  conv's zero padding is what stock sees; the source STFT reflect-pads at each item's own end;
  the inverse STFT's window envelope counts only the item's frames. So batched HiFiGAN equals
  per-item HiFiGAN up to float rounding, the last samples included (tested).

Noise: stock draws the CFM start noise with ``torch.randn_like(mu)`` over prompt+item frames
and HiFiGAN's source draws a random phase (``Uniform``) and sine noise per sample from the
global RNG. Here each item's noise is drawn over its own length only, from a generator seeded
with the item's seed on the device (CFM noise, then phase, then sine noise), so an item's
audio depends on its tokens, voice and seed, never on its neighbours or its bucket (up to
float rounding of differently shaped kernels). Tests inject stock's exact noise instead
(``noise=``, ``source_noise=``).

No host syncs in the per-bucket work: chatterbox's ``make_pad_mask`` calls ``.item()`` and
``add_optional_chunk_mask`` (used by the encoder and the CFM estimator) checks its mask with
``.item()``; SineGen builds tensors on the CPU and ``torch.istft`` checks its window envelope
with a sync. This module calls the stock submodules (layers, blocks, convs) with its own
masks and has small replacements for exactly those forwards (marked below). Inputs are
staged once per batch (pinned, non-blocking), audio comes back once per batch into pinned
memory, and the host waits once per :meth:`synthesize` call.

GPU options: ``dtype`` (default bf16 on CUDA, fp32 on CPU) runs the encoder and the CFM
estimator under autocast; the Euler state, HiFiGAN (unless ``vocoder_dtype``) and the
(i)STFT stay fp32. The CFM estimator runs as the pure functions of ``cfm_estimator``
(weights prepared once, q/k/v as one GEMM); ``compile_regions=True`` compiles those regions,
one dynamic-shape graph each for every bucket and batch size (the default of the fast engine
on CUDA; ``regions_mode`` passes a torch.compile mode, for measuring max-autotune). In bf16
on CUDA the estimator's attention runs as varlen flash attention over the padded batch (each
row's key count given by ``seqused_k``: the key-padding mask without a mask tensor): PyTorch's
FA2 kernel, or FlashAttention 4's (a Hopper kernel) where flash-attn-4 is installed:
``attention="auto"`` (the default) takes FA4 where it runs, ``"fa2"`` / ``"fa4"`` force one. HiFiGAN after ``conv_pre`` runs as the pure functions of ``vocoder`` (one
region per upsampling stage, one for conv_post and the iSTFT's elementwise start);
``compile_vocoder=True`` compiles those the same way, and ``vocoder_dtype=torch.bfloat16``
runs their convs in bf16 (Snake, masks, residuals, conv_post, the sine source and the
(i)STFT stay fp32). ``compile_encoder=True`` compiles the flow encoder's conformer layers
as one region of the same kind (one graph for the layers of both stacks). ``compile=True`` runs the encoder, the CFM step and HiFiGAN through
``torch.compile`` (one graph per bucket and batch size: batches are padded to a power of
two), and ``cuda_graphs=True`` replays the CFM loop's Euler step from one CUDA graph per
(batch, bucket) shape.
Both are CUDA-only and off by default.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import cfm_estimator, cfm_ffn, fa4, vocoder
from .capture import failure_line, recording
from .regions import Regions

log = logging.getLogger("ttsbatch")

# Item mel frames (2 per speech token, prompt excluded); an item lands in the smallest that fits.
DEFAULT_BUCKETS = (64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 2048)
OVERFLOW_STEP = 256  # items longer than the last bucket are padded to a multiple of this
SPEECH_VOCAB = 6561  # S3 speech tokens; larger ids are T3's special tokens (stock drops them)


# ---------------------------------------------------------------------------------------------
# Mask helpers: static max length from the bucket, lengths on the device, no .item()/.tolist()


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True where position < length. Stock's ``make_pad_mask`` (negated),
    but ``max_len`` comes from the bucket, so nothing is read back from the device."""
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)


def length_mask_f(lengths: torch.Tensor, max_len: int, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, max_len) float mask (1 valid, 0 padded)."""
    return length_mask(lengths, max_len).to(dtype).unsqueeze(1)


def attention_bias(mask_f: torch.Tensor, heads: int) -> torch.Tensor:
    """Stock ``mask_to_bias`` for the estimator's attention ((1 - m) * -1e10), expanded once to
    (B * heads, 1, T) so diffusers' ``prepare_attention_mask`` has nothing to repeat."""
    bias = (1.0 - mask_f) * -1.0e10  # (B, 1, T)
    b, _, t = bias.shape
    return bias.unsqueeze(1).expand(b, heads, 1, t).reshape(b * heads, 1, t).contiguous()


# ---------------------------------------------------------------------------------------------
# Noise


def item_noise(seed: int, cfm_frames: int, samples: int, device, harmonics: int = 9):
    """One item's noise, from its own generator on ``device``: CFM start noise (80, cfm_frames),
    HiFiGAN source phase (harmonics, 1) in [-pi, pi) and sine noise (harmonics, samples).
    Drawn over the item's own lengths only, so it does not depend on batch or bucket."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    z = torch.randn((80, cfm_frames), generator=g, device=device)
    u = torch.rand((harmonics, 1), generator=g, device=device)
    phase = -math.pi + u * (2 * math.pi)
    sine = torch.randn((harmonics, samples), generator=g, device=device)
    return z, phase, sine


# ---------------------------------------------------------------------------------------------
# The CFM's packed layout


@dataclass(frozen=True)
class PackedLayout:
    """A padded batch's items laid end to end for the CFM estimator, a ``gap`` of masked frames
    after each: the estimator computes the items' own frames (and the gaps) instead of every
    row up to the bucket's length. Exact, not an approximation: the estimator's convolutions
    are causal with kernel ``gap + 1`` and every one of them reads its input through the mask,
    so an item's first frame sees ``gap`` zeros before it, as the zero padding of a row of its
    own gives it; LayerNorm and the feed-forward are per frame; the attention is varlen, each
    item's queries (its frames and the gap after it) over its own frames only. Host-built
    once per batch (the lengths are known when the batch is staged), so nothing is read back."""

    src: torch.Tensor  # (N,) int64: each packed frame's flat index b * T + f in the padded batch (a gap: the item's frame 0, finite and masked)
    dst: torch.Tensor  # (B * T,) int64: each padded frame's packed index (padding: the gap after the item, masked later)
    mask: torch.Tensor  # (1, 1, N) fp32: 1 on the items' frames, 0 on the gaps and the tail
    bounds: torch.Tensor  # (2, 2B + 1) int32: [query/key range starts of both CFG halves, then 2N; keys used per range, then 2N]
    max_len: int  # the longest range (an item and its gap): the attention's max_seqlen
    n: int  # N, packed frames per CFG half


def pack_layout(lengths: Sequence[int], T: int, gap: int, device, pin: bool = False, align: int = 16) -> PackedLayout:
    """The :class:`PackedLayout` of items of ``lengths`` frames (each <= T) padded to ``T``."""
    L = np.asarray(lengths, dtype=np.int64)
    B = len(L)
    if B == 0 or L.min() < 1 or L.max() > T:
        raise ValueError(f"item lengths must be in [1, {T}], got {list(L)}")
    span = L + gap
    starts = np.concatenate([[0], np.cumsum(span)[:-1]])
    N = -(-int(span.sum()) // align) * align
    ends = np.append(starts[1:], N)  # the last range takes the tail
    item = np.repeat(np.arange(B), ends - starts)  # (N,) the item each packed frame belongs to
    off = np.arange(N) - starts[item]
    valid = off < L[item]
    src = item * T + np.where(valid, off, 0)
    f = np.arange(T)
    dst = (starts[:, None] + np.minimum(f[None, :], L[:, None])).reshape(-1)  # past the item's end: its gap's first frame
    cu = np.concatenate([starts, N + starts, [2 * N]])
    used = np.concatenate([L, L, [2 * N]])
    buf = torch.from_numpy(np.concatenate([src, dst, valid.astype(np.int64), cu, used]))
    if pin:
        buf = buf.pin_memory()
    buf = buf.to(device, non_blocking=pin)  # one copy per batch
    src_d, dst_d, valid_d, bounds = torch.split(buf, [N, B * T, N, 2 * (2 * B + 1)])
    return PackedLayout(src_d, dst_d, valid_d.to(torch.float32).view(1, 1, N), bounds.to(torch.int32).view(2, 2 * B + 1), int((ends - starts).max()), N)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoiceRef:
    """A voice's S3Gen conditioning, prepared once and kept on the device."""

    prompt_token: torch.Tensor  # (Pt,) int64
    prompt_feat: torch.Tensor  # (80, Pmel) fp32, the prompt mel, channels first
    spks: torch.Tensor  # (80,) fp32: normalized x-vector through spk_embed_affine_layer
    n_prompt_tokens: int
    n_prompt_frames: int

    def item_frames(self, n_tokens: int) -> int:
        """Mel frames stock outputs for an item of ``n_tokens`` (2 per token when the prompt
        mel has exactly 2 frames per prompt token, as ``embed_ref`` arranges)."""
        return 2 * (self.n_prompt_tokens + n_tokens) - self.n_prompt_frames


@dataclass
class StageTimes:
    """Seconds per stage, summed over calls (filled only with ``profile=True``)."""

    encoder: float = 0.0
    cfm: float = 0.0
    hifigan: float = 0.0
    batches: int = 0
    items: int = 0
    launch_s: float = 0.0  # host seconds launching batches (staging and the per-bucket work's Python)
    # the launching thread's CPU seconds in those: the rest of launch_s it was off the CPU,
    # waiting for the GIL or for room in the device's launch queue
    launch_cpu_s: float = 0.0
    sync_s: float = 0.0  # host seconds waiting for the device's results (the call's one wait, or a batch's)
    cfm_frames: int = 0  # frames the CFM estimator ran over per CFG half (padding or gaps included)
    graph_captures: int = 0  # CFM steps captured (``cuda_graphs``): one per (batch, bucket) shape
    capture_s: float = 0.0  # host seconds the captures took (recording the loop's launches)


def conformer_layer(layer, x, att, pos):
    """One layer of the flow encoder's conformer stacks: stock ``ConformerEncoderLayer.forward``
    with the key-padding mask ``att`` (B, 1, T) for its attention and its conv module alike, as
    ``UpsampleConformerEncoder.forward`` calls it. A function of the layer, so that one compiled
    graph serves every layer (the layer's weights are the graph's inputs)."""
    return layer(x, att, pos, att)[0]


class BatchedS3Gen:
    """Stock S3Gen semantics over many chunks at once (see the module docstring).

    ``model`` is a :class:`ttsbatch.engine.model.LoadedModel` (its ``s3gen`` is used as is,
    weights shared with the stock path). ``buckets``: item mel-frame lengths (even).
    ``max_batch``: most items per forward; ``max_attn_gib`` caps the size of one attention-score
    tensor of the encoder's upsampled stack (batch × 8 heads × frames² fp32, its largest
    activation), which lowers the batch of long buckets. ``pack``: the CFM over each batch's
    items end to end (:class:`PackedLayout`) instead of padded rows; None: where the attention
    is varlen flash and neither ``compile`` nor ``cuda_graphs`` is on. ``conv``: the CFM
    estimator's causal convs as GEMMs over flat rows ("gemm") or as the backend's own
    convolutions ("native"; see ``cfm_estimator.FusedEstimator``); None: "gemm" on CUDA (an
    H200's CFM 11% faster), "native" on the CPU (oneDNN's convs: the GEMM path's CFM took 6-9%
    longer with the full-size checkpoint on two cores). ``chain``: a transformer block's tail
    and the next block's head as one region (``cfm_estimator.FusedEstimator``'s ``chain``).
    """

    def __init__(
        self,
        model,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        dtype: torch.dtype | None = None,
        max_batch: int = 64,
        max_attn_gib: float = 4.0,
        compile: bool = False,
        cuda_graphs: bool = False,
        compile_mode: str | None = None,
        compile_dynamic: bool | None = False,
        compile_regions: bool = False,
        regions_backend: str = "inductor",
        regions_mode: str | None = None,
        profile: bool = False,
        vocoder_rows: int | None = None,
        compile_vocoder: bool = False,
        vocoder_dtype: torch.dtype = torch.float32,
        vocoder_conv2d: bool = False,
        compile_encoder: bool = False,
        attention: str = "auto",
        ffn: str = "region",
        pack: bool | None = None,
        conv: str | None = None,
        chain: bool = True,
    ):
        s3 = model.s3gen
        self.s3 = s3
        self.flow = s3.flow
        self.hift = s3.mel2wav
        if getattr(s3, "meanflow", False):
            raise ValueError("BatchedS3Gen supports the CFM (non-meanflow) S3Gen only")
        self.device = torch.device(model.device)
        self.is_cuda = self.device.type == "cuda"
        buckets = tuple(sorted({int(b) for b in buckets}))
        if not buckets or any(b <= 0 or b % 2 for b in buckets):
            raise ValueError(f"buckets must be positive even mel-frame counts, got {buckets}")
        self.buckets = buckets
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.is_cuda else torch.float32)
        self.max_batch = int(max_batch)
        self.max_attn_bytes = int(max_attn_gib * 2**30)
        if (compile or cuda_graphs) and not self.is_cuda:
            raise ValueError("compile=True and cuda_graphs=True need a CUDA device")
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.profile = profile
        # rows per HiFiGAN call: the whole batch on CUDA; one on CPU, where batching HiFiGAN is
        # ~1.7x slower per item than running it row by row (measured, tiny checkpoint)
        self.vocoder_rows = vocoder_rows if vocoder_rows is not None else (0 if self.is_cuda else 1)
        self.times = StageTimes()

        dec = self.flow.decoder
        self.cfg_rate = float(dec.inference_cfg_rate)
        self.t_scheduler = dec.t_scheduler
        est = dec.estimator
        blocks = [b for _, tbs, *_ in est.down_blocks for b in tbs]
        self.heads = blocks[0].attn1.heads if blocks else 8
        # HiFiGAN geometry (read off the modules)
        h = self.hift
        self.up_rates = [int(u.stride[0]) for u in h.ups]
        self.n_fft = int(h.istft_params["n_fft"])
        self.hop = int(h.istft_params["hop_len"])
        self.samples_per_frame = int(np.prod(self.up_rates)) * self.hop  # 480 at 24 kHz
        self.harmonics = h.m_source.l_sin_gen.harmonic_num + 1
        self.window = h.stft_window.to(self.device, torch.float32)  # stock moves it per call
        self.trim_fade = s3.trim_fade.to(self.device, torch.float32)
        self._pe_cache: dict = {}
        self._t_span_cache: dict = {}
        self._graphs: dict = {}
        self._graph_seen: set = set()  # shapes run once uncaptured (cuda_graphs: captured on the second)
        self._graph_pool = None
        self._capture_stream = None
        self.graph_error: str | None = None  # why a CFM capture failed (then graphs are off)

        # the estimator as pure functions of prepared weights (cfm_estimator), when the
        # checkpoint has the configuration they mirror; else the stock modules, called in order
        self.fused = None
        if ffn not in ("region", "triton", "triton-noproj", "triton-ffn"):
            raise ValueError(f"ffn must be 'region', 'triton', 'triton-noproj' or 'triton-ffn', got {ffn!r}")
        self.ffn = "region"
        if cfm_estimator.supported(est):
            regions = cfm_estimator.regions(compile=compile_regions, backend=regions_backend, mode=regions_mode)
            conv = conv or ("gemm" if self.is_cuda else "native")
            self.fused = cfm_estimator.FusedEstimator(est, self.dtype, regions, conv=conv, chain=chain)
            # the transformer blocks' tail as one Triton kernel (cfm_ffn): the feed-forward's
            # hidden stays on the chip; CUDA and 16-bit weights only (GELU's tanh form, as the
            # compiled region's cuBLASLt epilogue there)
            if ffn != "region":
                b = self.fused.mid[0][1][0] if self.fused.mid and self.fused.mid[0][1] else None
                ok = self.is_cuda and self.dtype in (torch.bfloat16, torch.float16) and b is not None and all(
                    t is not None for t in (b.bo, b.b1, b.b2)) and b.approximate == "none" and cfm_ffn.supported(
                    b.w2.shape[0], b.wo.shape[1], b.w1.shape[0], True)
                if ok:
                    # what the kernel takes: block_out's arguments ("o"), the block_proj
                    # region's result ("x"), or the block_norm3 region's rows ("h")
                    self.fused.ffn_input = {"triton": "o", "triton-noproj": "x", "triton-ffn": "h"}[ffn]
                    self.fused.ffn = cfm_ffn.Tuned(kernel="ffn") if ffn == "triton-ffn" else cfm_ffn.Tuned(proj=ffn == "triton")
                    self.ffn = ffn
                else:
                    log.warning("the fused feed-forward kernel does not run here (CUDA, bf16 and the estimator's "
                                "shapes only); S3Gen uses the compiled region")
        elif compile_regions:
            raise ValueError("compile_regions needs the estimator configuration of chatterbox-tts 0.1.7")
        # the estimator's attention kernel over the padded rows: PyTorch's FA2 varlen ("fa2"),
        # FlashAttention 4's (flash-attn-4, CuTe DSL, a Hopper kernel: "fa4"), or "auto": FA4
        # where it is installed and runs, else FA2. A kernel that fails its check gives way to
        # the next. "auto" is the default: on an H100 FA4 is 0.36 against 0.44 ms a call (128
        # rows x 650 frames) and 0.73 against 0.97 (1,100). Through flash_attn_varlen_func its
        # launch cost ~200 us of Python a call (a whole book lost 2.2 s with it, S3Gen's thread
        # sharing the GIL); launched directly (fa4.FA4Varlen) 25-39 us, as FA2's 33-35, and a
        # book's synthesis took 50.4 s against 52.6 with FA2 in the next process on the same
        # machine (BENCHMARKS.md, thirteenth session).
        if attention not in ("auto", "fa2", "fa4"):
            raise ValueError(f"attention must be 'auto', 'fa2' or 'fa4', got {attention!r}")
        self.flash = False
        self.attention = None
        self.fa4 = None  # the FA4 launcher (fa4.FA4Varlen) when FA4 is the kernel
        for name in (("fa2",) if attention == "fa2" else ("fa4", "fa2")):
            self._flash = self._flash_fa2 if name == "fa2" else self._fa4_launcher()
            if self._flash is not None and self.fused is not None and self._flash_usable():
                if name == "fa4":
                    self.fa4 = self._flash
                self.flash, self.attention = True, name
                break
        if attention == "fa4" and self.attention != "fa4":
            log.warning("FlashAttention 4 is not usable here (flash-attn-4 missing, or not a Hopper GPU); S3Gen uses %s",
                        self.attention or "masked SDPA")
        # the CFM over each batch's items end to end (PackedLayout) instead of padded rows: on
        # the benchmark book ~1 estimator frame in 7 was padding (BENCHMARKS.md, fourteenth
        # session). Needs the fused estimator; None: where the attention is varlen flash (the
        # portable path's dense (N, N) bias is for tests), not with graphs or whole-stage
        # compiling, whose shapes must repeat.
        packable = self.fused is not None and not (compile or cuda_graphs)
        if pack and not packable:
            raise ValueError("pack=True needs the fused CFM estimator and neither compile nor cuda_graphs")
        self.pack = packable and self.flash if pack is None else bool(pack)
        # the masked frames after each packed item: the estimator's causal convs see this many
        # frames back, which must be zeros, as a padded row's own start gives them
        self.pack_gap = max([m.kernel_size[0] - 1 for m in est.modules() if isinstance(m, torch.nn.Conv1d)] + [0])
        # HiFiGAN after conv_pre as pure functions of prepared weights (vocoder), one region per
        # upsampling stage; compile_vocoder compiles them as compile_regions does the estimator's
        # (vocoder_conv2d: the convs as conv2d over channels-last tensors, vocoder's docstring)
        self.vocoder = vocoder.FusedVocoder(
            h, vocoder_dtype, vocoder.regions(len(h.ups), compile=compile_vocoder, backend=regions_backend, conv2d=vocoder_conv2d),
            conv2d=vocoder_conv2d,
        )

        # the flow encoder's conformer layers as one region: one graph for every layer of both
        # stacks, batch size and bucket (frames, positions dynamic; rows unbacked, so a batch of
        # one shares it too). Not the whole encoder as one region: dynamo traces a region again
        # in every process (Inductor's cache keeps compiled graphs, not the trace), and the
        # whole encoder (635 ops) took it 4.5 s against 0.5 s for one layer
        # (scripts/encoder_trace_time.py, on the dev machine's CPU)
        self.encoder = Regions({"layer": conformer_layer}, "S3Gen's flow encoder", compile_encoder, regions_backend)
        self._enc_fn = self._encode
        self._step_fn = self._cfm_step
        self._voc_fn = self._vocode
        if compile:
            import torch._dynamo as dynamo

            cfg = dynamo.config
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 256))
            kw = dict(dynamic=compile_dynamic)
            if compile_mode:
                kw["mode"] = compile_mode
            self._enc_fn = torch.compile(self._encode, **kw)
            self._step_fn = torch.compile(self._cfm_step, **kw)
            self._voc_fn = torch.compile(self._vocode, **kw)

    # -----------------------------------------------------------------------------------------
    # Voice

    @torch.inference_mode()
    def prepare_voice(self, gen: dict) -> VoiceRef:
        """S3Gen's ref dict (``conds.gen``) -> a :class:`VoiceRef`, once per voice."""
        dev = self.device
        pt = torch.as_tensor(gen["prompt_token"]).to(dev).reshape(-1).long()  # stock may have cast it to float
        n_pt = pt.numel()
        plen = gen.get("prompt_token_len")
        if plen is not None and int(torch.as_tensor(plen).reshape(-1)[0]) != n_pt:  # once per voice: a sync is fine
            raise ValueError("prompt_token_len differs from the prompt's token count")
        pf = torch.as_tensor(gen["prompt_feat"]).to(dev, torch.float32)
        pf = pf.reshape(-1, pf.shape[-1])  # (Pmel, 80)
        emb = torch.atleast_2d(torch.as_tensor(gen["embedding"]).to(dev, torch.float32))
        spks = self.flow.spk_embed_affine_layer(F.normalize(emb, dim=1))[0]
        return VoiceRef(pt, pf.t().contiguous(), spks.float().contiguous(), n_pt, pf.shape[0])

    # -----------------------------------------------------------------------------------------
    # Bucketing

    def bucket_for(self, n_tokens: int) -> int:
        """The mel-length bucket (item frames, 2 per token) an item of ``n_tokens`` lands in."""
        frames = 2 * int(n_tokens)
        for b in self.buckets:
            if frames <= b:
                return b
        return -(-frames // OVERFLOW_STEP) * OVERFLOW_STEP

    def batches(self, lengths: Sequence[int], voice: VoiceRef) -> list[tuple[int, list[int]]]:
        """The items (token counts ``lengths``) as padded batches ``(bucket, indices)``, empty
        items skipped: longest first, each batch as many neighbours by length as its bucket
        allows, the sizes evened out (300 items at 64 a batch: 5 of 60, not 4 of 64 and one
        of 44). A batch is padded to its longest item's bucket, so shorter items pay for a few
        padded frames in the encoder and HiFiGAN (and in the CFM unless it packs: ``pack``);
        that is cheap beside the voice prompt every item carries (~500 frames), while
        batches of one bucket each would be small (a collection of 256 chunks spreads over
        ~15 buckets) and a small batch uses the GPU poorly (H100: 169
        audio-s/s at batch 16, 247 at 64)."""
        order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
        out = []
        while order:
            bucket = self.bucket_for(lengths[order[0]])
            limit = self.batch_limit(bucket, voice)
            size = -(-len(order) // -(-len(order) // limit))  # even sizes: ceil(n / ceil(n / limit))
            out.append((bucket, order[:size]))
            order = order[size:]
        return out

    def batch_limit(self, bucket: int, voice: VoiceRef) -> int:
        """The most items a batch of ``bucket`` takes: ``max_batch``, fewer where the flow
        encoder's attention scores would pass ``max_attn_bytes``."""
        return max(1, min(self.max_batch, self._attn_limit(bucket, voice)))

    def _attn_limit(self, bucket: int, voice: VoiceRef) -> int:
        frames = 2 * (voice.n_prompt_tokens + bucket // 2)
        heads = self.flow.encoder.up_encoders[0].self_attn.h if len(self.flow.encoder.up_encoders) else 8
        return self.max_attn_bytes // (heads * frames * frames * 4)

    def _padded_batch(self, b: int, limit: int) -> int:
        if not (self.compile or self.cuda_graphs):
            return b
        return max(b, min(1 << (b - 1).bit_length(), limit))

    # -----------------------------------------------------------------------------------------
    # Public entry points

    @torch.inference_mode()
    def synthesize(
        self,
        token_lists: Sequence,
        voice: VoiceRef,
        n_timesteps: int = 10,
        noise: Sequence[torch.Tensor] | None = None,
        source_noise: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        seeds: Sequence[int] | None = None,
        late: Callable[[], list[tuple[Sequence, int]]] | None = None,
    ) -> list[np.ndarray]:
        """Waveforms (float32, 24 kHz) for each item of ``token_lists``.

        ``noise[i]``: item i's CFM start noise, (80, prompt_frames + item_frames) as stock's
        ``randn_like(mu)``; ``source_noise[i]``: (phase (9, 1), sine noise (9, samples)) as
        stock's SineGen draws them. Items without injected noise draw it from ``seeds[i]``
        (default 0) through :func:`item_noise`. ``late``: asked once, just before the last
        batch is launched, for more items ``[(tokens, seed), ...]`` (see :meth:`_launch`);
        their waveforms follow the others' in the returned list.
        """
        t0, c0 = time.perf_counter(), time.thread_time()
        out, pending = self._run(token_lists, voice, n_timesteps, noise, source_noise, seeds, want_wav=True, late=late)
        t1 = time.perf_counter()
        self.times.launch_cpu_s += time.thread_time() - c0
        if self.is_cuda and pending:
            torch.cuda.current_stream(self.device).synchronize()  # the one wait of the call
        self.times.launch_s += t1 - t0
        self.times.sync_s += time.perf_counter() - t1
        for idxs, host, lens, _ in pending:
            for i, wav in self._host_wavs(idxs, host, lens):
                out[i] = wav
        return out

    @torch.inference_mode()
    def synthesize_iter(
        self, token_lists: Sequence, voice: VoiceRef, n_timesteps: int = 10, seeds: Sequence[int] | None = None,
        late: Callable[[], list[tuple[Sequence, int]]] | None = None,
    ) -> Iterator[list[tuple[int, np.ndarray]]]:
        """:meth:`synthesize`'s waveforms a padded batch at a time, ``[(item index, wav), ...]``,
        each batch as soon as its copy to the host is complete: the caller stores and encodes
        the first batches while the GPU renders the last (a collection's audio otherwise
        arrives at once, and the last collection's after the GPU's last kernel). Empty items
        come first. The batches are launched back to back as in :meth:`synthesize`; between
        launches the finished ones are looked for without waiting (an event query), and the
        rest are waited for one by one at the end. The same audio as :meth:`synthesize` (bit
        for bit where the device's kernels are deterministic: on CUDA, with cuDNN's default
        algorithms, two calls of either differ by ~1e-4). ``late`` as in :meth:`synthesize`:
        late items come with indices after the others' (empty ones not at all)."""
        toks = self._items(token_lists, None, None, seeds)
        empty = [(i, np.zeros(0, dtype=np.float32)) for i, t in enumerate(toks) if len(t) == 0]
        if empty:
            yield empty
        pending: list = []
        launches = self._launch(toks, voice, n_timesteps, None, None, seeds, want_wav=True, late=late)
        while True:
            t0, c0 = time.perf_counter(), time.thread_time()
            res = next(launches, None)
            self.times.launch_s += time.perf_counter() - t0
            self.times.launch_cpu_s += time.thread_time() - c0
            if res is None:
                break
            pending.append(res)
            while pending and (pending[0][3] is None or pending[0][3].query()):
                idxs, host, lens, _ = pending.pop(0)
                yield list(self._host_wavs(idxs, host, lens))
        for idxs, host, lens, done in pending:
            if done is not None:
                t0 = time.perf_counter()
                done.synchronize()
                self.times.sync_s += time.perf_counter() - t0
            yield list(self._host_wavs(idxs, host, lens))

    @staticmethod
    def _host_wavs(idxs, host, lens):
        arr = host.numpy()
        for j, i in enumerate(idxs):
            yield i, np.array(arr[j, : lens[j]], dtype=np.float32)

    @torch.inference_mode()
    def synthesize_mels(
        self,
        token_lists: Sequence,
        voice: VoiceRef,
        n_timesteps: int = 10,
        noise: Sequence[torch.Tensor] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """The CFM output mel of each item, (80, item_frames) fp32 on the device (stock's
        ``flow_inference(..., finalize=True)``, the prompt frames cut off)."""
        out, pending = self._run(token_lists, voice, n_timesteps, noise, None, seeds, want_wav=False)
        for idxs, mel, lens, _ in pending:
            for j, i in enumerate(idxs):
                out[i] = mel[j, :, : lens[j]].clone()
        return out

    # -----------------------------------------------------------------------------------------
    # Staging (host side, once per batch)

    def _as_tokens(self, t) -> torch.Tensor | list[int]:
        if torch.is_tensor(t):
            t = t.reshape(-1)
            if t.device.type == "cpu":
                t = t.tolist()
            else:
                return t.long()  # on the device already: not validated (that would sync)
        t = [int(x) for x in t]
        if any(x < 0 or x >= SPEECH_VOCAB for x in t):
            raise ValueError(f"speech tokens must be in [0, {SPEECH_VOCAB}); drop T3's special tokens first")
        return t

    def _stage_tokens(self, toks: list, voice: VoiceRef, n_tok: int):
        """(B, Pt + n_tok) token ids with the prompt in front, and (B,) lengths, on the device."""
        dev = self.device
        B = len(toks)
        pt = voice.n_prompt_tokens
        lens = [pt + len(t) for t in toks]
        if all(isinstance(t, list) for t in toks):
            buf = np.zeros((B, n_tok + 1), dtype=np.int64)  # item tokens, then the length
            for j, t in enumerate(toks):
                buf[j, : len(t)] = t
            buf[:, n_tok] = lens
            host = torch.from_numpy(buf)
            if self.is_cuda:
                host = host.pin_memory()
            staged = host.to(dev, non_blocking=True)  # one copy per batch
            items, lengths = staged[:, :n_tok], staged[:, n_tok]
        else:
            rows = [torch.as_tensor(t, dtype=torch.long).to(dev, non_blocking=True) for t in toks]
            items = torch.stack([F.pad(r, (0, n_tok - r.numel())) for r in rows])
            lengths = torch.tensor(lens, dtype=torch.long, pin_memory=self.is_cuda).to(dev, non_blocking=True)
        tokens = torch.cat([voice.prompt_token.unsqueeze(0).expand(B, -1), items], dim=1)
        return tokens, lengths

    def _stage_noise(self, idxs, toks, voice, T_mel, S, noise, source_noise, seeds):
        dev = self.device
        z_rows, ph_rows, sn_rows = [], [], []
        for j, i in enumerate(idxs):
            n = len(toks[j])
            frames = 2 * (voice.n_prompt_tokens + n)
            samples = voice.item_frames(n) * self.samples_per_frame
            z = ph = sn = None
            if noise is None or source_noise is None:
                seed = 0 if seeds is None else seeds[i]
                z, ph, sn = item_noise(seed, frames, samples, dev, self.harmonics)
            if noise is not None:
                z = torch.as_tensor(noise[i]).to(dev, torch.float32).reshape(80, -1)
                if z.shape[1] != frames:
                    raise ValueError(f"noise[{i}] has {z.shape[1]} frames, expected {frames}")
            if source_noise is not None:
                ph, sn = source_noise[i]
                ph = torch.as_tensor(ph).to(dev, torch.float32).reshape(self.harmonics, 1)
                sn = torch.as_tensor(sn).to(dev, torch.float32).reshape(self.harmonics, -1)
                if sn.shape[1] != samples:
                    raise ValueError(f"source_noise[{i}] has {sn.shape[1]} samples, expected {samples}")
            z_rows.append(F.pad(z, (0, T_mel - z.shape[1])))
            ph_rows.append(ph)
            sn_rows.append(F.pad(sn, (0, S - sn.shape[1])))
        return torch.stack(z_rows), torch.stack(ph_rows), torch.stack(sn_rows)

    def _items(self, token_lists, noise, source_noise, seeds) -> list:
        """The items' tokens, checked, and the per-item lists checked against them."""
        toks = [self._as_tokens(t) for t in token_lists]
        n = len(toks)
        for name, lst in (("noise", noise), ("source_noise", source_noise), ("seeds", seeds)):
            if lst is not None and len(lst) != n:
                raise ValueError(f"{name} has {len(lst)} entries for {n} items")
        return toks

    def _launch(self, toks, voice, n_timesteps, noise, source_noise, seeds, want_wav, late=None):
        """Each padded batch's work launched in turn; yields :meth:`_run_batch`'s results.

        ``late`` (with drawn noise only): asked once, just before the last batch is launched,
        for more items ``[(tokens, seed), ...]``; they are appended to ``toks`` (indices after
        the others') and join that batch, up to :meth:`join_limit` items in all, or are
        batched with it as usual. ``FastEngine`` hands over the book's last few chunks so
        (``s3gen_join_late``): a batch of 3 chunks costs about as much launch time as a full
        one (~0.9 s of S3Gen's thread on an H200, twenty-second session)."""
        if late is not None and (noise is not None or source_noise is not None):
            raise ValueError("late items draw their noise from seeds: no injected noise with late")
        plan = self.batches([len(t) for t in toks], voice)
        seeds = list(seeds) if seeds is not None else [0] * len(toks)
        while plan:
            bucket, sub = plan.pop(0)
            if not plan and late is not None:
                extra, late = late(), None  # asked once
                if extra:
                    plan = self._join_late(toks, seeds, sub, extra, voice)
                    bucket, sub = plan.pop(0)
            limit = self.batch_limit(bucket, voice)
            yield self._run_batch(sub, [toks[i] for i in sub], voice, bucket, limit, n_timesteps, noise, source_noise, seeds, want_wav)

    def _join_late(self, toks: list, seeds: list, sub: list[int], extra, voice: VoiceRef) -> list[tuple[int, list[int]]]:
        """The last batch ``sub`` with the ``extra`` items ``[(tokens, seed), ...]`` appended to
        ``toks`` and ``seeds``: one batch where :meth:`join_limit` allows, else as :meth:`batches`
        makes them (empty items skipped: ``sub`` alone when all are)."""
        new = []
        for t, seed in extra:
            toks.append(self._as_tokens(t))
            seeds.append(seed)
            if len(toks[-1]):
                new.append(len(toks) - 1)
        both = sorted(sub + new, key=lambda i: -len(toks[i]))
        bucket = self.bucket_for(len(toks[both[0]]))
        if len(both) <= self.join_limit(bucket, voice):
            return [(bucket, both)]
        chosen = set(both)
        return self.batches([len(t) if i in chosen else 0 for i, t in enumerate(toks)], voice)

    def join_limit(self, bucket: int, voice: VoiceRef) -> int:
        """The most items a batch takes when late items join it: a quarter over ``max_batch``
        (the batch size the GPU runs well at, not a memory bound; at least one over), never
        over the attention memory's bound (``max_attn_bytes``)."""
        return max(1, min(self.max_batch + max(1, self.max_batch // 4), self._attn_limit(bucket, voice)))

    def _run(self, token_lists, voice, n_timesteps, noise, source_noise, seeds, want_wav, late=None):
        toks = self._items(token_lists, noise, source_noise, seeds)
        pending = list(self._launch(toks, voice, n_timesteps, noise, source_noise, seeds, want_wav, late))
        out: list = [  # after the launches: ``late`` may have added items
            np.zeros(0, dtype=np.float32) if want_wav else torch.zeros(80, 0, device=self.device) for _ in toks
        ]
        return out, pending

    def _run_batch(self, idxs, toks, voice, bucket, limit, n_timesteps, noise, source_noise, seeds, want_wav):
        B = len(toks)
        Bp = self._padded_batch(B, limit)
        if Bp > B:  # static batch sizes for compiled graphs: repeat the first item, drop the copies
            pad = Bp - B
            idxs = list(idxs) + [idxs[0]] * pad
            toks = list(toks) + [toks[0]] * pad
        n_tok = bucket // 2
        T_tok = voice.n_prompt_tokens + n_tok
        T_mel = 2 * T_tok
        S = (T_mel - voice.n_prompt_frames) * self.samples_per_frame
        tokens, lengths = self._stage_tokens(toks, voice, n_tok)
        z, phase, sine = self._stage_noise(idxs, toks, voice, T_mel, S, noise, source_noise, seeds)
        item_frames = [voice.item_frames(len(t)) for t in toks[:B]]
        layout = None
        if self.pack:
            layout = pack_layout([2 * (voice.n_prompt_tokens + len(t)) for t in toks], T_mel, self.pack_gap, self.device, self.is_cuda)
            self.times.cfm_frames += layout.n
        else:
            self.times.cfm_frames += len(toks) * T_mel
        self.times.batches += 1
        self.times.items += B
        if not want_wav:
            mel = self.run_bucket(tokens, lengths, z, phase, sine, voice, n_timesteps, vocode=False, layout=layout)
            return idxs[:B], mel[:B], item_frames, None
        wav = self.run_bucket(tokens, lengths, z, phase, sine, voice, n_timesteps, layout=layout)
        host = torch.empty((B, S), dtype=torch.float32, pin_memory=self.is_cuda)
        host.copy_(wav[:B], non_blocking=self.is_cuda)
        done = None  # on CUDA: recorded after the copy, for synthesize_iter
        if self.is_cuda:
            done = torch.cuda.Event()
            done.record()
        return idxs[:B], host, [f * self.samples_per_frame for f in item_frames], done

    # -----------------------------------------------------------------------------------------
    # The per-bucket work: device tensors in, device tensors out, no host syncs

    def run_bucket(
        self, tokens, lengths, z, phase, sine, voice: VoiceRef, n_timesteps: int = 10, vocode: bool = True,
        layout: PackedLayout | None = None,
    ):
        """One padded batch: ``tokens`` (B, Pt + n) with the prompt in front, ``lengths`` (B,)
        prompt + item tokens, ``z`` (B, 80, 2(Pt + n)) CFM noise, ``phase`` (B, 9, 1) and
        ``sine`` (B, 9, samples) source noise. Returns (B, samples) audio, or with
        ``vocode=False`` the (B, 80, item frames) mel (padded frames zero). ``layout``: the
        batch's :class:`PackedLayout` (its mel lengths, ``2 * lengths``), to run the CFM over
        the items end to end instead of padded."""
        T_mel = tokens.shape[1] * 2
        Pm = voice.n_prompt_frames
        mel_len = 2 * lengths  # prompt + item mel frames (encoder output length)
        item_len = mel_len - Pm
        marks = [self._mark()]
        mu = self._enc_fn(tokens, lengths, self._pos_emb(0, tokens.shape[1]), self._pos_emb(1, T_mel))
        marks.append(self._mark())
        cond = F.pad(voice.prompt_feat, (0, T_mel - Pm)).unsqueeze(0).expand(mu.shape[0], -1, -1)
        if layout is not None:
            x = self._cfm_packed(z, mu, voice.spks, cond, layout, n_timesteps)
        else:
            x = self._cfm(z, mu, length_mask_f(mel_len, T_mel), voice.spks, cond, n_timesteps, mel_len)
        mel = x[:, :, Pm:] * length_mask_f(item_len, T_mel - Pm)
        marks.append(self._mark())
        if not vocode:
            self._account(marks)
            return mel
        rows = self.vocoder_rows or mel.shape[0]
        if rows >= mel.shape[0]:
            wav = self._voc_fn(mel, item_len, phase, sine)
        else:  # CPU: oneDNN's convs over a large batch of long rows thrash the caches; a few rows at a time
            wav = torch.cat(
                [self._voc_fn(mel[i : i + rows], item_len[i : i + rows], phase[i : i + rows], sine[i : i + rows])
                 for i in range(0, mel.shape[0], rows)]
            )
        marks.append(self._mark())
        self._account(marks)
        return wav

    def _mark(self):
        if not self.profile:
            return None
        if self.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _account(self, marks):
        if not self.profile:
            return
        if self.is_cuda:
            marks[-1].synchronize()  # profiling only: waits for this batch
            d = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
        else:
            d = [b - a for a, b in zip(marks, marks[1:])]
        for name, v in zip(("encoder", "cfm", "hifigan"), d):
            setattr(self.times, name, getattr(self.times, name) + v)

    def _autocast(self):
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        # the cast cache must be off for CUDA-graph capture; each weight is used once per step anyway
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)

    # ---- encoder ------------------------------------------------------------------------------

    def _pos_emb(self, which: int, size: int) -> torch.Tensor:
        """Relative position embedding (1, 2 * size - 1, 512) of the encoder's first (0) or
        upsampled (1) stack, fp32 on the device: stock's ``EspnetRelPositionalEncoding`` slice,
        computed once per size (stock re-casts its cached table per call)."""
        key = (which, size)
        if key not in self._pe_cache:
            enc = self.flow.encoder
            pos_enc = (enc.embed if which == 0 else enc.up_embed).pos_enc
            with torch.inference_mode():
                pos_enc.extend_pe(torch.zeros(1, size, device=self.device))  # grows/moves the table if needed
                pe = pos_enc.pe.to(self.device, torch.float32)
                c = pe.size(1) // 2
                self._pe_cache[key] = pe[:, c - size + 1 : c + size].contiguous()
        return self._pe_cache[key]

    def _layers(self, stack, x, att, pos):
        """``x`` through the conformer layers of ``stack`` (the compiled region each, if on)."""
        r = self.encoder
        for layer in stack:
            r.unbacked(0, x, att, shape_id="rows")
            r.dyn((x, 1), (att, 2), (pos, 1))
            x = r.layer(layer, x, att, pos)
        return x

    def _encode(self, tokens, lengths, pos1, pos2):
        """Stock ``CausalMaskedDiffWithXvec.inference`` up to ``encoder_proj`` (finalize=True),
        batched: returns mu (B, 80, 2T) fp32. Replaces ``UpsampleConformerEncoder.forward``
        (its ``add_optional_chunk_mask`` syncs) by calls to its submodules with our masks."""
        flow, enc = self.flow, self.flow.encoder
        T = tokens.shape[1]
        tok_mask = length_mask(lengths, T)  # (B, T)
        m = tok_mask.unsqueeze(-1).float()
        with self._autocast():
            x = flow.input_embedding(tokens) * m
            x = enc.embed.out(x) * enc.embed.pos_enc.xscale  # LinearNoSubsampling + pos-enc scaling
            x = x * m  # stock's look-ahead conv pads each item's end with zeros: make padded frames zero
            x = enc.pre_lookahead_layer(x)
            att = tok_mask.unsqueeze(1)  # (B, 1, T): padded keys masked
            x = self._layers(enc.encoders, x, att, pos1)
            x = enc.up_layer(x.transpose(1, 2).contiguous(), 0)[0].transpose(1, 2).contiguous()  # causal
            x = enc.up_embed.out(x) * enc.up_embed.pos_enc.xscale
            att2 = length_mask(2 * lengths, 2 * T).unsqueeze(1)
            x = self._layers(enc.up_encoders, x, att2, pos2)
            if enc.normalize_before:
                x = enc.after_norm(x)
            h = flow.encoder_proj(x)
        return h.float().transpose(1, 2).contiguous()

    # ---- CFM ------------------------------------------------------------------------------------

    def _t_span(self, n_timesteps: int) -> torch.Tensor:
        if n_timesteps not in self._t_span_cache:
            t = torch.linspace(0, 1, n_timesteps + 1, device=self.device, dtype=torch.float32)
            if self.t_scheduler == "cosine":
                t = 1 - torch.cos(t * 0.5 * torch.pi)
            self._t_span_cache[n_timesteps] = t
        return self._t_span_cache[n_timesteps]

    def _cfm(self, z, mu, mask, spks, cond, n_timesteps, lengths=None, bias=None, q_len=None):
        """Stock ``CausalConditionalCFM.solve_euler`` with CFG, batched. The CFG inputs that do
        not change over the steps (mu, speaker, prompt condition, masks) are packed once.
        ``lengths`` (B,): valid frames per row (else read off ``mask``, on the device).
        With flash attention the attention argument passed down is not a bias but the int32
        (2, 2B + 1) pair [row starts, valid keys per row] (see ``_estimator``). ``bias`` and
        ``q_len``: that argument and the longest query range given, for rows that are not one
        item each (:meth:`_cfm_packed`)."""
        B, _, T = mu.shape
        zeros = torch.zeros_like(mu)
        spk = spks.view(1, -1, 1).expand(B, -1, T)
        static = torch.cat(
            [torch.cat([mu, spk, cond], dim=1), torch.cat([zeros, torch.zeros_like(spk), torch.zeros_like(cond)], dim=1)],
            dim=0,
        )  # (2B, 240, T): [mu | spks | cond] for the conditional half, zeros for the CFG half
        mask_in = torch.cat([mask, mask], dim=0)
        if bias is None:
            if self.flash:
                if lengths is None:
                    lengths = mask[:, 0].sum(-1).long()
                # varlen flash attention over the padded layout: row i's queries and keys start at
                # i * T, and only its first ``lengths[i]`` keys are used (seqused_k): a key-padding
                # mask without a mask tensor, so the fast kernel applies.
                cu = torch.arange(0, (2 * B + 1) * T, T, device=mu.device, dtype=torch.int32)
                used = torch.cat([lengths, lengths]).to(torch.int32)
                bias = torch.stack([cu[:-1], used])  # (2, 2B) int32, unpacked in _estimator
                bias = torch.cat([bias, cu[-1:].expand(2, 1)], dim=1)  # keep cu's end: (2, 2B + 1)
            else:
                bias = attention_bias(mask_in, self.heads)
        t_span = self._t_span(n_timesteps)
        if self.cuda_graphs and self.graph_error is None:
            return self._cfm_graphed(z, static, mask_in, bias, t_span, n_timesteps)
        return self._cfm_loop(z, static, mask_in, bias, t_span, n_timesteps, q_len)

    def _cfm_packed(self, z, mu, spks, cond, lay: PackedLayout, n_timesteps):
        """:meth:`_cfm` over the batch's items end to end (``lay``, a :class:`PackedLayout`):
        the same Euler steps with CFG on one row of N frames (two with the CFG half); returns
        the padded (B, 80, T) result (past each item's end: a gap frame's state, which the
        caller's item mask zeroes as it zeroes the padded rows')."""
        B, C, T = mu.shape
        N = lay.n
        flat = torch.cat([z, mu, cond], dim=1).transpose(0, 1).reshape(3 * C, B * T)
        zp, mup, condp = flat.index_select(1, lay.src).unsqueeze(0).split(C, dim=1)  # (1, C, N) each, packed
        if self.flash:
            bias = lay.bounds
        else:  # each item's frames attend to its own valid frames only: a dense (2, 1, N, N) bias
            seg = torch.div(lay.src, T, rounding_mode="floor")
            ok = (seg.view(-1, 1) == seg.view(1, -1)) & (lay.mask.view(1, N) > 0)
            bias = ((~ok).float() * -1.0e10).view(1, 1, N, N).expand(2, 1, N, N)
        x = self._cfm(zp.contiguous(), mup, lay.mask, spks, condp, n_timesteps, bias=bias, q_len=lay.max_len)
        return x[0].index_select(1, lay.dst).view(C, B, T).transpose(0, 1)

    def _cfm_loop(self, z, static, mask_in, bias, t_span, n_timesteps, q_len=None):
        x = z
        for k in range(n_timesteps):
            x = self._step_fn(x, t_span[k : k + 1], t_span[k + 1 : k + 2], static, mask_in, bias, q_len)
        return x

    def _cfm_graphed(self, z, static, mask_in, bias, t_span, n_timesteps):
        """The CFM loop with its Euler step replayed from one CUDA graph per (batch, bucket)
        shape: ~560 kernel launches of Python a step become four (three copies and a replay),
        so S3Gen's thread holds the GIL for ~1/100 of the time it did.

        A shape's first batch runs the loop as it is (compiling, planning cuBLAS, allocating
        workspaces: what must not happen inside a capture); its second captures one step,
        without warm-up runs of its own and without ``torch.cuda.graph``'s synchronize and
        ``empty_cache`` (T3 runs beside S3Gen, and a book meets new shapes mid-run); every
        later step is a replay. Capture records the kernels without running them, so the
        captured step's first replay is that batch's first step. One step, not the whole loop
        (as the twelfth session captured): ten times less Python to record mid-book while
        the GPU gets none of S3Gen's work, and one graph for every step count."""
        key = tuple(z.shape)
        g = self._graphs.get(key)
        if g is None:
            if key not in self._graph_seen:
                self._graph_seen.add(key)
                return self._cfm_loop(z, static, mask_in, bias, t_span, n_timesteps)
            t0 = time.perf_counter()
            current = torch.cuda.current_stream(self.device)
            # the step's inputs live outside the graph's pool; x is the Euler state, written
            # back in place by the captured step so that the next replay reads it
            ins = dict(x=z.clone(), t=t_span[:1].clone(), r=t_span[1:2].clone(),
                       static=static.clone(), mask=mask_in.clone(), bias=bias.clone())
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            # not on the legacy default stream, where capture is refused: the engine's S3Gen
            # stream is a stream of its own already; elsewhere (scripts, tests) a side stream
            stream = current
            if current == torch.cuda.default_stream(self.device):
                if self._capture_stream is None:
                    self._capture_stream = torch.cuda.Stream(self.device)
                stream = self._capture_stream
                stream.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            try:
                with recording(graph, self._graph_pool, stream):  # T3's thread and the store go on beside it
                    ins["x"].copy_(self._step_fn(ins["x"], ins["t"], ins["r"], ins["static"], ins["mask"], ins["bias"]))
            except Exception as e:  # noqa: BLE001 - synthesize without graphs rather than not at all
                self._graphs_failed(e, key)
                if stream is not current:
                    current.wait_stream(stream)
                return self._cfm_loop(z, static, mask_in, bias, t_span, n_timesteps)
            if stream is not current:
                current.wait_stream(stream)
            g = self._graphs[key] = (graph, ins)
            self.times.graph_captures += 1
            self.times.capture_s += time.perf_counter() - t0
        else:
            graph, ins = g
            ins["x"].copy_(z)
        graph, ins = g
        ins["static"].copy_(static)
        ins["mask"].copy_(mask_in)
        ins["bias"].copy_(bias)
        for k in range(n_timesteps):
            ins["t"].copy_(t_span[k : k + 1])
            ins["r"].copy_(t_span[k + 1 : k + 2])
            graph.replay()
        return ins["x"].clone()  # the next batch of this shape overwrites the state

    def _graphs_failed(self, e: Exception, key) -> None:
        """A failed capture leaves its memory pool half-recorded: no capture again in this
        process; the CFM loop runs uncaptured from now on (``graph_error`` says why; the
        batches stay padded as before, so the compiled regions see the same shapes)."""
        self._graphs.clear()
        self.graph_error = failure_line(e)
        log.warning("CUDA graph capture of the CFM loop %s failed (%s); going on without graphs", key, self.graph_error)

    def _cfm_step(self, x, t, r, static, mask_in, bias, q_len=None):
        """One Euler step with CFG (stock ``solve_euler``'s loop body); x stays fp32.
        ``q_len``: the attention's longest query range (packed rows), else the row length."""
        B = x.shape[0]
        x_in = torch.cat([x, x], dim=0)
        t_in = t.expand(2 * B)
        with self._autocast():
            d = self._estimator(x_in, mask_in, t_in, bias, q_len, static=static)
        d = d.float()
        d, dc = torch.split(d, [B, B], dim=0)
        d = (1.0 + self.cfg_rate) * d - self.cfg_rate * dc
        return x + (r - t) * d

    def _estimator(self, x, mask, t, bias, q_len=None, static=None):
        """``ConditionalDecoder.forward`` (chatterbox 0.1.7) on an already packed input
        [x | mu | spks | cond] (or x and, in ``static``, the rest: the fused estimator's first
        region packs them), with the attention bias given: stock derives it through
        ``add_optional_chunk_mask``, whose check calls ``.item()`` every block. The fused
        estimator when the configuration allows (``self.fused``), else the stock modules."""
        if self.fused is not None:
            B, _, T = x.shape
            if self.flash:
                attend = cfm_estimator.flash_attend(self._flash, bias[0], bias[1, :-1], q_len or T)
            else:
                attend = cfm_estimator.sdpa_attend(bias, B, T)
            return self.fused(x, mask, t, attend, static=static)
        if static is not None:
            x = torch.cat([x, static], dim=1)
        est = self.flow.decoder.estimator
        t = est.time_embeddings(t).to(t.dtype)
        t = est.time_mlp(t)
        hiddens = []
        masks = [mask]
        biases = [bias]
        for level, (resnet, transformer_blocks, downsample) in enumerate(est.down_blocks):
            mask_down = masks[-1]
            if level > 0:
                biases.append(attention_bias(mask_down, self.heads))
            bias_down = biases[-1]
            x = resnet(x, mask_down, t)
            x = x.transpose(1, 2).contiguous()
            for block in transformer_blocks:
                x = self._block(block, x, bias_down, t)
            x = x.transpose(1, 2).contiguous()
            hiddens.append(x)
            x = downsample(x * mask_down)
            masks.append(mask_down[:, :, ::2])
        masks = masks[:-1]  # as stock: the last downsampled mask is not used
        mask_mid, bias_mid = masks[-1], biases[-1]
        for resnet, transformer_blocks in est.mid_blocks:
            x = resnet(x, mask_mid, t)
            x = x.transpose(1, 2).contiguous()
            for block in transformer_blocks:
                x = self._block(block, x, bias_mid, t)
            x = x.transpose(1, 2).contiguous()
        for resnet, transformer_blocks, upsample in est.up_blocks:
            mask_up, bias_up = masks.pop(), biases.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = resnet(x, mask_up, t)
            x = x.transpose(1, 2).contiguous()
            for block in transformer_blocks:
                x = self._block(block, x, bias_up, t)
            x = x.transpose(1, 2).contiguous()
            x = upsample(x * mask_up)
        x = est.final_block(x, mask_up)
        out = est.final_proj(x * mask_up)
        return out * mask

    def _flash_usable(self) -> bool:
        """Whether the fused estimator's attention can run as varlen flash attention: CUDA,
        a 16-bit dtype, and the kernel present (tried once). Tried at the full model's head
        size (64) with rows longer than one 128-query tile, as every bucket's are: FA4 compiles
        a kernel per variant (~2 s), and this is the one the book runs (with rows of 24 frames
        the check compiled a second variant, seen in a py-spy profile on an H200)."""
        if not self.is_cuda or self.dtype not in (torch.bfloat16, torch.float16):
            return False
        try:
            H, D, T = 2, 64, 160
            g = torch.Generator(device=self.device).manual_seed(0)
            q, k, v = (torch.randn(2 * T, H, D, device=self.device, dtype=self.dtype, generator=g) for _ in range(3))
            cu = torch.tensor([0, T, 2 * T], device=self.device, dtype=torch.int32)
            used = torch.tensor([T, 9], device=self.device, dtype=torch.int32)
            out = self._flash(q, k, v, cu, used, T, 1.0 / math.sqrt(D))
            ref = F.scaled_dot_product_attention(
                q.view(2, T, H, D).transpose(1, 2), k.view(2, T, H, D).transpose(1, 2), v.view(2, T, H, D).transpose(1, 2),
                attn_mask=(torch.arange(T, device=self.device) < used.view(2, 1, 1, 1)),
            ).transpose(1, 2).reshape(2 * T, H, D)
            return bool((out.float() - ref.float()).abs().max() < 0.05)
        except Exception:  # no flash kernel here (old GPU, build without it): the masked SDPA path
            return False

    @staticmethod
    def _flash_fa2(q, k, v, cu, used, T, scale):
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, T, T, 0.0, False, False, scale=scale, seqused_k=used
        )[0]

    def _fa4_launcher(self):
        """FlashAttention 4's varlen kernel, the same call as ``_flash_fa2``, launched directly
        after the first call of each layout (``fa4.FA4Varlen``); None where flash-attn-4 is not
        installed. Not ``seqused_q``: padded query rows would be left unwritten, and a NaN
        there survives the masks (NaN * 0) into the convolutions."""
        if not self.is_cuda:
            return None
        try:
            return fa4.FA4Varlen()
        except Exception:  # not installed, or its CUDA libraries do not load
            return None

    def _block(self, block, x, bias, t):
        """A transformer block of an estimator the fused path does not cover: the stock block
        with the additive attention bias."""
        return block(hidden_states=x, attention_mask=bias, timestep=t)

    # ---- HiFiGAN ---------------------------------------------------------------------------------

    def _vocode(self, mel, n_frames, phase, sine):
        """Stock ``HiFTGenerator.inference`` + trim/fade, batched and exact per item: mel
        (B, 80, T) fp32 with zeros past each item's ``n_frames``; returns (B, T * 480). The f0
        predictor and the sine source as stock's modules, fp32; the rest in ``self.vocoder``'s
        regions between the (i)STFT."""
        h = self.hift
        B, _, T = mel.shape
        m0 = length_mask_f(n_frames, T)
        # mel -> f0 (ConvRNNF0Predictor.forward, with each conv's output masked)
        x = mel
        for layer in h.f0_predictor.condnet:
            x = layer(x)
            if isinstance(layer, torch.nn.Conv1d):
                x = x * m0
        f0 = torch.abs(h.f0_predictor.classifier(x.transpose(1, 2)).squeeze(-1))  # (B, T)
        # f0 -> source (SourceModuleHnNSF with our SineGen)
        f0_up = h.f0_upsamp(f0[:, None])  # (B, 1, S)
        sine_waves = self._sine_gen(f0_up, phase, sine)  # (B, 9, S)
        ms = h.m_source
        s = ms.l_tanh(ms.l_linear(sine_waves.transpose(1, 2))).transpose(1, 2)  # (B, 1, S)
        # decode (HiFTGenerator.decode with masks): the vocoder's regions up to the spectrum
        n_samples = n_frames * self.samples_per_frame
        s_real, s_imag = self._stft(s.squeeze(1), n_samples)
        n_stft = n_frames * (self.samples_per_frame // self.hop) + 1  # stft frames of the item
        fmask = length_mask_f(n_stft, s_real.shape[-1])
        s_stft = torch.cat([s_real, s_imag], dim=1) * fmask
        real, imag = self.vocoder(mel, m0, s_stft, n_frames)
        wav = self._istft(real, imag, fmask)
        wav = torch.clamp(wav, -h.audio_limit, h.audio_limit)
        n = self.trim_fade.numel()
        return torch.cat([wav[:, :n] * self.trim_fade, wav[:, n:]], dim=1)

    def _sine_gen(self, f0, phase, noise):
        """Stock ``SineGen.forward`` with the random phase and noise given (stock builds
        F_mat and samples the phase on the CPU, then copies them over)."""
        sg = self.hift.m_source.l_sin_gen
        harm = torch.arange(1, sg.harmonic_num + 2, device=f0.device, dtype=f0.dtype).view(1, -1, 1)
        f_mat = f0 * harm / sg.sampling_rate  # (B, 9, S), as stock: f0 * (i + 1) / sr
        theta = 2 * np.pi * (torch.cumsum(f_mat, dim=-1) % 1)
        keep = torch.ones_like(phase)
        keep[:, 0] = 0  # stock: phase_vec[:, 0, :] = 0
        sine_waves = sg.sine_amp * torch.sin(theta + phase * keep)
        uv = (f0 > sg.voiced_threshold).float()
        noise_amp = uv * sg.noise_std + (1 - uv) * sg.sine_amp / 3
        return sine_waves * uv + noise_amp * noise

    def _stft(self, x, n_samples):
        """``torch.stft(center=True, pad_mode='reflect')`` per item: each row is reflected at
        its own end (``n_samples``), not at the bucket's. Returns real, imag (B, n_fft/2+1, F)."""
        B, S = x.shape
        pad = self.n_fft // 2
        p = torch.arange(S + 2 * pad, device=x.device) - pad
        idx = p.abs().unsqueeze(0).expand(B, -1)
        n = n_samples.unsqueeze(1)
        idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx).clamp(0, S - 1)
        frames = x.gather(1, idx).unfold(-1, self.n_fft, self.hop) * self.window  # (B, F, n_fft)
        spec = torch.fft.rfft(frames, dim=-1)
        return spec.real.transpose(1, 2), spec.imag.transpose(1, 2)

    def _istft(self, real, imag, fmask):
        """``torch.istft(center=True)`` per item of the spectrum (real, imag) (B, n_fft/2+1, F),
        without its envelope check (a host sync): the window envelope counts only each item's
        own frames (``fmask``, (B, 1, F)). Stock's clip and polar form are in ``vocoder.post``."""
        frames = torch.fft.irfft(torch.complex(real, imag).transpose(1, 2), n=self.n_fft, dim=-1)  # (B, F, n_fft)
        fm = fmask.transpose(1, 2)  # (B, F, 1)
        y = self._overlap_add(frames * self.window * fm)
        env = self._overlap_add((self.window * self.window) * fm)
        pad = self.n_fft // 2
        n_out = (frames.shape[1] - 1) * self.hop
        y = y[:, pad : pad + n_out]
        env = env[:, pad : pad + n_out]
        return y / torch.where(env > 1e-11, env, torch.ones_like(env))

    def _overlap_add(self, frames):
        """(B, F, n_fft) frames at hop -> (B, n_fft + hop * (F - 1)) signal."""
        B, Fr, N = frames.shape
        r = N // self.hop
        if N % self.hop:
            raise ValueError("n_fft must be a multiple of hop")
        parts = frames.reshape(B, Fr, r, self.hop)
        out = None
        for j in range(r):
            part = F.pad(parts[:, :, j, :], (0, 0, j, r - 1 - j))  # frame f's j-th hop lands at f + j
            out = part if out is None else out + part
        return out.reshape(B, (Fr + r - 1) * self.hop)
