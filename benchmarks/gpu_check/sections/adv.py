"""3b. Training step, IKL adversarial training: IKL-AT on WRN-34-10, batch 128, against the
authors' loop (``benchmarks/adv_step.py``), in float32, bfloat16 autocast (+ channels_last) and
``torch.compile``d: time per step, peak memory, the first step's loss against the authors' float32
one, the same maths in full float32, and a short run's accuracy in bfloat16 against float32."""

from __future__ import annotations

import copy
import math
import statistics

import torch
import torch.nn.functional as F

from ..core import BudgetSpent, Ctx, Section, attempt, failed, sibling
from ..measure import autocast, full_float32, rel_err, timed
from ..report import Sink
from ..steps import NUM_CLASSES, Mode, loss_check, mode_skip, repeat_steps

FULL = {
    "depth": 34,
    "widen": 10,
    "batch": 128,
    "warmup": 2,
    "reps": 5,
    "run_steps": 40,
    "run_eval": 1024,
}
SMOKE = {
    "depth": 10,
    "widen": 1,
    "batch": 2,
    "warmup": 0,
    "reps": 0,
    "run_steps": 1,
    "run_eval": 8,
}
# targets: dkl's IKL-AT step against the authors' loop
AT_SPEEDUP_FP32 = 1.2  # same maths in float32
AT_SPEEDUP_BF16 = 2.0  # with bfloat16 autocast + channels_last


def synthetic_images(n: int, gen: torch.Generator, protos: torch.Tensor, noise: float):
    """Class prototypes (smooth random images) plus noise, in [0, 1]: learnable in a few steps."""
    y = torch.randint(0, protos.shape[0], (n,), generator=gen)
    x = protos[y] + noise * torch.randn(n, *protos.shape[1:], generator=gen)
    return x.clamp(0, 1), y


