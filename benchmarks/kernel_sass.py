"""Machine instructions per element of dkl's Triton kernel, counted without a GPU.

    TRITON_INTERPRET=0 python benchmarks/kernel_sass.py            # sm_90 (Hopper)
    TRITON_INTERPRET=0 python benchmarks/kernel_sass.py --arch 80  # sm_80 (Ampere)

Each launch dkl makes is compiled for the architecture (``dkl.ops._aot``), disassembled with the
``cuobjdump`` Triton ships, and the instructions of its column loop counted by kind. One loop
iteration handles ``BLOCK`` columns with ``32 · num_warps`` threads, so a thread's iteration
covers ``BLOCK / (32 · num_warps)`` elements: the table divides by that. ``BAR`` are block-wide
barriers (two per cross-warp reduction), ``SHFL`` warp shuffles, ``MUFU`` the special-function
unit (exp2, log2, reciprocal), ``FP32`` the float adds, multiplies, fused multiply-adds, min/max,
selects and compares. A static count is not a time: it says what an iteration asks of the
hardware, not how well the warps hide the latency; `make gpu-check` times the kernel.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import torch

from dkl.ops._aot import compile_kernel, constexprs_for
from dkl.ops.divergence import MAX_BLOCK, NUM_WARPS

LAUNCHES = [
    (case, phase, dtype)
    for case in ("kl", "ikl", "ikl_t2")
    for phase in ("forward", "backward", "one_launch")
    for dtype in (torch.float32, torch.bfloat16)
] + [("ikl", "one_launch_ce", torch.bfloat16)]
FP32 = ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FMNMX3")
_LINE = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)")


def sass(cubin: bytes) -> list[tuple[int, str, str]]:
    """``(address, opcode, operands)`` of every instruction in a cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True)
    out = []
    for line in text.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def loop_counts(code: list[tuple[int, str, str]]) -> collections.Counter:
    """Instruction kinds (opcode without modifiers) inside the kernel's column loops: the ranges
    closed by a backward branch."""
    counts: collections.Counter = collections.Counter()
    for addr, op, rest in code:
        if not op.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", rest)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            counts.update(o.split(".")[0] for a, o, _ in code if start <= a <= addr)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="sm_XX target (default 90)")
    args = parser.parse_args(argv)
    per_thread = MAX_BLOCK // (32 * NUM_WARPS)
    print(
        f"sm_{args.arch}, BLOCK {MAX_BLOCK}, {NUM_WARPS} warps: {per_thread} elements per thread "
        "and loop iteration; instructions per element in the column loops\n"
    )
    print("| case | phase | dtype | all | FP32 | MUFU | SHFL | BAR | loads | stores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case, phase, dtype in LAUNCHES:
        compiled = compile_kernel(constexprs_for(case, phase), dtype=dtype, arch=args.arch)
        c = loop_counts(sass(compiled.asm["cubin"]))

        def per(n: float) -> str:
            return f"{n / per_thread:.2f}"

        cells = [
            per(sum(c.values())),
            per(sum(c[k] for k in FP32)),
            per(c["MUFU"]),
            per(c["SHFL"]),
            per(c["BAR"]),
            per(c["LDG"]),
            per(c["STG"]),
        ]
        name = str(dtype).removeprefix("torch.")
        print(f"| {case} | {phase} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
