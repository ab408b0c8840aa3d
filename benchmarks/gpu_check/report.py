"""The one report writer: a section's records (text, tables, checks, targets), streamed to a file
by a child process, and the Markdown report made of them."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
from dataclasses import dataclass

import torch

import dkl

from .core import log, sibling


class Sink:
    """A section's output as records; ``stream`` (a child's JSON-lines file) gets each at once."""

    def __init__(self, stream=None) -> None:
        self.records: list[dict] = []
        self.stream = stream
        self.width = 0  # columns of the current table

    def _add(self, **rec) -> None:
        self.records.append(rec)
        if self.stream is not None:
            self.stream.write(json.dumps(rec) + "\n")
            self.stream.flush()

    def text(self, text: str) -> None:
        self._add(kind="text", text=text)

    def table(self, *columns: str) -> None:
        self.width = len(columns)
        self._add(kind="table", columns=list(columns))

    def row(self, *cells, result: str | None = None) -> None:
        """One row of the current table; ``result`` goes in its last column, the gap is '–'."""
        cells = [str(c) for c in cells]
        if result is not None:
            cells += ["–"] * (self.width - len(cells) - 1) + [result]
        self._add(kind="row", cells=cells)
        log(" | ".join(c for c in cells if c))

    def check(self, ok: bool | None) -> None:
        """A correctness verdict: True passed, False failed, None skipped."""
        self._add(kind="check", ok=ok)

    def target(self, what: str, measured: str, ratio: float | None, met: bool | None) -> None:
        self._add(kind="target", what=what, measured=measured, ratio=ratio, met=met)
        verdict = {True: "met", False: "MISSED", None: "n/a"}[met]
        log(f"target {what}: {measured} -> {verdict}")


@dataclass
class SectionResult:
    name: str
    title: str
    records: list[dict]
    status: str
    seconds: float
    budget: float


def environment(device: torch.device, args) -> list[tuple[str, str]]:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    rows = [("device", sibling("kernel_speed").device_name(device))]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
        rows.append(
            ("GPU", gpu + f"compute capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
        )
    now = datetime.datetime.now(datetime.timezone.utc)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    command = " ".join(["python", "benchmarks/gpu_check.py", *args.argv])
    rows += [
        ("date", now.strftime("%Y-%m-%d %H:%M UTC")),
        ("torch", torch.__version__),
        ("triton", version("triton")),
        ("liger-kernel", version("liger-kernel")),
        ("timm", version("timm")),
        ("dkl", dkl.__version__),
        ("python", platform.python_version()),
        ("TF32", f"matmul {tf32[0]}, cuDNN {tf32[1]} (the torch defaults)"),
        ("run", f"`{command}`, budget {args.budget:.0f} s, compile backend {args.backend}"),
    ]
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        rows.append(("Triton", "CPU interpreter (TRITON_INTERPRET=1)"))
    return rows


def md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def md_table(columns: list[str], rows: list[list]) -> list[str]:
    return [md_row(columns), "|" + "---|" * len(columns), *(md_row(r) for r in rows), ""]


def count_checks(records: list[dict]) -> str:
    oks = [r["ok"] for r in records if r["kind"] == "check"]
    counts = (sum(ok is True for ok in oks), sum(ok is False for ok in oks), oks.count(None))
    return "{} passed, {} failed, {} skipped".format(*counts)


def target_cells(t: dict) -> list[str]:
    verdict = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
    ratio = "" if t["ratio"] is None else f"{t['ratio']:.2f}"
    return [t["what"], t["measured"], ratio, verdict]


def render_section(res: SectionResult) -> list[str]:
    lines = [f"## {res.title}", ""]
    spent = f"{res.seconds:.0f} s of a {res.budget:.0f} s budget"
    lines += [f"Status: {res.status}; {spent}; checks: {count_checks(res.records)}.", ""]
    table: tuple[list, list] | None = None  # (columns, rows) being collected
    for r in res.records:
        if r["kind"] == "row" and table is not None:
            table[1].append(r["cells"])
        elif r["kind"] in ("text", "table"):
            if table is not None:
                lines += md_table(*table)
            table = (r["columns"], []) if r["kind"] == "table" else None
            if r["kind"] == "text":
                lines += [r["text"], ""]
    if table is not None:
        lines += md_table(*table)
    targets = [target_cells(r) for r in res.records if r["kind"] == "target"]
    if targets:
        lines += ["Targets:", ""] + md_table(["target", "measured", "ratio", "verdict"], targets)
    return lines


def render_summary(results: list[SectionResult]) -> list[str]:
    """Each section's status and checks, then every target."""
    rows = [[r.title, r.status, f"{r.seconds:.0f}", count_checks(r.records)] for r in results]
    lines = md_table(["section", "status", "time (s)", "checks"], rows)
    targets = [
        [r.name, *target_cells(t)] for r in results for t in r.records if t["kind"] == "target"
    ]
    if targets:
        lines += md_table(["section", "target", "measured", "ratio", "verdict"], targets)
    return lines


def render(env: list[tuple[str, str]], results: list[SectionResult], smoke: bool) -> str:
    title = "dkl GPU check" + (" (smoke run: tiny sizes, not a measurement)" if smoke else "")
    lines = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in env] + ["", "## Summary", ""]
    lines += render_summary(results)
    for r in results:
        lines += render_section(r)
    return "\n".join(lines)


def device_slug(device: torch.device, smoke: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return f"smoke_{slug}" if smoke else slug