class AdversarialBench:
    """IKL-AT steps on one WRN: dkl's loop and the authors' (``benchmarks/adv_step.py``)."""

    BASE = "authors' loop fp32"
    epochs = 200  # the last epoch: the full ε = 8/255
    alpha, beta = 4.0, 20.0  # the CIFAR-100 IKL-AT preset

    def __init__(self, ctx: Ctx) -> None:
        from dkl.attacks import TrainAttack
        from dkl.models import with_normalization
        from dkl.models.wrn import WideResNet
        from dkl.recipes.adversarial import AdversarialLoss

        self.adv = sibling("adv_step")
        self.ctx, self.cfg, self.dev = ctx, ctx.size, ctx.device
        cfg, dev = self.cfg, self.dev
        torch.manual_seed(0)
        net = WideResNet(cfg["depth"], cfg["widen"], NUM_CLASSES)
        self.model = with_normalization(net, self.adv.CIFAR100_MEAN, self.adv.CIFAR100_STD)
        self.model = self.model.to(dev).train()
        self.init = copy.deepcopy(self.model.state_dict())
        self.attack = TrainAttack(loss="ikl", budget="high", max_eps=8 / 255)
        self.criterion = AdversarialLoss("ikl_at", alpha=self.alpha, beta=self.beta)
        self.steps, self.step_size, self.eps = self.attack.schedule(self.epochs, self.epochs)
        self.x = torch.rand(cfg["batch"], 3, 32, 32, device=dev)
        self.y = torch.randint(0, NUM_CLASSES, (cfg["batch"],), device=dev)
        prior = torch.rand(NUM_CLASSES, NUM_CLASSES, device=dev) + 0.1
        self.prior = prior / prior.sum(1, keepdim=True)  # GI rows, picked by label
        self.ms: dict[str, float] = {}  # median step time per variant
        self.first_loss: dict[str, float] = {}  # the authors' first-step loss: the reference

    def dkl_loss(self, net, x, y):
        from dkl.attacks import eval_mode

        w = self.prior[y]
        with torch.no_grad(), eval_mode(net):
            z_nat = net(x)
        E = self.epochs
        x_adv = self.attack(net, x, epoch=E, epochs=E, labels=y, z_nat=z_nat, class_weights=w)
        return self.criterion(net(x), net(x_adv), y, class_weights=w)["loss"]

    def authors_loss(self, net, x, y):
        w = self.prior[y]
        x_adv = self.adv.authors_attack(net, x, w, self.eps, self.steps, self.step_size)
        return self.adv.authors_loss(net, x, x_adv, y, w, self.alpha, self.beta)

    def prepare(self, mode: Mode):
        """Initial weights in ``mode``'s memory format, the (compiled) net and a fresh SGD."""
        self.model.load_state_dict(self.init)
        fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)
        net = torch.compile(self.model, backend=self.ctx.backend) if mode.compiled else self.model
        opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        return net, opt, fmt

    def step(self, loss_fn, net, opt, mode, x, y) -> float:
        with autocast(self.dev, mode.amp):
            loss = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().float().item()

    def same_maths(self, sink: Sink) -> None:
        """dkl's training loss and gradients against the authors' on the same adversarial batch,
        in full float32 and with torch's default TF32 convolutions, and how many adversarial
        pixels the two attacks share."""
        with full_float32():
            loss_err, grad_err, same = self.compare()
        _, tf32_err, _ = self.compare()
        ok = loss_err <= 1e-4 and grad_err <= 1e-4
        sink.check(ok)
        sink.text(
            "Same maths, on the same adversarial batch, in full float32 (TF32 off): dkl's training "
            f"loss (closed form) and the authors' (pairwise) differ by {loss_err:.1e}, their "
            f"parameter gradients by {grad_err:.1e} (relative; tolerance 1e-4: "
            f"{'ok' if ok else 'FAIL'}). With torch's default TF32 cuDNN convolutions the "
            f"gradients differ by {tf32_err:.1e}: TF32's 10-bit mantissa rounds the two losses' "
            "slightly different input gradients apart. The two attacks share "
            f"{100 * same:.1f} % of the adversarial pixels (sign steps on near-zero input "
            "gradients may flip between two float orderings)."
        )

    def compare(self) -> tuple[float, float, float]:
        """(loss error, parameter-gradient error, share of equal adversarial pixels)."""
        self.model.load_state_dict(self.init)
        self.model.to(memory_format=torch.contiguous_format)
        x, y, w = self.x, self.y, self.prior[self.y]
        torch.manual_seed(1)
        x_adv = self.attack(
            self.model, x, epoch=self.epochs, epochs=self.epochs, labels=y, class_weights=w
        )
        torch.manual_seed(1)
        x_ref = self.adv.authors_attack(self.model, x, w, self.eps, self.steps, self.step_size)
        params = list(self.model.parameters())
        self.model.train()  # the training forwards: BatchNorm on batch statistics
        loss = self.criterion(self.model(x), self.model(x_adv), y, class_weights=w)["loss"]
        grads = torch.autograd.grad(loss, params)
        ref = self.adv.authors_loss(self.model, x, x_adv, y, w, self.alpha, self.beta)
        ref_grads = torch.autograd.grad(ref, params)
        loss_err = rel_err(loss.item(), ref.item())
        flat = torch.cat([g.flatten() for g in grads])
        flat_ref = torch.cat([g.flatten() for g in ref_grads])
        grad_err = ((flat - flat_ref).norm() / flat_ref.norm()).item()
        return loss_err, grad_err, (x_adv == x_ref).float().mean().item()

    def variant(self, sink: Sink, name: str, mode: Mode) -> None:
        """One table row: ``name`` ("dkl" or "authors' loop") in ``mode``."""
        ctx, cfg, dev = self.ctx, self.cfg, self.dev
        label = f"{name} {mode}"
        skip = mode_skip(ctx, mode, need_s=10.0)
        if skip:
            sink.row(name, mode, result=skip)
            return
        loss_fn = self.dkl_loss if name == "dkl" else self.authors_loss

        def run():
            net, opt, fmt = self.prepare(mode)
            x = self.x.contiguous(memory_format=fmt)
            torch.manual_seed(1)  # the same random start in every loop
            ms0, first = timed(lambda: self.step(loss_fn, net, opt, mode, x, self.y), dev)
            times, peak = repeat_steps(
                lambda: self.step(loss_fn, net, opt, mode, x, self.y), cfg, ctx
            )
            return first, statistics.median(times or [ms0]), peak

        done, out = attempt(run, ctx)
        if not done:
            sink.row(name, mode, result=out)
            failed(sink, out)
            return
        first, med, peak = out
        self.ms[label] = med
        base = self.ms.get(self.BASE)
        if label == self.BASE:  # it runs first
            self.first_loss[label] = first
        ref = self.first_loss.get(self.BASE)
        verdict = loss_check(sink, mode, first, ref, label == self.BASE)
        speed = f"{base / med:.2f}×" if base else "–"
        sink.row(name, mode, f"{med:.1f}", speed, peak, f"{first:.5f}", verdict)


