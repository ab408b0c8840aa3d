"""KD recipe: each method's loss against hand-computed values; teacher checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from run_helpers import tiny_overrides, tiny_run

from dkl.config import Config, ModelConfig
from dkl.data import DataInfo
from dkl.recipes.distill import DistillConfig, DistillLoss, dkd_loss
from dkl.train import RunContext


def distill_loss(cfg, s, t, y, *, epoch, class_weights=None):
    """The loss module of ``cfg``, built once and called on one batch."""
    return DistillLoss(cfg)(s, t, y, epoch=epoch, class_weights=class_weights)


def _softmax(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


ZS = [1.0, 0.0, -1.0]  # student logits, label 0
ZT = [0.5, 2.0, 0.0]  # teacher logits
Y = 0


def _tensors():
    return (
        torch.tensor([ZS], dtype=torch.float64),
        torch.tensor([ZT], dtype=torch.float64),
        torch.tensor([Y]),
    )


def test_ce():
    s, _, y = _tensors()
    out = distill_loss(DistillConfig(method="ce"), s, None, y, epoch=1)
    assert out["loss"].item() == pytest.approx(-math.log(_softmax(ZS)[Y]), rel=1e-6)


def test_kd_hinton_times_t_squared():
    T = 2.0
    s, t, y = _tensors()
    cfg = DistillConfig(method="kd", temperature=T, ce_weight=0.1, kd_weight=0.9)
    out = distill_loss(cfg, s, t, y, epoch=1)
    ce = -math.log(_softmax(ZS)[Y])
    kl = _kl(_softmax(ZT, T), _softmax(ZS, T))
    assert out["loss"].item() == pytest.approx(0.1 * ce + 0.9 * T * T * kl, rel=1e-6)


def _dkd_by_hand(zs, zt, y, alpha, beta, T):
    ps, pt = _softmax(zs, T), _softmax(zt, T)
    bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
    tckd = _kl(bt, bs)
    ns = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
    nt = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
    return T * T * (alpha * tckd + beta * _kl(nt, ns))


def test_dkd_with_warmup():
    T, alpha, beta, warmup = 4.0, 1.0, 8.0, 20
    s, t, y = _tensors()
    cfg = DistillConfig(method="dkd", temperature=T, alpha=alpha, beta=beta, warmup=warmup)
    for epoch, ramp in [(1, 1 / 20), (10, 0.5), (30, 1.0)]:
        out = distill_loss(cfg, s, t, y, epoch=epoch)
        want = -math.log(_softmax(ZS)[Y]) + ramp * _dkd_by_hand(ZS, ZT, Y, alpha, beta, T)
        assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_dkd_matches_the_masked_formulation_and_stays_finite():
    # the original code masks the target logit with a large constant; at moderate logits both
    # agree, and ours stays finite where such constants would not matter anyway
    torch.manual_seed(0)
    s, t = torch.randn(16, 7, dtype=torch.float64) * 3, torch.randn(16, 7, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (16,))
    T = 4.0
    gt = F.one_hot(y, 7).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean()
    lns = F.log_softmax(s / T - 1000.0 * gt, 1)
    pnt = F.softmax(t / T - 1000.0 * gt, 1)
    nckd = (pnt * (pnt.clamp_min(1e-300).log() - lns)).sum(1).mean()
    want = T * T * (1.0 * tckd + 8.0 * nckd)
    got = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=T)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    big = dkd_loss(s * 1e4, t * 1e4, y, alpha=1.0, beta=8.0, temperature=1.0)
    assert torch.isfinite(big)


def _ikl_by_hand(zs, zt, w, alpha, beta, T):
    # pairwise wMSE: 1/4 sum_j sum_k w_j w_k ((t_j - t_k) - (s_j - s_k))^2, raw logits
    c = len(zs)
    wmse = 0.25 * sum(
        w[j] * w[k] * ((zt[j] - zt[k]) - (zs[j] - zs[k])) ** 2 for j in range(c) for k in range(c)
    )
    ps, pt = _softmax(zs, T), _softmax(zt, T)
    sce = -sum(a * math.log(b) for a, b in zip(pt, ps))
    return beta * wmse + alpha * sce


def test_ikl_per_sample_weights_and_warmup():
    T, T2, alpha, beta = 4.0, 2.0, 1.0, 3.0
    s, t, y = _tensors()
    cfg = DistillConfig(
        method="ikl", temperature=T, weight_temperature=T2, alpha=alpha, beta=beta, warmup=4
    )
    out = distill_loss(cfg, s, t, y, epoch=1)
    w = _softmax(ZT, T2)
    want = -math.log(_softmax(ZS)[Y]) + 0.25 * _ikl_by_hand(ZS, ZT, w, alpha, beta, T)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_ikl_class_prior_weights():
    s, t, y = _tensors()
    w = [0.2, 0.5, 0.3]
    cfg = DistillConfig(method="ikl", temperature=1.0, alpha=2.0, beta=0.5, warmup=0)
    out = distill_loss(cfg, s, t, y, epoch=1, class_weights=torch.tensor([w], dtype=torch.float64))
    want = -math.log(_softmax(ZS)[Y]) + _ikl_by_hand(ZS, ZT, w, 2.0, 0.5, 1.0)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


# --------------------------------------------------------------------------------------------
# mdistiller-format teachers load as they are
# --------------------------------------------------------------------------------------------

MDISTILLER_KEYS = {
    "resnet8x4": [
        "conv1.weight",
        "bn1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.0.bn2.bias",
        "layer3.0.downsample.0.weight",
        "fc.weight",
        "fc.bias",
    ],
    "wrn_40_2": [
        "conv1.weight",
        "block1.layer.0.bn1.weight",
        "block1.layer.0.conv1.weight",
        "block2.layer.0.convShortcut.weight",
        "bn1.running_var",
        "fc.weight",
    ],
}


def _cifar100_context() -> RunContext:
    info = DataInfo("cifar100", 100, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return RunContext(Config(), torch.device("cpu"), 0, 1, info, None, None)


@pytest.mark.parametrize("name", sorted(MDISTILLER_KEYS))
def test_mdistiller_teacher_checkpoint_loads(tmp_path, name):
    from dkl.models import create_model

    src = create_model(name, 100)
    sd = src.state_dict()
    for key in MDISTILLER_KEYS[name]:
        assert key in sd, f"{name}: mdistiller key {key} missing"
    torch.manual_seed(1)
    # perturbed weights, so a fresh init could not pass by chance
    sd = {
        k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in sd.items()
    }
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": sd, "epoch": 240}, path)  # mdistiller's released layout

    ctx = _cifar100_context()
    teacher = ctx.build_model(ModelConfig(name=name, checkpoint=str(path)))
    bare = create_model(name, 100)
    bare.load_state_dict(sd)
    bare.eval()
    teacher.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = bare((x - 0.5) / 0.25)
        got = teacher(x)  # inputs in [0, 1]; normalisation inside the wrapper
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# CLI: demo and eval end to end (short)
# --------------------------------------------------------------------------------------------


def test_demo_and_eval_cli(tmp_path, capsys):
    import json

    from dkl.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "1", "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| method | top-1 | per seed | time / run |" in printed
    assert "±" not in printed  # one seed: single values, no spread
    s = json.loads((out / "summary.json").read_text())
    assert set(s["methods"]) == {"ce", "kd", "dkd", "ikl"}
    assert all(len(r["runs"]) == 1 for r in s["methods"].values())
    assert s["teacher"]["params"] > 10 * s["methods"]["ce"]["params"]  # clearly smaller student
    assert s["labeled_images"] == 70 and s["train_images"] == 1347  # 5 %: 7 labels per class
    assert s["reference_ce_all_labels"]["runs"][0]["labeled_images"] == 1347
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 1000

    # evaluating the saved ikl student reproduces its logged accuracy
    run = out / "digits_ikl_s0"
    assert main(["eval", str(run / "final.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["top1"] == pytest.approx(s["methods"]["ikl"]["runs"][0]["top1"])


def test_cifar100_preset_end_to_end_on_generated_files(tmp_path, monkeypatch):
    """The real resnet32x4 -> resnet8x4 IKL preset, two steps on CIFAR-100 files in the real
    format, with a teacher checkpoint in mdistiller's layout and two loader workers."""
    import os
    import pickle

    import numpy as np

    tv_cifar = pytest.importorskip("torchvision.datasets.cifar")
    from dkl.api import train
    from dkl.config import load_config
    from dkl.models import create_model

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    d = tmp_path / "data" / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        with open(d / split, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": rng.integers(0, 100, n).tolist(),
                    "coarse_labels": [0] * n,
                },
                f,
            )
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    ckpt = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": create_model("resnet32x4", 100).state_dict()}, ckpt)

    cfg = load_config(
        "kd/cifar100_resnet32x4_resnet8x4_ikl",
        [
            f"data.root={tmp_path / 'data'}",
            "data.batch_size=8",
            "data.num_workers=2",
            f"distill.teacher.checkpoint={ckpt}",
            "train.epochs=1",
            f"train.out_dir={tmp_path / 'runs'}",
            "train.progress=false",
            "train.plot=false",
            "train.device=cpu",
        ],
    )
    s = train(cfg, log=lambda m: None)
    assert s["steps"] == 2 and s["method"] == "ikl" and s["model"] == "resnet8x4"
    assert 0 <= s["last"]["top1"] <= 100


