"""Adversarial-training losses, AWP and the EMA, against hand-written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dkl.awp import AWP
from dkl.config import AdversarialConfig, AttackConfig, config_from_dict
from dkl.data import DataInfo
from dkl.ema import ModelEMA
from dkl.recipes.adversarial import AdversarialTask, adversarial_loss, training_attack
from dkl.train import RunContext, StepContext


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)
    )


def batch(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 2, 2, generator=g), torch.randint(0, 5, (b,), generator=g)


def pairwise_wmse(z_t: torch.Tensor, z_s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The paper's pairwise row sum ¼ Σ_jk w_ij w_ik ((z_t,ij − z_t,ik) − (z_s,ij − z_s,ik))²."""
    dt = z_t[:, :, None] - z_t[:, None, :]
    ds = z_s[:, :, None] - z_s[:, None, :]
    return 0.25 * (w[:, :, None] * w[:, None, :] * (dt - ds) ** 2).sum((1, 2))


def make_task(
    method: str = "ikl_at", num_classes: int = 5, epochs: int = 4, model=None, **adversarial
) -> AdversarialTask:
    """The adversarial task of a ``num_classes``-class run on CPU (``adversarial`` overrides its
    section); ``model``, when given, is the one it trains and attacks."""
    cfg = config_from_dict(
        {
            "recipe": "adversarial",
            "train": {"epochs": epochs},
            "adversarial": {"method": method, **adversarial},
        }
    )
    info = DataInfo("toy", num_classes, (3, 2, 2), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    task = AdversarialTask(cfg, RunContext(cfg, torch.device("cpu"), 0, 1, info, None, None))
    task.raw_model = task.model = model
    return task


def random_prior(c: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(c, c, generator=g) + 0.05
    return p / p.sum(1, keepdim=True)


# ---------------------------------------------------------------------------- IKL-AT loss
def test_ikl_at_loss_equals_hand_written_reference():
    x, y = batch()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    alpha, beta = 4.0, 20.0
    task = make_task("ikl_at", 5, alpha=alpha, beta=beta)
    prior = random_prior(5)
    task.prior.prior.copy_(prior)

    m1, m2 = tiny_model(), tiny_model()
    out = task.loss(m1.train(), x, x_adv, y)
    out["loss"].backward()

    z_nat, z_adv = m2.train()(x), m2(x_adv)
    w = prior[y]
    ce = F.cross_entropy(z_nat, y)
    sce = -(z_nat.detach().softmax(1) * z_adv.log_softmax(1)).sum(1)
    ref = ce + (beta * pairwise_wmse(z_nat, z_adv, w) + alpha * sce).mean()
    ref.backward()

    torch.testing.assert_close(out["loss"].detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6)


def test_ikl_at_both_branches_get_wmse_gradient():
    torch.manual_seed(0)
    z_nat = torch.randn(4, 5, requires_grad=True)
    z_adv = torch.randn(4, 5, requires_grad=True)
    y = torch.randint(0, 5, (4,))
    w = random_prior(5)[y]
    out = adversarial_loss("ikl_at", z_nat, z_adv, y, alpha=0.0, beta=1.0, class_weights=w)
    (out["loss"] - F.cross_entropy(z_nat, y)).backward()  # wMSE alone
    assert z_nat.grad.abs().sum() > 0 and z_adv.grad.abs().sum() > 0
    torch.testing.assert_close(z_nat.grad, -z_adv.grad)  # wMSE depends on z_nat − z_adv only


def test_prior_fed_by_natural_logits_of_training_forward():
    x, y = batch(16)
    task = make_task("ikl_at", 5, prior_temperature=4.0)
    model = tiny_model().train()
    x_adv = x.clone()
    torch.manual_seed(3)
    task.loss(model, x, x_adv, y)
    torch.manual_seed(3)
    z_nat = tiny_model().train()(x)  # same weights, same BN batch statistics
    sums = torch.zeros(5, 5, dtype=torch.float64).index_add_(
        0, y, (z_nat.detach().double() / 4.0).softmax(1)
    )
    torch.testing.assert_close(task.prior.sums, sums)


def test_second_view_loss_and_prior_from_basic_view_only():
    torch.manual_seed(0)
    b = 6
    z_nat, z_adv = torch.randn(2 * b, 5), torch.randn(2 * b, 5)
    y = torch.randint(0, 5, (2 * b,))
    w = random_prior(5)[y]
    gamma = 0.3
    out = adversarial_loss(
        "ikl_at", z_nat, z_adv, y, alpha=4, beta=20, class_weights=w, n_basic=b, aug_weight=gamma
    )

    def robust(rows):
        sce = -(z_nat[rows].softmax(1) * z_adv[rows].log_softmax(1)).sum(1)
        return (20 * pairwise_wmse(z_nat[rows], z_adv[rows], w[rows]) + 4 * sce).mean()

    ref = F.cross_entropy(z_nat, y) + robust(slice(0, b)) + gamma * robust(slice(b, 2 * b))
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)

    task = make_task("ikl_at", 5)
    x, _ = batch(2 * b)
    task.loss(tiny_model().train(), x, x, y, n_basic=b)
    expected_counts = torch.bincount(y[:b], minlength=5).double()
    torch.testing.assert_close(task.prior.counts, expected_counts)


def test_gkl_at_loss_and_attack_equal_the_authors_formula():
    # DKLv2: CE + β·¼ Σ_i Σ_jk p_ij p_ik (Δ_nat − Δ_adv)² / Σ_i Σ_jk p_ij p_ik + α·mean sCE,
    # p = P[y] ** γ; attack on the same loss with α = β = γ = 1
    x, y = batch()
    x_adv = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    alpha, beta, gamma = 4.0, 20.0, 0.4
    task = make_task("gkl_at", 5, alpha=alpha, beta=beta, gamma=gamma)
    prior = random_prior(5)
    task.prior.prior.copy_(prior)

    def gkl(z_nat, z_adv, w, a, b):
        p = w**gamma
        pp = p[:, :, None] * p[:, None, :]
        dt = z_nat[:, :, None] - z_nat[:, None, :]
        ds = z_adv[:, :, None] - z_adv[:, None, :]
        wmse = 0.25 * (pp * (dt - ds) ** 2).sum() / pp.sum()
        sce = -(z_nat.detach().softmax(1) * z_adv.log_softmax(1)).sum(1).mean()
        return b * wmse + a * sce

    m1, m2 = tiny_model(), tiny_model()
    out = task.loss(m1.train(), x, x_adv, y)
    out["loss"].backward()
    z_nat, z_adv = m2.train()(x), m2(x_adv)
    ref = F.cross_entropy(z_nat, y) + gkl(z_nat, z_adv, prior[y], alpha, beta)
    ref.backward()
    torch.testing.assert_close(out["loss"].detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6)

    atk = training_attack(task.acfg)
    assert (atk.loss, atk.alpha, atk.beta, atk.gamma) == ("gkl", 1.0, 1.0, 1.0)
    from dkl.attacks import attack_loss

    z_nat = torch.randn(6, 5, dtype=torch.float64)
    z_adv = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = prior[torch.arange(6) % 5].double()
    got = attack_loss("gkl", z_adv, z_nat=z_nat, class_weights=w, gamma=gamma)
    torch.testing.assert_close(got, 6 * gkl(z_nat, z_adv, w, 1.0, 1.0))


def test_trades_and_pgd_at_losses():
    torch.manual_seed(0)
    z_nat, z_adv, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    p = z_nat.softmax(1)
    kl = (p * (p.log() - z_adv.log_softmax(1))).sum(1).mean()
    out = adversarial_loss("trades", z_nat, z_adv, y, trades_beta=6.0)
    torch.testing.assert_close(out["loss"], F.cross_entropy(z_nat, y) + 6.0 * kl)
    out = adversarial_loss("pgd_at", None, z_adv, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(z_adv, y))
    out = adversarial_loss("standard", z_nat, None, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(z_nat, y))
    with pytest.raises(ValueError, match="Expected method in"):
        adversarial_loss("mart", z_nat, z_adv, y)
    with pytest.raises(ValueError, match="pgd_at attacks CE"):
        training_attack(AdversarialConfig(method="pgd_at", attack=AttackConfig(loss="kl")))
    with pytest.raises(ValueError, match="pgd_at attacks CE"):
        make_task("pgd_at", attack={"loss": "kl"})


@pytest.mark.parametrize(
    "method,forwards",
    [
        ("ikl_at", (1, 5 + 1, 1)),
        ("trades", (1, 5 + 1, 1)),
        ("pgd_at", (0, 5 + 1, 0)),
        ("standard", (0, 0, 1)),
    ],
)
def test_natural_forward_once_per_batch(method, forwards):
    x, y = batch()
    calls = {"nat_eval": 0, "other": 0, "nat_train": 0}

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def forward(self, z):
            if torch.equal(z, x):
                calls["nat_train" if self.training else "nat_eval"] += 1
            else:
                calls["other"] += 1
            return self.net(z)

    model = Counting().train()
    attack = {"loss": {"pgd_at": "ce", "trades": "kl"}.get(method, "ikl"), "budget": "high"}
    task = make_task(method, 5, epochs=4, model=model, attack=attack)
    x_adv = task.adversarial_examples(x, y, epoch=1)
    task.loss(model, x, x_adv, y)
    assert (calls["nat_eval"], calls["other"], calls["nat_train"]) == forwards


# ---------------------------------------------------------------------------- AWP
def test_awp_perturbs_weight_matrices_by_gamma_norm_and_restores_exactly():
    x, y = batch()
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awp = AWP(model, gamma=0.005, lr=0.1)
    task = make_task("ikl_at", 5)
    awp.perturb(model, lambda m: task.loss(m, x, x, y, update_prior=False)["loss"])
    assert awp.active
    for name, p in model.named_parameters():
        delta = p.detach() - before[name]
        if p.dim() > 1:  # ‖γ·d‖ = γ‖w‖ per layer
            torch.testing.assert_close(delta.norm(), 0.005 * before[name].norm(), rtol=1e-3, atol=0)
        else:  # biases and BN affine untouched
            assert torch.equal(delta, torch.zeros_like(delta))
    awp.restore(model)
    assert not awp.active
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # bit-exact
    with pytest.raises(RuntimeError, match="already perturbed"):
        awp.apply(model, {"1.weight": torch.zeros(16, 12)})
        awp.apply(model, {"1.weight": torch.zeros(16, 12)})


def test_awp_step_uses_perturbed_gradient_on_original_weights():
    # the trainer's order: forward/backward at w + γd, task.before_optimizer_step(), step
    x, y = batch()
    model = tiny_model().train()
    task = make_task("ikl_at", 5, model=model)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    awp = task.awp = AWP(model, gamma=0.01, lr=0.1)
    diff = awp.compute(model, lambda m: F.cross_entropy(m(x), y))
    awp.apply(model, diff)
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    task.before_optimizer_step()
    opt.step()
    # reference: gradient at the perturbed point (computed independently) applied to w0
    ref = tiny_model().train()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.copy_(perturbed[n])
    F.cross_entropy(ref(x), y).backward()
    for n, p in model.named_parameters():
        gref = dict(ref.named_parameters())[n].grad
        torch.testing.assert_close(grads[n], gref)
        torch.testing.assert_close(p.detach(), w0[n] - 0.1 * gref)
    assert not awp.active
    # the restore is one-shot: a later step does not touch the weights again
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    task.before_optimizer_step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w1[n]), n
    opt.step()


