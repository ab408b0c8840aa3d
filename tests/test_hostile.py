"""Hostile inputs, round 2: each is refused with one line naming the key or the file, or gives a
result checked against an independent oracle (hashlib, zipfile, the numbers written).

Classes: config values out of range or of the wrong type, combinations that cannot do what they
say, duplicate YAML keys, run names that are paths, two runs of one folder, damaged / foreign /
changed checkpoint files, failing writes, data that cannot mean what it says, the small command
line ones (``--version``, a closed pipe).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import subprocess
import sys
import textwrap
import time
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dkl
from dkl._files import sniff
from dkl.api import train
from dkl.cli import main
from dkl.config import ConfigError, config_warnings, load_config
from dkl.data import build_datasets
from dkl.models import load_weights
from dkl.train import CheckpointError, load_checkpoint
from dkl.train import checkpoint as ckpt

QUIET = ["train.progress=false", "train.plot=false", "train.threads=1"]
TINY = {
    "recipe": "distill",
    "name": "tiny",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "optim": {"name": "sgd", "lr": 0.1},
    "sched": {"name": "cosine"},
    "train": {"epochs": 1, "max_steps_per_epoch": 3, "deterministic": True},
    "distill": {"method": "ce"},
}
SRC = str(Path(dkl.__file__).resolve().parents[1])
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _cfg(path: Path, *overrides: str):
    return load_config(path, [f"train.out_dir={path.parent / 'runs'}", *QUIET, *overrides])


def _cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def _line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("dkl: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run(tmp_path: Path, *overrides: str, **kw) -> Path:
    cfg = _cfg(tmp_path / "tiny.yaml", *overrides)
    train(cfg, log=lambda m: None, **kw)
    return cfg.run_dir


# --------------------------------------------------------------------------------------------
# Config values: one range per key, checked at load, with the key, the value and the range
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("sched.gamma=-0.1", "sched.gamma: must be in (0, 1], got -0.1"),
        ("sched.gamma=0", "sched.gamma: must be in (0, 1], got 0.0"),
        ("sched.min_lr_ratio=-0.5", "sched.min_lr_ratio: must be in [0, 1], got -0.5"),
        ("sched.warmup=-1", "sched.warmup: must be a finite number >= 0, got -1.0"),
        ("sched.total=-5", "sched.total: must be a finite number >= 0, got -5.0"),
        ("sched.cycles=.nan", "sched.cycles: must be in (0, 0.5], got nan"),
        ("sched.cycles=2", "sched.cycles: must be in (0, 0.5], got 2.0"),
        ("sched.warmup_start=3", "sched.warmup_start: must be in [0, 1], got 3.0"),
        ("sched.milestones=[5, -1]", "sched.milestones[1]: must be >= 0, got -1"),
        ("sched.offset=.inf", "sched.offset: must be a finite number (float32), got inf"),
        ("distill.temperature=1e-39", "distill.temperature: must be in [0.001, 10000], got 1e-39"),
        ("distill.temperature=0", "distill.temperature: must be in [0.001, 10000], got 0.0"),
        (
            "distill.weight_temperature=.inf",
            "distill.weight_temperature: must be in [0.001, 10000]",
        ),
        ("distill.prior_temperature=.inf", "distill.prior_temperature: must be 0 ("),
        ("distill.beta=1e39", "distill.beta: must be a finite number >= 0, got 1e+39"),
        ("distill.ce_weight=-1", "distill.ce_weight: must be a finite number >= 0, got -1.0"),
        ("distill.label_fraction=0", "distill.label_fraction: must be in (0, 1], got 0.0"),
        ("distill.prior_momentum=1.5", "distill.prior_momentum: must be in (0, 1], got 1.5"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0, 1), got 1.0"),
        ("optim.betas=[0.9]", "optim.betas: must be [beta1, beta2], got [0.9]"),
        ("seed=-1", "seed: must be in [0, 9223372036854775807], got -1"),
        ("train.device=gpu", "train.device: must be auto, cpu, cuda, cuda:N, mps or xpu"),
        ("train.grad_clip=.nan", "train.grad_clip: must be a finite number >= 0, got nan"),
        ("data.mean=[.nan]", "data.mean[0]: must be a finite number (float32), got nan"),
        ("train.log_every=-3", "train.log_every: must be >= 0, got -3"),
    ],
)
def test_a_value_out_of_range_names_key_value_and_range(cfg_file, capsys, override, expect):
    code, err = _cli(capsys, "train", cfg_file, override, "--out", cfg_file.parent / "r", *QUIET)
    assert code == 2 and expect in _line(err)
    assert not (cfg_file.parent / "r").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("recipe", "override", "expect"),
    [
        ("semisup", "semisup.threshold=1.5", "semisup.threshold: must be in [0, 1], got 1.5"),
        ("semisup", "semisup.unsup_warmup=2", "semisup.unsup_warmup: must be in [0, 1], got 2.0"),
        ("semisup", "semisup.pl_temperature=1e-39", "semisup.pl_temperature: must be in [0.001"),
        ("semisup", "semisup.ema_momentum=1", "semisup.ema_momentum: must be in [0, 1), got 1.0"),
        ("semisup", "semisup.uratio=0", "semisup.uratio: must be >= 1, got 0"),
        (
            "adversarial",
            "adversarial.prior_temperature=.inf",
            "adversarial.prior_temperature: must be in [0.001, 10000], got inf",
        ),
        ("adversarial", "adversarial.attack.eps=2", "adversarial.attack.eps: must be in [0, 1]"),
        ("adversarial", "adversarial.ema.tau=1", "adversarial.ema.tau: must be in [0, 1), got 1.0"),
    ],
)
def test_recipe_sections_follow_the_same_rule(recipe, override, expect):
    with pytest.raises(ConfigError) as e:
        load_config({"recipe": recipe, "name": "x"}, [override])
    assert str(e.value).startswith(expect) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("distill.temperature=null", "distill.temperature: expected float, got None"),
        ("distill.temperature='4'", "distill.temperature: expected float, got '4' (a string"),
        ("distill.temperature=[1, 2]", "distill.temperature: expected float, got [1, 2]"),
        ("sched.milestones=[a]", "sched.milestones[0]: expected int | float, got 'a'"),
        ("optim.betas=[x, 0.9]", "optim.betas[0]: expected float, got 'x'"),
        ("data.crop_scale=[a, 1]", "data.crop_scale[0]: expected float, got 'a'"),
        ("train.epochs=null", "train.epochs: expected int, got None"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_key(cfg_file, capsys, override, expect):
    code, err = _cli(capsys, "show", cfg_file, override)
    assert code == 2 and expect in _line(err)


def test_numbers_in_yaml_1_2_form_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY) + "seed: 1e3\n")
    cfg = load_config(path, ["optim.lr=5e-4", "optim.weight_decay=1E-5"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.seed) == (0.0005, 1e-05, 1000)


def _numeric_keys(cls, prefix: str):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or str(tp).startswith("list[int") or str(tp) == "list[float]":
            yield f"{prefix}{f.name}" + ("[]" if str(tp).startswith("list") else "")


def test_every_numeric_key_of_every_section_has_a_range():
    from dkl.config import RANGES
    from dkl.config.schema import BUILTIN_SECTIONS, COMMON_SECTIONS

    keys = [
        k
        for n, c in {**COMMON_SECTIONS, **BUILTIN_SECTIONS}.items()
        for k in _numeric_keys(c, f"{n}.")
    ]
    assert len(keys) > 70
    # data.channels is one of 0, 1, 3 (DataConfig.validate), not a range
    assert [k for k in keys if k not in RANGES] == ["data.channels"]


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("data.image_size=-2", "data.image_size: must be >= 0, got -2"),
        ("data.crop_padding=-3", "data.crop_padding: must be >= -1, got -3"),
        ("data.crop_scale=[0, 1]", "data.crop_scale[0]: must be in (0, 1], got 0.0"),
        ("data.crop_scale=[0.9, 0.1]", "data.crop_scale: expected [lo, hi] with lo <= hi"),
        ("data.ra_magnitude=31", "data.ra_magnitude: must be in [0, 30], got 31"),
        ("data.val_fraction=1", "data.val_fraction: must be in (0, 1), got 1.0"),
    ],
)
def test_data_keys_follow_the_same_rule(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config("kd/digits_ikl", [override])
    assert str(e.value).startswith(expect)


def test_a_custom_recipe_section_gets_the_finite_rule():
    from dataclasses import dataclass

    from dkl.config import register_recipe_config

    @dataclass
    class Mine:
        weight: float = 1.0

    register_recipe_config("hostile_custom", Mine)
    with pytest.raises(ConfigError, match=r"^hostile_custom\.weight: must be a finite number"):
        load_config({"recipe": "hostile_custom", "hostile_custom": {"weight": float("inf")}})


# --------------------------------------------------------------------------------------------
# Combinations that cannot do what they say: one warning line naming the keys
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["train.epochs=5", "distill.method=ikl", "distill.warmup=20"], ["distill.warmup"]),
        (["train.epochs=5", "sched.warmup=5"], ["sched.warmup", "train.epochs=5"]),
        (["train.epochs=5", "sched.total=3"], ["sched.total=3", "train.epochs=5"]),
        (
            ["train.epochs=5", "sched.name=multistep", "sched.milestones=[2, 5, 9]"],
            ["sched.milestones [5, 9]", "train.epochs=5"],
        ),
    ],
)
def test_a_combination_that_cannot_reach_its_target_warns_naming_the_keys(
    cfg_file, overrides, keys
):
    warnings = config_warnings(_cfg(cfg_file, *overrides))
    assert len(warnings) == 1 and all(k in warnings[0] for k in keys), warnings


@pytest.mark.parametrize(
    ("recipe", "overrides", "keys"),
    [
        ("distill", ["distill.method=kd", "distill.gi=true"], ["distill.gi", "method=kd"]),
        ("semisup", ["semisup.threshold=1"], ["semisup.threshold=1", "fixmatch_ikl"]),
        # an iteration run: a shorter epoch or fewer epochs ran the full 2,000 iterations
        (
            "semisup",
            ["train.iterations=2000", "train.epochs=1"],
            ["train.epochs=1 does not shorten the run", "train.iterations=2000"],
        ),
        (
            "semisup",
            ["train.iterations=2000", "train.max_steps_per_epoch=3"],
            ["train.max_steps_per_epoch=3 does not shorten the run"],
        ),
    ],
)
def test_a_setting_that_would_be_ignored_warns(recipe, overrides, keys):
    warnings = config_warnings(load_config({"recipe": recipe, "name": "x"}, overrides))
    assert len(warnings) == 1 and all(k in warnings[0] for k in keys), warnings


def test_the_ramp_warning_gives_the_share_reached_and_the_run_logs_it(cfg_file):
    logs: list[str] = []
    cfg = _cfg(cfg_file, "train.epochs=1")
    cfg.distill.method, cfg.distill.warmup = "dkd", 4.0
    assert "ramps to only 25% of its weight" in config_warnings(cfg)[0]  # min(1 / 4, 1)
    cfg.distill.method = "ce"  # the trainer logs what config_warnings says (no teacher needed)
    cfg.sched.warmup = 3.0
    train(cfg, log=logs.append)
    assert any(m.startswith("warning: sched.warmup=3 epochs") for m in logs)


def test_show_prints_warnings_on_stderr_only(cfg_file, capsys):
    code = main(["show", str(cfg_file), "train.epochs=2", "sched.warmup=4"])
    out, err = capsys.readouterr()
    assert code == 0 and "dkl: warning: sched.warmup=4" in err and "dkl: warning" not in out
    assert yaml.safe_load(out)["sched"]["warmup"] == 4.0


def test_a_consistent_config_has_no_warning(cfg_file):
    assert config_warnings(_cfg(cfg_file, "train.epochs=30", "sched.warmup=5")) == []


# --------------------------------------------------------------------------------------------
# YAML: a key or section written twice is an error with both line numbers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("seed: 1\nname: a\nseed: 2\n", "'seed'", (1, 3)),
        ("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "'optim.lr'", (2, 4)),
        ("train:\n  epochs: 3\noptim:\n  lr: 0.1\ntrain:\n  epochs: 9\n", "'train'", (1, 5)),
        ("data: {name: digits, name: npz}\n", "'data.name'", (1, 1)),
    ],
    ids=["top-level", "nested", "section-twice", "flow-mapping"],
)
def test_a_key_written_twice_is_an_error_naming_it_and_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"key {key} is written twice (lines {lines[0]} and {lines[1]})" in msg
    assert str(path) in msg and "\n" not in msg


def test_a_key_written_twice_in_a_base_file_is_found_there(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.3\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"base\.yaml'.*'optim\.lr' is written twice"):
        load_config(tmp_path / "run.yaml")


def test_an_alias_bomb_and_deep_nesting_are_one_line_and_quick(tmp_path):
    rows = ["model:", "  name: mlp", "  kwargs:", "    a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    rows += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\n")  # 10^9 values once expanded
    start = time.time()
    with pytest.raises(ConfigError, match=r"bomb\.yaml': expands to more than 100,000 values"):
        load_config(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml': nested too deeply"):
        load_config(deep)
    assert time.time() - start < 30


def test_a_whole_number_beyond_64_bits_is_refused():
    with pytest.raises(ConfigError, match=r"^data\.batch_size: must be > 0 and fit in 64 bits"):
        load_config("kd/digits_ikl", [f"data.batch_size={10**23}"])


def test_a_binary_file_given_as_config_says_what_it_is(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path)
    code, err = _cli(capsys, "train", path)
    line = _line(err)
    assert code == 2 and str(path) in line and "expected a YAML file" in line
    assert "torch" in line


# --------------------------------------------------------------------------------------------
# Run names are names; one live run per folder; no run's results lost
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", " ", "/", "..", ".", "a/b", "../escape", "a\\b", "x\ny", "n" * 300]
)
def test_a_run_name_that_is_a_path_is_refused(cfg_file, capsys, name):
    out = cfg_file.parent / "out"
    code, err = _cli(capsys, "train", cfg_file, f"name={name!r}", "--out", out, *QUIET)
    assert code == 2 and "name: must be a run name" in _line(err)
    assert sorted(p.name for p in cfg_file.parent.iterdir()) == ["tiny.yaml"]


def test_a_config_edited_in_python_meets_the_same_rule(cfg_file):
    cfg = _cfg(cfg_file)
    cfg.name = "../outside"
    with pytest.raises(ConfigError, match=r"^name: must be a run name"):
        train(cfg, log=lambda m: None)
    cfg.name, cfg.sched.gamma = "tiny", -1.0
    with pytest.raises(ConfigError, match=r"^sched\.gamma: must be in \(0, 1\], got -1\.0"):
        train(cfg, log=lambda m: None)
    assert not (cfg_file.parent / "outside").exists() and not (cfg_file.parent / "runs").exists()


def test_a_folder_locked_by_a_live_process_is_refused_and_a_killed_one_leaves_no_lock(
    cfg_file, capsys
):
    run = cfg_file.parent / "runs" / "tiny"
    holder = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from dkl.train.rundir import RunLock
        lock = RunLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code, err = _cli(capsys, "train", cfg_file, "--out", run.parent, *QUIET)
        line = _line(err)
        assert code == 2 and f"'{run}' is in use by a live process (pid {proc.pid})" in line
        assert not (run / "last.pt").exists()
    finally:
        proc.kill()  # SIGKILL: no clean-up runs in the holder
        proc.wait()
    assert (run / ".lock").exists()  # the file stays; the lock went with the process
    code, err = _cli(capsys, "train", cfg_file, "--out", run.parent, *QUIET)
    assert code == 0, err
    assert (run / "final.pt").is_file()


def test_a_finished_run_is_not_replaced_without_overwrite(cfg_file, capsys):
    run = _run(cfg_file.parent)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, err = _cli(capsys, "train", cfg_file, "seed=5", "--out", run.parent, *QUIET)
    line = _line(err)
    assert code == 2 and f"'{run}' already holds a finished run" in line
    assert "train.overwrite=true" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    code, _ = _cli(capsys, "train", cfg_file, "seed=5", "train.overwrite=true", "--out",
                   run.parent, *QUIET)  # fmt: skip
    assert code == 0
    assert load_checkpoint(run / "final.pt")["config"]["seed"] == 5


def test_overwrite_removes_the_previous_runs_files(cfg_file):
    run = _run(cfg_file.parent)
    (run / "robust.json").write_text("{}")
    _run(cfg_file.parent, "train.overwrite=true", "train.keep_best=false")
    assert not (run / "best.pt").exists() and not (run / "robust.json").exists()


def test_two_runs_of_one_name_started_together_never_both_succeed(cfg_file):
    out = cfg_file.parent / "runs"
    cmd = [sys.executable, "-m", "dkl", "train", str(cfg_file), "--out", str(out), *QUIET,
           "train.epochs=3", "train.max_steps_per_epoch=20"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by a live process" in refused or "already holds" in refused
    assert (out / "tiny" / "final.pt").is_file()


# --------------------------------------------------------------------------------------------
# Checkpoint files: hashed, verified, one line naming the file and the problem
# --------------------------------------------------------------------------------------------


def _storage_offsets(path: Path) -> list[tuple[str, int, int]]:
    """``(name, offset of the first data byte, size)`` of each tensor storage in a torch zip."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            f.seek(info.header_offset + 26)
            n_name, n_extra = (
                int.from_bytes(f.read(2), "little"),
                int.from_bytes(f.read(2), "little"),
            )
            out.append((info.filename, info.header_offset + 30 + n_name + n_extra, info.file_size))
    return out


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    )