# --------------------------------------------------------------------------------------------
# GKL (the authors' DKLv2) and the GI prior's temperature
# --------------------------------------------------------------------------------------------


def _gkl_by_hand(zs, zt, w, alpha, beta, gamma, T):
    # DKLv2: beta * 1/4 sum_i sum_jk p_ij p_ik (dt - ds)^2 / sum_i sum_jk p_ij p_ik + alpha * mean sCE
    b, c = len(zs), len(zs[0])
    p = [[wi**gamma for wi in row] for row in w]
    num = den = sce = 0.0
    for i in range(b):
        for j in range(c):
            for k in range(c):
                pp = p[i][j] * p[i][k]
                num += 0.25 * pp * ((zt[i][j] - zt[i][k]) - (zs[i][j] - zs[i][k])) ** 2
                den += pp
        ps, pt = _softmax(zs[i], T), _softmax(zt[i], T)
        sce -= sum(a * math.log(q) for a, q in zip(pt, ps)) / b
    return beta * num / den + alpha * sce


def test_gkl_method_with_prior_rows_and_with_per_sample_weights():
    zs = [[1.0, 0.0, -1.0], [0.3, 0.2, 0.9]]
    zt = [[0.5, 2.0, 0.0], [-1.0, 0.4, 1.5]]
    y = torch.tensor([0, 2])
    s, t = torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64)
    ce = F.cross_entropy(s, y).item()
    rows = [[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]
    cfg = DistillConfig(method="gkl", alpha=1.0, beta=16.0, gamma=0.05, temperature=4.0, warmup=2)
    out = distill_loss(cfg, s, t, y, epoch=1, class_weights=torch.tensor(rows, dtype=torch.float64))
    want = ce + 0.5 * _gkl_by_hand(zs, zt, rows, 1.0, 16.0, 0.05, 4.0)
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)  # the loss runs in float32
    # no GI: the weights are softmax(z_t / T2) ** gamma
    cfg = DistillConfig(
        method="gkl", alpha=2.0, beta=3.0, gamma=0.5, temperature=2.0, weight_temperature=4.0,
        warmup=0,
    )  # fmt: skip
    out = distill_loss(cfg, s, t, y, epoch=1)
    w = [_softmax(row, 4.0) for row in zt]
    assert out["loss"].item() == pytest.approx(
        ce + _gkl_by_hand(zs, zt, w, 2.0, 3.0, 0.5, 2.0), rel=1e-6
    )