ADV_VARIANTS = [("authors' loop", Mode("fp32"))] + [
    ("dkl", m)
    for m in (
        Mode("fp32"),
        Mode("bf16"),
        Mode("bf16", channels_last=True),
        Mode("bf16", compiled=True, channels_last=True),
        Mode("fp32", compiled=True),
    )
]
ADV_COLUMNS = ("loop", "mode", "step (ms)", "vs authors", "peak (GiB)", "first-step loss", "check")


def section_adv(sink: Sink, ctx: Ctx) -> None:
    bench = AdversarialBench(ctx)
    cfg = bench.cfg
    sink.text(
        f"IKL-AT, WRN-{cfg['depth']}-{cfg['widen']}, batch {cfg['batch']}, CIFAR-100 shapes, "
        f"random images and GI class-weight rows; attack: {bench.steps} steps of "
        f"{bench.step_size * 255:.0f}/255 at ε = {bench.eps * 255:.0f}/255 on IKL (α = β = 1); "
        f"loss CE + IKL (α = {bench.alpha:g}, β = {bench.beta:g}); SGD step included. The "
        "authors' loop (`benchmarks/adv_step.py`) recomputes the natural logits in every attack "
        "step and sums the wMSE over B×C×C pairs; dkl computes them once (eval mode, no grad) and "
        f"uses the O(B·C) closed form. Median of {cfg['reps']} steps after {cfg['warmup']}; "
        "peak memory over those steps. First-step loss from the same weights and random start, "
        "against the authors' float32 one."
    )
    sink.table(*ADV_COLUMNS)
    for name, mode in ADV_VARIANTS:
        if not mode.compiled:
            bench.variant(sink, name, mode)
    if ctx.left() > 10:
        done, out = attempt(lambda: bench.same_maths(sink), ctx)
        if not done:
            sink.text(f"Same maths: {out}")
            failed(sink, out)
    base = bench.ms.get(bench.BASE)
    for label, goal in (
        ("dkl fp32", AT_SPEEDUP_FP32),
        ("dkl bf16 autocast + channels_last", AT_SPEEDUP_BF16),
    ):
        what = f"IKL-AT {label}: ≥ {goal}× the authors' loop"
        if base and label in bench.ms:
            sp = base / bench.ms[label]
            sink.target(what, f"{bench.ms[label]:.1f} vs {base:.1f} ms", sp, sp >= goal)
        else:
            sink.target(what, "not measured", None, None)
    short_run(sink, bench)
    sink.text(
        "`torch.compile`d model (after the short run, so that a long compile cannot crowd it out):"
    )
    sink.table(*ADV_COLUMNS)
    for name, mode in ADV_VARIANTS:
        if mode.compiled:
            bench.variant(sink, name, mode)


EVAL_NOISE = (0.15, 0.5, 1.0)  # held-out noise levels: the training one, then harder ones


