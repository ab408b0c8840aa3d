"""Test-session set-up shared by tests/ and the doctests under src/.

Without a GPU the fused Triton kernel runs in Triton's CPU interpreter, which must be chosen before
triton is first imported in the process: choose it here, before anything is collected, so the
kernel tests run in the pytest process itself (exact, slow; the shapes are kept small).
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
