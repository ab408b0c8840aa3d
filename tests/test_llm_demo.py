"""The LLM demo's pieces: its data is real text from the standard library, the CLI offers it, and
its top-k measurement is exact at k = V and shrinks with k."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from dkl.cli import build_parser
from dkl.demos import DEMOS, demo_module
from dkl.demos.llm import _llama, stdlib_docstrings, topk_errors


def test_stdlib_docstrings_are_real_held_out_text():
    train, val = stdlib_docstrings()
    assert len(train) > 200_000 and len(val) > 20_000
    assert "Return" in train and "Return" in val  # English prose of the standard library
    # held out by module: the validation text is not a slice of the training text
    assert val[:2000] not in train


def test_cli_offers_the_llm_demo():
    assert "llm" in DEMOS
    args = build_parser().parse_args(
        ["demo", "--recipe", "llm", "--llm-steps", "3", "--llm-teacher-steps", "4"]
    )
    assert (args.recipe, args.llm_steps, args.llm_teacher_steps) == ("llm", 3, 4)
    assert demo_module("llm").main is not None


def test_topk_errors_vanish_at_k_equal_v_and_shrink_with_k():
    torch.manual_seed(0)
    student, teacher = _llama(16, 1, 2, 64), _llama(24, 1, 2, 64)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8)  # a peaked teacher, like a trained one
    val = torch.randint(0, 64, (4, 9))
    rows = topk_errors(student, teacher, val, ks=(4, 16, 64))
    assert {r["loss"] for r in rows} == {"kl", "ikl"}
    for kind in ("kl", "ikl"):
        for tail in ("renormalize", "uniform"):
            errs = [r["loss_rel_err"] for r in rows if (r["loss"], r["tail"]) == (kind, tail)]
            assert errs[-1] < 1e-5  # k = V: the full loss
            assert errs[0] > errs[-1]


def test_on_policy_mode_trains_every_divergence_in_both_modes(tmp_path):
    import json

    args = build_parser().parse_args(
        ["demo", "--recipe", "llm", "--llm-mode", "on-policy", "--seeds", "1"]
        + ["--llm-steps", "2", "--llm-teacher-steps", "2", "--out", str(tmp_path)]
    )
    assert demo_module("llm").main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = summary["methods"]
    assert len(methods) == 8  # 4 divergences x off- / on-policy
    assert {m["divergence"] for m in methods.values()} == {"kl", "reverse kl", "jsd(0.5)", "ikl"}
    for m in methods.values():
        assert m["teacher_loglik_mean"] < 0 and m["val_loss_mean"] > 0
    on = [r for m in methods.values() if m["mode"] == "on-policy" for r in m["runs"]]
    assert all(r["generation_share"] > 0 for r in on)
    assert (tmp_path / "results.png").stat().st_size > 0
    assert "| on-policy | jsd(0.5) |" in (tmp_path / "results.md").read_text()
