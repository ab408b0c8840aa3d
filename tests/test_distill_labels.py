"""KD with labels for a share of the training images only (``distill.label_fraction``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dkl.api import train
from dkl.config import ConfigError, load_config
from dkl.data import TensorImageDataset
from dkl.recipes.distill import DistillConfig, DistillLoss, LabeledShare

QUIET = ["train.progress=false", "train.plot=false", "train.threads=1"]

# three images, three classes; the middle image's label is hidden from the CE term
ZS = [[1.0, 0.0, -1.0], [0.2, -0.3, 0.9], [-0.5, 1.5, 0.0]]
ZT = [[0.5, 2.0, 0.0], [0.1, 0.0, 3.0], [1.0, -1.0, 0.5]]
Y = [0, 1, 2]
LABELED = [True, False, True]


def _log_softmax(z, T=1.0):
    m = max(v / T for v in z)
    lse = m + math.log(sum(math.exp(v / T - m) for v in z))
    return [v / T - lse for v in z]


def _kl(zt, zs, T):
    lt, ls = _log_softmax(zt, T), _log_softmax(zs, T)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def _call(cfg, y=Y, labeled=LABELED, grad=False):
    s = torch.tensor(ZS, dtype=torch.float64, requires_grad=grad)
    out = DistillLoss(cfg)(
        s,
        torch.tensor(ZT, dtype=torch.float64),
        torch.tensor(y),
        epoch=100,
        labeled=torch.tensor(labeled),
    )
    return out, s


def test_ce_is_the_mean_over_labeled_images_and_kd_covers_all():
    T = 4.0
    cfg = DistillConfig(method="kd", temperature=T, ce_weight=0.1, kd_weight=0.9)
    out, _ = _call(cfg)
    ce = -(_log_softmax(ZS[0])[0] + _log_softmax(ZS[2])[2]) / 2
    kd = T * T * sum(_kl(t, s, T) for s, t in zip(ZS, ZT)) / 3
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.1 * ce + 0.9 * kd, rel=1e-6)


def test_no_labeled_image_in_the_batch_gives_zero_ce_not_nan():
    out, s = _call(DistillConfig(method="ce"), labeled=[False, False, False], grad=True)
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_dkd_uses_the_teachers_top_class_for_an_unlabeled_image():
    T, alpha, beta = 4.0, 1.0, 2.0
    cfg = DistillConfig(method="dkd", temperature=T, alpha=alpha, beta=beta, warmup=0)
    out, _ = _call(cfg)

    def dkd(zs, zt, y):  # the decoupled terms from the softmaxes, as Zhao et al. define them
        ps = [math.exp(v) for v in _log_softmax(zs, T)]
        pt = [math.exp(v) for v in _log_softmax(zt, T)]
        tckd = sum(a * math.log(a / b) for a, b in zip([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]))
        ns = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
        nt = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
        return T * T * (alpha * tckd + beta * sum(a * math.log(a / b) for a, b in zip(nt, ns)))

    targets = [
        0,
        2,
        2,
    ]  # image 1 is unlabeled: its teacher's top class is 2 (its label 1 is unused)
    want = sum(dkd(s, t, y) for s, t, y in zip(ZS, ZT, targets)) / 3
    assert out["kd"].item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "ikl"])
def test_hidden_labels_change_nothing(method):
    cfg = DistillConfig(method=method, beta=1.0, warmup=0)
    a, sa = _call(cfg, y=[0, 1, 2], grad=True)
    b, sb = _call(cfg, y=[0, 0, 2], grad=True)  # only the unlabeled image's label differs
    a["loss"].backward()
    b["loss"].backward()
    assert a["loss"].item() == b["loss"].item()
    assert torch.equal(sa.grad, sb.grad)


def test_labeled_share_is_class_balanced_seeded_and_batched():
    labels = torch.tensor([0] * 10 + [1] * 10)
    base = TensorImageDataset(torch.arange(20.0)[:, None], labels)
    share = LabeledShare.pick(base, 0.3, num_classes=2, seed=0)  # round(0.3 * 20 / 2) = 3
    flags = share.labeled
    assert share.num_labeled == 6 and int(flags[:10].sum()) == 3 and int(flags[10:].sum()) == 3
    assert torch.equal(LabeledShare.pick(base, 0.3, 2, seed=0).labeled, flags)
    others = [LabeledShare.pick(base, 0.3, 2, seed=s).labeled for s in range(1, 6)]
    assert any(not torch.equal(o, flags) for o in others)
    x, y, f = share.__getitems__([3, 12, 0])
    assert x.flatten().tolist() == [3.0, 12.0, 0.0] and y.tolist() == [0, 1, 0]
    assert f.tolist() == [bool(flags[3]), bool(flags[12]), bool(flags[0])]
    assert share[5][2] == flags[5] and len(share) == 20

    class OneByOne(torch.utils.data.Dataset):  # no __getitems__: samples come one at a time
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return torch.tensor([float(i)]), int(labels[i])

    samples = LabeledShare(OneByOne(), [1, 12]).__getitems__([1, 2, 12])
    assert [(int(x), y, bool(f)) for x, y, f in samples] == [
        (1, 0, True),
        (2, 0, False),
        (12, 1, True),
    ]


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1"])
def test_label_fraction_out_of_range_is_refused(bad):
    with pytest.raises((ConfigError, ValueError), match="label_fraction"):
        load_config("kd/digits_ce", [f"distill.label_fraction={bad}"])


def test_end_to_end_with_the_gi_prior(tmp_path):
    """A teacher, then an IKL-GI student that sees 3 labels per class of the 1,347 digits."""
    tcfg = load_config(
        "kd/digits_teacher",
        [f"train.out_dir={tmp_path}", "train.epochs=1", "train.max_steps_per_epoch=4", *QUIET],
    )
    train(tcfg, log=lambda m: None)
    cfg = load_config(
        "kd/digits_ikl",
        [
            f"train.out_dir={tmp_path}",
            "train.epochs=1",
            "train.max_steps_per_epoch=4",
            f"distill.teacher.checkpoint={tmp_path / tcfg.name / 'best.pt'}",
            "distill.gi=true",
            "distill.label_fraction=0.0223",  # round(0.0223 * 1347 / 10) = 3 per class
            *QUIET,
        ],
    )
    lines: list[str] = []
    s = train(cfg, log=lines.append)
    assert s["labeled_images"] == 30
    assert any("30 of 1347 training images" in line for line in lines)
    hist = json.loads((tmp_path / cfg.name / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(hist["train_loss"]) and math.isfinite(hist["train_kd"])
