r"""Robustness evaluation: clean accuracy, PGD-20 and AutoAttack, with a masking check.

:func:`evaluate_robustness` runs, on the first ``n_examples`` points (all by default):

1. clean accuracy;
2. FGSM and PGD-20 (CE, uniform random start, step ε/4 = 2/255 at ε = 8/255) on the same points;
3. a gradient-masking sanity check (:func:`check_gradient_masking`) that raises
   :class:`GradientMaskingError` when the model outputs look like probabilities, when the input
   gradients are zero, or when PGD is weaker than FGSM;
4. AutoAttack, version ``"standard"``: APGD-CE (100 steps), APGD-T (9 target classes, 100 steps),
   FAB-T (9 target classes, 100 steps), Square (5000 queries), all with one restart, L∞; each
   attack runs only on the points still classified correctly and the worst case is kept. Version
   ``"fast"`` (APGD-CE + APGD-T only) is cheaper and is labelled **non-standard** in every output.

Backends: the official ``autoattack`` package when it is importable (``pip install
git+https://github.com/fra31/auto-attack``), else the same four attacks from ``torchattacks``
(extra ``robust``), each configured explicitly with the official settings (torchattacks' own
``AutoAttack`` class runs 10 steps and C−1 targets, which is *not* the standard evaluation).

The model runs in eval mode and fp32 (no autocast), on inputs in [0, 1] (normalisation belongs
inside the model); seeds are fixed, so a result can be reproduced.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dkl.attacks import eval_mode, fgsm_attack, input_gradient, pgd_attack

__all__ = [
    "AA_VERSIONS",
    "AttackSpec",
    "GradientMaskingError",
    "autoattack_specs",
    "build_autoattack",
    "check_backend",
    "check_gradient_masking",
    "evaluate_robustness",
    "format_table",
]

AA_VERSIONS = ("standard", "fast")
_ATTACK_ORDER = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}


class GradientMaskingError(RuntimeError):
    """The model shows an obvious sign of gradient masking; its robust accuracy would lie."""


@dataclass(frozen=True)
class AttackSpec:
    """One AutoAttack component and the settings it must run with (official ``standard`` values)."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)


def autoattack_specs(version: str, *, eps: float, num_classes: int, seed: int) -> list[AttackSpec]:
    """The components of AutoAttack ``version`` with their settings (independent of the backend).

    >>> [s.name for s in autoattack_specs("standard", eps=8 / 255, num_classes=10, seed=0)]
    ['apgd-ce', 'apgd-t', 'fab-t', 'square']
    """
    if version not in AA_VERSIONS:
        raise ValueError(f"Expected version in {AA_VERSIONS}, got {version!r}")
    if num_classes < 4:  # the (targeted) DLR loss reads the 4th-largest logit
        raise ValueError(f"AutoAttack's APGD-T (DLR loss) needs >= 4 classes, got {num_classes}")
    n_targets = min(9, num_classes - 1)
    common = {"norm": "Linf", "eps": eps, "n_restarts": 1, "seed": seed}
    specs = {
        "apgd-ce": AttackSpec(
            "apgd-ce", {**common, "steps": 100, "loss": "ce", "rho": 0.75, "eot_iter": 1}
        ),
        "apgd-t": AttackSpec(
            "apgd-t",
            {
                **common,
                "steps": 100,
                "loss": "dlr-targeted",
                "n_target_classes": n_targets,
                "rho": 0.75,
                "eot_iter": 1,
            },
        ),
        "fab-t": AttackSpec(
            "fab-t",
            {
                **common,
                "steps": 100,
                "n_target_classes": n_targets,
                "alpha_max": 0.1,
                "eta": 1.05,
                "beta": 0.9,
            },
        ),
        "square": AttackSpec(
            "square", {**common, "n_queries": 5000, "p_init": 0.8, "loss": "margin"}
        ),
    }
    return [specs[name] for name in _ATTACK_ORDER[version]]


def _official_module():
    try:
        return importlib.import_module("autoattack")
    except ImportError:
        return None


