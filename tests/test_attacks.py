"""Training and evaluation attacks: schedule, budgets, projection, mode, call counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dkl.attacks import (
    TrainAttack,
    attack_budget,
    attack_loss,
    epsilon_schedule,
    eval_mode,
    fgsm_attack,
    perturb,
    pgd_attack,
)


def tiny_model(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(12, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.ReLU(), nn.Linear(16, 5)]
    return nn.Sequential(*layers)


class Counting(nn.Module):
    """Counts forward calls, split by whether the input is the natural batch."""

    def __init__(self, inner: nn.Module, x_nat: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.x_nat = inner, x_nat
        self.calls = {"natural": 0, "other": 0, "natural_train": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape == self.x_nat.shape and torch.equal(x, self.x_nat):
            self.calls["natural_train" if self.training else "natural"] += 1
        else:
            self.calls["other"] += 1
        return self.inner(x)


def batch(b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 2, 2, generator=g), torch.randint(0, 5, (b,), generator=g)


# ---------------------------------------------------------------------------- schedule, budgets
@pytest.mark.parametrize("epoch", [1, 37, 100, 200])
def test_epsilon_ramp(epoch):
    assert epsilon_schedule(epoch, 200) == pytest.approx(8 / 255 * epoch / 200, rel=1e-12)
    assert epsilon_schedule(epoch, 200, fixed=True) == pytest.approx(8 / 255)
    assert epsilon_schedule(epoch, 200, max_eps=0.2) == pytest.approx(0.2 * epoch / 200)


def test_epsilon_bad_epoch():
    with pytest.raises(ValueError, match="epochs count from 1"):
        epsilon_schedule(0, 10)
    with pytest.raises(ValueError, match=r"epoch in \[1, 10\]"):
        epsilon_schedule(11, 10)


def test_budgets():
    assert attack_budget("low", 0.04) == (2, pytest.approx(0.04))
    assert attack_budget("high", 0.04) == (5, pytest.approx(0.02))
    with pytest.raises(ValueError, match="Expected budget in"):
        attack_budget("medium", 0.1)
    atk = TrainAttack(budget="high", max_eps=8 / 255)
    steps, size, eps = atk.schedule(50, 200)
    assert (steps, size, eps) == (5, pytest.approx(1 / 255), pytest.approx(2 / 255))
    steps, size, eps = TrainAttack(budget="low", fixed_eps=True, max_eps=0.1).schedule(1, 9)
    assert (steps, size, eps) == (2, pytest.approx(0.1), pytest.approx(0.1))


@pytest.mark.parametrize("budget,expected", [("low", 2), ("high", 5)])
def test_step_count_is_the_budget(budget, expected):
    x, y = batch()
    model = Counting(tiny_model(), x)
    TrainAttack(loss="sce", budget=budget)(model, x, epoch=3, epochs=10, labels=y)
    # one natural forward (eval, no grad) + one forward per step
    assert model.calls == {"natural": 1, "other": expected, "natural_train": 0}


def test_bad_attack_config():
    with pytest.raises(ValueError, match="Expected attack loss in"):
        TrainAttack(loss="mse")
    with pytest.raises(ValueError, match="Expected init in"):
        TrainAttack(init="zeros")


# ---------------------------------------------------------------------------- projection
@pytest.mark.parametrize("loss", ["ikl", "sce", "ce", "kl"])
@pytest.mark.parametrize("init", ["normal", "uniform"])
def test_projection_inside_ball_and_box(loss, init):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 2, 2)
    x[:4] = 0.0  # corners of the box: the ball pokes outside [0, 1] there
    x[4:8] = 1.0
    y = torch.randint(0, 5, (16,))
    eps = 0.3
    atk = TrainAttack(loss=loss, budget="low", max_eps=eps, fixed_eps=True, init=init)
    x_adv = atk(tiny_model(), x, epoch=1, epochs=1, labels=y)
    assert (x_adv - x).abs().max() <= eps + 1e-7
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() > 0.5 * eps  # it did move


def test_pgd_and_fgsm_stay_in_threat_model():
    x, y = batch(32)
    model = tiny_model()
    for x_adv in (pgd_attack(model, x, y, eps=0.1, steps=7), fgsm_attack(model, x, y, eps=0.1)):
        assert (x_adv - x).abs().max() <= 0.1 + 1e-7
        assert 0.0 <= x_adv.min() and x_adv.max() <= 1.0


def test_one_generator_per_row_makes_a_rows_start_its_own():
    """With one generator per row, a row's random start (and so its attack) is the same alone
    or in a batch: a hand-made start, x + eps (2u - 1) clipped, from that row's generator."""
    x, y = batch(6)
    model = tiny_model(bn=False).eval()
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(6)]
    whole = perturb(model, x, eps=0.1, steps=0, step_size=0.0, init="uniform",
                    loss_fn=lambda z: z.sum(), generator=gens())  # fmt: skip
    for i in range(6):
        u = torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(100 + i))
        start = (x[i] + 0.1 * (2 * u - 1)).clamp(0, 1)
        torch.testing.assert_close(whole[i], start)
        alone = pgd_attack(model, x[i : i + 1], y[i : i + 1], eps=0.1, steps=3,
                           generator=iter([torch.Generator().manual_seed(100 + i)]))  # fmt: skip
        full = pgd_attack(model, x, y, eps=0.1, steps=3, generator=gens())
        torch.testing.assert_close(alone[0], full[i])
    for init in ("none", "uniform"):
        with pytest.raises(ValueError, match=r"one generator per row \(6\), got 2"):
            perturb(model, x, eps=0.1, steps=1, step_size=0.01, init=init,
                    loss_fn=lambda z: z.sum(), generator=gens()[:2])  # fmt: skip