@pytest.mark.parametrize("method", ["ikl", "gkl"])
def test_gi_prior_temperature_defaults_to_the_weight_temperature(method):
    # the authors' KD code feeds the class prior with softmax(z_t / T2), not softmax(z_t / T)
    from dkl.config import config_from_dict
    from dkl.recipes.distill import DistillTask

    def prior_t(**distill):
        cfg = config_from_dict({"recipe": "distill", "distill": {"method": method, **distill}})
        info = DataInfo("toy", 3, (3, 2, 2), (0.5,) * 3, (0.25,) * 3)
        ctx = RunContext(cfg, torch.device("cpu"), 0, 1, info, None, None, eval_only=True)
        return DistillTask(cfg, ctx).prior.temperature

    assert prior_t(gi=True, temperature=4.0, weight_temperature=1.0) == 1.0
    assert prior_t(gi=True, temperature=4.0, weight_temperature=1.0, prior_temperature=2.0) == 2.0
    with pytest.raises(ValueError, match="gamma"):
        config_from_dict({"recipe": "distill", "distill": {"method": "gkl", "gamma": -1.0}})


def test_a_teacher_read_from_a_dkl_checkpoint_keeps_its_input_normalisation(tmp_path):
    """A teacher trained with model.normalize=false, named by its checkpoint alone: the student
    run must build it as it was trained (it got the Normalize wrapper, a different model)."""
    from dkl.api import make_trainer
    from dkl.config import load_config

    teacher_cfg, final, base = _teacher_run(tmp_path, "model.normalize=false")
    student_cfg = load_config(
        "kd/digits_kd", [*base, f"distill.teacher.checkpoint={final}", "distill.teacher.name="]
    )
    teacher = make_trainer(student_cfg, log=lambda m: None).task.teacher
    trained = make_trainer(teacher_cfg, log=lambda m: None).raw_model
    trained.load_state_dict(torch.load(final, weights_only=True)["model"])
    trained.eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), trained(x))