def test_every_file_a_run_writes_records_a_hash_that_matches_its_content(cfg_file):
    run = _run(cfg_file.parent)
    for name in ("last.pt", "best.pt", "final.pt"):
        raw = torch.load(run / name, weights_only=True)
        assert isinstance(raw["sha256"], str) and len(raw["sha256"]) == 64
        # the oracle: a byte-by-byte flip of any storage is caught (below); here, the stored hash
        # changes when any tensor changes
        raw["model"][next(iter(raw["model"]))].add_(1)
        torch.save(raw, run / "edited.pt")
        with pytest.raises(CheckpointError, match="is damaged"):
            load_checkpoint(run / "edited.pt")


def test_a_flipped_byte_in_any_tensor_of_last_pt_refuses_the_resume(cfg_file, capsys):
    run = _run(cfg_file.parent)
    last = run / "last.pt"
    pristine = last.read_bytes()
    original = torch.load(last, weights_only=True)
    storages = _storage_offsets(last)
    assert len(storages) >= 4  # model, optimiser momenta, RNG states
    for name, offset, size in storages:
        last.write_bytes(pristine)
        _flip(last, offset + size // 2)
        silently = torch.load(last, weights_only=True)  # torch itself does not notice
        assert not _same(silently, original), name
        code, err = _cli(capsys, "train", cfg_file, "train.epochs=2", "--resume", "--out",
                         run.parent, *QUIET)  # fmt: skip
        line = _line(err)
        assert code == 2 and f"'{last}' is damaged" in line, name
        assert "weights_only=False" not in line


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_flipped_byte_in_the_pickled_part_never_loads_changed_content(tmp_path):
    path = tmp_path / "c.pt"
    obj = {"engine": {"epoch": 3, "lr": 0.0123456, "best": {"top1": 91.25}}, "w": torch.ones(2)}
    ckpt.save_checkpoint(obj, path)
    pristine = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, e = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    begin = info.header_offset + 30 + n + e
    for i in range(begin, begin + info.file_size):
        path.write_bytes(pristine)
        _flip(path, i)
        try:
            got = load_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            continue
        got.pop("sha256"), got.pop("hashed")
        assert _same(got, obj), f"byte {i - begin} of data.pkl changed the content silently"


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (
            lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
            "truncated or damaged",
        ),
        (lambda p: p.write_bytes(random.Random(1).randbytes(3000)), "not a torch checkpoint"),
        (lambda p: p.write_bytes(PNG), "it is a PNG image, not a torch checkpoint"),
        (lambda p: p.write_text("model: {name: mlp}\n"), "it is text, not a torch checkpoint"),
        (
            lambda p: (
                np.savez(p.with_suffix(".npz"), x=np.zeros(3)) or p.with_suffix(".npz").rename(p)
            ),
            "written by numpy.savez (a NumPy .npz), not a torch checkpoint",
        ),
    ],
    ids=["empty", "truncated", "random", "png", "yaml", "npz"],
)
@pytest.mark.parametrize("use", ["eval", "resume", "teacher", "model.checkpoint"])
def test_a_bad_checkpoint_is_one_line_naming_the_file_wherever_it_is_used(
    cfg_file, capsys, make, expect, use
):
    run = _run(cfg_file.parent)
    target = run / ("last.pt" if use == "resume" else "final.pt")
    make(target)
    out = ["--out", run.parent, *QUIET]
    argv = {
        "eval": ["eval", target],
        "resume": ["train", cfg_file, "train.epochs=2", "--resume", *out],
        "teacher": ["train", cfg_file, "name=student", "distill.method=kd",
                    f"distill.teacher.checkpoint={target}", *out],
        "model.checkpoint": ["train", cfg_file, "name=init", f"model.checkpoint={target}", *out],
    }[use]  # fmt: skip
    code, err = _cli(capsys, *argv)
    line = _line(err)
    assert code == 2 and str(target) in line and expect in line
    assert "weights_only=False" not in line


