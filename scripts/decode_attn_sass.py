#!/usr/bin/env python
"""T3's decode attention kernel compiled ahead of time for a Hopper GPU and disassembled, on
any machine (no GPU needed: Triton's own ptxas and nvdisasm): instructions, local-memory
spill instructions (STL/LDL), and the same inside each loop (a backward branch's span), for
the kernel as the book's decode steps launch it (bf16, head dim 64, the voice template,
programmatic dependent launch). Give an older copy of ``decode_attention.py`` to compare
(its constexprs with ``--old-const``):

    git show 7c6ff90:ttsbatch/engine/decode_attention.py > /tmp/old_da.py
    TRITON_INTERPRET=0 python scripts/decode_attn_sass.py --old /tmp/old_da.py --old-const CHUNK=512 --old-const NSPLIT=1
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PTRS = dict(Q="*bf16", KN="*bf16", VN="*bf16", KC="*bf16", VC="*bf16", Pos="*i64", O="*bf16", OP="*fp32", MP="*fp32",
            LP="*fp32", COS="*fp32", SIN="*fp32", TK="*bf16", TV="*bf16", Shared="*i64")


def load(path: str):
    spec = importlib.util.spec_from_file_location("decode_attention_old", path)
    mod = importlib.util.module_from_spec(spec)
    src = Path(path).read_text().replace("from . import pdl", "from ttsbatch.engine import pdl")
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def sass_summary(fn, consts: dict, arch: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    sig = {n: "constexpr" if n in consts else PTRS.get(n, "fp32" if n == "scale" else "i32") for n in fn.arg_names}
    kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=1))
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    at: dict[int, str] = {}
    labels: dict[str, int] = {}
    pending = None
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.search(r"/\*([0-9a-f]{4,6})\*/", line)
        if m:
            a = int(m.group(1), 16)
            at[a] = line
            if pending is not None:
                labels[pending], pending = a, None
    spill = {a for a, line in at.items() if re.search(r"\b(STL|LDL)\b", line)}
    loops = []
    for a, line in sorted(at.items()):
        m = re.search(r"BRA[^`]*`\(\.L_x_(\d+)\)", line)
        if m and labels.get(m.group(1), a + 1) < a:
            s = labels[m.group(1)]
            loops.append(f"{sum(1 for x in at if s <= x <= a)} instructions, {sum(1 for x in spill if s <= x <= a)} spill")
    return f"{len(at)} instructions, {len(spill)} spill (STL/LDL); loops: {loops or 'none'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="an older decode_attention.py to compare")
    ap.add_argument("--old-const", action="append", default=[], metavar="NAME=INT", help="a constexpr of the old kernel")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("decode_attn_sass.py: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    from ttsbatch.engine import decode_attention

    flags = dict(BLOCK=decode_attention.BLOCK_N, D=64, ROPE=False, PREFETCH=True, PDL=True, SHARED=True)
    print("current:", sass_summary(decode_attention._attend_split, flags, args.arch))
    if args.old:
        extra = {k: int(v) for k, v in (c.split("=", 1) for c in args.old_const)}
        print("old:    ", sass_summary(load(args.old)._attend_split, {**extra, **flags}, args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
