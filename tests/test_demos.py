"""The demos: shared table helpers, and every demo writing the same three files."""

from __future__ import annotations

import json
import statistics

import pytest

from dkl.demos._stats import RESULT_FILES, format_mean_std, markdown_table, mean_std, write_results


def test_mean_and_sample_std_against_statistics():
    vals = [97.5, 96.25, 98.0, 97.0]
    assert mean_std(vals) == pytest.approx((statistics.mean(vals), statistics.stdev(vals)))
    assert format_mean_std(vals) == f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def test_one_value_prints_no_spread():
    assert format_mean_std([97.5]) == "97.50"
    assert format_mean_std([0.123], 1) == "0.1"
    assert mean_std([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])


def test_markdown_table_and_its_errors():
    assert markdown_table(["a", "b"], [["x", 1.5], ["y", "–"]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| x | 1.5 |",
        "| y | – |",
    ]
    with pytest.raises(ValueError, match="rows of 2 cells, got \\[3\\]"):
        markdown_table(["a", "b"], [["x", 1, 2]])


def test_write_results_writes_the_three_files(tmp_path):
    paths = write_results(
        tmp_path / "out", {"x": 1}, "| a |", lambda p: p.write_bytes(b"\x89PNG fake")
    )
    assert [p.name for p in paths] == list(RESULT_FILES)
    assert json.loads(paths[0].read_text()) == {"x": 1}
    assert paths[1].read_text() == "| a |\n"
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def _table_rows(md: str) -> list[list[str]]:
    rows = [r for r in md.splitlines() if r.startswith("| ")][1:]  # skip the header row
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def test_adversarial_demo_one_seed(tmp_path):
    from dkl.demos.adversarial import run_demo

    table = run_demo(
        tmp_path,
        methods=("standard",),
        seeds=1,
        n_examples=16,
        version="fast",
        overrides=[
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "adversarial.eval.pgd_examples=0",
            "train.plot=false",
        ],
        log=lambda m: None,
    )
    for name in RESULT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "results.md").read_text().strip() == table
    assert "±" not in table
    s = json.loads((tmp_path / "summary.json").read_text())
    run = s["methods"]["standard"]["runs"][0]
    (row,) = _table_rows(table)
    assert row[:3] == ["standard", f"{run['clean']:.2f}", f"{run['pgd20']:.2f}"]
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")