def test_a_legacy_torch_file_loads_and_a_folder_is_named(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(tmp_path / "old.pt")["w"], torch.tensor([0.0, 1.0, 2.0]))
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"dir\.pt' is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path / "dir.pt")


def test_only_a_refused_pickled_object_mentions_weights_only_false(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo never",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload()}, path)
    for load in (load_checkpoint, lambda p: load_weights(torch.nn.Linear(1, 1), p)):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert "refused unread" in msg and "system)" in msg and "weights_only=False" in msg


def test_a_checkpoint_without_a_hash_still_loads_and_resumes(cfg_file):
    run = _run(cfg_file.parent)
    for name in ("last.pt", "final.pt"):  # as written before checkpoints carried a hash
        state = torch.load(run / name, weights_only=True)
        for key in ("sha256", "hashed", "made_from", "data"):
            state.pop(key)
        torch.save(state, run / name)
    assert "model" in load_checkpoint(run / "final.pt")
    _run(cfg_file.parent, "train.epochs=2", resume=True)
    assert load_checkpoint(run / "last.pt")["engine"]["epoch"] == 3


def test_a_student_records_its_teachers_hash_and_refuses_a_changed_teacher(cfg_file, capsys):
    root = cfg_file.parent
    teacher = _run(root, "name=teacher") / "final.pt"
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()  # the oracle: hashlib, on the bytes
    student = _run(root, "name=student", "distill.method=kd",
                   f"distill.teacher.checkpoint={teacher}")  # fmt: skip
    for name in ("last.pt", "best.pt", "final.pt"):
        made = load_checkpoint(student / name)["made_from"]
        assert made == {"distill.teacher.checkpoint": {"path": str(teacher), "sha256": digest}}
    _run(root, "name=teacher", "seed=7", "train.overwrite=true")  # retrained in place
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() != digest
    code, err = _cli(capsys, "train", cfg_file, "name=student", "distill.method=kd",
                     f"distill.teacher.checkpoint={teacher}", "train.epochs=2", "--resume",
                     "--out", root / "runs", *QUIET)  # fmt: skip
    line = _line(err)
    assert code == 2 and f"the teacher file '{teacher}'" in line
    assert "changed since the run started" in line and digest[:12] in line


def test_a_resume_on_other_data_names_the_data_not_the_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "mine.npz"
    np.savez(data, x=rng.random((60, 8, 8)), y=np.arange(60) % 3)
    base = {**TINY, "data": {"name": "npz", "root": str(data), "batch_size": 16}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(base))
    train(_cfg(path), log=lambda m: None)
    np.savez(data, x=rng.random((80, 8, 8)), y=np.arange(80) % 4)  # replaced in place
    code, err = _cli(capsys, "train", path, "train.epochs=2", "--resume", "--out",
                     tmp_path / "runs", *QUIET)  # fmt: skip
    line = _line(err)
    assert code == 2 and "the data changed" in line and f"data.root='{data}'" in line
    assert "num classes 3 -> 4" in line and "model.name" not in line


def test_a_teacher_with_nan_weights_is_refused_naming_the_file(cfg_file, capsys):
    teacher = _run(cfg_file.parent, "name=teacher") / "final.pt"
    state = load_checkpoint(teacher)
    first = next(iter(state["model"]))
    state["model"][first][0].fill_(float("nan"))
    ckpt.save_checkpoint({k: v for k, v in state.items() if k not in ("sha256", "hashed")}, teacher)
    code, err = _cli(capsys, "train", cfg_file, "name=student", "distill.method=kd",
                     f"distill.teacher.checkpoint={teacher}", "--out", teacher.parents[1], *QUIET)  # fmt: skip
    line = _line(err)
    assert code == 2 and f"'{teacher}' holds NaN or inf weights ('{first}')" in line


def test_a_registered_data_set_with_nan_pixels_is_refused_up_front():
    from dkl.data import ImageSplits, TensorImageDataset, register_dataset
    from dkl.data.datasets import _REGISTRY

    x = torch.rand(8, 1, 2, 2)
    x[5, 0, 1, 0] = float("nan")
    sets = TensorImageDataset(x, torch.arange(8) % 2)

    register_dataset("hostile_nan")(lambda request: ImageSplits(sets, sets, 2))
    try:
        with pytest.raises(ValueError, match=r"training images: 1 value\(s\) are NaN or inf, the "
                           r"first at index \(5, 0, 1, 0\) \(image 5\)"):  # fmt: skip
            build_datasets("hostile_nan", mean=[0.5], std=[0.5])
    finally:
        del _REGISTRY["hostile_nan"]


@pytest.mark.parametrize("base", ["5", "[a.yaml, null]", "{x: 1}"])
def test_a_base_that_is_not_a_name_is_one_line(tmp_path, base):
    (tmp_path / "c.yaml").write_text(f"_base_: {base}\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"_base_: expected a preset name or path"):
        load_config(tmp_path / "c.yaml")


def test_an_old_checkpoint_on_other_data_blames_the_data(tmp_path, capsys):
    """Without the data record (an older checkpoint), a head of another class count still
    points at the data, not at the model."""
    rng = np.random.default_rng(2)
    data = tmp_path / "mine.npz"
    np.savez(data, x=rng.random((60, 8, 8)), y=np.arange(60) % 3)
    base = {**TINY, "data": {"name": "npz", "root": str(data), "batch_size": 16}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    run = _run(tmp_path)
    state = torch.load(run / "last.pt", weights_only=True)
    for key in ("sha256", "hashed", "data"):
        state.pop(key)
    torch.save(state, run / "last.pt")
    np.savez(data, x=rng.random((60, 8, 8)), y=np.arange(60) % 5)
    code, err = _cli(capsys, "train", tmp_path / "tiny.yaml", "train.epochs=2", "--resume",
                     "--out", tmp_path / "runs", *QUIET)  # fmt: skip
    line = _line(err)
    assert code == 2 and "the data has 5 classes, the checkpoint's model 3" in line
    assert "data.root" in line and "model.kwargs" not in line


def test_eval_on_other_data_names_the_data(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "three.npz", x=rng.random((60, 8, 8)), y=np.arange(60) % 3)
    np.savez(tmp_path / "four.npz", x=rng.random((60, 8, 8)), y=np.arange(60) % 4)
    base = {**TINY, "data": {"name": "npz", "root": str(tmp_path / "three.npz"), "batch_size": 16}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    run = _run(tmp_path)
    code, err = _cli(capsys, "eval", run, f"data.root={tmp_path / 'four.npz'}")
    line = _line(err)
    assert code == 2 and "was trained on other data" in line and "num classes 3 -> 4" in line


def test_running_out_of_memory_is_one_line(cfg_file, capsys, monkeypatch):
    from dkl import models

    def huge(*a, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8e12")

    monkeypatch.setattr(models, "create_model", huge)
    code, err = _cli(capsys, "train", cfg_file, "--out", cfg_file.parent / "r", *QUIET)
    line = _line(err)
    assert code == 1 and line.startswith("dkl: error: out of memory (") and "batch_size" in line


# --------------------------------------------------------------------------------------------
# A write that fails (disk full, quota) mid-way: one line, the previous files intact
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("victim", ["last.pt", "metrics.jsonl", "summary.json", "config.yaml"])
def test_a_write_that_fails_midway_keeps_the_previous_files(
    cfg_file, capsys, monkeypatch, code, victim
):
    run = _run(cfg_file.parent, "train.save_every=1")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            room = max(10 - self.written, 0)
            if len(b) > room:  # some bytes go out, then the disk is full
                self.f.write(bytes(b)[:room])
                self.written = 10
                raise OSError(code, os.strerror(code))
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opening(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        return Failing(f) if f"{victim}.tmp" in str(file) and "w" in mode else f

    monkeypatch.setattr("builtins.open", opening)
    argv = ["train", cfg_file, "train.epochs=2", "--resume", "--out", run.parent, *QUIET]
    status, err = _cli(capsys, *argv)
    line = _line(err)
    assert status == 1 and victim in line and os.strerror(code) in line
    monkeypatch.undo()
    for name, data in before.items():
        if name == victim or victim == "config.yaml":
            assert (run / name).read_bytes() == data, name
    assert not [p for p in run.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------------------------
# Data that cannot mean what it says
# --------------------------------------------------------------------------------------------


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _build(root: Path, **kw):
    return build_datasets("npz", root=str(root), **kw)


@pytest.mark.parametrize("name", ["npz", "imagefolder"])
def test_options_a_source_does_not_take_are_refused_not_ignored(tmp_path, name):
    with pytest.raises(
        ValueError, match=rf"data '{name}' takes no data.options, got \['image_key'\]"
    ):
        build_datasets(name, root=str(tmp_path), options={"image_key": "x"})


def test_one_class_is_refused(tmp_path):
    path = _npz(tmp_path / "one.npz", x=np.zeros((10, 4, 4)), y=np.zeros(10, int))
    with pytest.raises(ValueError, match=r"data 'npz': 1 class; a classifier needs at least 2"):
        _build(path)


def test_an_image_folder_with_one_class_is_refused(tmp_path):
    from PIL import Image

    for i in range(10):
        (tmp_path / "only").mkdir(exist_ok=True)
        Image.new("L", (4, 4), i * 20).save(tmp_path / "only" / f"{i}.png")
    with pytest.raises(ValueError, match=r"1 class \('only'\); a classifier needs at least 2"):
        build_datasets("imagefolder", root=str(tmp_path))


@pytest.mark.parametrize("labels", [[0, 5, 9], [3, 4], [1, 2, 7]])
def test_labels_with_gaps_name_the_missing_classes(tmp_path, labels):
    y = np.array(labels * 10)
    path = _npz(tmp_path / "gaps.npz", x=np.zeros((len(y), 4, 4)), y=y)
    missing = sorted(set(range(max(labels) + 1)) - set(labels))  # the oracle
    with pytest.raises(ValueError) as e:
        _build(path)
    msg = str(e.value)
    listed = ", ".join(map(str, missing))
    assert f" {listed} ha" in msg and f"labels present: {', '.join(map(str, labels))}" in msg
    assert "np.unique(y, return_inverse=True)" in msg


def test_a_huge_label_is_refused_without_allocating_its_classes(tmp_path):
    path = _npz(tmp_path / "huge.npz", x=np.zeros((8, 4, 4)), y=np.array([0, 1] * 3 + [2**40] * 2))
    with pytest.raises(ValueError) as e:
        _build(path)
    msg = str(e.value)
    assert f"labels must be 0..{2**40}" in msg and f"(+{2**40 - 2 - 10} more)" in msg


def test_a_label_beyond_the_declared_classes_is_named():
    from dkl.data import ImageSplits, register_dataset
    from dkl.data.datasets import _REGISTRY

    @register_dataset("hostile_extra")
    def extra(request):
        train = [(torch.zeros(1, 2, 2), i % 3) for i in range(6)]
        return ImageSplits(train, [(torch.zeros(1, 2, 2), 1), (torch.zeros(1, 2, 2), 7)], 3)

    try:
        with pytest.raises(ValueError, match=r"test labels 7 lie outside 0\.\.2 \(3 classes\)"):
            build_datasets("hostile_extra", mean=[0.5], std=[0.5])
    finally:
        del _REGISTRY["hostile_extra"]


@pytest.mark.parametrize("edit", ['"std": [0.0]', '"mean": [NaN]', '"std": "x"', '"mean": []'])
def test_an_edited_statistics_cache_is_recomputed_not_used(tmp_path, edit):
    x = np.random.default_rng(3).random((40, 4, 4)).astype(np.float32)
    x_test = np.random.default_rng(4).random((8, 4, 4)).astype(np.float32)
    path = _npz(
        tmp_path / "d.npz", x=x, y=np.arange(40) % 2, x_test=x_test, y_test=np.arange(8) % 2
    )
    kw = {"mean": "auto", "std": "auto", "cache_dir": str(tmp_path)}
    _build(path, **kw)
    cache = tmp_path / "data_stats.json"
    text = cache.read_text()
    key = edit.split(":")[0]
    start = text.index(key)
    end = text.index("]", start) + 1
    cache.write_text(text[:start] + edit + text[end:])
    info = _build(path, **kw)[2]
    assert info.mean[0] == pytest.approx(float(x.astype(np.float64).mean()), rel=1e-6)
    assert info.std[0] == pytest.approx(float(x.astype(np.float64).std()), rel=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_pixel_names_the_image_and_index(tmp_path, bad):
    x = np.random.default_rng(0).random((12, 4, 4))
    x[7, 2, 3] = bad
    path = _npz(tmp_path / "nan.npz", x=x, y=np.arange(12) % 2)
    with pytest.raises(ValueError) as e:
        _build(path)
    msg = str(e.value)
    assert str(path) in msg and "'x'" in msg and "1 value(s) are NaN or inf" in msg
    assert "index (7, 0, 2, 3) (image 7)" in msg


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (PNG, "a PNG image"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "a JPEG image"),
        (b"", "an empty file (0 bytes)"),
        ("pickle", "a pickle"),
        ("npy", "a NumPy .npy array"),
        ("torch", "a zip archive written by torch.save"),
        ("text", "text"),
    ],
)
def test_a_file_of_another_format_given_as_npz_says_what_it_is(tmp_path, content, what):
    path = tmp_path / "data.npz"
    if content == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"x": [1, 2]}))
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 4)))
    elif content == "torch":
        torch.save({"x": torch.zeros(2)}, path)
    elif content == "text":
        path.write_text("x,y\n1,2\n")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        _build(path)
    msg = str(e.value)
    assert f"'{path}' is {what}" in msg and "numpy.savez" in msg and "\n" not in msg
    assert "pickled data" not in msg  # what numpy itself would have said


