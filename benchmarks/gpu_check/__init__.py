"""One prepared run that proves dkl's GPU paths on a GPU and writes one Markdown report.

The command is ``python benchmarks/gpu_check.py`` (``make gpu-check``); this package is its body:

    sections/    one module per section of the report; sections/__init__.py lists them in order
    core.py      a section's registry entry and context, the guard that turns a failure or an
                 overrun into a row, child processes
    report.py    the one report writer: records (text, tables, checks, targets), then Markdown
    measure.py   timing, peak memory, relative errors, precision settings
    oracles.py   float64 references
    steps.py     what the training-step sections share (modes, repeated steps, loss checks)
    cli.py       the options, the time budget shared out, the report written after each section
"""

import importlib.util
import sys
import time
from pathlib import Path

START = time.time()  # before torch loads: the time budget counts the imports too
if importlib.util.find_spec("dkl") is None:  # a bare checkout (e.g. a GPU box without pip -e .)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
