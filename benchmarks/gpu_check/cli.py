"""The command line: the time budget shared out, each section run (in a child process of its own
on a GPU), the report written after each."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import START
from . import __doc__ as DESCRIPTION
from .core import BENCHMARKS, ENTRY, child_env, first_line, log, run_in_session
from .report import SectionResult, Sink, device_slug, environment, render, render_summary
from .sections import SECTIONS


def run_child_section(name: str, out_path: str, until: float, smoke: bool, backend: str) -> int:
    """Entry of a child process: one section, its records streamed to ``out_path``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with open(out_path, "a") as stream:
        sink = Sink(stream)
        try:
            section = SECTIONS[name]
            section.run(sink, section.context(device, smoke, until, backend))
            return 0
        except Exception:  # noqa: BLE001  (the parent reports it)
            traceback.print_exc()
            return 3  # "the section raised" to the parent


def run_section(name: str, budget: float, args, device: torch.device) -> SectionResult:
    section = SECTIONS[name]
    title = section.title
    log(f"section {title}: budget {budget:.0f} s")
    until = time.time() + budget
    t0 = time.time()
    if not args.isolate:
        sink = Sink()
        try:
            section.run(sink, section.context(device, args.smoke, until, args.backend))
            status = "ok"
        except Exception as exc:  # noqa: BLE001  (the section's failure is a report line)
            tb = traceback.format_exc().strip().splitlines()[-6:]
            sink.text("```\n" + "\n".join(tb) + "\n```")
            status = f"error: {first_line(exc)}"
        return SectionResult(name, title, sink.records, status, time.time() - t0, budget)

    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = Path(tmp) / "records.jsonl", Path(tmp) / "stderr.txt"
        out_path.touch()
        cmd = [
            sys.executable,
            str(ENTRY),
            "--child",
            name,
            "--child-out",
            str(out_path),
            "--until",
            repr(until),
            "--backend",
            args.backend,
        ]
        if args.smoke:
            cmd.append("--smoke")
        grace = 10.0  # a child stops itself at its deadline; this is for one that hangs
        with open(err_path, "w") as err:
            note = run_in_session(cmd, budget + grace, stderr=err, env=child_env(device))
        if note == "exit 0":
            status = "ok"
        elif note.startswith("timed out"):
            status = f"killed at its time budget ({budget:.0f} s + {grace:.0f} s)"
        elif note == "exit 3":
            status = "error: the section raised (traceback below)"
        else:
            status = f"crashed ({note})"
        records = []
        for line in out_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                records.append(json.loads(line))
        if status != "ok":
            tail = err_path.read_text(errors="replace").strip().splitlines()[-12:]
            if tail:
                records.append(
                    {"kind": "text", "text": "stderr (tail):\n\n```\n" + "\n".join(tail) + "\n```"}
                )
    return SectionResult(name, title, records, status, time.time() - t0, budget)


def parse_args(argv):
    p = argparse.ArgumentParser(description=DESCRIPTION.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU (seconds)")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=440.0,
        help="seconds for the whole run, shared by the sections (default 440)",
    )
    p.add_argument(
        "--results-dir",
        help="where gpu_check_<device>.md is written (default benchmarks/results; with --smoke "
        "the system's temporary folder)",
    )
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="each section in a child process (default on a GPU)",
    )
    iso.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        p.error(f"--sections: expected names from {','.join(SECTIONS)}, got {args.sections!r}")
    args.sections = names
    if not args.budget > 0:
        p.error(f"--budget: expected seconds > 0, got {args.budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        code = run_child_section(args.child, args.child_out, args.until, args.smoke, args.backend)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no interpreter teardown: it can wait on compile workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print(
            "No CUDA device: the full check needs a GPU. Run with --smoke for the tiny CPU "
            "version (it checks the script, measures nothing).",
            flush=True,
        )
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel at tiny sizes: cheap
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if args.isolate is None:
        args.isolate = device.type == "cuda"

    env = environment(device, args)
    results_dir = args.results_dir or (
        Path(tempfile.gettempdir()) if args.smoke else BENCHMARKS / "results"
    )
    path = Path(results_dir) / f"gpu_check_{device_slug(device, args.smoke)}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"{env[0][1]}; report -> {path}")
    results: list[SectionResult] = []
    end = START + args.budget
    for i, name in enumerate(args.sections):
        shares = [SECTIONS[n].share for n in args.sections[i:]]
        budget = (end - time.time()) * shares[0] / sum(shares)
        if budget < 10:
            skipped = "skipped: the time budget is spent"
            results.append(SectionResult(name, SECTIONS[name].title, [], skipped, 0, 0))
            continue
        results.append(run_section(name, budget, args, device))
        path.write_text(render(env, results, args.smoke))  # after each section: a partial report
    report = render(env, results, args.smoke)
    path.write_text(report)
    print("\n" + report, flush=True)
    # the summary once more: a log's tail is often all that is read
    print("\n".join(["", f"## Summary ({env[0][1]})", "", *render_summary(results)]), flush=True)
    log(f"done in {time.time() - START:.0f} s; report: {path}")
    failed = any(r.status != "ok" for r in results) or any(
        x["kind"] == "check" and x["ok"] is False for r in results for x in r.records
    )
    return 1 if failed else 0