def _teacher_run(tmp_path, *extra):
    """A tiny teacher run: its config, its final.pt and the overrides a student run reuses."""
    cfg = tiny_run(tmp_path, *extra, steps=3)
    return cfg, cfg.run_dir / "final.pt", tiny_overrides(tmp_path, steps=3)


def _normalize_buffers(model):
    from dkl.models.normalize import NormalizedModel

    (norm,) = [m for m in model.modules() if isinstance(m, NormalizedModel)]
    n = norm.normalize
    return [float(v) for v in n.mean.flatten()] + [float(v) for v in n.std.flatten()]


def test_a_dkl_teacher_normalises_with_the_statistics_it_was_trained_with(tmp_path):
    """The Normalize buffers are not in the state dict: a teacher trained with mean 0.5 / std
    0.1 was rebuilt with the student run's own statistics (its accuracy 100 -> 67 in a user's
    run). The same goes for `dkl eval` of a run on other data."""
    from dkl.api import load_run, make_trainer
    from dkl.config import load_config

    _, final, base = _teacher_run(tmp_path, "data.mean=[0.5]", "data.std=[0.1]", "name=t")
    student_cfg = load_config(
        "kd/digits_kd", [*base, f"distill.teacher.checkpoint={final}", "distill.teacher.name="]
    )
    student = make_trainer(student_cfg, log=lambda m: None)
    assert student.ctx.info.mean != (0.5,)  # the student's own statistics differ
    assert _normalize_buffers(student.task.teacher) == pytest.approx([0.5, 0.1])
    # evaluated with data statistics of its own ("auto" would give the data's), the record wins
    _, model = load_run(final, ["data.mean=auto", "data.std=auto"])
    assert _normalize_buffers(model) != pytest.approx([0.5, 0.1])  # the user's word
    _, model = load_run(final)
    assert _normalize_buffers(model) == pytest.approx([0.5, 0.1])


def test_a_teacher_of_other_classes_is_refused(tmp_path):
    """Only the number of classes was compared: a teacher of other class names was read in the
    student data's class order (top-1 0.00, training went on)."""
    from dkl.api import make_trainer
    from dkl.config import ConfigError, load_config
    from dkl.train.checkpoint import load_checkpoint, save_checkpoint

    _, final, base = _teacher_run(tmp_path, "name=t")
    state = load_checkpoint(final)
    assert state["data"]["classes"] == [str(i) for i in range(10)]
    state["data"]["classes"][3] = "cat"
    other = tmp_path / "other.pt"
    save_checkpoint(state, other)
    cfg = load_config(
        "kd/digits_kd", [*base, f"distill.teacher.checkpoint={other}", "distill.teacher.name="]
    )
    with pytest.raises(ConfigError, match=r"other classes than this data's \(class names .*"
                       r"class 3: 'cat' -> '3'\)"):  # fmt: skip
        make_trainer(cfg, log=lambda m: None)


def test_a_teacher_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    from dkl.api import make_trainer
    from dkl.config import load_config

    _, final, base = _teacher_run(tmp_path, "name=t")
    weights = torch.load(final, weights_only=True)["model"]
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    cfg = load_config("kd/digits_kd", [*base, f"distill.teacher.checkpoint={path}"])
    teacher = make_trainer(cfg, log=lambda m: None).task.teacher
    inner = teacher.model if hasattr(teacher, "model") else teacher
    for k, v in weights.items():
        assert torch.equal(inner.state_dict()[k], v), k