def test_awp_with_a_second_view_ascends_the_authors_one_batch_loss():
    # the authors' AWP loss over the 2B rows of (basic, view): CE(2B) + ½(R_basic + R_view)
    b, alpha, beta, gamma, lr = 4, 4.0, 20.0, 0.005, 0.1
    x, y = batch(b, seed=3)
    x_view = x.flip(-1)
    x_all = torch.cat([x, x_view])
    x_adv = (x_all + 0.03 * torch.randn_like(x_all)).clamp(0, 1)
    model = tiny_model().train()
    task = make_task(
        "ikl_at", 5, model=model, alpha=alpha, beta=beta, aug_weight=0.3,
        awp={"gamma": gamma, "start_epoch": 1, "lr": lr},
    )  # fmt: skip
    prior = random_prior(5)
    task.prior.prior.copy_(prior)
    task.adversarial_examples = lambda x, labels, epoch: x_adv
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    task.train_step(((x, x_view), y), StepContext(1, 0, 0, 1, 1))

    # reference: a proxy copy takes one SGD step on −loss, loss written out by hand
    proxy = tiny_model().train()
    y2 = torch.cat([y, y])
    z_nat, z_adv = proxy(x_all), proxy(x_adv)
    w = prior[y2]
    sce = -(z_nat.detach().softmax(1) * z_adv.log_softmax(1)).sum(1)
    robust = (beta * pairwise_wmse(z_nat, z_adv, w) + alpha * sce).sum() / (2 * b)
    loss = F.cross_entropy(z_nat, y2) + robust
    (-loss).backward()
    for n, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.equal(p.detach(), w0[n]), n
            continue
        d = -lr * dict(proxy.named_parameters())[n].grad
        want = w0[n] + gamma * w0[n].norm() / d.norm() * d
        torch.testing.assert_close(p.detach(), want, rtol=1e-4, atol=1e-7)
    task.before_optimizer_step()  # the weights come back bit for bit
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), w0[n]), n