def test_an_empty_npz_is_one_line(tmp_path, capsys):
    path = tmp_path / "empty.npz"
    np.savez(path)
    assert sniff(path) == "an empty zip archive"
    with pytest.raises(ValueError, match=r"is an empty \.npz \(no arrays\)"):
        _build(path)
    path2 = _npz(tmp_path / "zero.npz", x=np.zeros((0, 4, 4)), y=np.zeros(0, int))
    with pytest.raises(ValueError, match=r"'x' holds no images \(shape \(0, 1, 4, 4\)\)"):
        _build(path2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {"name": "npz", "root": str(path)}}))
    code, err = _cli(capsys, "train", cfg, "--out", tmp_path / "r", *QUIET)
    assert code == 2 and "empty .npz" in _line(err)


# --------------------------------------------------------------------------------------------
# The command line: --version, a reader that goes away
# --------------------------------------------------------------------------------------------


def test_version_is_the_installed_distributions(capsys):
    try:
        expected = metadata.version("dkl")
    except metadata.PackageNotFoundError:
        expected = dkl.__version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dkl {expected}"


def test_a_closed_pipe_ends_quietly():
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-m", "dkl", "list"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_a_broken_pipe_in_process_is_not_an_error(capsys, monkeypatch):
    class Gone:
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["list"]) == 141
    assert capsys.readouterr().err == ""


