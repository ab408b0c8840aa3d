"""Model zoo tests.

Expected key names and shapes below are literals derived by hand from the reference
definitions (mdistiller ``mdistiller/models/cifar/*.py``; RobustBench
``model_zoo/architectures/wide_resnet.py``, ``dm_wide_resnet.py``, ``resnet.py``), never from
dkl's own code. Parameter counts are the ones reported by CRD (Tian et al. 2020) / mdistiller /
the WRN and MobileNet papers.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from dkl.models import (
    Normalize,
    NormalizedModel,
    count_parameters,
    create_model,
    list_models,
    load_weights,
    register_model,
    with_normalization,
)

CIFAR_NAMES = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
]  # fmt: skip

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    """The five state_dict entries of a BatchNorm2d(c)."""
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def meta_model(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes, **kwargs)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_state(spec: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, shape in spec.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


# ---------------------------------------------------------------- expected layouts (hand-derived)


def mdistiller_resnet8x4_spec(num_classes: int = 100) -> dict[str, tuple[int, ...]]:
    # resnet.py: ResNet(8, [32, 64, 128, 256], "basicblock"): n = 1 block per stage, every stage
    # changes width, so every block has downsample = Sequential(conv1x1, bn)
    spec = {"conv1.weight": (32, 3, 3, 3), **bn("bn1", 32)}
    cin = 32
    for stage, cout in ((1, 64), (2, 128), (3, 256)):
        p = f"layer{stage}.0"
        spec[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
        spec.update(bn(f"{p}.bn1", cout))
        spec[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
        spec.update(bn(f"{p}.bn2", cout))
        spec[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
        spec.update(bn(f"{p}.downsample.1", cout))
        cin = cout
    spec["fc.weight"] = (num_classes, 256)
    spec["fc.bias"] = (num_classes,)
    return spec


def wrn_spec(depth: int, k: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    # mdistiller wrn.py == RobustBench wide_resnet.py (sub_block1=False): conv1,
    # block{1,2,3}.layer.<i>.{bn1, conv1, bn2, conv2, convShortcut (only if in != out)}, bn1, fc
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    spec = {"conv1.weight": (16, 3, 3, 3)}
    for b in (1, 2, 3):
        for i in range(n):
            cin = widths[b - 1] if i == 0 else widths[b]
            cout = widths[b]
            p = f"block{b}.layer.{i}"
            spec.update(bn(f"{p}.bn1", cin))
            spec[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            spec.update(bn(f"{p}.bn2", cout))
            spec[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                spec[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
    spec.update(bn("bn1", widths[3]))
    spec["fc.weight"] = (num_classes, widths[3])
    spec["fc.bias"] = (num_classes,)
    return spec


def dm_wrn_spec(depth: int, k: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    # RobustBench dm_wide_resnet.py DMWideResNet (its Swish WRNs)
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    spec = {"mean": (3, 1, 1), "std": (3, 1, 1), "init_conv.weight": (16, 3, 3, 3)}
    for g in range(3):
        for i in range(n):
            cin = widths[g] if i == 0 else widths[g + 1]
            cout = widths[g + 1]
            p = f"layer.{g}.block.{i}"
            spec.update(bn(f"{p}.batchnorm_0", cin))
            spec[f"{p}.conv_0.weight"] = (cout, cin, 3, 3)
            spec.update(bn(f"{p}.batchnorm_1", cout))
            spec[f"{p}.conv_1.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                spec[f"{p}.shortcut.weight"] = (cout, cin, 1, 1)
    spec.update(bn("batchnorm", widths[3]))
    spec["logits.weight"] = (num_classes, widths[3])
    spec["logits.bias"] = (num_classes,)
    return spec


def preact18_spec(num_classes: int) -> dict[str, tuple[int, ...]]:
    # RobustBench resnet.py PreActResNet(PreActBlock, [2, 2, 2, 2], bn_before_fc=True)
    spec = {"conv1.weight": (64, 3, 3, 3)}
    cin = 64
    for s, cout in enumerate((64, 128, 256, 512), start=1):
        for i in range(2):
            p = f"layer{s}.{i}"
            spec.update(bn(f"{p}.bn1", cin))
            spec[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            spec.update(bn(f"{p}.bn2", cout))
            spec[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                spec[f"{p}.shortcut.0.weight"] = (cout, cin, 1, 1)
            cin = cout
    spec.update(bn("bn", 512))
    spec["linear.weight"] = (num_classes, 512)
    spec["linear.bias"] = (num_classes,)
    return spec


# spot checks of other mdistiller models: (key, shape) literals read off the reference source
SPOT_CHECKS: dict[str, dict[str, tuple[int, ...]]] = {
    "resnet56": {
        "conv1.weight": (16, 3, 3, 3),
        "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.8.conv2.weight": (64, 64, 3, 3),
        "fc.weight": (100, 64),
    },
    "resnet32x4": {
        "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.4.bn2.running_var": (256,),
        "fc.weight": (100, 256),
    },
    "vgg13": {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.0.bias": (64,),
        "block0.1.running_mean": (64,),
        "block0.3.weight": (64, 64, 3, 3),
        "block4.4.running_var": (512,),
        "classifier.weight": (100, 512),
    },
    "vgg8": {"block0.1.weight": (64,), "block3.0.weight": (512, 256, 3, 3)},
    "MobileNetV2": {
        "conv1.0.weight": (16, 3, 3, 3),
        "conv1.1.weight": (16,),
        "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3),
        "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.1.0.conv.0.weight": (48, 8, 1, 1),
        "blocks.6.0.conv.7.running_mean": (160,),
        "conv2.0.weight": (1280, 160, 1, 1),
        "classifier.0.weight": (100, 1280),
    },
    "ShuffleV1": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv2.weight": (54, 1, 3, 3),
        "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer1.1.conv1.weight": (60, 80, 1, 1),
        "layer3.3.bn3.weight": (960,),
        "linear.weight": (100, 960),
    },
    "ShuffleV2": {
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv2.weight": (58, 24, 1, 1),
        "layer1.0.conv3.weight": (58, 24, 1, 1),
        "layer1.0.conv4.weight": (58, 1, 3, 3),
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer1.3.bn3.weight": (58,),
        "layer2.7.conv2.weight": (116, 1, 3, 3),
        "conv2.weight": (1024, 464, 1, 1),
        "linear.weight": (100, 1024),
    },
    "ResNet50": {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer1.0.shortcut.1.running_var": (256,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
    "mobilenet_v1": {
        "model.0.0.weight": (32, 3, 3, 3),
        "model.1.0.weight": (32, 1, 3, 3),
        "model.1.3.weight": (64, 32, 1, 1),
        "model.13.4.running_var": (1024,),
        "fc.weight": (100, 1024),
    },
}

ABSENT_KEYS = {
    "resnet56": ["layer1.0.downsample.0.weight"],  # 16 -> 16: identity shortcut
    "wrn_40_1": ["block1.layer.0.convShortcut.weight"],  # 16 -> 16
    "vgg8": ["block0.3.weight"],
    "ResNet50": ["layer1.1.shortcut.0.weight"],
}


# ---------------------------------------------------------------------------- layouts and loading


def test_resnet8x4_state_dict_matches_mdistiller_layout(tmp_path):
    spec = mdistiller_resnet8x4_spec()
    model = create_model("resnet8x4", 100)
    assert shapes(model) == spec
    sd = random_state(spec)
    torch.save({"model": sd, "epoch": 240, "best_acc": 73.1}, tmp_path / "ckpt_epoch_240.pth")
    load_weights(model, tmp_path / "ckpt_epoch_240.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_wrn_40_2_state_dict_matches_mdistiller_layout(tmp_path):
    spec = wrn_spec(40, 2, 100)
    assert (
        "block1.layer.0.convShortcut.weight" in spec
        and "block1.layer.1.convShortcut.weight" not in spec
    )
    model = create_model("wrn_40_2", 100)
    assert shapes(model) == spec
    sd = random_state(spec)
    torch.save({"model": sd}, tmp_path / "wrn.pth")
    load_weights(model, tmp_path / "wrn.pth")
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    model.eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", sorted(SPOT_CHECKS))
def test_spot_check_keys_and_shapes(name):
    got = shapes(meta_model(name))
    for key, shape in SPOT_CHECKS[name].items():
        assert key in got, f"{name}: missing {key}"
        assert got[key] == shape, f"{name}.{key}: expected {shape}, got {got[key]}"
    for key in ABSENT_KEYS.get(name, []):
        assert key not in got, f"{name}: unexpected {key}"


@pytest.mark.parametrize(
    "name,depth,k", [("wrn_16_1", 16, 1), ("wrn_16_2", 16, 2), ("wrn_40_1", 40, 1)]
)
def test_small_wrns_layout(name, depth, k):
    assert shapes(meta_model(name)) == wrn_spec(depth, k, 100)


@pytest.mark.parametrize("name,depth", [("wrn_34_10", 34), ("wrn_28_10", 28)])
def test_robustbench_wrn_layout(name, depth):
    assert shapes(meta_model(name, 10)) == wrn_spec(depth, 10, 10)


def test_robustbench_swish_wrn_layout_and_preact():
    assert shapes(meta_model("wrn_28_10_swish", 10)) == dm_wrn_spec(28, 10, 10)
    assert shapes(meta_model("preact_resnet18", 10)) == preact18_spec(10)


def test_robustbench_wrn_round_trip(tmp_path):
    # a RobustBench-style checkpoint (DataParallel prefix, "state_dict" container) loads strictly
    spec = wrn_spec(34, 10, 10)
    sd = {f"module.{k}": torch.zeros(s) if s else torch.tensor(0) for k, s in spec.items()}
    sd["module.fc.bias"] = torch.arange(10.0)
    torch.save({"state_dict": sd}, tmp_path / "rb.pt")
    model = load_weights(create_model("wrn_34_10", 10), tmp_path / "rb.pt")
    assert list(model.state_dict()) == list(spec)
    assert torch.equal(model.fc.bias, torch.arange(10.0))
    # and ours saves back in the same layout
    assert set(model.state_dict()) == set(spec)


def test_dm_swish_round_trip_keeps_stored_normalisation(tmp_path):
    spec = dm_wrn_spec(28, 10, 10)
    sd = random_state(spec)
    sd["mean"] = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    sd["std"] = torch.tensor([0.2471, 0.2435, 0.2616]).view(3, 1, 1)
    torch.save(sd, tmp_path / "dm.pt")
    model = load_weights(create_model("wrn_28_10_swish", 10), tmp_path / "dm.pt")
    assert torch.equal(model.mean, sd["mean"])
    assert isinstance(model.relu, nn.SiLU)


# ------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "name,num_classes,reported",
    [
        ("resnet8x4", 100, 1.23e6),
        ("resnet32x4", 100, 7.43e6),
        ("wrn_40_2", 100, 2.25e6),
        ("wrn_16_2", 100, 0.70e6),
        ("wrn_40_1", 100, 0.57e6),
        ("resnet56", 100, 0.86e6),
        ("resnet110", 100, 1.73e6),
        ("resnet20", 100, 0.28e6),
        ("vgg13", 100, 9.46e6),
        ("vgg8", 100, 3.96e6),
        ("MobileNetV2", 100, 0.81e6),
        ("ShuffleV1", 100, 0.95e6),
        ("ShuffleV2", 100, 1.35e6),
        ("ResNet50", 100, 23.71e6),
        ("wrn_34_10", 10, 46.16e6),
        ("wrn_28_10", 10, 36.48e6),
        ("preact_resnet18", 10, 11.17e6),
        ("mobilenet_v1", 1000, 4.2e6),
        ("resnet18", 1000, 11.69e6),
        ("resnet34", 1000, 21.80e6),
        ("resnet50", 1000, 25.56e6),
    ],
)
def test_parameter_counts_match_reported(name, num_classes, reported):
    n = count_parameters(meta_model(name, num_classes))
    assert abs(n - reported) / reported < 0.01, f"{name}: {n:,} vs reported {reported:,.0f}"


def test_digits_teacher_and_student_sizes_differ():
    teacher = count_parameters(create_model("digits_cnn", 10))
    cnn_student = count_parameters(create_model("digits_cnn", 10, width=8))
    mlp_student = count_parameters(create_model("mlp", 10))
    assert 80_000 <= teacher <= 120_000
    assert 5_000 <= cnn_student <= 10_000 and 5_000 <= mlp_student <= 10_000
    # mlp: 64*128 + 128 + 128*10 + 10, by hand
    assert mlp_student == 64 * 128 + 128 + 128 * 10 + 10


# ---------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_forward_shape(name):
    torch.manual_seed(0)
    model = create_model(name, 100)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["wrn_28_10_swish", "preact_resnet18"])
def test_robust_forward_shape(name):
    model = create_model(name, 10).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ["mobilenet_v1", "tv:resnet18"])
def test_imagenet_forward_shape(name):
    model = create_model(name, 7).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 7)


def test_digits_models_forward_and_backward():
    x = torch.rand(5, 1, 8, 8)
    for model in (create_model("mlp", 10, hidden=(16, 8)), create_model("digits_cnn", 10, width=4)):
        out = model(x)
        assert out.shape == (5, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_mlp_flattens_and_checks_features():
    model = create_model("mlp", 3, in_features=12, hidden=())
    assert isinstance(model.net[0], nn.Linear) and model.net[0].in_features == 12
    x = torch.rand(2, 3, 4)
    expected = x.reshape(2, 12) @ model.net[0].weight.T + model.net[0].bias
    assert torch.allclose(model(x), expected)
    with pytest.raises(ValueError, match="Expected inputs with 12 features per row, got 64"):
        model(torch.rand(2, 1, 8, 8))


def test_vgg_skips_fourth_pool_at_32px_like_mdistiller():
    # block3 and block4 both see 4x4 maps at 32x32 input: record their input sizes
    model = create_model("vgg8", 10)
    seen = {}
    for i in (3, 4):
        getattr(model, f"block{i}").register_forward_hook(
            lambda m, inp, out, i=i: seen.__setitem__(i, tuple(inp[0].shape[-2:]))
        )
    model(torch.rand(2, 3, 32, 32))
    assert seen == {3: (4, 4), 4: (4, 4)}
    model(torch.rand(2, 3, 64, 64))
    assert seen == {3: (8, 8), 4: (4, 4)}


# --------------------------------------------------------------------------------------- registry


def test_list_models_contains_all_required_names():
    names = set(list_models())
    required = set(CIFAR_NAMES) | {
        "wrn_34_10", "wrn_28_10", "wrn_28_10_swish", "preact_resnet18", "mlp", "digits_cnn",
        "mobilenet_v1", "resnet18", "resnet34", "resnet50", "mobilenet_v2",
    }  # fmt: skip
    assert required <= names
    assert set(list_models(family="digits")) == {"mlp", "digits_cnn"}
    assert list_models("wrn_40_*") == ["wrn_40_1", "wrn_40_2"]


def test_plain_imagenet_names_do_not_shadow_cifar_names():
    assert count_parameters(meta_model("ResNet50")) != count_parameters(meta_model("resnet50"))
    assert "layer4.2.conv3.weight" in meta_model("resnet50").state_dict()
    assert "fc.weight" in meta_model("resnet50").state_dict()  # torchvision head
    assert "linear.weight" in meta_model("ResNet50").state_dict()  # mdistiller head


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet8x3'.*'resnet8x4'"):
        create_model("resnet8x3", 10)
    with pytest.raises(ValueError, match=r"close matches:.*'wrn_40_2'"):
        create_model("WRN_40_2", 10)
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'resnet19'.*'resnet18'"):
        create_model("tv:resnet19", 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Expected num_classes to be a positive int, got 0"):
        create_model("resnet8", 0)
    with pytest.raises(TypeError, match="Model 'resnet8' got an unknown option"):
        create_model("resnet8", 10, width=3)
    with pytest.raises(ValueError, match="would download weights"):
        create_model("tv:resnet18", 10, weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet8")(lambda num_classes: nn.Identity())
    with pytest.raises(ValueError, match="Expected family to be a non-empty str, got ''"):
        register_model("x", family="")


def test_register_model_decorator():
    from dkl.models.registry import _REGISTRY

    @register_model("test_only_linear", family="digits")
    def build(num_classes: int, *, in_features: int = 4) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    try:
        assert "test_only_linear" in list_models(family="digits")
        assert create_model("test_only_linear", 3, in_features=5).weight.shape == (3, 5)
    finally:
        _REGISTRY.pop("test_only_linear")


def test_timm_prefix_dispatches_to_timm(monkeypatch):
    calls = []
    fake = types.ModuleType("timm")
    fake.list_models = lambda: ["tiny_net"]

    def fake_create(name, pretrained, num_classes, **kwargs):
        calls.append((name, pretrained, num_classes, kwargs))
        return nn.Linear(2, num_classes)

    fake.create_model = fake_create
    monkeypatch.setitem(sys.modules, "timm", fake)
    assert create_model("timm:tiny_net", 4, drop_rate=0.1).out_features == 4
    assert calls == [("tiny_net", False, 4, {"drop_rate": 0.1, "in_chans": 3})]
    with pytest.raises(ValueError, match="Unknown timm model 'tiny_nett'.*'tiny_net'"):
        create_model("timm:tiny_nett", 4)
    with pytest.raises(ValueError, match="would download weights"):
        create_model("timm:tiny_net", 4, pretrained=True)


# ------------------------------------------------------------------- inputs of the data's shape

ADAPTED = ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
           "preact_resnet18", "tv:resnet18", "tv:mobilenet_v2"]  # fmt: skip


@pytest.mark.parametrize("name", ADAPTED)
def test_grey_inputs_adapt_the_first_conv_exactly(name):
    # summed filters: the 1-channel model on a grey image = the 3-channel one on it repeated
    from dkl.models import adapt_input_channels

    torch.manual_seed(0)
    rgb = create_model(name, 5).eval()
    grey = adapt_input_channels(__import__("copy").deepcopy(rgb), 1).eval()
    first = next(m for m in grey.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    built = create_model(name, 5, input_shape=(1, 32, 32)).eval()  # what the trainer calls
    with torch.no_grad():
        torch.testing.assert_close(built(x), grey(x), rtol=1e-4, atol=1e-5)


def test_adapt_to_more_channels_repeats_and_scales():
    from dkl.models import adapt_input_channels

    conv = nn.Sequential(nn.Conv2d(2, 4, 3))
    old = conv[0].weight.detach().clone()
    adapt_input_channels(conv, 3)
    w = conv[0].weight.detach()
    assert w.shape == (4, 3, 3, 3)
    torch.testing.assert_close(w, torch.cat([old, old[:, :1]], 1) * (2 / 3))
    assert adapt_input_channels(nn.Linear(3, 2), 1).in_features == 3  # no conv: unchanged


def test_input_shape_sets_declared_options():
    assert create_model("mlp", 3, input_shape=(1, 12, 12), hidden=()).net[0].in_features == 144
    cnn = create_model("digits_cnn", 3, width=4, input_shape=(3, 12, 12))
    assert cnn.features[0].in_channels == 3 and cnn(torch.rand(2, 3, 12, 12)).shape == (2, 3)
    assert create_model("mlp", 3, input_shape=(1, 8, 8), in_features=64).net[0].in_features == 64
    with pytest.raises(ValueError, match=r"model option in_channels=1 does not fit inputs of "
                                         r"shape \(3, 8, 8\) \(in_channels=3\)"):  # fmt: skip
        create_model("digits_cnn", 3, in_channels=1, input_shape=(3, 8, 8))


def test_timm_builds_with_the_data_channels():
    pytest.importorskip("timm")
    vit = create_model("vit_tiny_patch2_32", 4, input_shape=(1, 32, 32), depth=1)
    assert vit.patch_embed.proj.in_channels == 1
    assert vit(torch.rand(1, 1, 32, 32)).shape == (1, 4)
    net = create_model("timm:test_resnet", 4, input_shape=(1, 32, 32))
    assert net.conv1[0].in_channels == 1


def test_timm_local_weight_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    saved = timm.create_model("test_resnet", pretrained=False, num_classes=5).state_dict()
    path = tmp_path / "w.pth"
    torch.save(saved, path)
    overlay = {"pretrained_cfg_overlay": {"file": str(path)}}
    torch.manual_seed(1)  # another init: every weight below comes from the file
    model = create_model("timm:test_resnet", 5, **overlay)
    got = model.state_dict()
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    # another head: timm leaves the classifier out (the rest still comes from the file)
    other = create_model("timm:test_resnet", 3, **overlay).state_dict()
    assert other["fc.weight"].shape == (3, other["fc.weight"].shape[1])
    assert torch.equal(other["conv1.0.weight"], saved["conv1.0.weight"])
    # grey inputs: timm sums the first conv's filters
    grey = create_model("timm:test_resnet", 5, input_shape=(1, 32, 32), **overlay).state_dict()
    torch.testing.assert_close(grey["conv1.0.weight"], saved["conv1.0.weight"].sum(1, True))
    with pytest.raises(FileNotFoundError, match="Weight file not found: .*nope.pth"):
        create_model("timm:test_resnet", 5, pretrained_cfg_overlay={"file": "nope.pth"})
    with pytest.raises(ValueError, match=r"keys \['url'\] would download weights"):
        create_model("timm:test_resnet", 5, pretrained_cfg_overlay={"file": path, "url": "x"})
    with pytest.raises(ValueError, match="would download weights"):
        create_model("timm:test_resnet", 5, pretrained=True)


def test_timm_missing_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"pip install 'dkl\[timm\]'"):
        create_model("timm:resnet18", 10)


def test_prefixes_are_registered_by_the_library_modules():
    from dkl.models.registry import _PREFIXES, register_prefix

    assert set(_PREFIXES) >= {"tv", "timm"}
    with pytest.raises(ValueError, match="Model prefix 'tv' is already registered"):
        register_prefix("tv", lambda name, num_classes: nn.Identity())
    with pytest.raises(ValueError, match="Expected a non-empty prefix without ':', got 'a:b'"):
        register_prefix("a:b", lambda name, num_classes: nn.Identity())
    # an unregistered prefix is just an unknown name
    with pytest.raises(ValueError, match="Unknown model 'foo:bar'"):
        create_model("foo:bar", 10)


def test_registry_does_not_import_the_library_modules():
    # the dependency points one way: imagenet (and every architecture) -> registry
    import ast
    import inspect

    from dkl.models import registry

    tree = ast.parse(inspect.getsource(registry))
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module is not None
    }
    assert "imagenet" not in imported and "dkl.models.imagenet" not in imported


# ------------------------------------------------------------------------------------------- ViT


def test_vit_models_are_registered_cifar_models():
    pytest.importorskip("timm")
    assert {"vit_small_patch2_32", "vit_tiny_patch2_32"} <= set(list_models(family="cifar"))
    small = meta_model("vit_small_patch2_32", 100)
    tiny = meta_model("vit_tiny_patch2_32", 10)
    # USB's ViT-S/2: embed 384, 6 heads; ViT-Ti/2: embed 192, 3 heads; 12 blocks, 16x16 + 1 tokens
    assert small.pos_embed.shape == (1, 257, 384) and small.head.weight.shape == (100, 384)
    assert tiny.pos_embed.shape == (1, 257, 192) and tiny.head.weight.shape == (10, 192)
    assert len(small.blocks) == len(tiny.blocks) == 12
    assert small.blocks[0].attn.num_heads == 6 and tiny.blocks[0].attn.num_heads == 3


def test_vit_forward_returns_logits():
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch2_32", 10).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_models_import_without_timm():
    import subprocess

    code = (
        "import sys; sys.modules['timm'] = None\n"
        "import dkl.models as m\n"
        "assert 'vit_tiny_patch2_32' in m.list_models()\n"
        "try:\n"
        "    m.create_model('vit_tiny_patch2_32', 10)\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'dkl[timm]'\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('expected an ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_create_model_with_checkpoint(tmp_path):
    src = create_model("resnet8", 10)
    torch.save({"net": src.state_dict()}, tmp_path / "r8.pth")
    dst = create_model("resnet8", 10, checkpoint=tmp_path / "r8.pth")
    assert all(
        torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values())
    )


# ----------------------------------------------------------------------------------- load_weights


def _tiny_sd() -> dict[str, torch.Tensor]:
    return {
        "0.weight": torch.randn(4, 3, 3, 3),
        "0.bias": torch.randn(4),
        "1.weight": torch.randn(4),
        "1.bias": torch.randn(4),
        "1.running_mean": torch.randn(4),
        "1.running_var": torch.rand(4),
        "1.num_batches_tracked": torch.tensor(3),
    }


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


@pytest.mark.parametrize("container", ["model", "state_dict", "net", None])
def test_load_weights_containers_and_module_prefix(tmp_path, container):
    sd = _tiny_sd()
    stored = {f"module.{k}": v for k, v in sd.items()}
    torch.save(stored if container is None else {container: stored, "epoch": 3}, tmp_path / "w.pt")
    model = load_weights(_conv_bn(), tmp_path / "w.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_load_weights_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Weight file not found: .*nope.pth"):
        load_weights(_conv_bn(), tmp_path / "nope.pth")


def test_load_weights_missing_and_unexpected_keys(tmp_path):
    sd = _tiny_sd()
    del sd["0.bias"]
    sd["2.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(ValueError) as err:
        load_weights(_conv_bn(), tmp_path / "w.pt")
    msg = str(err.value)
    assert "1 missing key(s): 0.bias" in msg and "1 unexpected key(s): 2.weight" in msg
    model = load_weights(_conv_bn(), tmp_path / "w.pt", strict=False)
    assert torch.equal(model[0].weight, sd["0.weight"])


def test_load_weights_lists_only_a_few_keys(tmp_path):
    torch.save({f"extra.{i}": torch.zeros(1) for i in range(9)} | _tiny_sd(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"9 unexpected key\(s\): extra.0, .*\(\+4 more\)"):
        load_weights(_conv_bn(), tmp_path / "w.pt")


def test_load_weights_shape_mismatch_names_key(tmp_path):
    torch.save({"model": mdistiller_random(num_classes=10)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"fc.weight: expected \(100, 256\), got \(10, 256\)"):
        load_weights(create_model("resnet8x4", 100), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="shape mismatch"):  # never silently skipped
        load_weights(create_model("resnet8x4", 100), tmp_path / "w.pt", strict=False)


def mdistiller_random(num_classes: int) -> dict[str, torch.Tensor]:
    return random_state(mdistiller_resnet8x4_spec(num_classes))


def test_load_weights_tolerates_missing_num_batches_tracked(tmp_path):
    sd = {k: v for k, v in _tiny_sd().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "old.pt")
    model = load_weights(_conv_bn(), tmp_path / "old.pt")
    assert torch.equal(model[1].running_mean, sd["1.running_mean"])


class _NotATensor:
    pass


def test_load_weights_refuses_pickled_code(tmp_path):
    torch.save({"model": _tiny_sd(), "extra": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused unread"):
        load_weights(_conv_bn(), tmp_path / "evil.pt")


def test_load_weights_rejects_non_state_dict(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(1), "note": "hi"}}, tmp_path / "w.pt")
    with pytest.raises(
        ValueError, match=r"Expected a state_dict of tensors.*non-tensor entries: \['note'\]"
    ):
        load_weights(_conv_bn(), tmp_path / "w.pt")


# ---------------------------------------------------------------------------------- normalisation


def test_normalize_matches_hand_formula_and_has_no_state():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    x = torch.tensor([1.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert norm(x).flatten().tolist() == [1.0, 1.0, 0.5]
    assert norm.state_dict() == {}
    with pytest.raises(
        ValueError, match=r"Expected input of shape \(B, 3, H, W\), got \(1, 1, 2, 2\)"
    ):
        norm(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="Expected every std > 0"):
        Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="same non-zero length, got 3 and 2"):
        Normalize((0.0, 0.0, 0.0), (1.0, 1.0))


def test_with_normalization_forward_and_state_dict_prefix(tmp_path):
    torch.manual_seed(0)
    inner = create_model("resnet8", 10).eval()
    mean_, std_ = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's
    wrapped = with_normalization(inner, mean_, std_).eval()
    assert isinstance(wrapped, NormalizedModel)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(mean_).view(1, 3, 1, 1)
    std = torch.tensor(std_).view(1, 3, 1, 1)
    assert torch.allclose(wrapped(x), inner((x - mean) / std))
    assert all(k.startswith("model.") for k in wrapped.state_dict())

    # a bare-model checkpoint loads into the wrapper (auto) or explicitly into .model
    bare = create_model("resnet8", 10)
    torch.save({"model": bare.state_dict()}, tmp_path / "bare.pth")
    target = with_normalization(create_model("resnet8", 10), (0.5,) * 3, (0.5,) * 3)
    load_weights(target, tmp_path / "bare.pth")
    assert torch.equal(target.model.fc.weight, bare.fc.weight)
    target = with_normalization(create_model("resnet8", 10), (0.5,) * 3, (0.5,) * 3)
    load_weights(target.model, tmp_path / "bare.pth")
    assert torch.equal(target.model.fc.weight, bare.fc.weight)
    # and a wrapper checkpoint loads into a wrapper
    torch.save(wrapped.state_dict(), tmp_path / "wrapped.pth")
    again = load_weights(
        with_normalization(create_model("resnet8", 10), (0.5,) * 3, (0.5,) * 3),
        tmp_path / "wrapped.pth",
    )
    assert torch.equal(again.model.fc.weight, inner.fc.weight)


# ------------------------------------------------------------------------------- building blocks


def test_channel_shuffle_interleaves_groups():
    from dkl.models.shufflenet import channel_shuffle

    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_dm_block_pads_same_style_at_stride_2():
    # DeepMind/RobustBench: activated input padded (0, 1, 0, 1), 3x3 conv stride 2 without padding
    import torch.nn.functional as F

    torch.manual_seed(0)
    from dkl.models.wrn import _DMBlock

    block = _DMBlock(160, 320, stride=2, act="swish").eval()
    x = torch.randn(1, 160, 8, 8)
    pre = F.silu(block.batchnorm_0(x))
    out = F.conv2d(F.pad(pre, (0, 1, 0, 1)), block.conv_0.weight, stride=2)
    out = F.conv2d(F.silu(block.batchnorm_1(out)), block.conv_1.weight, padding=1)
    expected = out + F.conv2d(pre, block.shortcut.weight, stride=2)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_unwrap_normalization_strips_every_wrapper():
    from dkl.models import unwrap_normalization

    inner = nn.Linear(2, 2)
    wrapped = nn.DataParallel(with_normalization(inner, (0.0,), (1.0,)))
    assert unwrap_normalization(wrapped) is inner
    assert unwrap_normalization(inner) is inner


def test_safetensors_weights_load_like_a_torch_file(tmp_path):
    """timm and the Hugging Face hub publish .safetensors: they were refused as 'not a torch
    checkpoint', a teacher included, though the docs say any torchvision or timm file loads."""
    from safetensors.torch import save_file

    from dkl.models import create_model, load_weights
    from dkl.train import CheckpointError

    src = create_model("resnet8", 10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = load_weights(create_model("resnet8", 10), path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot load weight file '{path}'"):
        load_weights(create_model("resnet8", 10), path)
