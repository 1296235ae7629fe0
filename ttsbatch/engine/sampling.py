"""On-device sampling for the fast T3 engine: stock Chatterbox semantics, batched, no host sync.

Stock ``T3.inference`` turns the CFG pair of logits into one token per step like this::

    logits = cond + cfg * (cond - uncond)
    logits = RepetitionPenaltyLogitsProcessor(penalty)(generated_ids incl. BOS, logits)
    logits = logits / temperature            # skipped when temperature == 1.0
    logits = MinPLogitsWarper(min_p)(logits)
    logits = TopPLogitsWarper(top_p)(logits) # runs even at top_p == 1.0
    token  = torch.multinomial(softmax(logits), 1)

:func:`filter_logits` does the same filters for a whole batch, with every option a per-row
tensor (so one captured CUDA graph serves any options), and :func:`sample_tokens` draws the
token. Differences from stock, all deliberate:

- Repetition penalty uses a per-row boolean "seen" mask over the vocabulary instead of the
  list of generated ids. HF's processor gathers and scatters by id, so duplicates do not
  matter and the two are equal.
- ``top_p >= 1`` skips the top-p filter (``use_top_p=False``). At 1.0 HF's warper only
  removes tokens whose softmax probability is exactly 0 in fp32, so the sampling
  distribution is the same; only those logits stay finite instead of becoming -inf.
- The random draw is not ``torch.multinomial``: it is an exponential race
  ``argmax(probs / E)``, ``E = -log(U)``, which picks token ``v`` with probability
  ``probs[v]`` (the distribution of multinomial), with ``U`` from a counter-based hash of
  ``(row seed, step, vocabulary index)``. No generator state is shared between rows, so
  a sentence samples the same tokens whatever batch it is in, and the draw can live inside
  a CUDA graph. The token *stream* therefore differs from stock's for the same seed;
  faithfulness is asserted by teacher-forced logits (tests/test_t3_fast.py) and by the
  filter and sampling-distribution tests (tests/test_sampling.py).
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
# Multipliers are below 2**31 so products with 32-bit values fit in int64 without overflow.
_MIX = 0x045D9F3B  # Thomas Mueller's 32-bit integer hash constant
_GOLD = 0x4F1BBCDD  # an odd constant to spread the step counter
_VOCAB = 0x27D4EB2D  # an odd constant to spread the vocabulary index


def split_seed(seed: int) -> tuple[int, int]:
    """A Python int seed as two 32-bit halves (any int; reduced modulo 2**64)."""
    seed &= (1 << 64) - 1
    return seed & M32, (seed >> 32) & M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (avalanching) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & M32
    x = x ^ (x >> 16)
    x = (x * _MIX) & M32
    x = x ^ (x >> 16)
    return x


def row_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row for this step: a hash of (seed, step). int64 tensors (rows,)."""
    k = _mix32(seed_lo ^ _mix32(seed_hi ^ 0x2545F491))
    return _mix32((k + ((step * _GOLD) & M32)) & M32)


def uniform_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) noise (rows, vocab), float32, a pure function of (seed, step, vocabulary index)."""
    key = row_keys(seed_lo, seed_hi, step)[:, None]
    v = torch.arange(vocab, device=key.device, dtype=torch.int64)[None, :]
    h = _mix32(key ^ ((v * _VOCAB) & M32))
    return hash_to_unit(_mix32((h + key) & M32))


def hash_to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in [2**-24, 1 - 2**-24]: the top 23 bits, centred in their bin.

    Exact in float32, so ``-log(U)`` is never 0 or inf (24 bits would round the top bin to 1.0).
    """
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def race(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A multinomial draw per row as an exponential race: ``argmax(probs / -log(U))``.

    Token ``v`` wins with probability ``probs[v]``; a token of probability 0 never wins.
    Unlike an inverse-CDF draw, a small error in one probability only matters when that
    token is one of the two closest racers, so bf16 noise rarely changes the token.
    """
    return torch.argmax(probs / (-torch.log(uniform)), dim=-1)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, cfg: torch.Tensor) -> torch.Tensor:
    """Stock classifier-free guidance: ``cond + cfg * (cond - uncond)``; ``cfg`` is (rows,)."""
    return cond + cfg[:, None] * (cond - uncond)


def filter_logits(
    logits: torch.Tensor,
    seen: torch.Tensor,
    repetition_penalty: torch.Tensor,
    temperature: torch.Tensor,
    min_p: torch.Tensor,
    top_p: torch.Tensor,
    use_top_p: bool = True,
) -> torch.Tensor:
    """Repetition penalty, temperature, min-p and top-p as stock applies them (fp32, (rows, V)).

    ``seen`` is a (rows, V) bool mask of the ids generated so far (BOS included);
    the options are (rows,) float tensors. Removed tokens get -inf, as in HF.
    """
    logits = logits.float()
    # RepetitionPenaltyLogitsProcessor: score < 0 -> score * penalty, else score / penalty.
    pen = repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    # TemperatureLogitsWarper (dividing by exactly 1.0 changes nothing, so stock's skip is implied).
    logits = logits / temperature[:, None]
    # MinPLogitsWarper (min_tokens_to_keep=1: the top token always passes probs >= min_p * top).
    probs = torch.softmax(logits, dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    logits = logits.masked_fill(probs < min_p[:, None] * top, float("-inf"))
    if use_top_p:
        # TopPLogitsWarper, step for step.
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p[:, None])
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    params: "SamplingParams | dict",
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    step: torch.Tensor,
    use_top_p: bool = True,
) -> torch.Tensor:
    """Filter and draw one token per row. ``logits`` (rows, V) are already CFG-mixed."""
    p = params if isinstance(params, dict) else params.as_dict()
    filtered = filter_logits(
        logits, seen, p["repetition_penalty"], p["temperature"], p["min_p"], p["top_p"], use_top_p
    )
    probs = torch.softmax(filtered, dim=-1)
    return race(probs, uniform_noise(seed_lo, seed_hi, step, probs.shape[-1]))


class SamplingParams:
    """Per-row sampling options as device tensors (rows,), written once per row at prefill."""

    NAMES = ("cfg", "temperature", "min_p", "top_p", "repetition_penalty")

    def __init__(self, rows: int, device):
        for name in self.NAMES:
            setattr(self, name, torch.zeros(rows, dtype=torch.float32, device=device))

    def set_rows(self, rows: torch.Tensor, gen) -> None:
        """Write the options of ``gen`` (a GenerationOptions) into ``rows``."""
        values = dict(
            cfg=gen.cfg_weight,
            temperature=gen.temperature,
            min_p=gen.min_p,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
        )
        for name, value in values.items():
            getattr(self, name).index_fill_(0, rows, float(value))

    def view(self, n: int) -> dict:
        return {name: getattr(self, name)[:n] for name in self.NAMES}

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.NAMES}


def check_options(gen) -> None:
    """Reject options stock would reject (HF warpers validate them), with a clear message."""
    from ..errors import InputError

    if not (0.0 <= gen.min_p <= 1.0):
        raise InputError(f"min_p must be in [0, 1], got {gen.min_p}")
    if not (0.0 <= gen.top_p <= 1.0):
        raise InputError(f"top_p must be in [0, 1], got {gen.top_p}")
    if not gen.temperature > 0:
        raise InputError(f"temperature must be > 0, got {gen.temperature}")
    if not gen.repetition_penalty > 0:
        raise InputError(f"repetition_penalty must be > 0, got {gen.repetition_penalty}")
