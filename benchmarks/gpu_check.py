"""One prepared run that proves dkl's GPU paths on a GPU and writes one Markdown report.

    python benchmarks/gpu_check.py                          # full run on one CUDA GPU (< 8 min)
    python benchmarks/gpu_check.py --results-dir /tmp/r     # write the report elsewhere
    python benchmarks/gpu_check.py --sections kernel,adv    # a subset
    python benchmarks/gpu_check.py --smoke                  # tiny sizes on CPU, report in /tmp

Sections (each guarded: a failure is a row in the report and the next section still runs), one
module each in gpu_check/sections/, which lists them in the order they run:

1. ``correctness``: the GPU test files, the kernel and the LLM loss against float64 oracles.
2. ``kernel``: the kernel's time and memory against torch, ``F.kl_div``, Liger-Kernel and the
   bandwidth floor.
3. ``kd``, ``adv``, ``ssl``: training steps at the paper shapes (distillation, IKL-AT against the
   authors' loop, FixMatch(-IKL)) in float32 and bfloat16 autocast, eager and compiled.

Targets (the speed and memory goals set for these paths) are printed as met / missed with the ratio.
Each section has a share of the time budget (``--budget``, 440 s by default); on a GPU each runs
in its own child process, killed at its deadline, so a hung compile or a CUDA fault costs only
that section. Whatever did not fit is reported as skipped. Nothing is downloaded.
Exit status: 0 when every section ran and every correctness check passed (targets may be
missed), 1 otherwise, 2 for a full run without a GPU.
"""

import sys

from gpu_check.cli import main  # the package next to this file (benchmarks/gpu_check/)

if __name__ == "__main__":
    sys.exit(main())
