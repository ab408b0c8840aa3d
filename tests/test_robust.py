"""Robustness evaluation: AutoAttack settings, the masking sanity check, the evaluation driver."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from run_helpers import plain_weights, tiny_run
from torch import nn

from dkl.robust import (
    GradientMaskingError,
    autoattack_specs,
    build_autoattack,
    check_gradient_masking,
    evaluate_robustness,
    format_table,
)

torchattacks = pytest.importorskip("torchattacks")


def linear_model(c: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, c)).eval()


def data(n: int = 16, c: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 2, 2, generator=g), torch.randint(0, c, (n,), generator=g)


@pytest.fixture
def no_official(monkeypatch):
    monkeypatch.setitem(sys.modules, "autoattack", None)  # import fails -> torchattacks backend


# ---------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("num_classes", [10, 100])
def test_torchattacks_components_have_the_standard_settings(no_official, num_classes):
    eps = 8 / 255
    backend, attacks = build_autoattack(
        linear_model(num_classes),
        version="standard",
        eps=eps,
        num_classes=num_classes,
        seed=0,
        backend="auto",
    )
    assert backend == "torchattacks"
    objs = {spec.name: obj for spec, _, obj in attacks}
    assert list(objs) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    apgd, apgdt, fab, square = objs["apgd-ce"], objs["apgd-t"], objs["fab-t"], objs["square"]
    assert isinstance(apgd, torchattacks.APGD) and isinstance(apgdt, torchattacks.APGDT)
    assert isinstance(fab, torchattacks.FAB) and isinstance(square, torchattacks.Square)
    for a in (apgd, apgdt, fab, square):
        assert a.norm == "Linf" and a.eps == eps and a.n_restarts == 1
    assert apgd.steps == 100 and apgd.loss == "ce" and apgd.eot_iter == 1 and apgd.thr_decr == 0.75
    # torchattacks' own AutoAttack would use 10 steps and C - 1 targets: not the standard
    assert apgdt.steps == 100 and apgdt.n_target_classes == 9
    assert fab.steps == 100 and fab.multi_targeted and fab.n_target_classes == 9
    assert (fab.alpha_max, fab.eta, fab.beta) == (0.1, 1.05, 0.9)
    assert square.n_queries == 5000 and square.p_init == 0.8 and square.loss == "margin"


def test_fast_version_has_two_attacks_and_fewer_targets_for_few_classes(no_official):
    _, attacks = build_autoattack(linear_model(5), version="fast", num_classes=5)
    assert [s.name for s, _, _ in attacks] == ["apgd-ce", "apgd-t"]
    assert attacks[1][2].n_target_classes == 4  # min(9, C - 1)
    with pytest.raises(ValueError, match=">= 4 classes"):
        build_autoattack(linear_model(3), num_classes=3)
    with pytest.raises(ValueError, match="Expected version in"):
        autoattack_specs("rand", eps=0.1, num_classes=10, seed=0)


def test_official_backend_is_configured_explicitly(monkeypatch):
    made = {}

    class Part:
        def perturb(self, x, y):
            return x

    class FakeAutoAttack:
        def __init__(self, model, norm, eps, version, seed, verbose):
            made.update(norm=norm, eps=eps, version=version, seed=seed)
            self.apgd, self.apgd_targeted, self.fab, self.square = Part(), Part(), Part(), Part()
            made["obj"] = self

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    backend, attacks = build_autoattack(linear_model(), eps=0.1, seed=3)
    aa = made["obj"]
    assert backend == "autoattack (official)"
    assert (made["norm"], made["eps"], made["version"], made["seed"]) == (
        "Linf",
        0.1,
        "standard",
        3,
    )
    assert (aa.apgd.n_iter, aa.apgd.n_restarts, aa.apgd.loss) == (100, 1, "ce")
    assert (aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes) == (100, 9)
    assert (aa.fab.n_iter, aa.fab.n_target_classes, aa.fab.targeted) == (100, 9, True)
    assert aa.square.n_queries == 5000
    assert [s.name for s, _, _ in attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_official_backend_demanded_but_missing(no_official):
    with pytest.raises(ImportError, match="autoattack"):
        build_autoattack(linear_model(), backend="official")


# ---------------------------------------------------------------------------- sanity check
def test_sanity_check_triggers_on_softmax_outputs():
    model = nn.Sequential(linear_model(), nn.Softmax(dim=1))
    x, y = data()
    with pytest.raises(GradientMaskingError, match="probabilities"):
        check_gradient_masking(model, x, y)
    with pytest.raises(GradientMaskingError, match="probabilities"):
        evaluate_robustness(model, x, y, eps=0.05, version="fast", progress=False, log=None)


def test_sanity_check_triggers_on_zero_gradients():
    class Quantised(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = linear_model()

        def forward(self, x):  # rounding: the gradient is zero everywhere
            return self.net(torch.round(x * 4) / 4)

    x, y = data()
    with pytest.raises(GradientMaskingError, match="zero"):
        check_gradient_masking(Quantised(), x, y)


def test_sanity_check_triggers_when_pgd_is_weaker_than_fgsm():
    x, y = data(100)
    pgd_ok = torch.ones(100, dtype=torch.bool)
    fgsm_ok = torch.zeros(100, dtype=torch.bool)
    with pytest.raises(GradientMaskingError, match="weaker than FGSM"):
        check_gradient_masking(linear_model(), x, y, pgd_correct=pgd_ok, fgsm_correct=fgsm_ok)
    info = check_gradient_masking(linear_model(), x, y, pgd_correct=fgsm_ok, fgsm_correct=pgd_ok)
    assert info["pgd_correct"] == 0


# ---------------------------------------------------------------------------- driver
def trained_linear(c: int = 4):
    # a separable problem so that clean accuracy is high and ε matters
    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % c
    x = (0.5 + 0.3 * (torch.nn.functional.one_hot(y, 12).float()[:, :12])).view(24, 3, 2, 2)
    x = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, c))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_evaluate_fast_is_labelled_non_standard_and_monotone(no_official):
    model, x, y = trained_linear()
    logs = []
    r = evaluate_robustness(
        model, x, y, eps=0.1, n_examples=10, version="fast", progress=False, log=logs.append, seed=0
    )
    assert r["n_examples"] == 10 and r["n_total"] == 24
    assert r["standard"] is False and "NON-STANDARD" in r["label"]
    assert any("NON-STANDARD" in line for line in logs)
    assert "non-standard" in format_table({"m": r})
    assert r["clean"] >= r["pgd20"] >= 0
    accs = [r["clean"], *r["per_attack"].values()]
    assert accs == sorted(accs, reverse=True) and r["autoattack"] == accs[-1]
    r2 = evaluate_robustness(
        model, x, y, eps=0.1, n_examples=10, version="fast", progress=False, log=None, seed=0
    )
    assert {k: r2[k] for k in ("clean", "pgd20", "autoattack")} == {
        k: r[k] for k in ("clean", "pgd20", "autoattack")
    }


def test_each_attack_runs_only_on_still_correct_points_worst_case_kept(monkeypatch):
    # spy attacks: each one breaks the first point it is given (pushes it to the wrong class)
    from dkl import robust
    from dkl.robust import AttackSpec

    model, x, y = trained_linear()
    seen = {}

    def make(name):
        def run(xb, yb):
            seen[name] = xb.clone()
            out = xb.clone()
            if len(xb):  # move the first point to the training mean of another class
                other = x[(y != yb[0]).nonzero()[0, 0]]
                out[0] = xb[0] + (other - xb[0]).clamp(-0.4, 0.4)
            return out

        return run

    names = ["apgd-ce", "apgd-t", "fab-t", "square"]
    monkeypatch.setattr(
        robust,
        "build_autoattack",
        lambda *a, **k: ("spy", [(AttackSpec(n), make(n), None) for n in names]),
    )
    r = evaluate_robustness(
        model, x, y, eps=0.4, version="standard", progress=False, log=None, sanity="off"
    )
    assert r["clean"] == 100.0
    n = len(x)
    sizes = [len(seen[k]) for k in names]
    assert sizes == [n, n - 1, n - 2, n - 3]  # each attack sees only the still-robust points
    assert list(r["per_attack"]) == names
    assert r["per_attack"]["square"] == pytest.approx(100.0 * (n - 4) / n)
    assert r["autoattack"] == r["per_attack"]["square"]
    assert r["standard"] is True and r["label"] == "AutoAttack standard"


def test_evaluate_rejects_bad_input(no_official):
    model, x, y = trained_linear()
    with pytest.raises(ValueError, match=r"inputs in \[0, 1\]"):
        evaluate_robustness(model, x * 3, y, progress=False, log=None)
    with pytest.raises(TypeError, match="fp32"):
        evaluate_robustness(model.double(), x, y, progress=False, log=None)


class _ArgmaxNet(nn.Module):
    """A classifier whose logits come out of an argmax: no autograd path from input to loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 10)

    def forward(self, x):
        return 10.0 * torch.nn.functional.one_hot(self.lin(x.flatten(1)).argmax(1), 10).float()