def test_lock_is_released_after_a_failed_run(cfg_file):
    """A run that fails (divergence) releases its folder: the next attempt is not 'in use'."""
    with pytest.raises(Exception, match="diverged"):
        _run(cfg_file.parent, "optim.lr=1e6", "train.epochs=2", "train.max_steps_per_epoch=5")
    start = time.time()
    _run(cfg_file.parent, "train.overwrite=true")
    assert time.time() - start < 120


# --------------------------------------------------------------------------------------------
# Round 3: numbers YAML 1.1 reads in its own way, data with nothing to test on, devices,
# options a source, a model or a demo would have dropped, worker tracebacks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["010", "0755", "1e2", "12:30", "0x10", "1_000"])
def test_text_keys_keep_what_was_typed(cfg_file, text):
    """YAML 1.1 reads 010 as octal 8, 12:30 as 750: a run name or a folder given so went
    elsewhere than typed."""
    cfg = _cfg(cfg_file, f"name={text}", f"data.root={text}")
    assert cfg.name == text and cfg.data.root == text


@pytest.mark.parametrize(("text", "value"), [("010", 8), ("12:30", 750)])
def test_numbers_written_as_octal_or_base_60_are_refused(cfg_file, capsys, text, value):
    code, err = _cli(capsys, "show", cfg_file, f"train.epochs={text}")
    assert code == 2
    assert (
        f"train.epochs: expected a decimal number, got {text} (YAML 1.1 reads it as {value})"
        in (_line(err))
    )


