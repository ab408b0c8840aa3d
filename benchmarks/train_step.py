"""Student training-step time with ``ikl`` vs ``kd`` vs ``dkd`` vs ``ce`` (CIFAR-100 IKL-KD recipe).

resnet8x4 student <- resnet32x4 teacher, CIFAR-100 shapes (batch 64, 3x32x32, 100 classes), on
the current device. One step = teacher forward (no grad; not for ``ce``) + student forward + loss
+ backward + SGD step, exactly what ``dkl.recipes.distill`` runs. Methods are interleaved round by
round so that a busy machine slows all of them alike; the median is reported. Also reported: the
loss alone (forward + backward on fixed logits), which is where the methods differ.

    python benchmarks/train_step.py [--device cuda] [--steps 20] [--batch 64]

Target: ``ikl`` adds under 5 % to the ``kd`` step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dkl.models import create_model
from dkl.recipes.distill import DistillConfig, DistillLoss

METHODS = {
    "ce": DistillConfig(method="ce"),
    "kd": DistillConfig(method="kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0),
    "dkd": DistillConfig(method="dkd", alpha=1.0, beta=8.0, temperature=4.0, warmup=20),
    "ikl": DistillConfig(
        method="ikl", alpha=1.0, beta=8.0, temperature=4.0, weight_temperature=100.0, warmup=20
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed rounds per method")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--loss-reps", type=int, default=200)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    teacher = create_model("resnet32x4", 100).to(device).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    student = create_model("resnet8x4", 100).to(device).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)

    def step(cfg: DistillConfig) -> float:
        _sync(device)
        t0 = time.perf_counter()
        z_t = None
        if cfg.method != "ce":
            with torch.no_grad():
                z_t = teacher(x)
        out = DistillLoss(cfg)(student(x), z_t, y, epoch=30)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(args.warmup + args.steps):
        for m, cfg in METHODS.items():
            t = step(cfg)
            if r >= args.warmup:
                times[m].append(t)

    # the loss alone on fixed logits
    zs = torch.randn(args.batch, 100, device=device, requires_grad=True)
    zt = torch.randn(args.batch, 100, device=device)
    loss_runs: dict[str, list[float]] = {m: [] for m in METHODS}
    group = 10
    for r in range(args.loss_reps // group + 1):  # interleaved groups; the first is warm-up
        for m, cfg in METHODS.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(group):
                DistillLoss(cfg)(zs, zt, y, epoch=30)["loss"].backward()
            _sync(device)
            if r:
                loss_runs[m].append((time.perf_counter() - t0) / group * 1e3)
    loss_ms = {m: statistics.median(v) for m, v in loss_runs.items()}

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    kd = statistics.median(times["kd"]) * 1e3
    print(
        f"resnet8x4 <- resnet32x4, batch {args.batch}, 3x32x32, 100 classes; {name}; "
        f"torch {torch.__version__}; median of {args.steps} steps\n"
    )
    print("| method | step (ms) | vs kd | loss fwd+bwd (ms) |")
    print("|---|---|---|---|")
    for m in METHODS:
        med = statistics.median(times[m]) * 1e3
        rel = "–" if m == "ce" else f"{(med / kd - 1) * 100:+.1f} %"
        print(f"| {m} | {med:.1f} | {rel} | {loss_ms[m]:.3f} |")
    extra = (loss_ms["ikl"] - loss_ms["kd"]) / kd * 100
    print(
        f"\n(ce runs no teacher forward, so its step is the student's alone. The loss is the "
        f"only part that differs between kd, dkd and ikl: ikl's loss costs "
        f"{extra:+.3f} % of a kd step more than kd's; step-time differences beyond that are "
        f"timing noise.)"
    )


if __name__ == "__main__":
    main()