def _torchattacks():
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError(
            "AutoAttack needs the official `autoattack` package or torchattacks "
            "(pip install 'dkl[robust]' && pip install --no-deps 'torchattacks>=3.5')"
        ) from e
    return torchattacks


def check_backend(backend: str = "auto") -> None:
    """Raise now, before any attack has run, if AutoAttack's ``backend`` cannot be imported."""
    if backend not in ("auto", "official", "torchattacks"):
        raise ValueError(
            f"Expected backend in ('auto', 'official', 'torchattacks'), got {backend!r}"
        )
    if backend == "official" and _official_module() is None:
        raise ImportError("backend='official' but the `autoattack` package is not importable")
    if backend == "torchattacks" or (backend == "auto" and _official_module() is None):
        _torchattacks()


def _build_torchattacks(model: nn.Module, spec: AttackSpec, num_classes: int):
    torchattacks = _torchattacks()
    s = spec.settings
    if spec.name == "apgd-ce":
        atk = torchattacks.APGD(
            model,
            norm=s["norm"],
            eps=s["eps"],
            steps=s["steps"],
            n_restarts=s["n_restarts"],
            seed=s["seed"],
            loss="ce",
            eot_iter=s["eot_iter"],
            rho=s["rho"],
        )
    elif spec.name == "apgd-t":
        atk = torchattacks.APGDT(
            model,
            norm=s["norm"],
            eps=s["eps"],
            steps=s["steps"],
            n_restarts=s["n_restarts"],
            seed=s["seed"],
            eot_iter=s["eot_iter"],
            rho=s["rho"],
            n_classes=num_classes,
        )
        atk.n_target_classes = s["n_target_classes"]  # torchattacks' default is C - 1
    elif spec.name == "fab-t":
        atk = torchattacks.FAB(
            model,
            norm=s["norm"],
            eps=s["eps"],
            steps=s["steps"],
            n_restarts=s["n_restarts"],
            seed=s["seed"],
            multi_targeted=True,
            n_classes=num_classes,
            alpha_max=s["alpha_max"],
            eta=s["eta"],
            beta=s["beta"],
        )
        atk.n_target_classes = s["n_target_classes"]
    elif spec.name == "square":
        atk = torchattacks.Square(
            model,
            norm=s["norm"],
            eps=s["eps"],
            n_queries=s["n_queries"],
            n_restarts=s["n_restarts"],
            seed=s["seed"],
            p_init=s["p_init"],
            loss=s["loss"],
            resc_schedule=True,
        )
    else:  # pragma: no cover
        raise ValueError(f"unknown AutoAttack component {spec.name!r}")
    return atk


def _build_official(module, model: nn.Module, specs: list[AttackSpec], eps: float, seed: int):
    adversary = module.AutoAttack(
        model, norm="Linf", eps=eps, version="standard", seed=seed, verbose=False
    )
    # the official "standard" version already sets these; restated so a change upstream shows
    adversary.apgd.n_restarts = 1
    adversary.apgd.n_iter = 100
    adversary.apgd.loss = "ce"
    adversary.apgd_targeted.n_restarts = 1
    adversary.apgd_targeted.n_iter = 100
    adversary.apgd_targeted.n_target_classes = next(
        s.settings["n_target_classes"] for s in specs if s.name == "apgd-t"
    )
    adversary.fab.n_restarts = 1
    adversary.fab.n_iter = 100
    adversary.fab.targeted = True
    adversary.fab.n_target_classes = adversary.apgd_targeted.n_target_classes
    adversary.square.n_queries = 5000
    adversary.square.p_init = 0.8
    return {
        "apgd-ce": adversary.apgd.perturb,
        "apgd-t": adversary.apgd_targeted.perturb,
        "fab-t": adversary.fab.perturb,
        "square": adversary.square.perturb,
    }