@pytest.mark.parametrize("sanity", ["raise", "warn", "off"])
def test_a_model_without_an_input_gradient_is_flagged_not_a_traceback(no_official, sanity):
    """An argmax inside: autograd.grad raised 'does not require grad' from the attacks and the
    check, whatever ``sanity`` said; it is the textbook masked gradient."""
    x, y = data()
    with pytest.raises(GradientMaskingError, match="masks gradients|cannot run"):
        evaluate_robustness(
            _ArgmaxNet().eval(), x, y, version="fast", sanity=sanity, progress=False, log=None
        )
    with pytest.raises(GradientMaskingError, match="input gradients are exactly zero"):
        check_gradient_masking(_ArgmaxNet().eval(), x, y)


def test_evaluating_no_example_is_one_line(no_official):
    model, (x, y) = linear_model(), data()
    with pytest.raises(ValueError, match="at least one example"):
        evaluate_robustness(model, x, y, n_examples=0, progress=False, log=None)
    with pytest.raises(ValueError, match="at least one example"):
        evaluate_robustness(model, x[:0], y[:0], progress=False, log=None)


def test_a_missing_backend_is_reported_before_any_attack(monkeypatch):
    """No official package and no torchattacks: the error comes before the clean and PGD
    passes (which on CIFAR take real GPU time), naming both installs."""
    monkeypatch.setitem(sys.modules, "autoattack", None)
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    calls = []
    model = linear_model()
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = data()
    with pytest.raises(ImportError, match="--no-deps 'torchattacks>=3.5'"):
        evaluate_robustness(model, x, y, progress=False, log=None)
    assert not calls