def test_an_npz_with_nothing_to_test_on_is_one_line_before_training(tmp_path, capsys):
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 10
    np.savez(tmp_path / "empty_test.npz", x=x, y=y, x_test=x[:0], y_test=y[:0])
    np.savez(tmp_path / "one_per_class.npz", x=x[:10], y=y[:10])
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    for name, expect in (
        ("empty_test", "x_test / y_test hold no images"),
        ("one_per_class", "too few images per class to hold out data.val_fraction"),
    ):
        code, err = _cli(
            capsys,
            "train",
            tmp_path / "tiny.yaml",
            "data.name=npz",
            f"data.root={tmp_path / name}.npz",
            "--out",
            tmp_path / "r",
            *QUIET,
        )
        assert code == 2 and expect in _line(err)


def test_an_npz_label_beyond_int64_is_named_as_it_is(tmp_path):
    from dkl.data.sources import _labels_from_array

    y = np.array([0, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(ValueError, match="too large for a class \\(9223372036854775813\\)"):
        _labels_from_array(y, 2, tmp_path / "x.npz", "y")


@pytest.mark.parametrize("device", ["mps", "xpu"])
def test_a_device_this_machine_lacks_is_one_line(cfg_file, capsys, device):
    code, err = _cli(capsys, "train", cfg_file, f"train.device={device}", *QUIET)
    assert code == 2 and f"train.device: '{device}' requested but it is not available" in _line(err)


def test_digits_refuses_data_options(cfg_file, capsys):
    code, err = _cli(capsys, "train", cfg_file, "data.options={foo: 1}", *QUIET)
    assert code == 2 and "data 'digits' takes no data.options, got ['foo']" in _line(err)


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ("{hidden: [16.5]}", "Model 'mlp' option hidden: expected a list of ints, got [16.5]"),
        ("{hidden: [true]}", "Model 'mlp' option hidden: expected a list of ints, got [True]"),
    ],
)
def test_model_options_of_the_wrong_type_are_refused(cfg_file, capsys, kwargs, expect):
    code, err = _cli(capsys, "train", cfg_file, f"model.kwargs={kwargs}", *QUIET)
    assert code == 2 and expect in _line(err)


