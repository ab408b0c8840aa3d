"""Launch configurations of the fused kernel: forward + backward time per (BLOCK, num_warps).

    python benchmarks/kernel_configs.py            # on a CUDA GPU: Markdown table
    python benchmarks/kernel_configs.py --smoke    # one tiny case, also on CPU (interpreter)

``dkl.ikl_loss(impl="triton")`` with the settings of ``kernel_speed.py``, student logits requiring
grad, at 4096 × 32,000 and 8192 × 128,000 in float32 and bfloat16; each launch configuration is
forced in turn, the shipped one (``dkl.ops.divergence._launch_config``) is marked. Time: median of
CUDA-event-timed calls; floor: read two (B, C) tensors and write one at the measured
device-to-device copy bandwidth. This is how the shipped configuration was chosen.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

if not torch.cuda.is_available():  # the kernel in Triton's interpreter (before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_speed import IKL, Timer, copy_bandwidth, device_name

import dkl
from dkl.ops import divergence

SHAPES = [(4096, 32000), (8192, 128000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BLOCKS = (2048, 4096, 8192)
WARPS = (4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="one tiny case (CPU: the interpreter)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("kernel_configs.py times the kernel on a CUDA GPU; use --smoke on CPU")
    shapes, blocks, warps = ([(4, 300)], (64, 128), (4,)) if args.smoke else (SHAPES, BLOCKS, WARPS)
    bw = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    timer = Timer(device, repeats=1 if args.smoke else 20, budget_s=1.0, warmup=1)
    shipped_config = divergence._launch_config
    print(
        f"device: {device_name(device)}, torch {torch.__version__}; IKL {IKL}; "
        f"copy bandwidth {bw / 1e9:.0f} GB/s (read + written)\n"
    )
    print("| B × C | dtype | BLOCK | num_warps | fwd+bwd (ms) | × floor | shipped |")
    print("|---|---|---|---|---|---|---|")
    loss = functools.partial(dkl.ikl_loss, impl="triton", **IKL)
    try:
        for B, C in shapes:
            for dname, dtype in DTYPES.items():
                gen = torch.Generator(device=device).manual_seed(0)
                zs = (torch.randn(B, C, device=device, generator=gen) * 3).to(dtype)
                zt = (torch.randn(B, C, device=device, generator=gen) * 3).to(dtype)
                zs.requires_grad_(True)
                floor = 3 * zs.numel() * zs.element_size() / bw * 1e3
                shipped = shipped_config(C, None)
                for block in blocks:
                    for nw in warps:
                        divergence._launch_config = lambda C, b, cfg=(block, nw): cfg

                        def step(zs=zs, zt=zt):
                            loss(zs, zt).backward()
                            zs.grad = None

                        try:
                            ms, _ = timer(step)
                        except Exception as exc:  # noqa: BLE001  (a config that fails is a row)
                            print(f"| {B} × {C} | {dname} | {block} | {nw} | {exc!r:.80} | | |")
                            continue
                        mark = "yes" if (block, nw) == shipped else ""
                        print(
                            f"| {B} × {C} | {dname} | {block} | {nw} | {ms:.3f} | "
                            f"{ms / floor:.2f} | {mark} |",
                            flush=True,
                        )
                del zs, zt
    finally:
        divergence._launch_config = shipped_config


if __name__ == "__main__":
    main()
