#!/usr/bin/env python
"""bf16 vs fp32 top-1 agreement, teacher forced, for ttsbatch's T3 and for stock T3 (HF) cast
to bf16: the measurement of tests/gpu/test_t3_gpu.py's agreement test, on any device.

    python scripts/bf16_agreement.py [--ckpt DIR] [--device cpu] [--texts 16] [--steps 48]

Random weights have near-tied logits that bf16 rounding flips in any implementation; stock's
own bf16 model shows how often on this checkpoint. Histories come from ttsbatch's bf16 path
(as in the GPU tests); the fp32 reference is ttsbatch's fp32 path (stock's within 4e-6 on an
H100). On the CPU ttsbatch runs its plain path (SDPA, no Triton kernels, no voice template).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.environ.get("TTSBATCH_FULL_CKPT", "/tmp/ttsbatch-full"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    import torch

    from tests.gpu.test_t3_gpu import TEXTS, _sampled_histories, _stock_bf16_logits, _teacher_forced
    from ttsbatch.config import GenerationOptions
    from ttsbatch.engine.model import load_model
    from ttsbatch.engine.t3_fast import FastT3
    from ttsbatch.engine.voice import BUILTIN, VoiceCache

    t0 = time.perf_counter()
    model = load_model(Path(args.ckpt), args.device)
    conds = VoiceCache(model).get(BUILTIN, 0.5)
    texts = TEXTS[: args.texts]
    f32 = FastT3(model, dtype=torch.float32, use_graphs=False)
    f16 = FastT3(model, dtype=torch.bfloat16)
    forced = _sampled_histories(f16, conds, texts, args.steps)
    gen = GenerationOptions()
    ref = _teacher_forced(f32, conds, texts, forced, gen)
    ours = _teacher_forced(f16, conds, texts, forced, gen)
    stock = _stock_bf16_logits(model, conds, texts, forced)
    top2 = ref[:, :, 0].topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    decisive = margin >= 0.05

    def agree(low):
        return ref[:, :, 0].argmax(-1) == low[:, :, 0].argmax(-1)

    res = dict(device=str(model.device), random_size=model.random_size, positions=int(margin.numel()),
               ttsbatch_bf16=round(agree(ours).float().mean().item(), 4), stock_bf16=round(agree(stock).float().mean().item(), 4),
               decisive_share=round(decisive.float().mean().item(), 3),
               ttsbatch_bf16_decisive=round(agree(ours)[decisive].float().mean().item(), 4),
               stock_bf16_decisive=round(agree(stock)[decisive].float().mean().item(), 4),
               logit_diff_mean=dict(ttsbatch=round((ref - ours).abs().mean().item(), 4), stock=round((ref - stock).abs().mean().item(), 4)),
               seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bf16_agreement.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
