"""The Triton kernel compiled for a GPU architecture on a machine without a GPU.

Triton ships its own ``ptxas``, so the kernel lowers to PTX and to a cubin for, say, ``sm_90``
with no CUDA device present. The tests use this to catch a kernel that Triton's interpreter runs
but the GPU compiler refuses (the interpreter is looser about types), and
``benchmarks/kernel_sass.py`` to count the machine instructions each variant spends per element.

It needs a process where Triton compiles: under ``TRITON_INTERPRET=1`` (how the tests run the
kernel on CPU) Triton's own library functions are interpreted ones and cannot be lowered, so the
tests call ``python -m dkl.ops._aot`` in a subprocess with ``TRITON_INTERPRET=0``.

    python -m dkl.ops._aot                 # every launch dkl makes, for sm_90 and sm_80
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dkl.ops.divergence import MAX_BLOCK, NUM_WARPS, _kernel_module

_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# the kernel's arguments that are not the logits, their gradients or plain int32 / fp32 scalars
_FIXED_TYPES = {
    "cw_ptr": "*fp32",
    "mask_ptr": "*u8",
    "labels_ptr": "*i64",
    "ce_ptr": "*fp32",
    "scale_ptr": "*fp32",
    "loss_ptr": "*fp32",
    "stats_ptr": "*fp32",
}
_INPUT_SIDE = ("s_ptr", "gs_ptr")  # the input's logits and gradient: the input's dtype
_TARGET_SIDE = ("t_ptr", "gt_ptr")  # the target's: the target's dtype
_FLOAT_SCALARS = ("inv_T", "inv_T2", "alpha", "beta", "ce_weight")

# The launch phases dkl uses: the autograd forward (statistics), the autograd backward
# (gradients from the saved statistics) and the chunked LLM path's single launch (both), the
# latter also with the hard-label CE at T != 1 and at T = 1.
_NO_CE = {"HAS_CE": False, "CE_AT_T": False}
_ONE_LAUNCH = {"PASS1": True, "PASS2": True, "HAS_SCALE": True, "GRAD_S": True, "GRAD_T": False}
PHASES: dict[str, dict[str, bool]] = {
    "forward": {
        "PASS1": True,
        "PASS2": False,
        "HAS_SCALE": False,
        "GRAD_S": False,
        "GRAD_T": False,
        **_NO_CE,
    },
    "backward": {
        "PASS1": False,
        "PASS2": True,
        "HAS_SCALE": True,
        "GRAD_S": True,
        "GRAD_T": True,
        **_NO_CE,
    },
    "one_launch": {**_ONE_LAUNCH, **_NO_CE},
    "one_launch_ce": {**_ONE_LAUNCH, "HAS_CE": True, "CE_AT_T": False},
    "one_launch_ce_t1": {**_ONE_LAUNCH, "HAS_CE": True, "CE_AT_T": True},
}
# (KIND, WMODE): KL, DKL, and IKL with the weights from the target's softmax at T, at T2, or given
CASES = {"kl": (0, 0), "dkl": (1, 0), "ikl": (2, 0), "ikl_t2": (2, 1), "ikl_gi": (2, 2)}


def launches() -> list[tuple[str, str, torch.dtype | tuple[torch.dtype, torch.dtype]]]:
    """``(case, phase, dtype)`` for every launch kind dkl makes: float32 throughout, the half
    types for IKL's gradient-writing launches, the CE launches for the LLM path's kinds, and that
    path's mixed pairs (a bfloat16 student with a float32 teacher: a soft-capped teacher head, a
    top-k teacher with the uniform tail)."""
    plain = [p for p in PHASES if not PHASES[p]["HAS_CE"]]
    out = [(case, phase, torch.float32) for case in CASES for phase in plain]
    out += [
        ("ikl", phase, dt)
        for phase in ("backward", "one_launch", "one_launch_ce")
        for dt in (torch.bfloat16, torch.float16)
    ]
    out += [
        (case, phase, torch.float32)
        for case in ("kl", "ikl")
        for phase in ("one_launch_ce", "one_launch_ce_t1")
    ]
    out += [
        ("ikl", "one_launch_ce", (torch.bfloat16, torch.float32)),
        ("kl", "one_launch_ce_t1", (torch.bfloat16, torch.float32)),
    ]
    return out


def constexprs_for(case: str, phase: str, *, mask: bool = True, block: int = MAX_BLOCK) -> dict:
    kind, wmode = CASES[case]
    return {
        "KIND": kind,
        "WMODE": wmode,
        "HAS_MASK": mask,
        "BLOCK": block,
        **PHASES[phase],
    }


def compile_kernel(
    constexprs: dict[str, int | bool],
    *,
    dtype: torch.dtype | tuple[torch.dtype, torch.dtype] = torch.float32,
    arch: int = 90,
    num_warps: int = NUM_WARPS,
    aligned: bool = True,
):
    """The divergence kernel compiled for ``sm_<arch>``; returns Triton's ``CompiledKernel``
    (its ``asm`` holds ``ttir`` ... ``ptx`` and ``cubin``). ``constexprs`` names every
    compile-time argument (``KIND``, ``WMODE``, ..., ``BLOCK``); ``dtype`` is the logits', or
    ``(input's, target's)`` when they differ.

    ``aligned``: specialise as Triton does at run time for the usual call, with every pointer
    16-byte aligned, ``C`` and the row strides multiples of 16 and the per-row scale contiguous
    (its stride the constant 1); the loads are vectorised then. ``False``: no such knowledge."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    s_dtype, t_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    for d in (s_dtype, t_dtype):
        if d not in _POINTER_TYPES:
            raise ValueError(f"Expected a logits dtype in {list(_POINTER_TYPES)}, got {d}")
    kernel = _kernel_module()._divergence_kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(  # noqa: TRY004  (the process's mode, not the argument's type)
            "Triton runs its interpreter in this process (TRITON_INTERPRET=1 when triton was "
            "imported), and interpreted functions do not compile: compile in a fresh process "
            "with TRITON_INTERPRET=0, e.g. `TRITON_INTERPRET=0 python -m dkl.ops._aot`"
        )
    missing = [p.name for p in kernel.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"Expected a value for every compile-time argument, missing {missing}")
    signature = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _INPUT_SIDE:
            signature[name] = _POINTER_TYPES[s_dtype]
        elif name in _TARGET_SIDE:
            signature[name] = _POINTER_TYPES[t_dtype]
        elif name in _FIXED_TYPES:
            signature[name] = _FIXED_TYPES[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    constexprs = dict(constexprs)
    attrs = {}
    if aligned:
        constexprs["scale_stride"] = 1
        signature["scale_stride"] = "constexpr"
        for i, param in enumerate(kernel.params):
            if signature[param.name].startswith("*") or signature[param.name] == "i32":
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every launch of dkl's kernel for GPUs.")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="sm_XX targets")
    args = parser.parse_args(argv)
    failed = 0
    print("| arch | case | phase | dtype | result | seconds |\n|---|---|---|---|---|---|")
    for arch in args.arch:
        for case, phase, dtype in launches():
            start = time.perf_counter()
            try:
                compiled = compile_kernel(constexprs_for(case, phase), dtype=dtype, arch=arch)
                result = f"cubin {len(compiled.asm['cubin']):,} bytes"
            except Exception as exc:  # noqa: BLE001  (each launch's failure is its row)
                failed += 1
                result = f"**failed**: {type(exc).__name__}: {str(exc).strip().splitlines()[-1]}"
            took = time.perf_counter() - start
            name = " / ".join(
                str(d).removeprefix("torch.")
                for d in (dtype if isinstance(dtype, tuple) else [dtype])
            )
            print(f"| sm_{arch} | {case} | {phase} | {name} | {result} | {took:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