def build_autoattack(
    model: nn.Module,
    *,
    version: str = "standard",
    eps: float = 8 / 255,
    num_classes: int = 10,
    seed: int = 0,
    backend: str = "auto",
) -> tuple[str, list[tuple[AttackSpec, Callable[[Tensor, Tensor], Tensor], Any]]]:
    """``(backend, [(spec, run(x, y) -> x_adv, attack object or None), ...])`` in order.

    ``backend``: ``"auto"`` (official if importable, else torchattacks), ``"official"`` or
    ``"torchattacks"``.
    """
    check_backend(backend)
    specs = autoattack_specs(version, eps=eps, num_classes=num_classes, seed=seed)
    module = _official_module() if backend in ("auto", "official") else None
    if module is not None:
        runs = _build_official(module, model, specs, eps, seed)
        return "autoattack (official)", [(s, runs[s.name], None) for s in specs]
    out = []
    for s in specs:
        atk = _build_torchattacks(model, s, num_classes)
        out.append((s, atk, atk))
    return "torchattacks", out


def _pct(mask: Tensor) -> float:
    return 100.0 * int(mask.sum()) / max(mask.numel(), 1)


def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )


def check_gradient_masking(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    pgd_correct: Tensor | None = None,
    fgsm_correct: Tensor | None = None,
    eps: float = 8 / 255,
) -> dict[str, Any]:
    """Raise :class:`GradientMaskingError` on obvious gradient masking; return what was measured.

    Checks (on ``x``, a batch of a few hundred points is enough):

    * outputs are probabilities (non-negative rows summing to 1): attacks built on logits (CE,
      DLR) then see a squashed, vanishing signal;
    * the CE gradient with respect to the input is exactly zero for most points;
    * PGD leaves more points correct than FGSM on the same points (``pgd_correct`` /
      ``fgsm_correct`` boolean masks; a stronger attack cannot do worse unless gradients lie).
    """
    with eval_mode(model), torch.no_grad():
        out = model(x)
    if out.dim() != 2:
        raise GradientMaskingError(
            f"Expected model outputs of shape (B, C), got {tuple(out.shape)}"
        )
    _check_finite(out, "")
    row_sums = out.sum(1)
    if bool((out >= 0).all()) and bool(
        torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-3)
    ):
        raise GradientMaskingError(
            "model outputs look like probabilities (non-negative, rows sum to 1): return logits, "
            "not softmax outputs; attacks on CE/DLR are unreliable on probabilities"
        )
    xg = x.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        loss = F.cross_entropy(model(xg), y, reduction="sum")
        grad = input_gradient(loss, xg)
    broken = (~torch.isfinite(grad.flatten(1))).any(1).float().mean().item()
    if broken > 0:
        raise GradientMaskingError(
            f"input gradients are NaN or inf for {100 * broken:.0f}% of the points: gradient "
            "attacks cannot follow them, and the robust accuracy would be overstated"
        )
    zero = (grad.flatten(1).abs().amax(1) == 0).float().mean().item()
    if zero > 0.5:
        raise GradientMaskingError(
            f"input gradients are exactly zero for {100 * zero:.0f}% of the points: the model "
            "masks gradients (non-differentiable or saturated layers); gradient attacks would fail"
        )
    info: dict[str, Any] = {"zero_grad_fraction": zero}
    if pgd_correct is not None and fgsm_correct is not None:
        n = pgd_correct.numel()
        n_pgd, n_fgsm = int(pgd_correct.sum()), int(fgsm_correct.sum())
        info.update(pgd_correct=n_pgd, fgsm_correct=n_fgsm)
        # slack: one point or 1%, PGD's random start can miss a point FGSM finds
        if n_pgd > n_fgsm + max(1, math.ceil(0.01 * n)):
            raise GradientMaskingError(
                f"PGD is weaker than FGSM on the same {n} points ({n_pgd} vs {n_fgsm} still "
                "correct): a sign of gradient masking; the robust accuracy would be overstated"
            )
    return info


