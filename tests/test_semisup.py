"""Semi-supervised learning: label split, views, resumable sampling, the per-batch losses on fixed
logits (hand-computed), the EMA teacher, the USB ViT weight loader and layer-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dkl.data import (
    DigitsStrong,
    DigitsWeak,
    InfiniteBatchSampler,
    SemiSupLoader,
    ViewDataset,
    split_labeled,
)
from dkl.models import load_usb_pretrained, resize_pos_embed
from dkl.recipes.semisup import (
    SemiSupTask,
    confidence_mask,
    fixmatch_loss,
    ikl_consistency,
    masked_batch_mean,
    meanteacher_loss,
    param_groups,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- label split
def _labels(n_per_class=(7, 5, 9, 6)) -> torch.Tensor:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


def test_split_is_stratified_disjoint_and_covers_everything():
    y = _labels()
    lab, unl = split_labeled(y, 3, seed=0)
    assert torch.bincount(y[lab]).tolist() == [3, 3, 3, 3]
    assert set(lab).isdisjoint(unl)
    assert sorted(lab + unl) == list(range(len(y)))
    assert lab == sorted(lab) and unl == sorted(unl)


def test_split_is_reproducible_by_seed():
    y = _labels()
    assert split_labeled(y, 2, seed=5) == split_labeled(y, 2, seed=5)
    assert {tuple(split_labeled(y, 2, seed=s)[0]) for s in range(6)}.__len__() > 1


def test_split_can_include_labeled_in_unlabeled_like_usb():
    y = _labels()
    lab, unl = split_labeled(y, 2, seed=0, include_labeled_in_unlabeled=True)
    assert unl == list(range(len(y))) and set(lab) <= set(unl)


@pytest.mark.parametrize("seed", [0, 3])
def test_split_picks_the_images_usb_picks(seed):
    # USB: np.random.seed(seed); per class c in order: idx = np.where(y == c)[0];
    # np.random.shuffle(idx); the first n are labeled
    import numpy as np

    y = np.random.RandomState(11).randint(0, 10, size=500)
    state = np.random.get_state()
    np.random.seed(seed)
    want = []
    for c in range(10):
        idx = np.where(y == c)[0]
        np.random.shuffle(idx)
        want.extend(idx[:2].tolist())
    np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    lab, unl = split_labeled(torch.as_tensor(y), 2, seed=seed)
    assert lab == sorted(want)
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is untouched
    assert sorted(lab + unl) == list(range(500))


def test_split_errors_name_the_problem():
    with pytest.raises(ValueError, match="class 1, the smallest, has 5 samples.*at most 4"):
        split_labeled(_labels(), 5)
    # the smallest class is named, not the first that fails (class 0 has 8, class 1 has 3)
    y = torch.tensor([0] * 8 + [1] * 3 + [2] * 6)
    with pytest.raises(ValueError, match=r"class 1, the smallest, has 3 samples.*at most 2$"):
        split_labeled(y, 7)
    with pytest.raises(ValueError, match="num_labels_per_class >= 1"):
        split_labeled(_labels(), 0)
    with pytest.raises(ValueError, match="1-D integer"):
        split_labeled(torch.rand(10), 1)


# --------------------------------------------------------------------------- views and sampling
def test_digit_views_keep_shape_and_range():
    torch.manual_seed(0)
    x = torch.rand(1, 8, 8)
    for tf in (DigitsWeak(), DigitsStrong()):
        v = tf(x)
        assert v.shape == (1, 8, 8) and v.min() >= 0 and v.max() <= 1
    # a weak view is a shift of the image: its pixels are the image's pixels or zero fill
    w = DigitsWeak()(x)
    assert torch.isin(w[w != 0], x).all()
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        DigitsWeak()(torch.rand(8, 8))
    # batched: one shift per image; each output is its own image shifted
    xb = torch.rand(5, 1, 8, 8)
    wb = DigitsWeak()(xb, generator=torch.Generator().manual_seed(0))
    for k in range(5):
        nz = wb[k][wb[k] != 0]
        assert torch.isin(nz, xb[k]).all()
    assert DigitsStrong()(xb).shape == (5, 1, 8, 8)


def test_view_dataset_is_deterministic_per_draw_and_leaves_global_rng_alone():
    images, labels = torch.rand(6, 1, 8, 8), torch.arange(6) % 2
    ds = ViewDataset(images, labels, [1, 3, 5], [DigitsWeak(), DigitsStrong()], seed=3)
    state = torch.get_rng_state()
    a, b = ds[(0, 10)], ds[(0, 10)]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = ds[(0, 11)]
    assert not torch.equal(a[1], c[1])  # another draw, another strong view
    assert a[2].item() == labels[1].item() and a[3].item() == 1  # label and original index


def test_a_samples_views_do_not_depend_on_its_batch():
    """Digits views are drawn batched; each image's randomness comes from its own draw number,
    so a sample's views are the same alone, in any batch and at any place in it: what a run on
    1 or 2 ranks (batches of 64 or 32) gives it. Seeded by the batch's first draw, 15 of 16
    labeled images and 48 of 64 unlabeled ones were augmented differently on 2 ranks."""
    images, labels = torch.rand(10, 1, 8, 8), torch.arange(10) % 3
    ds = ViewDataset(images, labels, list(range(10)), [DigitsWeak(), DigitsStrong()], seed=5)
    keys = [(p, 100 + p) for p in range(8)]
    whole = ds.__getitems__(keys)
    halves = [ds.__getitems__(keys[0::2]), ds.__getitems__(keys[1::2])]  # two ranks' shares
    for j, key in enumerate(keys):
        alone = ds[key]
        half = halves[j % 2]
        for v, view in enumerate(alone[:2]):
            assert torch.equal(whole[v][j], view)
            assert torch.equal(half[v][j // 2], view)
        assert int(alone[3]) == key[0] and int(alone[2]) == int(labels[key[0]])
    reversed_batch = ds.__getitems__(keys[::-1])
    assert torch.equal(reversed_batch[1].flip(0), whole[1])


def test_row_streams_are_uniform_normal_and_independent_of_nearby_seeds():
    """The per-image streams behind the batched digits views: uniform and normal moments of
    200,000 draws, integers in range and even, and consecutive seeds (consecutive draw numbers)
    neither equal nor shifted copies of each other."""
    from dkl.data.transforms import RowStreams

    rows = RowStreams(torch.arange(400))
    u = rows.rand((500,), torch.float64)
    assert abs(float(u.mean()) - 0.5) < 3e-3 and abs(float(u.var()) - 1 / 12) < 1e-3
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    z = rows.randn((500,), torch.float64)
    assert abs(float(z.mean())) < 1e-2 and abs(float(z.std()) - 1.0) < 1e-2
    k = rows.randint(3, (500,))
    counts = torch.bincount(k.flatten(), minlength=3).double() / k.numel()
    assert int(k.min()) == 0 and int(k.max()) == 2 and float((counts - 1 / 3).abs().max()) < 5e-3
    corr = torch.corrcoef(u[:50])[~torch.eye(50, dtype=torch.bool)]
    assert float(corr.abs().max()) < 0.25  # 50 x 49 pairs of 500 draws: |r| ~ 0.045
    assert not torch.equal(u[0, 1:], u[1, :-1])


def test_infinite_sampler_epochs_are_permutations_and_resume_exactly():
    s = InfiniteBatchSampler(7, 3, seed=2)
    it = iter(s)
    batches = [next(it) for _ in range(7)]  # 21 draws = 3 epochs
    pos = [p for b in batches for p, _ in b]
    for e in range(3):
        assert sorted(pos[7 * e : 7 * e + 7]) == list(range(7))
    assert [k for b in batches for _, k in b] == list(range(21))
    resumed = InfiniteBatchSampler(7, 3, seed=2, start=4)
    assert next(iter(resumed)) == batches[4]
    ranks = [InfiniteBatchSampler(7, 3, seed=2, rank=r, world=2).batch(0) for r in (0, 1)]
    assert {k for _, k in ranks[0]}.isdisjoint({k for _, k in ranks[1]})


def _tiny_loader(**kw) -> SemiSupLoader:
    images = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 4
    lab, unl = split_labeled(labels, 2, seed=0)
    ls = ViewDataset(images, labels, lab, [DigitsWeak()], seed=0, stream=0)
    us = ViewDataset(images, labels, unl, [DigitsWeak(), DigitsStrong()], seed=0, stream=1)
    return SemiSupLoader(ls, us, batch_size=3, uratio=2, seed=0, **kw)


def test_loader_pairs_batches_with_uratio_and_resumes_mid_stream():
    ref = _tiny_loader()
    got = [next(ref) for _ in range(6)]
    lab, unl = got[0]
    assert lab[0].shape == (3, 1, 8, 8) and len(lab) == 3
    assert unl[0].shape == (6, 1, 8, 8) and len(unl) == 4
    first = _tiny_loader()
    for _ in range(4):
        next(first)
    state = first.state_dict()
    again = _tiny_loader()
    again.load_state_dict(state)
    for want in got[4:]:
        have = next(again)
        for part_w, part_h in zip(want, have):
            assert all(torch.equal(a, b) for a, b in zip(part_w, part_h))


# --------------------------------------------------------------------------- losses on fixed logits
Z_T = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # row 0 confident (σ = 0.9526), row 1 not (0.5)
Z_S = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
P0 = _sig(3.0)  # confidence of row 0
LOGP = (-math.log1p(math.exp(-1.0)), -math.log1p(math.exp(1.0)))  # log σ([1, 0])


def test_confidence_mask_threshold_is_inclusive_and_detached():
    z = torch.tensor([[3.0, 0.0], [2.9, 0.0], [0.0, 0.0]], requires_grad=True)
    m = confidence_mask(z, 0.95)
    assert m.tolist() == [1.0, 0.0, 0.0] and not m.requires_grad
    assert confidence_mask(z, 0.5).tolist() == [1.0, 1.0, 1.0]  # 0.5 >= 0.5


def test_masked_mean_is_over_the_whole_batch():
    assert masked_batch_mean(
        torch.tensor([2.0, 4.0, 6.0, 8.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    ).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        masked_batch_mean(torch.ones(3), torch.ones(2))


def test_fixmatch_hard_label_by_hand():
    loss, mask = fixmatch_loss(Z_S, Z_T, threshold=0.95, hard_label=True)
    assert mask.tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx(-LOGP[0] / 2, rel=1e-6)


@pytest.mark.parametrize("t", [1.0, 0.5])
def test_fixmatch_soft_label_by_hand(t):
    p0 = _sig(3.0 / t)
    ce = -(p0 * LOGP[0] + (1 - p0) * LOGP[1])
    loss, _ = fixmatch_loss(Z_S, Z_T, threshold=0.95, pl_temperature=t)
    assert loss.item() == pytest.approx(ce / 2, rel=1e-6)


def test_fixmatch_target_gets_no_gradient():
    zs, zt = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    fixmatch_loss(zs, zt)[0].backward()
    assert zt.grad is None and zs.grad[1].abs().sum() == 0 and zs.grad[0].abs().sum() > 0


def test_ikl_consistency_by_hand():
    # two classes: wMSE = ½ w0 w1 ((t0 - t1) - (s0 - s1))², w = σ(z_t / T2)
    alpha, beta, t2 = 1.0, 0.1, 2.0
    w0 = _sig(3.0 / t2)
    wmse = 0.5 * w0 * (1 - w0) * (3.0 - 1.0) ** 2
    sce = -(P0 * LOGP[0] + (1 - P0) * LOGP[1])
    loss, mask = ikl_consistency(
        Z_S, Z_T, threshold=0.95, alpha=alpha, beta=beta, weight_temperature=t2
    )
    assert mask.tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx((beta * wmse + alpha * sce) / 2, rel=1e-6)


def test_ikl_consistency_moves_the_weak_view_unless_detached():
    zs, zt = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    ikl_consistency(zs, zt, detach_weights=True)[0].backward()
    # d/dt0 of β·½ w0 w1 (Δt − Δs)² / B = β·w0 w1 (Δt − Δs) / B
    w0 = P0
    assert zt.grad[0, 0].item() == pytest.approx(0.1 * w0 * (1 - w0) * 2.0 / 2, rel=1e-5)
    assert zt.grad[1].abs().sum() == 0  # masked row: no gradient at all
    zs, zt = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    ikl_consistency(zs, zt, detach_target=True)[0].backward()
    assert zt.grad is None


@pytest.mark.parametrize("t2", [1.0, 2.5])
def test_ikl_consistency_weights_carry_gradient_as_in_the_authors_code(t2):
    # FixMatch-IKL as the authors run it: w = softmax(z_w / T2) NOT detached, so the pairwise
    # wMSE differentiates the weights too; oracle: the pairwise form in float64 under autograd
    g = torch.Generator().manual_seed(0)
    zs0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    zt0 = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    alpha, beta = 1.0, 0.1
    zs, zt = zs0.clone().requires_grad_(), zt0.clone().requires_grad_()
    loss, mask = ikl_consistency(zs, zt, threshold=0.5, alpha=alpha, beta=beta,
                                 weight_temperature=t2)  # fmt: skip
    loss.backward()

    rs, rt = zs0.clone().requires_grad_(), zt0.clone().requires_grad_()
    w = (rt / t2).softmax(1)  # live weights
    d = (rt[:, :, None] - rt[:, None, :]) - (rs[:, :, None] - rs[:, None, :])
    wmse = 0.25 * (w[:, :, None] * w[:, None, :] * d**2).sum((1, 2))
    sce = -(rt.detach().softmax(1) * rs.log_softmax(1)).sum(1)
    ref = ((beta * wmse + alpha * sce) * mask).mean()
    ref.backward()
    assert 0 < mask.sum() < 6
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(zs.grad, rs.grad)
    torch.testing.assert_close(zt.grad, rt.grad)
    # detach_weights=True: the weights are constants (dkl.ikl_loss), a different target gradient
    zt2 = zt0.clone().requires_grad_()
    ikl_consistency(zs0, zt2, threshold=0.5, alpha=alpha, beta=beta, weight_temperature=t2,
                    detach_weights=True)[0].backward()  # fmt: skip
    assert not torch.allclose(zt2.grad, rt.grad)


def test_fixmatch_ikl_weight_detaching_is_a_config_switch_defaulting_to_the_authors():
    from dkl.config import load_config

    assert load_config("semisup/cifar100_fixmatch_ikl").semisup.detach_weights is False
    cfg = load_config("semisup/cifar100_fixmatch_ikl", ["semisup.detach_weights=true"])
    assert cfg.semisup.detach_weights is True


def test_meanteacher_mse_of_probabilities_by_hand():
    d = P0 - _sig(1.0)  # both classes differ by the same amount with two classes
    loss, mask = meanteacher_loss(Z_S, Z_T, threshold=0.95)
    assert mask.tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx(d * d / 2, rel=1e-6)  # mean over classes, then batch
    loss0, mask0 = meanteacher_loss(Z_S, Z_T, threshold=0.0)
    d1 = 0.5 - _sig(-2.0)
    assert mask0.tolist() == [1.0, 1.0]
    assert loss0.item() == pytest.approx((d * d + d1 * d1) / 2, rel=1e-6)


def test_losses_reject_mismatched_logits():
    with pytest.raises(
        ValueError, match=r"target of shape \(B, C\) = \(2, 3\) like input, got \(2, 4\)"
    ):
        fixmatch_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating-point input logits, got torch.int64"):
        ikl_consistency(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


# --------------------------------------------------------------------------- EMA teacher
def _task_training(model: nn.Module, method: str, *overrides: str) -> SemiSupTask:
    """The task of a digits ``method`` run whose trained model is ``model`` (built, like the
    trainer's, by the task's own ``build_model``, which also makes its EMA)."""
    from dkl.api import make_trainer
    from dkl.config import load_config

    cfg = load_config(f"semisup/digits_{method}", ["train.device=cpu", *overrides])
    task = make_trainer(cfg, log=lambda m: None).task
    assert isinstance(task, SemiSupTask)
    task.ctx.build_model = lambda mcfg, **kw: model
    task.raw_model = task.model = task.build_model()
    assert task.raw_model is model
    return task


def _step_ctx(global_step: int = 0):
    from dkl.train import StepContext

    return StepContext(1, global_step, global_step, 100, 100)


def test_ema_update_by_hand_and_buffers_copied():
    student = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(3.0)
    task = _task_training(student, "fixmatch", "semisup.eval_ema=true",
                          "semisup.ema_momentum=0.999")  # fmt: skip
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        student[1].running_mean.fill_(7.0)
    task.after_step(_step_ctx())
    for p in task.ema.module.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.999 * 3.0 + 0.001 * 1.0))
        assert not p.requires_grad
    assert task.ema.module[1].running_mean.item() == 7.0  # buffers copied, as USB does
    assert task.eval_model() is task.ema.module


def test_meanteacher_task_teacher_is_ema_and_gets_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    task = _task_training(model, "meanteacher_ikl", "semisup.threshold=0.0", "semisup.alpha=0.02",
                          "semisup.beta=0.03", "semisup.ema_momentum=0.999")  # fmt: skip
    assert task.eval_model() is task.ema.module
    x = torch.rand(4, 1, 2, 2)
    lab = (x[:2], torch.tensor([0, 1]), torch.arange(2))
    unl = (x, x.flip(0), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    m = task.train_step((lab, unl), _step_ctx())
    m["loss"].backward()
    assert all(p.grad is None for p in task.ema.module.parameters())
    before = [p.clone() for p in task.ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.after_step(_step_ctx())
    for b, e, s in zip(before, task.ema.module.parameters(), model.parameters()):
        assert torch.allclose(e, 0.999 * b + 0.001 * s)
    assert m["mask_ratio"].item() == 1.0 and task.pl.reduce()["unl_count"] == 4


def test_fixmatch_task_runs_one_forward_and_counts_pseudo_labels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    calls = []
    model.register_forward_hook(lambda mod, i, o: calls.append(i[0].shape[0]))
    task = _task_training(model, "fixmatch", "semisup.threshold=0.0", "semisup.eval_ema=false")
    x = torch.rand(4, 1, 2, 2)
    lab = (x[:2], torch.tensor([0, 1]), torch.arange(2))
    unl = (x, x, torch.tensor([0, 1, 2, 0]), torch.arange(4))
    out = task.train_step((lab, unl), _step_ctx())
    assert calls == [2 + 4 + 4]  # labeled + weak + strong in one pass
    assert set(out) == {"loss", "logits", "labels", "sup_loss", "unsup_loss", "mask_ratio"}
    with torch.no_grad():
        pred = model(x).argmax(1)
    counts = task.pl.reduce()
    assert counts["pl_correct"] == (pred == unl[2]).sum().item()
    assert counts["pl_count"] == 4 and counts["unl_count"] == 4  # threshold 0 keeps all
    assert task.ema is None and task.eval_model() is model
    from dkl.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="semisup.method"):
        config_from_dict({"recipe": "semisup", "semisup": {"method": "mixmatch"}})


# --------------------------------------------------------------------------- optimiser, schedule
class TinyViTLike(nn.Module):
    """The parameter names of timm's / USB's VisionTransformer at a toy size."""

    def __init__(self, grid: int = 16, dim: int = 8, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2, 2)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}


def test_layer_decay_groups_by_hand():
    lr, wd = 1.0, 5e-4
    groups = param_groups(TinyViTLike(depth=2), lr=lr, weight_decay=wd, layer_decay=0.5)
    got = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    want_lr = {
        "cls_token": 0.125,
        "pos_embed": 0.125,
        "patch_embed.proj.weight": 0.125,
        "patch_embed.proj.bias": 0.125,
        "blocks.0.0.weight": 0.25,
        "blocks.0.1.weight": 0.25,
        "blocks.1.1.bias": 0.5,
        "norm.weight": 0.5,
        "head.weight": 1.0,
        "head.bias": 1.0,
    }
    for name, v in want_lr.items():
        assert got[name][0] == pytest.approx(v), name
    decayed = {n for n, (_, w) in got.items() if w == wd}
    assert decayed == {
        "patch_embed.proj.weight",
        "blocks.0.1.weight",
        "blocks.1.1.weight",
        "head.weight",
    }
    assert len(got) == len(list(TinyViTLike(depth=2).parameters()))


def test_layer_decay_needs_a_vit_and_plain_groups_skip_bias_decay():
    mlp = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="ViT-like"):
        param_groups(mlp, lr=0.1, weight_decay=0.1, layer_decay=0.5)
    from dkl.config import OptimConfig
    from dkl.train import build_optimizer

    groups = param_groups(mlp, lr=0.1, weight_decay=0.1)
    opt = build_optimizer(OptimConfig(name="adamw", lr=0.1, weight_decay=0.1), groups)
    assert isinstance(opt, torch.optim.AdamW)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(mlp[0].weight)] == 0.1 and wd_of[id(mlp[0].bias)] == 0.0
    assert wd_of[id(mlp[1].weight)] == 0.0


def test_usb_cosine_schedule_by_hand():
    from dkl.config import load_config
    from dkl.train import build_scheduler, lr_factor

    cfg = load_config("semisup/cifar100_fixmatch")
    total, warm = 204_800, 5_120
    assert (cfg.sched.name, cfg.sched.warmup, cfg.sched.cycles) == ("usb_cosine", warm, 7 / 16)

    def f(step: int) -> float:  # the factor of update number `step` (0-based)
        return lr_factor(cfg.sched, float(step), float(total))

    assert f(0) == 0.0
    assert f(2_560) == pytest.approx(0.5)
    assert f(warm) == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert f(mid) == pytest.approx(math.cos(math.pi * 7 / 16 * (mid - warm) / (total - warm)))
    assert f(total) == pytest.approx(math.cos(7 * math.pi / 16))  # ≈ 0.195, not 0
    # the trainer's LambdaLR (an iteration run) uses the same factor at every update
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.sched, steps_per_epoch=50_000, iterations=total)
    for step in (0, 2_560, warm, mid, total):
        assert sched.lr_lambdas[0](step) == f(step)


# --------------------------------------------------------------------------- USB ViT weights
def _usb_checkpoint(tmp_path, src: nn.Module):
    sd = {"module." + k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / "usb_vit.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    return path


def test_usb_loader_strips_prefix_drops_head_and_resizes_pos_embed(tmp_path):
    torch.manual_seed(0)
    src = TinyViTLike(grid=14, num_classes=1000)
    with torch.no_grad():
        src.pos_embed[:, 1:] = 0.25  # a constant grid: any interpolation must keep it
    path = _usb_checkpoint(tmp_path, src)
    dst = TinyViTLike(grid=16, num_classes=10)
    head_before = dst.head.weight.clone()
    report = load_usb_pretrained(dst, path)
    assert report["resized"] == ["pos_embed"]
    assert set(report["dropped"]) == {"head.weight", "head.bias"}
    assert set(report["missing"]) == {"head.weight", "head.bias"}
    assert torch.equal(dst.head.weight, head_before)
    assert torch.equal(dst.blocks[1][1].weight, src.blocks[1][1].weight)
    assert torch.equal(dst.cls_token, src.cls_token)
    assert dst.pos_embed.shape == (1, 257, 8)
    assert torch.equal(dst.pos_embed[:, :1], src.pos_embed[:, :1])
    assert torch.allclose(dst.pos_embed[:, 1:], torch.full((1, 256, 8), 0.25), atol=1e-6)


def test_usb_loader_errors(tmp_path):
    dst = TinyViTLike()
    with pytest.raises(FileNotFoundError, match="not found"):
        load_usb_pretrained(dst, tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"extra.weight": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="does not have"):
        load_usb_pretrained(dst, bad)
    other = tmp_path / "other.pth"
    torch.save({"optimizer": [1, 2]}, other)
    with pytest.raises(ValueError, match="USB's layout"):
        load_usb_pretrained(dst, other)


def test_resize_pos_embed_matches_timm_resampler():
    timm_layers = pytest.importorskip("timm.layers")
    pe = torch.randn(1, 1 + 14 * 14, 6, generator=torch.Generator().manual_seed(0))
    ours = resize_pos_embed(pe, 1 + 16 * 16)
    # USB interpolates without antialiasing (timm's default antialias=True changes the kernel)
    theirs = timm_layers.resample_abs_pos_embed(pe, [16, 16], num_prefix_tokens=1, antialias=False)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_real_timm_vit_loads_usb_layout_and_gets_decayed_groups(tmp_path):
    pytest.importorskip("timm")
    from dkl.models.vit import vit_tiny_patch2_32

    torch.manual_seed(0)
    src = vit_tiny_patch2_32(1000, depth=2, img_size=28)  # 14×14 patches
    path = _usb_checkpoint(tmp_path, src)
    model = vit_tiny_patch2_32(100, depth=2, pretrained=str(path))
    assert model.pos_embed.shape == (1, 257, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert model.head.out_features == 100
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)
    lrs = {g["lr"] for g in param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)}
    assert sorted(lrs) == [0.125, 0.25, 0.5, 1.0]  # stem, block 0, block 1 + norm, head


def test_cifar_views_on_uint8_images():
    pytest.importorskip("torchvision")
    from dkl.data import cifar_strong, cifar_weak

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g).numpy()
    ds = ViewDataset(images, [0, 1, 2, 3], [0, 2], [cifar_weak(), cifar_strong()], seed=1)
    w, s, y, i = ds[(1, 5)]
    assert w.shape == s.shape == (3, 32, 32) and w.dtype == torch.float32
    assert 0 <= w.min() and w.max() <= 1 and 0 <= s.min() and s.max() <= 1
    assert (y.item(), i.item()) == (2, 2)
    assert torch.equal(ds[(1, 5)][1], s)
    with pytest.raises(ValueError, match="crop_ratio"):
        cifar_weak(crop_ratio=0.0)


# --------------------------------------------------------------------------- the task in runs
@pytest.fixture
def one_thread():
    # the digits models are tiny: one thread is faster and immune to a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _digits_cfg(tmp_path, method: str, *extra: str):
    from dkl.config import load_config

    return load_config(
        f"semisup/digits_{method}",
        [
            f"train.out_dir={tmp_path}",
            "train.iterations=24",
            "train.eval_every=8",
            "train.plot=true",
            "sched.warmup=4",
            "data.batch_size=8",
            "semisup.uratio=2",
            "model.kwargs.width=4",
            "semisup.threshold=0.5",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "method", ["supervised", "fixmatch", "fixmatch_ikl", "meanteacher", "meanteacher_ikl"]
)
def test_presets_load_and_cifar_matches_spec(method):
    from dkl.config import load_config

    cfg = load_config(f"semisup/digits_{method}")
    assert cfg.recipe == "semisup" and cfg.semisup.method == method
    if method == "supervised":
        return
    c = load_config(f"semisup/cifar100_{method}")
    s = c.semisup
    assert (c.data.batch_size, s.uratio, s.num_labels_per_class, s.threshold) == (8, 1, 2, 0.95)
    assert (c.train.iterations, c.sched.warmup, s.layer_decay) == (204_800, 5_120, 0.5)
    assert c.sched.name == "usb_cosine"
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("adamw", 5e-4, 5e-4)
    assert c.model.name == "vit_small_patch2_32" and s.lambda_u == 1.0 and s.unsup_warmup == 0
    want = {
        "fixmatch": (1.0, 0.1),
        "fixmatch_ikl": (1.0, 0.1),
        "meanteacher": (1.0, 0.1),
        "meanteacher_ikl": (0.02, 0.03),
    }[method]
    if method.endswith("ikl"):
        assert (s.alpha, s.beta, s.temperature, s.weight_temperature) == (*want, 1.0, 1.0)
    if method.startswith("meanteacher"):
        assert s.ema_momentum == 0.999


def test_bad_semisup_config_is_a_config_error():
    from dkl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="semisup.method"):
        load_config("semisup/digits_fixmatch", ["semisup.method=mixmatch"])
    with pytest.raises(ConfigError, match="uratio"):
        load_config("semisup/digits_fixmatch", ["semisup.uratio=0"])


def test_run_writes_indices_metrics_and_plot(one_thread, tmp_path):
    import json

    from dkl.api import make_trainer

    cfg = _digits_cfg(tmp_path, "fixmatch_ikl")
    summary = make_trainer(cfg, log=lambda m: None).fit()
    run = tmp_path / cfg.name
    saved = json.loads((run / "labeled_indices.json").read_text())
    assert len(saved["indices"]) == 30 and sorted(saved["labels"]) == sorted(list(range(10)) * 3)
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [8, 16, 24]
    for h in hist:
        assert 0.0 <= h["mask_ratio"] <= 1.0 and 0.0 <= h["pl_acc_all"] <= 100.0
        assert ("pl_acc" in h) == (h["mask_ratio"] > 0)
        assert "train_unsup_loss" in h and "top1" in h
    assert (run / "ssl_curves.png").is_file() and summary["num_labeled"] == 30
    # the lr follows USB's warm-up + cosine (group 0 = the head group, undecayed)
    f = math.cos(math.pi * 7 / 16 * (23 - 4) / (24 - 4))
    assert hist[-1]["lr"] == pytest.approx(cfg.optim.lr * f)


@pytest.mark.parametrize("method", ["fixmatch_ikl", "meanteacher_ikl"])
def test_resume_mid_run_equals_uninterrupted(one_thread, tmp_path, method):
    import os
    import signal

    from dkl.api import make_trainer
    from dkl.train import Interrupted

    quiet = {"log": lambda m: None}
    ref = make_trainer(_digits_cfg(tmp_path / "a", method), **quiet)
    ref.fit()
    cut = make_trainer(_digits_cfg(tmp_path / "b", method), **quiet)
    after_step = cut.task.after_step

    def sigterm_after_13(ctx):  # a SIGTERM between two evaluations (the 13th step of 24)
        after_step(ctx)
        if ctx.global_step + 1 == 13:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: stop after this step

    cut.task.after_step = sigterm_after_13
    with pytest.raises(Interrupted):
        cut.fit()
    assert cut.global_step == 13
    resumed = make_trainer(_digits_cfg(tmp_path / "b", method), **quiet)
    resumed.fit(resume=True)

    def strip(hist):
        return [{k: v for k, v in h.items() if k != "time"} for h in hist]

    assert strip(resumed.history) == strip(ref.history)
    for a, b in zip(ref.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(
        ref.task.eval_model().state_dict().values(),
        resumed.task.eval_model().state_dict().values(),
    ):
        assert torch.equal(a, b)


def test_demo_table_reports_mean_and_sample_std(one_thread, tmp_path):
    import statistics

    from dkl.demos.semisup import run_demo

    table, runs = run_demo(
        tmp_path,
        seeds=2,
        methods=("supervised", "fixmatch"),
        log=lambda m: None,
        overrides=[
            "train.iterations=4",
            "train.eval_every=4",
            "data.batch_size=8",
            "semisup.uratio=1",
            "model.kwargs.width=4",
        ],
    )
    assert (tmp_path / "results.md").read_text().strip() == table
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "results.png").is_file()
    rows = [r for r in table.splitlines() if r.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["supervised", "fixmatch"]
    for row, method in zip(rows, ("supervised", "fixmatch")):
        top1 = [r["top1"] for r in runs[method]]
        want = f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f}"
        assert row.split("|")[2].strip() == want
    assert rows[0].split("|")[4].strip() == "–"  # no mask ratio without unlabeled data


def test_cifar_preset_path_with_a_tiny_vit_and_usb_weights(one_thread, tmp_path, monkeypatch):
    """The CIFAR-100 FixMatch-IKL preset end to end on fake CIFAR-shaped data: PIL views with
    RandAugment, a (depth-1) ViT-Ti/2 from a USB-layout checkpoint, layer decay, USB's schedule."""
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    import numpy as np

    import dkl.train.loop
    from dkl.api import make_trainer
    from dkl.config import load_config
    from dkl.data import DataInfo, TensorImageDataset
    from dkl.models.vit import vit_tiny_patch2_32

    class FakeCifar:  # what build_datasets returns for cifar100: SeededDataset(base with .data)
        def __init__(self, n):
            rng = np.random.default_rng(0)
            self.base = type("Base", (), {})()
            self.base.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.base.targets = [i % 100 for i in range(n)]

        def __len__(self):
            return len(self.base.targets)

    test = TensorImageDataset(torch.rand(20, 3, 32, 32), torch.arange(20) % 100)
    info = DataInfo("cifar100", 100, (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    monkeypatch.setattr(
        dkl.train.loop, "build_datasets", lambda *a, **k: (FakeCifar(300), test, info)
    )
    src = vit_tiny_patch2_32(1000, depth=1, img_size=28)
    ckpt = tmp_path / "usb.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}}, ckpt)
    cfg = load_config(
        "semisup/cifar100_fixmatch_ikl",
        [
            f"train.out_dir={tmp_path}",
            "train.iterations=2",
            "train.eval_every=2",
            "data.num_workers=0",
            "data.batch_size=2",
            "train.plot=false",
            "model.name=vit_tiny_patch2_32",
            f"model.kwargs={{depth: 1, pretrained: {ckpt}}}",
        ],
    )
    trainer = make_trainer(cfg, log=lambda m: None)
    vit = trainer.raw_model.model if hasattr(trainer.raw_model, "model") else trainer.raw_model
    assert torch.equal(vit.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})  # before the schedule
    assert lrs == pytest.approx([5e-4 * 0.25, 5e-4 * 0.5, 5e-4])  # stem, block 0 + norm, head
    trainer.fit()
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([5e-4 * 0.25, 5e-4 * 0.5, 5e-4])
    assert len(trainer.history) == 1 and trainer.history[0]["step"] == 2
    assert trainer.history[0]["lr"] == pytest.approx(5e-4 * 1 / 5120)  # warm-up step 1 of 5,120


def test_the_unsupervised_warm_up_ramps_over_an_epoch_run_too(tmp_path):
    """semisup.unsup_warmup is a fraction of the run's steps; an epoch run (no iterations)
    kept λ_u at its full value from the first step."""
    from dkl.api import make_trainer
    from dkl.config import load_config

    cfg = load_config(
        "semisup/digits_meanteacher",
        [
            f"train.out_dir={tmp_path}",
            "train.iterations=0",
            "train.epochs=2",
            "train.max_steps_per_epoch=4",
            "semisup.unsup_warmup=0.5",
            "train.progress=false",
        ],
    )
    task = make_trainer(cfg, log=lambda m: None).task
    lam = cfg.semisup.lambda_u
    assert [task.lambda_u(it) for it in (0, 2, 4, 7)] == pytest.approx([0, lam / 2, lam, lam])


@pytest.mark.parametrize("source", ["npz", "imagefolder"])
def test_semisup_on_own_data_is_one_line_naming_the_data_sets_it_takes(tmp_path, source):
    """It was refused with two different messages, one naming an internal class."""
    import numpy as np
    from PIL import Image

    from dkl.api import make_trainer
    from dkl.config import ConfigError, load_config

    if source == "npz":
        root = tmp_path / "d.npz"
        np.savez(root, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2)
    else:
        root = tmp_path / "d"
        for split in ("train", "val"):
            for c in ("a", "b"):
                (root / split / c).mkdir(parents=True)
                for i in range(3):
                    Image.new("L", (8, 8), i * 40).save(root / split / c / f"{i}.png")
    cfg = load_config(
        "semisup/digits_fixmatch_ikl",
        [f"data.name={source}", f"data.root={root}", "train.progress=false", "data.image_size=8"],
    )
    with pytest.raises(ConfigError, match=rf"recipe semisup: runs on digits, cifar10, cifar100 .* "
                       rf"got data.name='{source}'"):  # fmt: skip
        make_trainer(cfg, log=lambda m: None)
