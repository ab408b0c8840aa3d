"""What a run shows people: the progress bar (terminals only) and the panels of curves.png."""

from __future__ import annotations

import io

from dkl.api import train
from dkl.config import load_config
from dkl.train.outputs import curve_panels, plot_history, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal():
    assert progress_bar(True, 10, 0, "epoch 1", file=io.StringIO()) is None  # a log file
    assert progress_bar(False, 10, 0, "epoch 1", file=FakeTerminal()) is None  # switched off
    term = FakeTerminal()
    bar = progress_bar(True, 10, 0, "epoch 1", file=term)
    assert bar is not None
    bar.update(3)
    bar.close()
    assert "epoch 1" in term.getvalue() and "\r" in term.getvalue()


def test_a_run_logged_to_files_has_epoch_lines_and_no_bar_frames(tmp_path, capfd):
    cfg = load_config(
        "kd/digits_ce",
        [
            f"train.out_dir={tmp_path}",
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
            "train.progress=true",  # asked for, but stdout and stderr are not terminals here
            "train.plot=false",
            "train.threads=1",
            "distill.label_fraction=1",
        ],
    )
    train(cfg, log=print)
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch=")]
    assert [line.split()[0] for line in epoch_lines] == ["epoch=1", "epoch=2"]


def test_panels_of_a_distillation_run():
    history = [
        {
            "epoch": e,
            "step": 10 * e,
            "lr": 0.1 / e,
            "train_loss": 2.0 / e,
            "train_acc": 50.0 + e,
            "train_ce": 1.0 / e,
            "train_kd": 1.0 / e,
            "top1": 60.0 + e,
            "top5": 90.0,
            "test_loss": 1.5 / e,
            "time": 1.0 * e,
        }
        for e in (1, 2)
    ]
    assert curve_panels(history) == [
        ("train loss", ["train_loss", "train_ce", "train_kd"]),
        ("test loss", ["test_loss"]),
        ("accuracy (%)", ["train_acc", "top1", "top5"]),
        ("learning rate", ["lr"]),
    ]


def test_panels_of_semisup_and_adversarial_runs():
    semisup = {
        "epoch": 1,
        "step": 4,
        "lr": 0.03,
        "train_loss": 1.0,
        "train_acc": 40.0,
        "train_sup_loss": 0.7,
        "train_unsup_loss": 0.3,
        "train_mask_ratio": 0.4,
        "top1": 50.0,
        "top5": 80.0,
        "test_loss": 1.2,
        "mask_ratio": 0.5,
        "pl_acc": 90.0,
        "method": "fixmatch",  # not a number: not plotted
    }
    assert curve_panels([semisup]) == [
        ("train loss", ["train_loss", "train_sup_loss", "train_unsup_loss"]),
        ("test loss", ["test_loss"]),
        ("accuracy (%)", ["train_acc", "top1", "top5", "pl_acc"]),
        ("learning rate", ["lr"]),
        ("train_mask_ratio", ["train_mask_ratio"]),
        ("mask_ratio", ["mask_ratio"]),
    ]
    adversarial = [
        {"epoch": 1, "step": 5, "lr": 0.05, "train_loss": 2.0, "train_robust": 0.5},
        {"epoch": 2, "step": 10, "top1": 70.0, "pgd10": 30.0, "eps": 0.15, "test_loss": 1.0},
    ]
    assert curve_panels(adversarial) == [
        ("train loss", ["train_loss", "train_robust"]),
        ("test loss", ["test_loss"]),
        ("accuracy (%)", ["top1", "pgd10"]),
        ("learning rate", ["lr"]),
        ("eps", ["eps"]),
    ]


def test_plot_history_draws_the_panels(tmp_path):
    history = [
        {"epoch": e, "step": e, "lr": 0.1, "train_loss": 1.0 / e, "top1": 50.0 + e}
        for e in (1, 2, 3)
    ]
    path = tmp_path / "curves.png"
    assert plot_history(history, path, title="t") == curve_panels(history)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert plot_history([], tmp_path / "none.png") == [] and not (tmp_path / "none.png").exists()