def _check_finite(out: Tensor, where: str) -> None:
    """Non-finite logits make every prediction the argmax of NaN (class 0): an accuracy that
    no attack can lower, for no reason of robustness."""
    bad = (~torch.isfinite(out)).any(1)
    if bool(bad.any()):
        raise GradientMaskingError(
            f"the model's outputs are NaN or inf for {int(bad.sum())} of {len(out)} points"
            f"{' ' + where if where else ''}: a diverged or damaged model (its accuracy would be "
            "that of always predicting class 0, and no attack could lower it)"
        )


def _check_threat_model(x_adv: Tensor, x: Tensor, eps: float, name: str) -> None:
    dist = (x_adv - x).abs().flatten(1).amax(1).max().item() if len(x) else 0.0
    if dist > eps + 1e-5 or x_adv.min().item() < -1e-6 or x_adv.max().item() > 1 + 1e-6:
        raise RuntimeError(
            f"{name} returned points outside the threat model (L∞ distance {dist:.6f} > ε = "
            f"{eps:.6f}, or outside [0, 1]); refusing to count them"
        )


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    n_examples: int | None = None,
    version: str = "standard",
    batch_size: int = 256,
    seed: int = 0,
    pgd_steps: int = 20,
    backend: str = "auto",
    sanity: str = "raise",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Clean, FGSM, PGD-k and AutoAttack accuracy (%) of ``model`` on ``(x, y)``.

    Returns a dict with ``clean``, ``fgsm``, ``pgd<k>``, ``autoattack`` (robust accuracy, %),
    ``per_attack`` (robust accuracy after each AutoAttack component), ``n_examples``, ``eps``,
    ``version``, ``standard`` (False for any non-standard variant), ``label``, ``backend``,
    ``seed`` and ``time_s``. ``sanity``: ``"raise"`` (default), ``"warn"`` or ``"off"``.
    """
    from tqdm.auto import tqdm

    if version not in AA_VERSIONS:
        raise ValueError(f"Expected version in {AA_VERSIONS}, got {version!r}")
    if sanity not in ("raise", "warn", "off"):
        raise ValueError(f"Expected sanity in ('raise', 'warn', 'off'), got {sanity!r}")
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise ValueError(
            f"Expected x (N, ...) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    check_backend(backend)  # before the clean and PGD passes, which take a while
    params = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.dtype != torch.float32 for p in params):
        raise TypeError("evaluate_robustness runs in fp32: convert the model with model.float()")
    device = params[0].device if params else torch.device("cpu")
    say = log or (lambda s: None)
    n_total = len(x)
    n = n_total if n_examples is None else min(int(n_examples), n_total)
    if n < 1:
        raise ValueError(
            f"Expected at least one example to evaluate, got {n_total} inputs and "
            f"n_examples={n_examples}"
        )
    x = x[:n].to(device, torch.float32)
    y = y[:n].to(device)
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"Expected inputs in [0, 1] (normalisation inside the model), got [{lo:.3g}, {hi:.3g}]"
        )
    t0 = time.time()
    standard = version == "standard"
    label = (
        "AutoAttack standard"
        if standard
        else "AutoAttack fast (NON-STANDARD: APGD-CE + APGD-T only; not comparable to published numbers)"
    )
    result: dict[str, Any] = {
        "n_examples": n,
        "n_total": n_total,
        "eps": eps,
        "version": version,
        "standard": standard,
        "label": label,
        "seed": seed,
    }
    say(f"robustness evaluation: {n} of {n_total} examples, L∞ ε = {eps:.5f}, {label}")
    g = torch.Generator(device=device).manual_seed(seed)

    with eval_mode(model), torch.autocast(device.type, enabled=False):
        with torch.no_grad():
            out0 = model(x[: min(n, batch_size)])
        num_classes = out0.shape[1]
        _check_finite(out0, "on the first test batch")
        # AutoAttack's own requirements, before the clean and PGD passes that take a while
        autoattack_specs(version, eps=eps, num_classes=num_classes, seed=seed)
        clean_pred = _predict(model, x, batch_size)
        clean_ok = clean_pred == y
        result["clean"] = _pct(clean_ok)
        say(f"  clean: {result['clean']:.2f}%")

        fgsm_ok = torch.zeros_like(clean_ok)
        pgd_ok = torch.zeros_like(clean_ok)
        bar = tqdm(range(0, n, batch_size), desc="fgsm+pgd", disable=not progress, leave=False)
        for i in bar:
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            xf = fgsm_attack(model, xb, yb, eps=eps)
            xp = pgd_attack(model, xb, yb, eps=eps, steps=pgd_steps, generator=g)
            _check_threat_model(xp, xb, eps, f"PGD-{pgd_steps}")
            with torch.no_grad():
                fgsm_ok[i : i + batch_size] = model(xf).argmax(1) == yb
                pgd_ok[i : i + batch_size] = model(xp).argmax(1) == yb
        result["fgsm"] = _pct(fgsm_ok)
        result[f"pgd{pgd_steps}"] = _pct(pgd_ok)
        say(f"  fgsm: {result['fgsm']:.2f}%   pgd-{pgd_steps}: {result[f'pgd{pgd_steps}']:.2f}%")

        if sanity != "off":
            m = min(n, 512)
            try:
                result["sanity"] = check_gradient_masking(
                    model, x[:m], y[:m], pgd_correct=pgd_ok, fgsm_correct=fgsm_ok, eps=eps
                )
            except GradientMaskingError as e:
                if sanity == "raise":
                    raise
                result["sanity"] = {"warning": str(e)}
                say(f"  WARNING (gradient masking): {e}")

        backend_name, attacks = build_autoattack(
            model, version=version, eps=eps, num_classes=num_classes, seed=seed, backend=backend
        )
        result["backend"] = backend_name
        robust = clean_ok.clone()
        per_attack: dict[str, float] = {}
        for spec, run, _ in attacks:
            idx = robust.nonzero().flatten()
            torch.manual_seed(seed)
            bar = tqdm(
                range(0, len(idx), batch_size), desc=spec.name, disable=not progress, leave=False
            )
            for i in bar:
                sel = idx[i : i + batch_size]
                xb, yb = x[sel], y[sel]
                try:
                    x_adv = run(xb, yb).detach().to(device, torch.float32)
                except RuntimeError as e:  # the backends' own autograd.grad on no graph
                    if "grad" not in str(e):
                        raise
                    raise GradientMaskingError(
                        f"{spec.name} cannot run: the model's output does not depend on its input "
                        "through autograd (an argmax, detach or non-differentiable layer "
                        "inside), so gradient attacks do not apply"
                    ) from None
                _check_threat_model(x_adv, xb, eps, spec.name)
                with torch.no_grad():
                    robust[sel] = model(x_adv).argmax(1) == yb
            per_attack[spec.name] = _pct(robust)
            say(
                f"  after {spec.name}: {per_attack[spec.name]:.2f}%  "
                f"({int(robust.sum())}/{n} robust)"
            )
        result["per_attack"] = per_attack
        result["autoattack"] = _pct(robust)
    result["time_s"] = round(time.time() - t0, 2)
    return result


def format_table(rows: dict[str, dict[str, Any]], *, pgd_steps: int = 20) -> str:
    """Markdown table of results keyed by run name; non-standard AutoAttack is marked.

    >>> print(format_table({"a": {"clean": 90.0, "pgd20": 50.0, "autoattack": 45.0,
    ...                           "standard": False, "n_examples": 10}}))
    | run | n | clean | PGD-20 | AutoAttack |
    |---|---|---|---|---|
    | a | 10 | 90.00 | 50.00 | 45.00 (fast, non-standard) |
    """
    lines = [
        "| run | n | clean | PGD-20 | AutoAttack |".replace("20", str(pgd_steps)),
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        aa = f"{r['autoattack']:.2f}" + ("" if r.get("standard", True) else " (fast, non-standard)")
        lines.append(
            f"| {name} | {r['n_examples']} | {r['clean']:.2f} | {r[f'pgd{pgd_steps}']:.2f} | {aa} |"
        )
    return "\n".join(lines)