def test_a_data_error_in_a_loader_worker_is_its_own_line(tmp_path, capsys):
    """With data.num_workers >= 1 torch re-raises a worker's error with the worker's whole
    traceback in its message; the command prints the error's own line."""
    from PIL import Image

    for split, names in (("train", ("a", "b")), ("val", ("a", "b"))):
        for c in names:
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), color=40 * i).save(d / f"{i}.png")
    (tmp_path / "imgs" / "val" / "a" / "bad.png").write_bytes(PNG)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    code, err = _cli(
        capsys,
        "train",
        tmp_path / "tiny.yaml",
        "data.name=imagefolder",
        f"data.root={tmp_path / 'imgs'}",
        "data.num_workers=1",
        "data.batch_size=4",
        "--out",
        tmp_path / "r",
        *QUIET,
    )
    line = _line(err)
    assert code == 2 and "bad.png" in line and "Original Traceback" not in line


def test_demo_arguments_that_would_be_ignored_are_refused(tmp_path, capsys):
    code = main(["demo", "--epochs", "0", "--seeds", "1", "--out", str(tmp_path / "kd")])
    assert code == 2 and "train.epochs: must be >= 1" in capsys.readouterr().err
    code = main(["demo", "--recipe", "adversarial", "--adv-methods", "", "--out", str(tmp_path)])
    assert code == 2 and "no method" in capsys.readouterr().out + capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "robust", "demo"])
