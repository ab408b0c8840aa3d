"""3c. Training step, semi-supervised ViT: FixMatch and FixMatch-IKL on ViT-S/2, 8 labeled + 8
unlabeled images, in float32 and bfloat16 autocast, eager and ``torch.compile``d: time per step,
peak memory, and the first step's loss against float32."""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F

from ..core import Ctx, Section, attempt, failed
from ..measure import autocast, timed
from ..report import Sink
from ..steps import MODES, NUM_CLASSES, loss_check, repeat_steps, runnable_modes

FULL = {"model": "vit_small_patch2_32", "kwargs": {}, "batch": 8, "warmup": 3, "reps": 10}
SMOKE = {
    "model": "vit_tiny_patch2_32",
    "kwargs": {"depth": 1, "img_size": 8},
    "batch": 2,
    "warmup": 0,
    "reps": 0,
}


def section_ssl(sink: Sink, ctx: Ctx) -> None:
    from dkl.models import create_model
    from dkl.recipes.semisup import fixmatch_loss, ikl_consistency, param_groups

    cfg, dev = ctx.size, ctx.device
    n = cfg["batch"]
    side = cfg["kwargs"].get("img_size", 32)
    sink.text(
        f"{cfg['model']} (drop-path off, so that the variants' losses compare), {n} labeled + "
        f"{n} unlabeled images ({side}×{side}); labeled, weak and strong views in one forward of "
        f"{3 * n} (USB's use_cat); CE + λ_u · unsupervised term (λ_u = 1, confidence threshold 0 "
        "so that the term is in the loss); AdamW with layer decay 0.5. FixMatch-IKL: α = 1, "
        f"β = 0.1, T = T2 = 1 (the preset). Median of {cfg['reps']} steps after {cfg['warmup']}; "
        "peak memory over those steps."
    )
    torch.manual_seed(0)
    model = create_model(cfg["model"], NUM_CLASSES, drop_path_rate=0.0, **cfg["kwargs"])
    model = model.to(dev).train()
    init = copy.deepcopy(model.state_dict())
    x = torch.rand(3 * n, 3, side, side, device=dev)
    y = torch.randint(0, NUM_CLASSES, (n,), device=dev)
    unsup = {
        "fixmatch": lambda zi, zt: fixmatch_loss(zi, zt, threshold=0.0)[0],
        "fixmatch_ikl": lambda zi, zt: ikl_consistency(zi, zt, threshold=0.0, beta=0.1)[0],
    }
    sink.table(
        "mode", "method", "step (ms)", "vs fixmatch", "peak (GiB)", "first-step loss", "check"
    )
    ref: dict[str, float] = {}
    for mode in runnable_modes(sink, ctx):
        net = torch.compile(model, backend=ctx.backend) if mode.compiled else model

        def run(net=net, mode=mode):
            out = {}
            for method, u in unsup.items():
                model.load_state_dict(init)
                groups = param_groups(model, lr=5e-4, weight_decay=5e-4, layer_decay=0.5)
                for g in groups:
                    g.pop("param_names")
                opt = torch.optim.AdamW(groups, lr=5e-4, weight_decay=5e-4)

                def step(u=u, opt=opt):
                    with autocast(dev, mode.amp):
                        logits = net(x)
                        target, inp = logits[n:].chunk(2)
                        loss = F.cross_entropy(logits[:n], y) + u(inp, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    return loss.detach().float().item()

                ms0, first = timed(step, dev)
                times, peak = repeat_steps(step, cfg, ctx)
                out[method] = (first, statistics.median(times or [ms0]), peak)
            return out

        done, out = attempt(run, ctx)
        if not done:
            sink.row(mode, "all", result=out)
            failed(sink, out)
            continue
        for method, (first, med, peak) in out.items():
            vs = "–" if method == "fixmatch" else f"{(med / out['fixmatch'][1] - 1) * 100:+.1f} %"
            verdict = loss_check(sink, mode, first, ref.get(method), mode == MODES[0])
            sink.row(mode, method, f"{med:.2f}", vs, peak, f"{first:.5f}", verdict)
        if mode == MODES[0]:
            ref = {m: v[0] for m, v in out.items()}


SECTION = Section(
    "ssl",
    "3c. Training step: semi-supervised ViT",
    share=70,
    run=section_ssl,
    full=FULL,
    smoke=SMOKE,
    compile_s=25,
)
