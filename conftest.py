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


import pytest
import torch

# Process-wide numeric settings a test must leave as it found them (and so must the code it
# runs). Under ``pytest -n 8`` a worker runs many tests in one process, so a leaked setting changes
# the numbers of whichever tests happen to follow it there: a benchmark that switched TF32 on made a
# float64-oracle test on the GPU fail in some runs and pass in others.
_NUMERIC_STATE = {
    "torch.backends.cuda.matmul.allow_tf32": (
        lambda: torch.backends.cuda.matmul.allow_tf32,
        lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v),
    ),
    "torch.backends.cudnn.allow_tf32": (
        lambda: torch.backends.cudnn.allow_tf32,
        lambda v: setattr(torch.backends.cudnn, "allow_tf32", v),
    ),
    "torch.get_float32_matmul_precision()": (
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
    ),
    "torch.get_default_dtype()": (torch.get_default_dtype, torch.set_default_dtype),
    "torch.is_grad_enabled()": (torch.is_grad_enabled, torch.set_grad_enabled),
}


@pytest.fixture(autouse=True)
def _numeric_state_is_left_alone():
    """Fail the test that changes a process-wide numeric setting, and put the setting back."""
    before = {name: get() for name, (get, _) in _NUMERIC_STATE.items()}
    # a training run sets these for its process on CUDA (cudnn.benchmark, and with
    # train.deterministic the deterministic algorithms): put back, not failed
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    changed = {}
    for name, (get, set_) in _NUMERIC_STATE.items():
        now = get()
        if now != before[name]:
            changed[name] = (before[name], now)
            set_(before[name])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    if changed:
        pytest.fail(
            "the test left process-wide numeric settings changed (restored now): "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        )


@pytest.fixture(autouse=True)
def _accelerate_state_is_per_test():
    """accelerate keeps one process-wide state, and transformers < 5 writes the precision of its
    TrainingArguments into ``ACCELERATE_MIXED_PRECISION``: a TRL ``SFTConfig`` (``bf16=True`` by
    default in TRL 0.25) left bf16 autocast on for the plain Trainers of the tests that followed
    it. Each test starts from a fresh state and the environment it found."""
    environ = dict(os.environ)
    yield
    import sys

    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state()
        state.GradientState._reset_state()