def short_run(sink: Sink, bench: AdversarialBench) -> None:
    """float32 vs bfloat16 + channels_last over a short IKL-AT run on a learnable synthetic task;
    the noise is a second float32 run with other data and attack draws."""
    from dkl.attacks import eval_mode

    ctx, cfg, dev = bench.ctx, bench.cfg, bench.dev
    n_steps, n_eval, B = cfg["run_steps"], cfg["run_eval"], cfg["batch"]
    grid = torch.rand(NUM_CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    protos = F.interpolate(grid, size=32, mode="nearest")
    gen = torch.Generator().manual_seed(6)
    evals = [synthetic_images(n_eval, gen, protos, noise) for noise in EVAL_NOISE]
    evals = [(x.to(dev), y) for x, y in evals]
    n_all = n_eval * len(EVAL_NOISE)
    levels = ", ".join(f"{n:g}" for n in EVAL_NOISE)
    sink.text(
        f"Short run: {n_steps} IKL-AT steps (batch {B}) from the same weights on a synthetic task "
        f"(100 class prototypes + noise 0.15), then clean top-1 on {n_eval} held-out images at "
        f"each noise level {levels} (the harder levels keep the accuracy off its ceiling): "
        "float32 twice (other data and attack draws give the noise) and bfloat16 + channels_last. "
        f"Same accuracy within noise, on all {n_all} images: |Δ| ≤ max(2 × the float32 runs' "
        "difference, 2 standard errors of a difference of two binomial proportions, 3 images)."
    )
    sink.table(
        "run", "final loss (mean of last 5 steps)", *(f"top-1 at {n:g} (%)" for n in EVAL_NOISE)
    )
    runs = {
        "fp32, draws 0": (Mode("fp32"), 0),
        "fp32, draws 1": (Mode("fp32"), 1),
        "bf16 + channels_last, draws 0": (Mode("bf16", channels_last=True), 0),
    }
    results = {}
    for label, (mode, seed) in runs.items():
        if ctx.left() < 15:
            sink.row(label, result="skipped (time budget)")
            continue

        def run(mode=mode, seed=seed):
            net, opt, fmt = bench.prepare(mode)
            gen = torch.Generator().manual_seed(100 + seed)
            torch.manual_seed(100 + seed)
            losses = []
            for _ in range(n_steps):
                x, y = synthetic_images(B, gen, protos, 0.15)
                x = x.to(dev).contiguous(memory_format=fmt)
                losses.append(bench.step(bench.dkl_loss, net, opt, mode, x, y.to(dev)))
                if ctx.left() < 5:
                    raise BudgetSpent
            correct = []
            with torch.no_grad(), eval_mode(bench.model), autocast(dev, mode.amp):
                for x_eval, y_eval in evals:
                    pred = bench.model(x_eval.contiguous(memory_format=fmt)).argmax(1).cpu()
                    correct.append(int((pred == y_eval).sum()))
            return statistics.mean(losses[-5:]), correct

        done, out = attempt(run, ctx)
        if not done:
            sink.row(label, result=out)
            continue
        results[label] = out
        sink.row(label, f"{out[0]:.4f}", *(f"{100 * c / n_eval:.1f}" for c in out[1]))
    what = "IKL-AT bf16 + channels_last: clean accuracy as fp32's within noise"
    a, b, h = (results.get(k) for k in runs)
    if not (a and b and h):
        sink.target(what, "not measured", None, None)
        return
    acc_a, acc_b, acc_h = (100 * sum(r[1]) / n_all for r in (a, b, h))
    p = acc_a / 100
    se = 100 * math.sqrt(2 * p * (1 - p) / n_all)
    tol = max(2 * abs(acc_a - acc_b), 2 * se, 300 / n_all)
    diff = abs(acc_h - acc_a)
    sink.target(
        what,
        f"{acc_h:.1f} vs {acc_a:.1f} % (all levels): Δ {diff:.1f} pp, noise {tol:.1f} pp",
        diff / tol,
        diff <= tol,
    )


SECTION = Section(
    "adv",
    "3b. Training step: IKL adversarial training",
    share=100,
    run=section_adv,
    full=FULL,
    smoke=SMOKE,
    compile_s=40,
)
