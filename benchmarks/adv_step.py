"""Time of one IKL-AT training step (high budget): dkl vs the authors' way of doing the same step.

dkl: the natural logits are computed once per batch (eval mode, no grad) and reused by every
attack step; wMSE in the O(B·C) closed form (``dkl.ikl_loss``).
Authors' way (re-implemented here after their training script, for timing only): the
natural logits are recomputed inside every attack step, and the wMSE is the pairwise B×C×C sum,
normalised by ``Σ w_j w_k`` (= B for prior rows that sum to 1, so both are batch means).

Both steps start from the same weights, the same batch and the same random start; the script first
checks that they produce the same adversarial examples, loss and gradients, then times them
interleaved (median of ``--reps``). CIFAR-100 setting: C = 100, attack loss IKL with α = β = 1,
training loss CE + IKL(α = 4, β = 20) with GI class weights, 5 steps of ε/2 at ε = 8/255.

    python benchmarks/adv_step.py                         # WRN-16-4, batch 128, current device
    python benchmarks/adv_step.py --widen 1 --reps 3      # smaller net for a CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dkl.attacks import TrainAttack, eval_mode
from dkl.models import with_normalization
from dkl.models.wrn import WideResNet
from dkl.recipes.adversarial import AdversarialLoss

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def pairwise_ikl(z_s, z_t, w, alpha, beta):
    """wMSE as the B×C×C pairwise sum (both sides keep their gradient) + sCE, batch means."""
    dt = z_t[:, :, None] - z_t[:, None, :]
    ds = z_s[:, :, None] - z_s[:, None, :]
    ww = w[:, :, None] * w[:, None, :]
    mse = 0.25 * (ww * (dt - ds) ** 2).sum() / ww.sum()
    sce = -(F.softmax(z_t, dim=1).detach() * F.log_softmax(z_s, dim=1)).sum(1).mean()
    return beta * mse + alpha * sce


def authors_attack(model, x, w, eps, steps, step_size):
    model.eval()
    x_adv = (x + 0.001 * torch.randn(x.shape, device=x.device)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = pairwise_ikl(model(x_adv), model(x), w, 1.0, 1.0)  # natural logits again
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv.detach()


def authors_loss(model, x, x_adv, y, w, alpha, beta):
    z_adv, z_nat = model(x_adv), model(x)
    return F.cross_entropy(z_nat, y) + pairwise_ikl(z_adv, z_nat, w, alpha, beta)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--widen", type=int, default=4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    c, b = args.classes, args.batch
    model = with_normalization(WideResNet(args.depth, args.widen, c), CIFAR100_MEAN, CIFAR100_STD)
    model = model.to(device).train()
    x = torch.rand(b, 3, 32, 32, device=device)
    y = torch.randint(0, c, (b,), device=device)
    prior = torch.rand(c, c, device=device) + 0.1
    prior = prior / prior.sum(1, keepdim=True)
    w = prior[y]
    alpha, beta, epochs = 4.0, 20.0, 200
    epoch = epochs  # full ε = 8/255: 5 steps of 4/255
    attack = TrainAttack(loss="ikl", budget="high", max_eps=8 / 255, alpha=1.0, beta=1.0)
    criterion = AdversarialLoss("ikl_at", alpha=alpha, beta=beta)
    steps, step_size, eps = attack.schedule(epoch, epochs)
    params = list(model.parameters())

    def dkl_step(update: bool = True):
        with torch.no_grad(), eval_mode(model):  # natural logits once per batch, as dkl trains
            z_nat = model(x)
        x_adv = attack(model, x, epoch=epoch, epochs=epochs, labels=y, z_nat=z_nat, class_weights=w)
        loss = criterion(model(x), model(x_adv), y, class_weights=w)["loss"]
        grads = torch.autograd.grad(loss, params)
        return x_adv, loss.detach(), grads

    def ref_step(update: bool = True):
        x_adv = authors_attack(model, x, w, eps, steps, step_size)
        loss = authors_loss(model, x, x_adv, y, w, alpha, beta)
        grads = torch.autograd.grad(loss, params)
        return x_adv, loss.detach(), grads

    # ---- equal results: same weights, batch and random start
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    xa, la, ga = dkl_step()
    model.load_state_dict(state)
    torch.manual_seed(1)
    xr, lr_, gr = ref_step()
    model.load_state_dict(state)
    same_px = (xa == xr).float().mean().item()
    max_px = (xa - xr).abs().max().item()
    rel_loss = abs(la.item() - lr_.item()) / abs(lr_.item())
    rel_grad = max(((g1 - g2).norm() / g2.norm()).item() for g1, g2 in zip(ga, gr))
    print(
        f"device={device} WRN-{args.depth}-{args.widen} B={b} C={c} steps={steps} "
        f"step={step_size * 255:.2f}/255 eps={eps * 255:.2f}/255 threads={torch.get_num_threads()}"
    )
    print(
        f"equal results: identical adversarial pixels {100 * same_px:.4f}% (max diff {max_px:.2e}); "
        f"loss {la.item():.6f} vs {lr_.item():.6f} (rel {rel_loss:.1e}); "
        f"max relative grad diff {rel_grad:.1e}"
    )

    # ---- timing, interleaved
    times = {"dkl": [], "authors": []}
    for i in range(args.warmup + args.reps):
        for name, fn in (("dkl", dkl_step), ("authors", ref_step)):
            model.load_state_dict(state)
            torch.manual_seed(2 + i)
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"step time (median of {args.reps}): dkl {1e3 * med['dkl']:.1f} ms, "
        f"authors' way {1e3 * med['authors']:.1f} ms -> {med['authors'] / med['dkl']:.2f}x faster"
    )


if __name__ == "__main__":
    main()
