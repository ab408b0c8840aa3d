"""benchmarks/gpu_check.py: the smoke run (tiny sizes, CPU) writes a report with every section.

The numbers of a smoke run mean nothing; what is checked is that the one command meant for a GPU
box runs each section to its end and reports it. The kernel runs in Triton's CPU interpreter (the
root conftest.py turns it on without a GPU). The command's body is the package
benchmarks/gpu_check/, imported here from that folder.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PATH = BENCHMARKS / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The package's modules by their short names (``gpu_check.cli``, ``gpu_check.core``, ...)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        names = ("cli", "core", "measure", "oracles", "report", "sections")
        yield SimpleNamespace(**{n: importlib.import_module(f"gpu_check.{n}") for n in names})
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in [m for m in sys.modules if m.split(".")[0] == "gpu_check"]:
            del sys.modules[name]


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python script args`` in a fresh process, the kernel in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(script), *args]
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_smoke_report_has_every_section(gpu_check, tmp_path, capsys):
    code = gpu_check.cli.main(["--smoke", "--results-dir", str(tmp_path)])
    reports = list(tmp_path.glob("gpu_check_smoke_*.md"))
    assert len(reports) == 1, reports
    report = reports[0].read_text()
    assert report in capsys.readouterr().out  # printed as well as written
    for title in (section.title for section in gpu_check.sections.SECTIONS.values()):
        assert f"## {title}" in report
        # every section ran to its end (a failed check is still "ok": it is a row)
        assert re.search(rf"^\| {re.escape(title)} \| ok \|", report, re.MULTILINE), title
    for key in ("device", "torch", "triton", "date"):
        assert f"- **{key}**:" in report
    # the tables each section promises
    for heading in ("| case | dtype | B × C |", "| B × C | dtype | method |", "| mode | method |",
                    "| loop | mode |", "| run | final loss"):  # fmt: skip
        assert heading in report
    assert "IKL fused kernel" in report and "F.kl_div, compiled" in report
    assert "KD fp32: IKL step overhead over KD" in report
    assert "IKL-AT dkl fp32: ≥ 1.2× the authors' loop" in report
    assert "| fp32 | fixmatch_ikl |" in report
    for row in ("bf16 \\| fused_linear_reverse_kl \\| 1024", "bf16 \\| fused_linear_jsd, β = 0.5 \\| 1024",
                "fp32 \\| fused_linear_ikl \\| 16"):  # fmt: skip
        assert re.search(rf"^\\| {row} \\| [0-9.]+ \\|", report, re.MULTILINE), row  # timed
    # exit status: 1 exactly when a correctness check failed
    failed = re.search(r"checks: \d+ passed, [1-9]\d* failed", report) is not None
    assert code == (1 if failed else 0)


def test_sections_option(gpu_check):
    parse_args = gpu_check.cli.parse_args
    assert parse_args(["--sections", "kd,adv"]).sections == ["kd", "adv"]
    assert parse_args([]).sections == list(gpu_check.sections.SECTIONS)
    with pytest.raises(SystemExit):
        parse_args(["--sections", "kd,nope"])


def test_every_section_module_is_registered(gpu_check):
    """A module in gpu_check/sections/ is a section: listed once, with a heading, a share of the
    budget and sizes for both runs."""
    package = gpu_check.sections
    modules = {m.name for m in pkgutil.iter_modules(package.__path__)}
    registered = {s.run.__module__.rsplit(".", 1)[1] for s in package.SECTIONS.values()}
    assert registered == modules
    for name, section in package.SECTIONS.items():
        assert section.name == name and section.title and section.share > 0
        assert isinstance(section.full, dict) and isinstance(section.smoke, dict)
    titles = [s.title for s in package.SECTIONS.values()]
    assert len(set(titles)) == len(titles)


def test_command_line_runs_a_section_in_a_child_process(tmp_path):
    """``python benchmarks/gpu_check.py`` as a GPU box runs it: each section in a child process
    started from the same file (here one section, the smoke sizes)."""
    args = ["--smoke", "--isolate", "--sections", "kernel", "--results-dir", str(tmp_path)]
    out = run_script(PATH, *args, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = (tmp_path / "gpu_check_smoke_cpu.md").read_text()
    assert re.search(r"^\| 2\. Kernel speed and memory \| ok \|", report, re.MULTILINE)
    assert "| 8 × 1000 | fp32 | IKL fused kernel |" in report  # a row the child streamed back


def test_pytest_outcomes_with_and_without_xdist(gpu_check):
    out = """