def test_inputs_outside_unit_box_are_rejected():
    x, y = batch()
    with pytest.raises(ValueError, match=r"Expected inputs in \[0, 1\]"):
        pgd_attack(tiny_model(), x * 2 - 0.5, y)


def test_signed_step_matches_hand_computation():
    # one step from the clean point, no start noise: x + a·sign(∇ CE), clipped to the box
    model = tiny_model(bn=False)
    x, y = batch()
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)[0]
    expected = torch.clamp(x + 0.05 * grad.sign(), 0, 1)
    got = perturb(
        model,
        x,
        eps=0.05,
        steps=1,
        step_size=0.05,
        init="none",
        loss_fn=lambda z: F.cross_entropy(z, y, reduction="sum"),
    )
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------- mode, grads, calls
@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_during_attack_and_restored(start_training):
    x, y = batch()
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()

        def forward(self, z):
            seen.append((self.training, self.net[2].training))
            return self.net(z)

    model = Spy().train(start_training)
    TrainAttack(loss="kl", budget="high")(model, x, epoch=1, epochs=2, labels=y)
    assert seen and all(not a and not b for a, b in seen)
    assert model.training is start_training and model.net[2].training is start_training
    running = model.net[2].running_mean.clone()
    assert torch.equal(running, model.net[2].running_mean)  # eval: BN stats untouched


def test_attack_leaves_parameter_grads_alone():
    x, y = batch()
    model = tiny_model()
    TrainAttack(loss="ce")(model, x, epoch=1, epochs=1, labels=y)
    assert all(p.grad is None for p in model.parameters())


def test_eval_mode_restores_mixed_modes():
    model = tiny_model().train()
    model[2].eval()  # a frozen BN inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[2].training


def test_natural_logits_passed_in_are_used_not_recomputed():
    x, y = batch()
    inner = tiny_model()
    with torch.no_grad():
        z_nat = inner.eval()(x)
    model = Counting(inner, x)
    TrainAttack(loss="ikl", budget="high")(model, x, epoch=2, epochs=2, z_nat=z_nat, labels=y)
    assert model.calls["natural"] == 0 and model.calls["other"] == 5