# ---------------------------------------------------------------------------- EMA
def test_ema_arithmetic_by_hand():
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[1].running_mean.fill_(1.0)
    ema = ModelEMA(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.fill_(4.0)
        net[1].running_mean.fill_(3.0)
        net[1].num_batches_tracked.fill_(7)
    ema.update(net)
    assert ema.module[0].weight.item() == pytest.approx(0.9 * 2 + 0.1 * 4)  # 2.2
    assert ema.module[1].running_mean.item() == pytest.approx(0.9 * 1 + 0.1 * 3)  # 1.2
    assert ema.module[1].num_batches_tracked.item() == 7  # integers are copied
    with torch.no_grad():
        net[0].weight.fill_(0.0)
    ema.update(net)
    assert ema.module[0].weight.item() == pytest.approx(0.9 * 2.2)  # 1.98
    assert ema.num_updates == 2
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_ema_copy_buffers_reset_copy_to_apply_and_state():
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    ema = ModelEMA(net, decay=0.5, buffers="copy")
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].running_mean.fill_(5.0)
    w_before = ema.module[0].weight.item()
    ema.update(net)
    assert ema.module[0].weight.item() == pytest.approx(0.5 * w_before + 0.5)
    assert ema.module[1].running_mean.item() == 5.0  # copied, not averaged
    ema.reset(net)
    assert ema.module[0].weight.item() == 1.0
    with torch.no_grad():
        net[0].weight.fill_(9.0)
    with ema.apply(net):
        assert net[0].weight.item() == 1.0
    assert net[0].weight.item() == 9.0
    state = ema.state_dict()
    other = ModelEMA(nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1)), decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.5 and other.num_updates == ema.num_updates
    assert other.module[0].weight.item() == 1.0
    other.copy_to(net)
    assert net[0].weight.item() == 1.0
    with pytest.raises(ValueError, match=r"decay in \[0, 1\)"):
        ModelEMA(net, decay=1.0)


