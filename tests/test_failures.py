"""Nothing silently wrong: every bad input or fault ends in a correct result or one line + exit.

Each case goes through the command line (``dkl.cli.main``, in process) or the API and checks the
message, the exit code and that nothing on disk was lost. The losses' own edge cases (``-inf``
targets, empty batches, bad weights) are in ``test_loss_edge_cases.py``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import plain_weights, tiny_run

from dkl.api import make_trainer, train
from dkl.cli import main
from dkl.config import ConfigError, load_config
from dkl.train import CheckpointError, DivergenceError, Interrupted, load_checkpoint
from dkl.train import checkpoint as ckpt
from dkl.train.state import load_model_state

QUIET = ["train.progress=false", "train.plot=false", "train.threads=1"]
# a 16-unit MLP on digits, 5 steps an epoch: a run takes about a second
TINY = {
    "recipe": "distill",
    "name": "tiny",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "mlp", "kwargs": {"hidden": [16]}},
    "optim": {"name": "sgd", "lr": 0.1},
    "sched": {"name": "cosine"},
    "train": {"epochs": 2, "max_steps_per_epoch": 5, "deterministic": True},
    "distill": {"method": "ce"},
}


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _cfg(path: Path, *overrides: str):
    return load_config(path, [f"train.out_dir={path.parent / 'runs'}", *QUIET, *overrides])


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dkl:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _interrupt_after(trainer, steps: int) -> None:
    """Make ``trainer`` behave as if SIGTERM came after ``steps`` optimiser steps."""
    step = trainer._step

    def stepping(*a):
        step(*a)
        if trainer.global_step == steps:
            trainer._stop_signal = signal.SIGTERM

    trainer._step = stepping


def _cut_mid_epoch(path: Path, steps: int = 7, *overrides: str) -> Path:
    """A run interrupted mid-epoch 2 (5 steps an epoch); returns its folder."""
    cfg = _cfg(path, *overrides)
    trainer = make_trainer(cfg, log=lambda m: None)
    _interrupt_after(trainer, steps)
    with pytest.raises(Interrupted):
        trainer.fit()
    return cfg.run_dir


# --------------------------------------------------------------------------------------------
# Resume is exact or refuses
# --------------------------------------------------------------------------------------------


def test_resume_applies_a_new_lr_and_weight_decay(cfg_file):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    cfg = _cfg(cfg_file, "train.epochs=2", "optim.lr=0.5", "optim.weight_decay=0.01")
    logs: list[str] = []
    trainer = make_trainer(cfg, log=logs.append)
    trainer.fit(resume=True)
    # epoch 2 of 2 under the cosine schedule (lr changes at epoch boundaries): factor
    # 0.5 * (1 + cos(pi * 1 / 2)) = 0.5 of the NEW base lr
    assert trainer.history[-1]["lr"] == pytest.approx(0.25)
    g = trainer.optimizer.param_groups[0]
    assert g["initial_lr"] == 0.5 and g["weight_decay"] == 0.01
    assert any("optim.lr changed (0.1 -> 0.5): applied" in m for m in logs)


def test_resume_with_more_epochs_follows_the_longer_schedule(cfg_file):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    trainer = make_trainer(_cfg(cfg_file, "train.epochs=4"), log=lambda m: None)
    trainer.fit(resume=True)
    lrs = [r["lr"] for r in trainer.history]
    # epoch e (from 1) of 4: 0.1 * 0.5 * (1 + cos(pi * (e - 1) / 4))
    expected = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert lrs == pytest.approx(expected)


def test_resume_mid_epoch_with_another_batch_size_refuses(cfg_file, capsys):
    run = _cut_mid_epoch(cfg_file)
    before = (run / "last.pt").read_bytes()
    out = cfg_file.parent / "runs"
    code, err = _cli(
        capsys, "train", cfg_file, "data.batch_size=32", "--resume", "--out", out, *QUIET
    )
    line = _one_error_line(err)
    assert code == 2
    assert "data.batch_size changed mid-epoch (64 -> 32)" in line and "--new-epoch" in line
    assert (run / "last.pt").read_bytes() == before  # nothing on disk changed


def test_resume_new_epoch_starts_the_next_epoch_with_the_new_batch_size(cfg_file):
    run = _cut_mid_epoch(cfg_file)  # epoch 2, step 2 of 5
    cfg = _cfg(cfg_file, "data.batch_size=32", "train.epochs=3")
    logs: list[str] = []
    trainer = make_trainer(cfg, log=logs.append)
    trainer.fit(resume=True, new_epoch=True)
    assert any("the rest of epoch 2 is skipped" in m for m in logs)
    assert [r["epoch"] for r in trainer.history] == [1, 3]
    # epoch 3 of 3, position re-counted in the new epoch length: factor 0.5 (1 + cos(2 pi / 3))
    assert trainer.history[-1]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(2 * math.pi / 3)))
    assert load_checkpoint(run / "last.pt")["config"]["data"]["batch_size"] == 32


def test_resume_new_epoch_drops_the_skipped_epochs_partial_metrics(cfg_file):
    """The epoch after a --new-epoch resume reports its own steps: the skipped epoch's partial
    running sums (2 steps, under the old settings) were carried into its train_loss."""
    _cut_mid_epoch(cfg_file)  # epoch 2, step 2 of 5
    trainer = make_trainer(
        _cfg(cfg_file, "distill.ce_weight=2", "train.epochs=3"), log=lambda m: None
    )
    seen: list[float] = []
    check = trainer._check_loss
    trainer._check_loss = lambda value: (seen.append(value), check(value))[1]
    trainer.fit(resume=True, new_epoch=True)
    assert len(seen) == 5  # epoch 3 alone
    assert trainer.history[-1]["train_loss"] == pytest.approx(sum(seen) / len(seen), rel=1e-6)


def test_resume_at_an_epoch_boundary_accepts_a_new_batch_size(cfg_file):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    trainer = make_trainer(_cfg(cfg_file, "data.batch_size=32"), log=lambda m: None)
    trainer.fit(resume=True)
    assert trainer.history[-1]["epoch"] == 2
    assert trainer.scheduler.last_epoch == 2 * 5  # 5 steps an epoch in either length


def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


@pytest.mark.parametrize(
    ("mode", "cut"),
    [("iterations", 4), ("iterations", 8), ("iterations", 9), ("epochs", 5), ("epochs", 7)],
)
def test_a_run_cut_anywhere_resumes_to_the_same_records_and_model(cfg_file, mode, cut):
    """Interrupted at an evaluation point, at an epoch's end or mid-epoch, then resumed: every
    record (losses, accuracies, lr) and the final model equal those of the uninterrupted run.
    A signal at a step that was due an evaluation lost that evaluation for good (iterations)."""
    length = (
        ["train.iterations=10", "train.eval_every=4", "train.max_steps_per_epoch=3"]
        if mode == "iterations"
        else ["train.epochs=2"]
    )
    ref = _cfg(cfg_file, *length, "name=ref")
    train(ref, log=lambda m: None)
    cut_cfg = _cfg(cfg_file, *length, "name=cut")
    trainer = make_trainer(cut_cfg, log=lambda m: None)
    _interrupt_after(trainer, cut)
    with pytest.raises(Interrupted):
        trainer.fit()
    train(_cfg(cfg_file, *length, "name=cut"), resume=True, log=lambda m: None)
    assert _records(cut_cfg.run_dir) == _records(ref.run_dir)
    want = torch.load(ref.run_dir / "final.pt", weights_only=True)["model"]
    got = torch.load(cut_cfg.run_dir / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_signal_in_the_last_step_ends_the_run_as_usual(cfg_file):
    cfg = _cfg(cfg_file, "train.iterations=6", "train.eval_every=4", "train.max_steps_per_epoch=3")
    trainer = make_trainer(cfg, log=lambda m: None)
    _interrupt_after(trainer, 6)
    trainer.fit()
    assert (cfg.run_dir / "final.pt").is_file()
    assert [r["step"] for r in _records(cfg.run_dir)] == [4, 6]


@pytest.mark.parametrize(
    ("override", "key", "values"),
    [
        ("seed=3", "seed", "(0 -> 3)"),
        ("train.amp=bf16", "train.amp", "('none' -> 'bf16')"),
        ("distill.ce_weight=2", "distill.ce_weight", "(1.0 -> 2.0)"),
    ],
)
def test_resume_refuses_settings_that_make_another_run(cfg_file, capsys, override, key, values):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    out = cfg_file.parent / "runs"
    code, err = _cli(capsys, "train", cfg_file, "--resume", override, "--out", out, *QUIET)
    line = _one_error_line(err)
    assert code == 2 and f"{key} changed {values}" in line


def test_resume_refuses_another_model_even_with_new_epoch(cfg_file, capsys):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    out = cfg_file.parent / "runs"
    code, err = _cli(
        capsys, "train", cfg_file, "model.kwargs.hidden=[32]", "--resume", "--new-epoch",
        "--out", out, *QUIET,
    )  # fmt: skip
    line = _one_error_line(err)
    assert code == 2 and "model.kwargs" in line and "[16]" in line and "[32]" in line


def test_resume_of_a_checkpoint_from_an_older_version_ignores_keys_it_did_not_have(cfg_file):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    path = cfg_file.parent / "runs" / "tiny" / "last.pt"
    state = load_checkpoint(path)
    del state["config"]["train"]["divergence_factor"]  # a key this version added
    del state["config"]["data"]["channels"]
    ckpt.save_checkpoint(state, path)
    trainer = make_trainer(_cfg(cfg_file, "train.epochs=2"), log=lambda m: None)
    trainer.fit(resume=True)
    assert [r["epoch"] for r in trainer.history] == [1, 2]
    state = load_checkpoint(path)
    del state["config"]["data"]["channels"]
    ckpt.save_checkpoint(state, path)
    with pytest.raises(ConfigError, match=r"data.channels changed \(None -> 1\)"):
        train(_cfg(cfg_file, "train.epochs=3", "data.channels=1"), resume=True, log=lambda m: None)


def test_new_epoch_needs_resume(cfg_file, capsys):
    code, err = _cli(capsys, "train", cfg_file, "--new-epoch")
    assert code == 2 and "--new-epoch goes with --resume" in _one_error_line(err)


# --------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(p.read_bytes()[:500]), "truncated or damaged"),
        (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "not a torch checkpoint"),
        (lambda p: p.write_bytes((p.parent / "best.pt").read_bytes()), "not a training state"),
    ],
    ids=["zero-bytes", "truncated", "random-bytes", "best-copied-to-last"],
)
def test_resume_from_a_damaged_checkpoint_is_one_line(cfg_file, capsys, damage, expect):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    damage(cfg_file.parent / "runs" / "tiny" / "last.pt")
    out = cfg_file.parent / "runs"
    code, err = _cli(capsys, "train", cfg_file, "--resume", "--out", out, *QUIET)
    assert code == 2 and expect in _one_error_line(err)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Boom()}, path)
    with pytest.raises(CheckpointError, match="refused unread"):
        load_checkpoint(path)


def test_weights_of_another_width_name_what_differs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    other = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    with pytest.raises(CheckpointError) as e:
        load_model_state(model, other.state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "3 reshaped" in msg and "(32, 4) vs model (16, 4)" in msg


@pytest.mark.parametrize("seed", range(20))
def test_eval_of_random_bytes_is_one_line(tmp_path, capsys, seed):
    path = tmp_path / "x.pt"
    path.write_bytes(random.Random(seed).randbytes(1000))  # garbage fails anywhere in the reader
    code, err = _cli(capsys, "eval", path)
    assert code == 2 and "not a torch checkpoint" in _one_error_line(err)


# --------------------------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------------------------


def test_a_huge_lr_is_a_divergence_error_and_keeps_no_bad_checkpoint(cfg_file, capsys):
    out = cfg_file.parent / "runs"
    code, err = _cli(capsys, "train", cfg_file, "optim.lr=1e6", "--out", out, *QUIET)
    line = _one_error_line(err)
    assert code == 1
    assert "diverged at epoch 1" in line and "lower optim.lr (now 1e+06)" in line
    assert "no checkpoint was written" in line
    assert not (out / "tiny" / "last.pt").exists()


def test_divergence_after_a_good_epoch_names_the_finite_checkpoint(cfg_file):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    before = (cfg_file.parent / "runs" / "tiny" / "last.pt").read_bytes()
    with pytest.raises(DivergenceError, match=r"epoch 2, .*last finite checkpoint: .*last\.pt"):
        train(_cfg(cfg_file, "train.epochs=2", "optim.lr=1e6"), resume=True, log=lambda m: None)
    after = cfg_file.parent / "runs" / "tiny" / "last.pt"
    assert after.read_bytes() == before
    state = load_checkpoint(after)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_an_exploding_loss_stops_before_it_is_inf(cfg_file):
    cfg = _cfg(cfg_file, "train.max_steps_per_epoch=30")
    trainer = make_trainer(cfg, log=lambda m: None)
    task_step = trainer.task.train_step
    calls = [0]

    def exploding(batch, ctx):  # the real step, its loss scaled up 1e5x from step 15 on
        out = task_step(batch, ctx)
        calls[0] += 1
        if calls[0] >= 15:
            out["loss"] = out["loss"] * 1e5
        return out

    trainer.task.train_step = exploding
    with pytest.raises(DivergenceError, match=r"exploded to .*x the median"):
        trainer.fit()
    assert trainer.global_step == 14  # stopped before updating with the exploded loss


def test_non_finite_buffers_stop_the_run_at_evaluation(cfg_file):
    cfg = _cfg(cfg_file, "model.name=digits_cnn", "model.kwargs={width: 4}")
    trainer = make_trainer(cfg, log=lambda m: None)
    after_step = trainer.task.after_step

    def poisoning(ctx):  # as if a forward pass had overflowed a BatchNorm's statistics
        after_step(ctx)
        bn = next(m for m in trainer.raw_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var.fill_(float("inf"))

    trainer.task.after_step = poisoning
    with pytest.raises(DivergenceError, match=r"buffer '.*running_var' holds NaN or inf"):
        trainer.fit()
    assert not (cfg.run_dir / "last.pt").exists()


def test_the_learning_check_warns_when_the_loss_does_not_move(cfg_file):
    logs: list[str] = []
    train(_cfg(cfg_file, "train.epochs=1", "optim.lr=1e-7"), log=logs.append)
    warning = [m for m in logs if m.startswith("warning: the training loss has not gone down")]
    assert len(warning) == 1 and "optim.lr (now 1e-07)" in warning[0]
    assert "chance 10.0%" in warning[0]


def test_the_learning_check_is_quiet_when_the_model_learns(cfg_file):
    logs: list[str] = []
    train(_cfg(cfg_file, "train.epochs=1", "train.max_steps_per_epoch=20"), log=logs.append)
    assert not any(m.startswith("warning:") for m in logs)


# --------------------------------------------------------------------------------------------
# Config values no run can use
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("train.epochs=0", "train.epochs: must be >= 1 (or set train.iterations > 0), got 0"),
        ("optim.lr=-0.1", "optim.lr: must be a finite number > 0, got -0.1"),
        ("optim.lr=.nan", "optim.lr: must be a finite number > 0, got nan"),
        ("optim.lr=nan", "optim.lr: expected float, got 'nan' (a string, not a number"),
        ("optim.weight_decay=-1", "optim.weight_decay: must be a finite number >= 0"),
        ("optim.momentum=1.5", "optim.momentum: must be in [0, 1)"),
        ("data.batch_size=0", "data.batch_size: must be > 0, got 0"),
        ("train.divergence_factor=-1", "train.divergence_factor: must be a finite number >= 0"),
        ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
        ("model.name=no_such_net", "no_such_net"),
        ("recipe=no_such_recipe", "no_such_recipe"),
    ],
)
def test_bad_values_are_one_line(cfg_file, capsys, override, expect):
    code, err = _cli(capsys, "train", cfg_file, override, "--out", cfg_file.parent / "r", *QUIET)
    assert code == 2 and expect in _one_error_line(err)
    assert not (cfg_file.parent / "r" / "tiny" / "last.pt").exists()


def test_missing_files_are_one_line(tmp_path, capsys):
    code, err = _cli(capsys, "train", tmp_path / "nope.yaml")
    assert code == 2 and "no such file or preset" in _one_error_line(err)
    code, err = _cli(capsys, "eval", tmp_path / "no_run")
    assert code == 2 and "no such run folder or checkpoint" in _one_error_line(err)
    code, err = _cli(capsys, "train", tmp_path / "x.yaml", "--resume")
    assert code == 2


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {name: digits\noptim: [")
    code, err = _cli(capsys, "show", path)
    assert code == 2 and "invalid YAML" in _one_error_line(err)


def test_a_missing_teacher_says_which_preset_makes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative teacher path is looked for from where dkl runs
    code, err = _cli(capsys, "train", "kd/digits_kd", "--out", tmp_path, *QUIET)
    line = _one_error_line(err)
    assert code == 2 and "dkl train kd/digits_teacher" in line
    assert str(tmp_path) in line  # where the relative path was looked for


# --------------------------------------------------------------------------------------------
# Disk: full, leftovers
# --------------------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_previous_checkpoint_and_its_temporary_is_removed(
    tmp_path, monkeypatch
):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint({"a": torch.ones(2)}, path)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device; the previous 'last.pt' is intact"):
        ckpt.save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_full_disk_during_training_is_one_line(cfg_file, capsys, monkeypatch):
    def full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    out = cfg_file.parent / "runs"
    code, err = _cli(capsys, "train", cfg_file, "--out", out, *QUIET)
    line = _one_error_line(err)
    assert code == 1 and "could not write checkpoint" in line and "free some space" in line
    assert not list((out / "tiny").glob(".*tmp*"))


def test_leftover_temporaries_are_removed_on_the_next_start(cfg_file):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    run = cfg_file.parent / "runs" / "tiny"
    (run / ".last.pt.tmp12345").write_bytes(b"half a checkpoint")
    logs: list[str] = []
    train(_cfg(cfg_file, "train.epochs=2"), resume=True, log=logs.append)
    assert not (run / ".last.pt.tmp12345").exists()
    assert any("removed" in m and ".last.pt.tmp12345" in m for m in logs)


# --------------------------------------------------------------------------------------------
# The command line itself
# --------------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError):
        main(["show", str(tmp_path / "nope.yaml"), "--debug"])


def test_programming_errors_still_surface(cfg_file, monkeypatch):
    import dkl.api

    def broken(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(dkl.api, "train", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["train", str(cfg_file)])


def test_keyboard_interrupt_is_exit_130(cfg_file, capsys, monkeypatch):
    import dkl.api

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dkl.api, "train", interrupted)
    code, err = _cli(capsys, "train", cfg_file)
    assert code == 130 and _one_error_line(err) == "dkl: interrupted"


def test_flags_go_anywhere(cfg_file, capsys):
    out = cfg_file.parent / "x"
    assert _cli(capsys, "train", cfg_file, "--out", out, "train.epochs=1", *QUIET)[0] == 0
    a = _cli(capsys, "train", cfg_file, "--out", out, "--resume", "train.epochs=2", *QUIET)
    b = _cli(capsys, "train", cfg_file, "--resume", "train.epochs=3", "--out", out, *QUIET)
    assert a[0] == b[0] == 0
    assert [r["epoch"] for r in load_checkpoint(out / "tiny" / "last.pt")["engine"]["history"]] == [
        1,
        2,
        3,
    ]


def test_show_prints_the_resolved_config(capsys):
    assert main(["show", "kd/digits_ikl", "distill.beta=2"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["distill"]["beta"] == 2.0 and data["recipe"] == "distill"
    assert "optim" in data and "adversarial" not in data


def test_list_shows_descriptions_and_hides_fragments(capsys):
    assert main(["list", "kd"]) == 0
    out = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in out]
    assert "kd/digits_teacher" in names and not any("/_" in n for n in names)
    row = next(line for line in out if line.startswith("kd/digits_teacher "))
    assert "teacher" in row[len("kd/digits_teacher") :].lower()
    code, err = _cli(capsys, "list", "nope")
    assert code == 2 and "groups: adversarial, kd, semisup" in _one_error_line(err)


def test_train_help_points_at_show(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "dkl show CONFIG" in out and "--out" in out and "--resume" in out


# --------------------------------------------------------------------------------------------
# Data a run cannot use
# --------------------------------------------------------------------------------------------


def _image_folder(root: Path, train=("a", "b"), val=("a", "b")) -> Path:
    from PIL import Image

    for split, classes in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("L", (8, 8), color=40 * i).save(root / split / c / f"{i}.png")
    return root


def _folder_run(tmp_path: Path, root: Path) -> Path:
    cfg = {**TINY, "data": {"name": "imagefolder", "root": str(root), "batch_size": 2}}
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_unknown_data_set_is_one_line(cfg_file, capsys):
    code, err = _cli(capsys, "train", cfg_file, "data.name=mnist", "--out", cfg_file.parent, *QUIET)
    line = _one_error_line(err)
    assert code == 2 and "unknown data set 'mnist'" in line and "imagefolder" in line


def test_train_and_val_class_folders_that_differ_are_one_line(tmp_path, capsys):
    root = _image_folder(tmp_path / "d", train=("a", "b"), val=("a", "c"))
    code, err = _cli(capsys, "train", _folder_run(tmp_path, root), "--out", tmp_path, *QUIET)
    line = _one_error_line(err)
    assert code == 2 and "class folders differ" in line and "'b'" in line and "'c'" in line


def test_an_unreadable_image_is_one_line(tmp_path, capsys):
    root = _image_folder(tmp_path / "d")
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"not a png")
    code, err = _cli(capsys, "train", _folder_run(tmp_path, root), "--out", tmp_path, *QUIET)
    line = _one_error_line(err)
    assert code == 2 and f"cannot read image '{bad}'" in line


def test_eval_of_a_config_file_asks_for_the_weights(cfg_file, capsys):
    code, err = _cli(capsys, "eval", cfg_file)
    assert code == 2 and "is a config file: give the weights" in _one_error_line(err)


def test_eval_of_plain_weights_with_a_config_equals_the_runs_own(tmp_path, capsys):
    """The advice for a plain state dict (dkl eval CONFIG model.checkpoint=FILE) was refused:
    'is a config file, not a checkpoint'."""
    cfg = tiny_run(tmp_path, steps=3)
    raw = plain_weights(cfg, tmp_path / "raw.pt")
    code = main(["eval", str(cfg.run_dir), "--json"])
    own = json.loads(capsys.readouterr().out)
    code = main(["eval", str(cfg.run_dir / "config.yaml"), f"model.checkpoint={raw}", "--json"])
    plain = json.loads(capsys.readouterr().out)
    assert code == 0 and (plain["top1"], plain["test_loss"]) == pytest.approx(
        (own["top1"], own["test_loss"]), rel=1e-6
    )


@pytest.mark.parametrize(
    ("flag", "expect"),
    [
        (["--n-examples", "0"], "n_examples: expected a number of test points >= 1, got 0"),
        (["--eps", "-1"], "eps: expected an L-inf radius in [0, 1]"),
        (["--eps", "8"], "on pixels in [0, 1] (8/255 = 0.0314), got 8.0"),
        (["--batch-size", "0"], "batch_size: expected >= 1, got 0"),
    ],
)
def test_robust_arguments_are_checked_before_anything_runs(cfg_file, capsys, flag, expect):
    train(_cfg(cfg_file, "train.epochs=1"), log=lambda m: None)
    code, err = _cli(capsys, "robust", cfg_file.parent / "runs" / "tiny", *flag)
    assert code == 2 and expect in _one_error_line(err)


def test_eval_creates_no_folder_where_it_is_run(tmp_path, monkeypatch):
    """A checkpoint whose config's out_dir is relative (runs/) and that records no
    normalisation (written before it did) wrote runs/<name>/data_stats.json into whatever folder
    dkl eval was run from."""
    from dkl.api import evaluate_checkpoint
    from dkl.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_run(tmp_path, "data.mean=auto", "data.std=auto")
    state = load_checkpoint(cfg.run_dir / "final.pt")
    del state["normalization"]
    state["config"]["train"]["out_dir"] = "runs"
    moved = tmp_path / "moved.pt"
    save_checkpoint(state, moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = evaluate_checkpoint(moved)
    assert 0 <= res["top1"] <= 100 and list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------------------------
# final.pt is never lost; a real file-size limit is one line; wrapped weights; eval of a preset
# --------------------------------------------------------------------------------------------


class _Killed(BaseException):
    """As if the process died here (SIGKILL, OOM killer, power loss): nothing after it runs."""


def _models_equal(a: Path, b: Path) -> bool:
    want = torch.load(a, weights_only=True)["model"]
    got = torch.load(b, weights_only=True)["model"]
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_kill_while_final_pt_is_written_still_ends_with_the_final_model(cfg_file, monkeypatch):
    """last.pt was written finished before final.pt: a kill between them left no final.pt, and
    --resume said "done" without writing it (a student pointed at it failed later)."""
    ref = _cfg(cfg_file, "name=ref")
    train(ref, log=lambda m: None)
    save = ckpt.save_checkpoint

    def dies_writing_final(obj, path):
        if Path(path).name == "final.pt":
            raise _Killed
        save(obj, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", dies_writing_final)
    cut = _cfg(cfg_file, "name=cut")
    with pytest.raises(_Killed):
        train(cut, log=lambda m: None)
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    train(_cfg(cfg_file, "name=cut"), resume=True, log=lambda m: None)
    assert _models_equal(ref.run_dir / "final.pt", cut.run_dir / "final.pt")
    assert _records(cut.run_dir) == _records(ref.run_dir)


def test_resuming_a_finished_run_without_final_pt_writes_it(cfg_file):
    cfg = _cfg(cfg_file)
    train(cfg, log=lambda m: None)
    final = cfg.run_dir / "final.pt"
    kept = cfg.run_dir.parent / "final_before.pt"
    final.rename(kept)  # what a kill during its write by an older dkl left
    logs: list[str] = []
    train(_cfg(cfg_file), resume=True, log=logs.append)
    assert _models_equal(kept, final)
    assert load_checkpoint(final)["metrics"] == load_checkpoint(kept)["metrics"]
    assert any("wrote the missing" in m for m in logs)


def test_a_real_file_size_limit_inside_torch_save_is_one_line(cfg_file):
    """torch.save's zip writer turns EFBIG (ulimit -f, a quota) into a RuntimeError with the
    OSError only as its context: the command printed a 40-line traceback."""
    import hashlib
    import resource
    import subprocess
    import sys

    out = cfg_file.parent / "runs"
    wide = ["model.kwargs={hidden: [256]}", "--out", str(out), *QUIET]  # checkpoints ~200 kB
    train(_cfg(cfg_file, "train.epochs=1", *wide[:1]), log=lambda m: None)
    last = out / "tiny" / "last.pt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    assert last.stat().st_size > 100_000

    def limit():  # ulimit -f: no file written beyond 100 kB (config.yaml, metrics.jsonl fit)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    res = subprocess.run(
        [sys.executable, "-m", "dkl", "train", str(cfg_file), *wide, "--resume"],
        capture_output=True, text=True, timeout=300, preexec_fn=limit, check=False,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    line = _one_error_line(res.stderr)
    assert "could not write checkpoint" in line and "File too large" in line
    assert "is intact" in line
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not list(last.parent.glob(".*tmp*"))


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_weights_of_a_compiled_or_parallel_model_load(tmp_path, prefix):
    from dkl.models import load_weights

    torch.manual_seed(0)
    saved = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    path = tmp_path / "w.pt"
    torch.save({prefix + k: v for k, v in saved.state_dict().items()}, path)
    model = load_weights(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)), path)
    want = saved.state_dict()
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)


def test_weights_under_an_unknown_shared_prefix_name_it(tmp_path):
    from dkl.models import load_weights

    path = tmp_path / "w.pt"
    torch.save(
        {f"module.model.{k}": v for k, v in torch.nn.Linear(4, 3).state_dict().items()}, path
    )
    with pytest.raises(ValueError, match=r"every unexpected key starts with 'model\.'") as e:
        load_weights(torch.nn.Linear(4, 3), path)
    assert "\n" not in str(e.value)


def test_eval_takes_a_preset_name_as_train_does(tmp_path, capsys):
    """The plain-weights error says `dkl eval CONFIG model.checkpoint=...`; a preset name as
    CONFIG was 'no such run folder or checkpoint'."""
    cfg = tiny_run(tmp_path, steps=3)
    raw = plain_weights(cfg, tmp_path / "raw.pt")
    assert main(["eval", str(cfg.run_dir), "--json"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["eval", "kd/digits_teacher", f"model.checkpoint={raw}", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (plain["top1"], plain["test_loss"]) == pytest.approx(
        (own["top1"], own["test_loss"]), rel=1e-6
    )


@pytest.mark.parametrize("bad", ["truncated", "odd size"])
def test_a_bad_test_image_stops_the_run_before_training_and_keeps_the_previous_run(
    tmp_path, capsys, monkeypatch, bad
):
    """A bad image in val/ was found at the first evaluation, after a whole epoch, with nothing
    saved; under train.overwrite=true the previous run's checkpoints were already deleted."""
    from PIL import Image

    from dkl.train import Trainer

    root = _image_folder(tmp_path / "d")
    run = _folder_run(tmp_path, root)
    assert main(["train", str(run), "--out", str(tmp_path), *QUIET]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "tiny").glob("*.pt")}
    target = root / "val" / "b" / "1.png"
    if bad == "truncated":
        target.write_bytes(target.read_bytes()[:40])
    else:  # the others are 8x8 and data.image_size is 0: all must be one size
        Image.new("L", (9, 9)).save(target)
    steps: list[int] = []
    step = Trainer._step
    monkeypatch.setattr(Trainer, "_step", lambda self, *a: (steps.append(1), step(self, *a))[1])
    code, err = _cli(capsys, "train", run, "train.overwrite=true", "--out", tmp_path, *QUIET)
    line = _one_error_line(err)
    assert code == 2 and str(target) in line and not steps
    assert {p.name: p.read_bytes() for p in (tmp_path / "tiny").glob("*.pt")} == before


def test_eval_reads_each_test_image_once_and_still_names_a_bad_one(tmp_path, capsys, monkeypatch):
    """Training reads the test split before its first step; an evaluation, which reads it
    right after, read every image twice."""
    from PIL import Image

    from dkl.data.preprocess import PreparedImages

    root = _image_folder(tmp_path / "d")
    run = _folder_run(tmp_path, root)
    assert main(["train", str(run), "--out", str(tmp_path), *QUIET]) == 0
    capsys.readouterr()
    reads: list[str] = []
    raw = PreparedImages.raw
    monkeypatch.setattr(
        PreparedImages, "raw", lambda self, i: (reads.append(self.describe(i)), raw(self, i))[1]
    )
    assert main(["eval", str(tmp_path / "tiny"), "--json"]) == 0
    capsys.readouterr()
    val = [r for r in reads if f"{root / 'val'}" in r]
    assert len(val) == 4 and len(set(val)) == 4
    target = root / "val" / "b" / "1.png"
    Image.new("L", (9, 9)).save(target)
    code, err = _cli(capsys, "eval", tmp_path / "tiny")
    assert code == 2 and str(target) in _one_error_line(err)