def test_a_model_with_nan_outputs_is_refused_not_scored(no_official, monkeypatch):
    """NaN logits make every prediction class 0: AutoAttack then 'kept' the clean accuracy
    (8 % on digits, the share of class 0), and the sanity check passed it."""
    model, (x, y) = linear_model(), data()
    with torch.no_grad():
        model[-1].weight.fill_(float("nan"))
    with pytest.raises(GradientMaskingError, match="outputs are NaN or inf for 16 of 16 points"):
        evaluate_robustness(model, x, y, version="fast", progress=False, log=None)
    with pytest.raises(GradientMaskingError, match="outputs are NaN or inf"):
        check_gradient_masking(model, x, y)


def test_too_few_classes_for_autoattack_is_refused_before_the_attacks(no_official, monkeypatch):
    """With 3 classes the clean, FGSM and PGD passes ran first, then APGD-T refused."""
    from dkl import robust

    model, (x, y) = linear_model(c=3), data(c=3)

    def no_pass(*a, **kw):
        raise AssertionError("an attack pass ran before the class count was checked")

    monkeypatch.setattr(robust, "_predict", no_pass)
    with pytest.raises(ValueError, match=r"needs >= 4 classes, got 3"):
        evaluate_robustness(model, x, y, version="fast", progress=False, log=None)


def test_plain_weights_through_a_runs_config_do_not_write_into_that_run(tmp_path, no_official):
    """`dkl robust RUN/config.yaml model.checkpoint=OTHER.pt` wrote the other weights' result
    into the run's robust.json and summary.json, recorded as the run's."""
    import json

    from dkl.api import evaluate_run

    cfg = tiny_run(tmp_path)
    other = plain_weights(cfg, tmp_path / "other" / "weights.pt")
    res = evaluate_run(
        cfg.run_dir / "config.yaml", n_examples=8, version="fast", progress=False, log=None,
        overrides=[f"model.checkpoint={other}"],
    )  # fmt: skip
    assert res["checkpoint"] == str(other)
    assert json.loads((other.parent / "robust.json").read_text())["checkpoint"] == str(other)
    assert not (cfg.run_dir / "robust.json").exists()
    assert "robust" not in json.loads((cfg.run_dir / "summary.json").read_text())