# ---------------------------------------------------------------------------- the recipe
def _cfg(preset: str, tmp_path, *extra: str):
    from dkl.config import load_config

    return load_config(
        preset,
        [
            f"train.out_dir={tmp_path}",
            "train.overwrite=true",
            "train.progress=false",
            "train.plot=false",
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
            "adversarial.eval.pgd_examples=20",
            *extra,
        ],
    )


def test_all_adversarial_presets_load():
    from dkl.config import list_presets, load_config

    names = list_presets("adversarial")
    assert {
        "adversarial/cifar10_ikl_at",
        "adversarial/cifar10_ikl_at_alpha4",
        "adversarial/cifar100_ikl_at",
        "adversarial/cifar100_ikl_at_alpha4",
        "adversarial/cifar100_ikl_at_alpha4_t2",
        "adversarial/cifar100_ikl_at_autoaug",
        "adversarial/cifar10_trades",
        "adversarial/cifar100_trades_ikl_schedule",
        "adversarial/cifar10_trades_awp",
        "adversarial/cifar10_pgd_at",
        "adversarial/digits_standard",
        "adversarial/digits_ikl_at",
    } <= set(names)
    for n in names:
        load_config(n)


# the settings behind each published number, as the authors' released logs and scripts name them
RELEASED = {
    # preset: (alpha, beta, prior T, attack loss, source named in the first comment line)
    "cifar10_ikl_at": (3.0, 20.0, 4.0, "sce", "cifar10_dkl_a3_b20_T4.log"),
    "cifar10_ikl_at_alpha4": (4.0, 20.0, 4.0, "sce", "no released log"),
    "cifar100_ikl_at": (3.0, 20.0, 4.0, "ikl", "cifar100_dkl_a3_b20_T4.log"),
    "cifar100_ikl_at_alpha4": (4.0, 20.0, 4.0, "ikl", "no released log"),
    "cifar100_ikl_at_alpha4_t2": (4.0, 20.0, 2.0, "ikl", "cifar100_dkl_a4_b20_T2.log"),
    "cifar100_ikl_at_alpha5": (5.0, 20.0, 4.0, "ikl", "no log names it"),
    "cifar100_ikl_at_autoaug": (4.0, 20.0, 4.0, "ikl", "README 65.93 / 32.52"),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_ikl_at_presets_match_the_released_runs(name):
    from dkl.config import PRESET_DIR, load_config

    alpha, beta, t, attack, source = RELEASED[name]
    a = load_config(f"adversarial/{name}").adversarial
    assert (a.method, a.alpha, a.beta, a.prior_temperature, a.attack.loss) == (
        "ikl_at",
        alpha,
        beta,
        t,
        attack,
    )
    assert a.attack.eps == pytest.approx(8 / 255) and a.attack.budget == "high"
    assert (a.awp.gamma, a.awp.start_epoch, a.ema.tau, a.ema.start_epoch) == (0.005, 10, 0.9, 1)
    if attack == "ikl":
        assert (a.attack.alpha, a.attack.beta) == (1.0, 1.0)
    first = (PRESET_DIR / "adversarial" / f"{name}.yaml").read_text().splitlines()[0]
    assert source in first, first
    if name.endswith("autoaug"):
        assert (a.aug_view, a.aug_weight) == ("autoaugment", 0.3)


def test_gkl_at_presets_are_the_dkl_v2_scripts():
    from dkl.config import load_config

    for name, gamma, t in (("cifar100_gkl_at", 1.0, 4.0), ("cifar100_gkl_at_gamma04", 0.4, 1.0)):
        a = load_config(f"adversarial/{name}").adversarial
        assert (a.method, a.alpha, a.beta, a.gamma, a.prior_temperature) == (
            "gkl_at",
            4.0,
            20.0,
            gamma,
            t,
        )
        atk = training_attack(a)
        assert (atk.loss, atk.alpha, atk.beta, atk.gamma) == ("gkl", 1.0, 1.0, 1.0)


def test_trades_presets_follow_their_own_scripts():
    import math

    from dkl.config import load_config
    from dkl.train import lr_factor

    def lr(cfg, epoch):  # lr of epoch e (counted from 1) as the trainer sets it
        return cfg.optim.lr * lr_factor(cfg.sched, epoch - 1, float(cfg.train.epochs))

    # Zhang et al. 2019: 76 epochs, 0.1 then 0.01 from epoch 75, eps 0.031, 10 steps of 0.007
    z = load_config("adversarial/cifar10_trades")
    a = z.adversarial
    assert (a.method, a.trades_beta, a.attack.loss, a.attack.eps) == ("trades", 6.0, "kl", 0.031)
    attack = training_attack(a)
    assert attack.schedule(1, 76) == (10, 0.007, 0.031)
    assert (z.train.epochs, z.optim.weight_decay, a.awp.gamma, a.ema.tau) == (76, 2e-4, 0.0, 0.0)
    assert [lr(z, e) for e in (1, 74, 75, 76)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    # Wu et al. 2020 TRADES-AWP: 200 epochs, x0.1 from 100, x0.01 from 150, AWP from 10
    w = load_config("adversarial/cifar100_trades_awp")
    a = w.adversarial
    assert training_attack(a).schedule(1, 200) == pytest.approx((10, 2 / 255, 8 / 255))
    assert (w.train.epochs, w.optim.weight_decay, a.awp.gamma, a.awp.start_epoch) == (
        200,
        5e-4,
        0.005,
        10,
    )
    assert [lr(w, e) for e in (99, 100, 149, 150)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    # the IKL-AT authors' TRADES: lr 0.2 * 0.5 (1 + cos(pi (e - 1) / 200)), beta 9 on CIFAR-100
    c = load_config("adversarial/cifar100_trades_ikl_schedule")
    a = c.adversarial
    assert (a.trades_beta, a.attack.budget, a.attack.fixed_eps, a.awp.gamma, a.ema.tau) == (
        9.0,
        "high",
        False,
        0.005,
        0.9,
    )
    assert c.data.drop_last
    for e in (1, 2, 100, 200):
        want = 0.2 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 200))
        assert lr(c, e) == pytest.approx(want, rel=1e-12)


def test_recipe_trains_with_awp_and_exports_the_ema(tmp_path):
    from dkl.api import make_trainer
    from dkl.models import unwrap_normalization
    from dkl.train import load_checkpoint

    cfg = _cfg(
        "adversarial/digits_ikl_at",
        tmp_path,
        "adversarial.awp.gamma=0.005",
        "adversarial.awp.start_epoch=2",
    )
    trainer = make_trainer(cfg, log=lambda m: None)
    summary = trainer.fit()
    task = trainer.task
    assert task.ema is not None and task.ema.num_updates == 2
    assert task.eval_model() is task.ema.module
    assert summary["adversarial"]["evaluated_model"] == "ema"
    assert task.awp is not None and not task.awp.active  # restored before the step
    assert not torch.equal(task.prior.prior, torch.full((10, 10), 0.1))  # prior stepped
    final = load_checkpoint(tmp_path / cfg.name / "final.pt")

    ema_sd = unwrap_normalization(task.ema.module).state_dict()
    assert final["model"].keys() == ema_sd.keys()
    for k in ema_sd:
        assert torch.equal(final["model"][k], ema_sd[k]), k
    last = load_checkpoint(tmp_path / cfg.name / "last.pt")
    assert "ema" in last["recipe"] and "prior" in last["recipe"]
    assert "pgd10" in trainer.history[-1] and "eps" in trainer.history[-1]


def test_recipe_second_view_needs_image_dataset(tmp_path):
    from dkl.api import make_trainer

    cfg = _cfg("adversarial/digits_ikl_at", tmp_path, "adversarial.aug_view=cutout")
    with pytest.raises(ValueError, match="aug_view"):
        make_trainer(cfg, log=lambda m: None)


def test_recipe_second_view_batches(tmp_path):
    # a two-view batch goes through the recipe's step: CE on 2B rows, prior from the basic view
    from dkl.api import make_trainer
    from dkl.train import StepContext

    cfg = _cfg("adversarial/digits_ikl_at", tmp_path)
    trainer = make_trainer(cfg, log=lambda m: None)
    x = torch.rand(6, 1, 8, 8)
    y = torch.arange(6) % 10
    out = trainer.task.train_step(((x, x.flip(-1)), y), StepContext(1, 0, 0, 1, 2))
    assert out["logits"].shape == (6, 10) and out["labels"].shape == (6,)
    assert int(trainer.task.prior.counts.sum()) == 6


def test_robust_command_on_a_run(tmp_path, capsys):
    pytest.importorskip("torchattacks")
    from dkl.api import make_trainer
    from dkl.cli import main

    cfg = _cfg("adversarial/digits_standard", tmp_path)
    make_trainer(cfg, log=lambda m: None).fit()
    rc = main(["robust", str(tmp_path / cfg.name), "--n-examples", "8", "--version", "fast"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "non-standard" in out and "8 of 450" in out
    import json

    res = json.loads((tmp_path / cfg.name / "robust.json").read_text())
    assert res["n_examples"] == 8 and res["standard"] is False
    assert (
        json.loads((tmp_path / cfg.name / "summary.json").read_text())["robust"]["version"]
        == "fast"
    )


def test_cifar_presets_use_the_authors_cosine():
    """The IKL-AT authors' lr: 0.2 · ½(1 + cos(π e / (E + 1))) at epoch e = 1..E, E = 200."""
    import math

    from dkl.config import load_config
    from dkl.train import build_optimizer, build_scheduler, lr_factor

    for preset in ("adversarial/cifar10_ikl_at", "adversarial/cifar100_ikl_at"):
        cfg = load_config(preset)
        assert cfg.optim.lr == 0.2 and cfg.train.epochs == 200
        for e in (1, 2, 50, 150, 200):
            want = 0.5 * (1 + math.cos(math.pi * e / 201))
            assert math.isclose(lr_factor(cfg.sched, e - 1, 200.0), want, rel_tol=1e-12)
        # the trainer's schedule (stepped after every optimiser step): every step of epoch e
        opt = build_optimizer(cfg.optim, [nn.Parameter(torch.zeros(1))])
        sched = build_scheduler(opt, cfg.sched, steps_per_epoch=3, epochs=200)
        for e in range(1, 201):
            want = 0.2 * 0.5 * (1 + math.cos(math.pi * e / 201))
            for _ in range(3):
                assert math.isclose(opt.param_groups[0]["lr"], want, rel_tol=1e-12), e
                opt.step()
                sched.step()
