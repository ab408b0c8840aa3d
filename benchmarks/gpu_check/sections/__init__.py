"""The sections of the report, in the order they run and share the time budget.

A section is one module of this folder that ends in a ``Section`` (``..core``); listed in
``SECTIONS`` below, it runs, is reported, is accepted by ``--sections`` and runs in the smoke
test. Its shape::

    FULL = {"N": 8192, "H": 4096, "V": 128256}  # sizes on one GPU
    SMOKE = {"N": 12, "H": 8, "V": 50}  # sizes of the CPU smoke run (seconds)

    def section_x(sink: Sink, ctx: Ctx) -> None:  # ctx.size: FULL or SMOKE; ctx.left(): seconds
        sink.text("What is measured, how, and against what.")
        sink.table("dtype", "method", "fwd+bwd (ms)", "result")
        done, out = attempt(lambda: measure(ctx.size), ctx)  # raising or overrunning: a reason
        if not done:
            sink.row("bf16", "fused", result=out)  # the gap filled with '–'
            return failed(sink, out)  # a failed check, or skipped at the deadline
        sink.row("bf16", "fused", f"{out.ms:.1f}", "pass" if out.ok else "FAIL")
        sink.check(out.ok)  # a correctness verdict: True, False, None (skipped)
        sink.target("fused ≤ Liger's time", "70 vs 90 ms", 0.78, True)

    SECTION = Section("x", "4. Title", share=60, run=section_x, full=FULL, smoke=SMOKE)
"""

from __future__ import annotations

from ..core import Section
from . import adv, correctness, kd, kernel, llm, sharded, ssl

SECTIONS: dict[str, Section] = {
    s.name: s
    for s in (
        correctness.SECTION,
        kernel.SECTION,
        kd.SECTION,
        adv.SECTION,
        ssl.SECTION,
        sharded.SECTION,
        llm.SECTION,
    )
}