tests/test_ops_triton.py::test_a[1x2-float32-kl] PASSED                   [ 10%]
[gw1] [ 20%] FAILED tests/test_llm.py::test_b
[gw0] [ 30%] SKIPPED tests/test_ops_triton.py::test_c
FAILED tests/test_llm.py::test_b - AssertionError: loss 1 vs 2
==== 1 failed, 1 passed, 1 skipped in 3.2s ====
"""
    assert gpu_check.sections.correctness.pytest_outcomes(out) == {
        "tests/test_ops_triton.py::test_a[1x2-float32-kl]": "PASSED",
        "tests/test_llm.py::test_b": "FAILED",
        "tests/test_ops_triton.py::test_c": "SKIPPED",
    }


def test_oracle_restricts_rows_to_finite_target_classes(gpu_check):
    """The float64 oracle with -inf targets: finite, the wMSE that of the finite classes alone,
    and KL equal to F.kl_div on the probabilities (0 for the -inf classes)."""
    import torch

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    t_inf = t.clone()
    t_inf[:, 4:] = float("-inf")
    for kind in ("kl", "ikl"):
        full = gpu_check.oracles.oracle(s, t_inf, kind=kind, beta=2.0, temperature=2.0)
        assert torch.isfinite(full).all()
    # IKL's wMSE part alone (alpha = 0: no sCE) is the one on the finite classes, softmax or
    # class weights alike
    cw = torch.rand(2, 6, generator=g)
    for weights in ({}, {"class_weights": cw}):
        got = gpu_check.oracles.oracle(s, t_inf, kind="ikl", alpha=0.0, **weights)
        cut = {k: v[:, :4] for k, v in weights.items()}
        want = gpu_check.oracles.oracle(s[:, :4], t[:, :4], kind="ikl", alpha=0.0, **cut)
        torch.testing.assert_close(got, want)
    # KL against F.kl_div on probabilities (0 for the -inf classes)
    kl = gpu_check.oracles.oracle(s, t_inf, kind="kl", temperature=2.0)
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(s.double() / 2, 1), torch.softmax(t_inf.double() / 2, 1), reduction="none"
    ).sum(1)
    torch.testing.assert_close(kl, ref)


def test_attempt_reports_errors_and_stops_at_the_deadline(gpu_check):
    """A failing or overrunning cell becomes a one-line reason; the section goes on."""
    import time

    import torch

    far = gpu_check.core.Ctx(
        torch.device("cpu"), smoke=False, until=time.time() + 60, backend="eager"
    )
    assert gpu_check.core.attempt(lambda: 42, far) == (True, 42)
    done, why = gpu_check.core.attempt(lambda: torch.zeros(2) @ torch.zeros(3), far)
    assert not done and why.startswith("error: RuntimeError")
    near = gpu_check.core.Ctx(
        torch.device("cpu"), smoke=False, until=time.time() + 1.2, backend="eager"
    )
    t0 = time.time()
    done, why = gpu_check.core.attempt(lambda: time.sleep(30), near)
    assert (done, why) == (False, "stopped at the section's time budget")
    assert time.time() - t0 < 1.1  # a second before the deadline, not after 30 s


def test_ulp_rel_is_the_spacing_of_the_dtype(gpu_check):
    torch = pytest.importorskip("torch")
    ulp = gpu_check.measure.ulp_rel
    assert ulp(torch.tensor([1.0, -0.5]), torch.float16) == 2.0**-10  # spacing 2^-10 at 1
    assert ulp(torch.tensor([0.75]), torch.bfloat16) == pytest.approx(2.0**-8 / 0.75)
    assert ulp(torch.tensor([3.0]), torch.float32) == pytest.approx(2.0**-22 / 3.0)
    # below float16's normal range (6.1e-5) the spacing is the subnormals' 2^-24
    assert ulp(torch.tensor([3.7e-5]), torch.float16) == pytest.approx(2.0**-24 / 3.7e-5)
    assert ulp(torch.zeros(3), torch.float16) == 0.0


def test_kernel_configs_smoke():
    """benchmarks/kernel_configs.py times every forced launch configuration (interpreter here)."""
    out = run_script(BENCHMARKS / "kernel_configs.py", "--smoke", cwd=BENCHMARKS)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 4 × 300 |")]
    assert len(rows) == 4  # 2 dtypes × 2 blocks × 1 warp count
    assert {row.split("|")[3].strip() for row in rows} == {"64", "128"}
