"""4. Sharded LLM distillation through the Hugging Face Trainer on this GPU: DeepSpeed ZeRO-3
(student and a LoRA student, teachers loaded partitioned by ``zero.Init``) and FSDP2
(``fully_shard``, the teacher sharded like the student), each one optimiser step compared with one
float64 process. CPU ranks cannot run FSDP through accelerate, so this is its only check.

One GPU runs one rank: the parameters are partitioned over a world of one, so the hooks, gathers
and the head-gradient path run as on more GPUs, but no shard lives on another device and no
collective moves data between devices; the 2-rank runs of the same tests on CPU cover that."""

from __future__ import annotations

from ..core import Ctx, Section
from ..report import Sink
from .correctness import run_suite

FILES = ["tests/test_llm_sharding.py"]
FULL = {"files": FILES, "nproc": "1"}
SMOKE = {"files": None, "nproc": "2"}


def section_sharded(sink: Sink, ctx: Ctx) -> None:
    sink.text(
        "`tests/test_llm_sharding.py` with one rank on this GPU (`DKL_SHARDED_NPROC=1`): loss and "
        "every trainable parameter's step equal to one float64 process, the teacher sharded, the "
        "logged `distill/*` terms adding up to the logged loss."
    )
    run_suite(
        sink,
        ctx,
        ctx.size["files"],
        env={"DKL_SHARDED_NPROC": ctx.size["nproc"]},
        parallel=False,  # each test starts its own torchrun
        skipped="Skipped in the smoke run (CI runs this file on 2 CPU ranks).",
    )


SECTION = Section(
    "sharded",
    "4. Sharded LLM distillation (ZeRO-3, FSDP2) through the Trainer",
    share=90,  # four torchrun starts of about 20 s each
    run=section_sharded,
    full=FULL,
    smoke=SMOKE,
)