def test_attack_increases_its_loss():
    x, y = batch(64)
    model = tiny_model().eval()
    with torch.no_grad():
        z_nat = model(x)
    for kind in ("ikl", "sce", "kl", "ce"):
        x_adv = TrainAttack(loss=kind, budget="high", max_eps=0.2, fixed_eps=True)(
            model, x, epoch=1, epochs=1, labels=y, z_nat=z_nat
        )
        with torch.no_grad():
            before = attack_loss(kind, model(x), z_nat=z_nat, labels=y)
            after = attack_loss(kind, model(x_adv), z_nat=z_nat, labels=y)
        assert after > before, kind


def test_attack_loss_values_against_torch():
    torch.manual_seed(0)
    z_adv, z_nat, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    p = z_nat.softmax(1)
    sce = -(p * z_adv.log_softmax(1)).sum()
    kl = (p * (p.log() - z_adv.log_softmax(1))).sum()
    torch.testing.assert_close(attack_loss("sce", z_adv, z_nat=z_nat), sce)
    torch.testing.assert_close(attack_loss("kl", z_adv, z_nat=z_nat), kl)
    torch.testing.assert_close(
        attack_loss("ce", z_adv, labels=y), F.cross_entropy(z_adv, y, reduction="sum")
    )
    with pytest.raises(ValueError, match="needs the natural logits"):
        attack_loss("sce", z_adv)


def test_pgd_deterministic_with_generator():
    x, y = batch()
    model = tiny_model()
    a = pgd_attack(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(3))
    b = pgd_attack(model, x, y, eps=0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- as the released code
class Recording(nn.Module):
    """Records every input it sees (the attack's forwards)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_normal_start_is_not_projected_before_the_first_step():
    # TRADES / IKL-AT: the first gradient is taken at x + 0.001 N(0, 1) itself, outside [0, 1]
    # where x sits on the box; every later point is projected
    x = torch.ones(8, 3, 2, 2)
    x[4:] = 0.0
    g = torch.Generator().manual_seed(0)
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    model = Recording(tiny_model(bn=False))
    out = perturb(model, x, eps=0.1, steps=2, step_size=0.05, init="normal", generator=g,
                  loss_fn=lambda z: z.logsumexp(1).sum())  # fmt: skip
    torch.testing.assert_close(model.seen[0], start, rtol=0, atol=0)
    assert model.seen[0].max() > 1.0 and model.seen[0].min() < 0.0
    assert model.seen[1].min() >= 0.0 and model.seen[1].max() <= 1.0
    assert out.min() >= 0.0 and out.max() <= 1.0
    # uniform (Madry) starts inside the box; steps = 0 returns the projected start
    model.seen.clear()
    perturb(model, x, eps=0.1, steps=1, step_size=0.05, init="uniform",
            loss_fn=lambda z: z.sum())  # fmt: skip
    assert model.seen[0].min() >= 0.0 and model.seen[0].max() <= 1.0
    x0 = perturb(model, x, eps=0.1, steps=0, step_size=0.05, loss_fn=lambda z: z.sum())
    assert x0.min() >= 0.0 and x0.max() <= 1.0


def test_absolute_step_size_replaces_the_budget_fraction():
    # TRADES' own script: 10 steps of 0.007 at eps 0.031
    atk = TrainAttack(loss="kl", budget="pgd10", max_eps=0.031, fixed_eps=True, step_size=0.007)
    assert atk.schedule(3, 76) == (10, 0.007, 0.031)
    assert TrainAttack(budget="pgd10", max_eps=0.04, fixed_eps=True).schedule(1, 5) == (
        10,
        pytest.approx(0.01),
        0.04,
    )
    with pytest.raises(ValueError, match="step_size >= 0"):
        TrainAttack(step_size=-0.1)
