"""Draws the two plots at the top of docs/benchmarks.md from the measured tables on that page
(the numbers below are copied from them: the CPU loss table of ``benchmarks/loss_speed.py`` and
the H100 kernel table of ``benchmarks/results/gpu_check_nvidia_h100_80gb_hbm3.md``).

    python docs/_hooks/benchmark_plots.py     # rewrites docs/assets/benchmarks/*.png

Run it again when those tables change.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parents[1] / "assets" / "benchmarks"

# the project's 2-core CPU, forward + backward, float32, median ms (docs/benchmarks.md)
CPU_SIZES = ["128 × 100", "256 × 1000", "64 × 4000", "8 × 32000", "4 × 128000", "64 × 200000"]
CPU = {
    "F.kl_div": [0.244, 1.99, 2.13, 2.15, 5.09, 249],
    "dkl.kl_loss": [0.135, 0.77, 0.843, 0.791, 1.73, 54.4],
    "dkl.ikl_loss": [0.157, 1.1, 1.11, 1.09, 2.62, 88.7],
    "pairwise wMSE (authors)": [8.63, 5250, None, None, None, None],
}
# one H100, forward + backward, ms (benchmarks/results/gpu_check_nvidia_h100_80gb_hbm3.md)
GPU_SIZES = [
    "4096 × 32,000\nfp32",
    "4096 × 32,000\nbf16",
    "8192 × 128,000\nfp32",
    "8192 × 128,000\nbf16",
]
GPU = {
    "bandwidth floor": [0.53, 0.26, 4.22, 2.11],
    "dkl IKL kernel": [1.26, 0.89, 7.93, 5.15],
    "F.kl_div compiled": [1.92, 1.06, 14.26, 7.20],
    "Liger-Kernel KL": [4.38, 2.12, 34.09, 16.91],
    "F.kl_div": [5.46, 2.79, 43.75, 22.58],
}


def cpu_plot(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = range(len(CPU_SIZES))
    for name, times in CPU.items():
        pts = [(i, t) for i, t in zip(x, times) if t is not None]
        ax.plot(*zip(*pts), marker="o", label=name, linestyle="--" if "pairwise" in name else "-")
    ax.set_yscale("log")
    ax.set_xticks(list(x), CPU_SIZES)
    ax.set_xlabel("B × C (batch × classes)")
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title("The losses on a 2-core CPU (pairwise: out of memory beyond C = 1000)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_plot(path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    width = 0.16
    for j, (name, times) in enumerate(GPU.items()):
        xs = [i + (j - 2) * width for i in range(len(GPU_SIZES))]
        ax.bar(xs, times, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(GPU_SIZES)), GPU_SIZES)
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title("KL-type losses on one H100 (lower is better)")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    cpu_plot(OUT / "losses_cpu.png")
    gpu_plot(OUT / "kernel_h100.png")
    print(f"wrote {OUT}/losses_cpu.png and kernel_h100.png")
