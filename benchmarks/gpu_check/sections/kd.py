"""3a. Training step, knowledge distillation: resnet32x4 -> resnet8x4, batch 64 (ce / kd / dkd /
ikl as the CIFAR-100 presets), in float32 and bfloat16 autocast, eager and ``torch.compile``d, on
random data of the real shapes: time per step, peak memory, and the first step's loss against
float32."""

from __future__ import annotations

import copy
import statistics

import torch

from ..core import Ctx, Section, attempt, failed, sibling
from ..measure import autocast, peak_gib, reset_peak, timed
from ..report import Sink
from ..steps import MODES, NUM_CLASSES, STEP_TOLS, loss_check, runnable_modes

FULL = {"teacher": "resnet32x4", "student": "resnet8x4", "batch": 64, "warmup": 3, "reps": 10}
SMOKE = {"teacher": "resnet8", "student": "resnet8", "batch": 4, "warmup": 0, "reps": 0}
IKL_OVER_KD = 0.05  # target: IKL's step at most 5 % slower than KD's


def section_kd(sink: Sink, ctx: Ctx) -> None:
    from dkl.models import create_model
    from dkl.recipes.distill import DistillLoss

    methods = sibling("train_step").METHODS  # ce / kd / dkd / ikl as the CIFAR-100 presets
    cfg, dev = ctx.size, ctx.device
    B = cfg["batch"]
    sink.text(
        f"{cfg['teacher']} -> {cfg['student']}, batch {B}, 3×32×32, {NUM_CLASSES} classes, random "
        "weights and images. One step: teacher forward (no grad; none for ce), student forward, "
        "`DistillLoss`, backward, SGD. Methods interleaved round by round; median of "
        f"{cfg['reps']} rounds after {cfg['warmup']}; peak memory of one more step. First-step "
        f"loss from the same weights, against float32 eager (relative tolerance {STEP_TOLS})."
    )
    torch.manual_seed(0)
    teacher = create_model(cfg["teacher"], NUM_CLASSES).to(dev).eval().requires_grad_(False)
    student = create_model(cfg["student"], NUM_CLASSES).to(dev).train()
    init = copy.deepcopy(student.state_dict())
    x = torch.rand(B, 3, 32, 32, device=dev)
    y = torch.randint(0, NUM_CLASSES, (B,), device=dev)
    crits = {m: DistillLoss(c) for m, c in methods.items()}
    sink.table("mode", "method", "step (ms)", "vs kd", "peak (GiB)", "first-step loss", "check")
    ref: dict[str, float] = {}
    for mode in runnable_modes(sink, ctx):
        s_net = torch.compile(student, backend=ctx.backend) if mode.compiled else student
        t_net = torch.compile(teacher, backend=ctx.backend) if mode.compiled else teacher
        opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        def step(method, s_net=s_net, t_net=t_net, opt=opt, mode=mode):
            with autocast(dev, mode.amp):
                z_t = None
                if method != "ce":
                    with torch.no_grad():
                        z_t = t_net(x)
                loss = crits[method](s_net(x), z_t, y, epoch=30)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach().float().item()

        def run(step=step, opt=opt):
            first, first_ms, times = {}, {}, {m: [] for m in methods}
            for m in methods:  # the same weights for each method's first step
                student.load_state_dict(init)
                opt.state.clear()
                first_ms[m], first[m] = timed(lambda m=m: step(m), dev)
            for r in range(cfg["warmup"] + cfg["reps"]):
                for m in methods:
                    ms, _ = timed(lambda m=m: step(m), dev)
                    if r >= cfg["warmup"]:
                        times[m].append(ms)
                if ctx.left() < 3:
                    break
            peaks = {}
            for m in methods:
                reset_peak(dev)
                if dev.type == "cuda":
                    step(m)
                peaks[m] = peak_gib(dev)
            med = {m: statistics.median(times[m] or [first_ms[m]]) for m in methods}
            return first, med, peaks

        done, out = attempt(run, ctx)
        if not done:
            sink.row(mode, "all", result=out)
            failed(sink, out)
            continue
        first, med, peaks = out
        for m in methods:
            vs = "–" if m == "ce" else f"{(med[m] / med['kd'] - 1) * 100:+.1f} %"
            verdict = loss_check(sink, mode, first[m], ref.get(m), mode == MODES[0])
            sink.row(mode, m, f"{med[m]:.2f}", vs, peaks[m], f"{first[m]:.5f}", verdict)
        if mode == MODES[0]:
            ref = dict(first)
        over = med["ikl"] / med["kd"] - 1
        sink.target(
            f"KD {mode}: IKL step overhead over KD < {IKL_OVER_KD:.0%}",
            f"{med['ikl']:.2f} vs {med['kd']:.2f} ms ({over:+.1%})",
            med["ikl"] / med["kd"],
            over < IKL_OVER_KD,
        )


SECTION = Section(
    "kd",
    "3a. Training step: knowledge distillation",
    share=60,
    run=section_kd,
    full=FULL,
    smoke=SMOKE,
    compile_s=20,
)
