"""KD with labels for a share of the training images only (``distill.label_fraction``)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dkl.api import make_trainer, train
from dkl.config import ConfigError, load_config
from dkl.data import TensorImageDataset
from dkl.recipes.distill import DistillConfig, DistillLoss, pick_labeled

QUIET = ["train.progress=false", "train.plot=false", "train.threads=1"]

ZS = [[1.0, 0.0, -1.0], [0.2, -0.3, 0.9]]  # the teacher's batch: student logits
ZT = [[0.5, 2.0, 0.0], [0.1, 0.0, 3.0]]  # and teacher logits
ZL = [[-0.5, 1.5, 0.0], [2.0, 0.1, -1.0], [0.3, 0.3, 0.0]]  # a labeled batch: student logits
YL = [1, 0, 2]


def _log_softmax(z, T=1.0):
    m = max(v / T for v in z)
    lse = m + math.log(sum(math.exp(v / T - m) for v in z))
    return [v / T - lse for v in z]


def _kl(zt, zs, T):
    lt, ls = _log_softmax(zt, T), _log_softmax(zs, T)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def test_ce_on_the_labeled_batch_and_kd_on_the_teachers_batch():
    T = 4.0
    cfg = DistillConfig(method="kd", temperature=T, ce_weight=0.1, kd_weight=0.9)
    out = DistillLoss(cfg)(
        torch.tensor(ZS),
        torch.tensor(ZT),
        torch.tensor([0, 0]),  # the teacher's batch: labels unused by kd
        epoch=1,
        labeled=(torch.tensor(ZL), torch.tensor(YL)),
    )
    ce = -sum(_log_softmax(z)[y] for z, y in zip(ZL, YL)) / 3
    kd = T * T * sum(_kl(t, s, T) for s, t in zip(ZS, ZT)) / 2
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-6)


def test_pick_labeled_is_class_balanced_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 10)
    base = TensorImageDataset(torch.zeros(20, 1), labels)
    idx = pick_labeled(base, 0.3, 2, seed=0)  # round(0.3 * 20 / 2) = 3 per class
    assert len(idx) == 6 and sorted(labels[idx].tolist()) == [0, 0, 0, 1, 1, 1]
    assert idx == sorted(idx) == pick_labeled(base, 0.3, 2, seed=0)
    assert any(pick_labeled(base, 0.3, 2, seed=s) != idx for s in range(1, 6))
    assert len(pick_labeled(base, 0.01, 2, seed=0)) == 2  # at least one per class


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1"])
def test_label_fraction_out_of_range_is_refused(bad):
    with pytest.raises((ConfigError, ValueError), match="label_fraction"):
        load_config("kd/digits_ce", [f"distill.label_fraction={bad}"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config(
        "kd/digits_teacher",
        [f"train.out_dir={out}", "train.epochs=1", "train.max_steps_per_epoch=4", *QUIET],
    )
    train(cfg, log=lambda m: None)
    return out / cfg.name / "best.pt"


def _trainer(tmp_path, teacher, method, extra=()):
    cfg = load_config(
        f"kd/digits_{method}",
        [
            f"train.out_dir={tmp_path}",
            "train.epochs=2",
            "train.max_steps_per_epoch=3",
            f"distill.teacher.checkpoint={teacher}",
            "distill.label_fraction=0.0223",  # round(0.0223 * 1347 / 10) = 3 per class
            *QUIET,
            *extra,
        ],
    )
    return make_trainer(cfg, log=lambda m: None)


@pytest.mark.parametrize("method, extra", [("ce", ()), ("dkd", ()), ("ikl", ("distill.gi=true",))])
def test_hidden_labels_change_nothing(tmp_path, teacher, method, extra):
    """Training with the unlabeled images' labels changed gives the very same student."""
    ref = _trainer(tmp_path / "a", teacher, method, extra)
    summary = ref.fit()
    assert summary["labeled_images"] == 30
    other = _trainer(tmp_path / "b", teacher, method, extra)
    labels = other.task.train_set.labels
    hidden = torch.ones(len(labels), dtype=torch.bool)
    hidden[other.task.labeled_idx] = False
    labels[hidden] = (labels[hidden] + 1) % 10
    other.fit()
    for a, b in zip(ref.raw_model.state_dict().values(), other.raw_model.state_dict().values()):
        assert torch.equal(a, b)


def test_labeled_stream_holds_only_labeled_images_and_resumes(tmp_path, teacher):
    task = _trainer(tmp_path, teacher, "kd").task
    idx = set(task.labeled_idx)
    images = task.train_set.images
    rows = {tuple(images[i].flatten().tolist()): i for i in range(len(images))}

    def labeled_batches(epoch, start):  # the steps the trainer takes (3 per epoch)
        batches = itertools.islice(task.train_batches(epoch, start), 3 - start)
        return [[rows[tuple(r.flatten().tolist())] for r in b[2]] for b in batches]

    epoch1, epoch2 = labeled_batches(1, 0), labeled_batches(2, 0)
    assert len(epoch1) == 3 and all(set(b) <= idx for b in epoch1 + epoch2)
    assert labeled_batches(1, 2) == epoch1[2:]  # resumed mid-epoch: the same stream
    assert epoch2 != epoch1  # the stream goes on across epochs