def test_commands_that_run_in_one_process_refuse_torchrun(capsys, monkeypatch, command, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = _cli(capsys, command, *(["--out", tmp_path] if command == "demo" else [tmp_path]))
    assert code == 2 and f"dkl {command} runs in one process, got WORLD_SIZE=2" in _line(err)


@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (ImportError("No module named 'transformers'", name="transformers"), "dkl[llm]"),
        (ImportError("No module named 'tokenizers'", name="tokenizers"), "dkl[llm]"),
        (ImportError("No module named 'timm'", name="timm"), "dkl[timm]"),
        (ImportError("No module named 'datasets'", name="datasets"), "dkl[hf]"),
    ],
)
def test_a_missing_optional_module_names_its_extra(error, expect):
    from dkl.cli import _user_error

    code, line = _user_error(error)
    assert code == 2 and f"pip install '{expect}'" in line and "[...]" not in line


def test_a_message_that_names_its_install_is_not_repeated():
    from dkl.cli import _user_error

    e = ImportError("data 'hf' needs Hugging Face datasets: pip install 'dkl[hf]'", name="datasets")
    assert _user_error(e) == (2, str(e))


@pytest.mark.parametrize(
    ("argv", "out"),
    [
        (["--recipe", "kd"], "runs/demo"),
        (["--recipe", "adversarial"], "runs/demo_adversarial"),
        (["--recipe", "semisup"], "runs/demo_ssl"),
        (["--recipe", "llm"], "runs/demo_llm"),
        (["--recipe", "llm", "--llm-mode", "on-policy"], "runs/demo_llm_onpolicy"),
    ],
)
def test_each_demo_has_its_own_default_folder(monkeypatch, argv, out):
    """`dkl demo` then `dkl demo --recipe llm` wrote the same runs/demo/results.*"""
    from dkl import cli

    seen = {}

    class Demo:
        @staticmethod
        def main(args):
            seen["out"] = args.out
            return 0

    args = cli._subparser("demo").parse_intermixed_args(argv)
    monkeypatch.setattr("dkl.demos.demo_module", lambda name: Demo)
    assert cli._run_demo(args) == 0 and seen["out"] == out


def test_quick_outside_the_on_policy_demo_is_refused(capsys):
    code, err = _cli(capsys, "demo", "--quick")
    assert code == 2 and "--quick: only the on-policy LLM demo" in _line(err)


@pytest.mark.parametrize(("command", "name"), [("train", "config"), ("eval", "target")])
def test_a_missing_positional_is_named_alone(capsys, command, name):
    with pytest.raises(SystemExit) as info:
        main([command])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.endswith(f"the following arguments are required: {name}\n")


def test_a_killed_runs_orphaned_workers_are_waited_for(tmp_path):
    """After kill -9 of a run with loader workers, the workers hold the inherited lock for a
    second or two: a resume then was refused as 'in use by a live process (pid <dead pid>)'."""
    from dkl.train.rundir import RunLock

    run = tmp_path / "run"
    holder = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {SRC!r})
        from dkl.train.rundir import RunLock
        lock = RunLock({str(run)!r}).acquire()
        if os.fork() == 0:  # the worker: keeps the lock's file open, outlives its parent
            time.sleep(1.5)
            os._exit(0)
        print(os.getpid(), flush=True)
        os._exit(0)  # the run, killed: no clean-up
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    proc.wait()
    assert (run / ".lock").read_text().strip() == str(pid)
    lock = RunLock(run).acquire()  # waits for the orphan, then takes the lock
    lock.release()
