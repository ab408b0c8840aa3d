"""The README's Python examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = '@register_recipe("label_smoothing")'


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def _recipe_example() -> str:
    blocks = [b for b in _python_blocks() if MARKER in b]
    assert len(blocks) == 1, f"expected one README python block with {MARKER}, got {len(blocks)}"
    return blocks[0]


def test_readme_names_no_removed_module():
    text = README.read_text()
    assert "dkl.engine" not in text and "Recipe)" not in text


def test_readme_python_blocks_compile():
    for block in _python_blocks():
        compile(block, str(README), "exec")


def test_readme_recipe_example_runs(tmp_path, monkeypatch):
    from dkl import recipes
    from dkl.config import loader

    # the example registers a recipe: keep it out of the registries of the other tests
    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))
    monkeypatch.setattr(loader, "_RECIPE_SECTIONS", dict(loader._RECIPE_SECTIONS))
    monkeypatch.chdir(tmp_path)

    code = _recipe_example()
    exec(compile(code, f"{README}:label_smoothing", "exec"), {"__name__": "readme_example"})  # noqa: S102

    run = tmp_path / "runs" / "ls"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "final.pt"):
        assert (run / name).is_file(), name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["recipe"] == "label_smoothing" and cfg["train"]["epochs"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"] == "label_smoothing" and summary["epochs"] == 2
    # label smoothing still learns digits: far above the 10 % of chance
    assert summary["last"]["top1"] > 50


@pytest.mark.parametrize("needle", ["from dkl.train import Task", "from dkl.api import train"])
def test_readme_recipe_example_uses_the_public_api(needle):
    assert needle in _recipe_example()
