"""examples/distill_trainer.py, the LLM guide's lead example, runs as a user runs it (shortened)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_trainer.py"


def test_distill_trainer_example_teaches_the_student(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("distill_trainer_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--teacher-steps", "12", "--steps", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "distill/wmse" in out and "distill/sce" in out  # the IKL parts are logged
    assert result["teacher_ce"] < result["uniform_ce"] - 1  # the teacher has learnt something
    # 8 IKL steps move the random student well towards the teacher's predictions
    assert result["student_ce_after"] < result["student_ce_before"] - 0.5
    assert "next-token CE (nats)" in out
