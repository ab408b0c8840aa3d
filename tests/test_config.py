"""Config: presets, includes, overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from dkl.cli import main
from dkl.config import ConfigError, config_from_dict, config_to_dict, list_presets, load_config


def test_preset_by_name_and_overrides():
    cfg = load_config("kd/digits_ikl", ["distill.beta=0.5", "seed=3", "optim.lr=1e-3"])
    assert cfg.name == "digits_ikl"  # default run name: the preset's file name
    assert cfg.recipe == "distill" and cfg.distill.method == "ikl"
    assert cfg.distill.beta == 0.5 and cfg.seed == 3
    assert cfg.optim.lr == pytest.approx(1e-3)  # "1e-3" is a float, not a string
    assert cfg.data.name == "digits"  # from _digits_base via two levels of _base_


def test_short_keys_resolve_to_their_unique_section():
    cfg = load_config("kd/digits_ikl", ["method=kd", "device=cpu", "epochs=2"])
    assert cfg.distill.method == "kd" and cfg.train.device == "cpu" and cfg.train.epochs == 2


def test_preset_by_path_with_relative_base(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {batch_size: 32}\ntrain: {epochs: 7}\n")
    (tmp_path / "run.yaml").write_text("_base_: base.yaml\ntrain: {epochs: 9}\nname: mine\n")
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert (cfg.name, cfg.data.batch_size, cfg.train.epochs) == ("mine", 32, 9)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["train.epochz=3"], r"^unknown key 'train\.epochz' \(known: amp, "),
        (["bogus=1"], r"^unknown key 'bogus'"),
        (["train.epochs=many"], r"^train\.epochs: expected int, got 'many'"),
        (["train.deterministic=maybe"], r"^train\.deterministic: expected bool"),
        (["train.amp=fp8"], r"^train\.amp: expected one of 'none', 'bf16', 'fp16', got 'fp8'"),
        (["distill.method=magic"], r"^distill\.method: expected one of 'ce', 'kd'"),
        (
            ["distill.temperature=-1"],
            r"^distill\.temperature: must be in \[0\.001, 10000\], got -1\.0",
        ),
        (["distill.teacher.nme=x"], r"^unknown key 'distill\.teacher\.nme'"),
        (["data.batch_size=0"], r"^data\.batch_size: must be > 0"),
        (["noequals"], r"^override 'noequals': expected key=value"),
        (["recipe=nope"], r"^recipe: unknown recipe 'nope'"),
    ],
)
def test_errors_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config("kd/digits_ikl", overrides)
    assert "\n" not in str(info.value)


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match=r"^config 'kd/nope': no such file or preset"):
        load_config("kd/nope")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(str(tmp_path / "a.yaml"))


def test_round_trip():
    cfg = load_config("kd/cifar100_resnet32x4_resnet8x4_ikl")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_cli_error_is_one_line(capsys):
    assert main(["train", "kd/digits_ikl", "train.epochz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dkl: error: unknown key 'train.epochz'") and "\n" not in err


# (teacher, student, alpha, beta, lr, DKD beta): alpha, beta and lr of the authors' KD-dkl
# CIFAR-100 configs, DKD beta of mdistiller's
PAIRS = [
    ("resnet56", "resnet20", 1, 4, 0.05, 2),
    ("resnet110", "resnet32", 1, 12, 0.05, 2),
    ("resnet32x4", "resnet8x4", 1, 8, 0.05, 8),
    ("wrn_40_2", "wrn_16_2", 3, 12, 0.05, 6),
    ("wrn_40_2", "wrn_40_1", 1, 8, 0.05, 6),
    ("vgg13", "vgg8", 1, 12, 0.05, 6),
    ("resnet32x4", "ShuffleV1", 1, 8, 0.01, 8),
    ("resnet32x4", "ShuffleV2", 3, 12, 0.01, 8),
    ("wrn_40_2", "ShuffleV1", 1, 4, 0.01, 8),
    ("vgg13", "MobileNetV2", 4, 12, 0.01, 6),
    ("ResNet50", "MobileNetV2", 1, 12, 0.01, 8),
]


@pytest.mark.parametrize("teacher, student, alpha, beta, lr, dkd_beta", PAIRS)
def test_cifar100_presets_follow_the_authors(teacher, student, alpha, beta, lr, dkd_beta):
    stem = f"kd/cifar100_{teacher}_{student}"
    ikl = load_config(f"{stem}_ikl")
    d = ikl.distill
    assert (ikl.model.name, d.teacher.name, ikl.optim.lr) == (student, teacher, lr)
    assert (d.method, d.alpha, d.beta, d.temperature, d.warmup) == ("ikl", alpha, beta, 4, 20)
    assert (d.ce_weight, d.gi, d.weight_temperature) == (1, False, 100)
    assert (ikl.train.epochs, ikl.data.batch_size, ikl.optim.weight_decay) == (240, 64, 5e-4)
    assert ikl.sched.milestones == [150, 180, 210] and ikl.optim.momentum == 0.9
    kd = load_config(f"{stem}_kd").distill
    assert (kd.method, kd.ce_weight, kd.kd_weight, kd.temperature) == ("kd", 0.1, 0.9, 4)
    dkd = load_config(f"{stem}_dkd").distill
    assert (dkd.method, dkd.alpha, dkd.beta, dkd.warmup, dkd.temperature) == (
        "dkd",
        1,
        dkd_beta,
        20,
        4,
    )


def test_imagenet_presets_follow_the_authors():
    r = load_config("kd/imagenet_resnet34_resnet18_ikl")
    d = r.distill
    assert (r.model.name, d.teacher.name, d.alpha, d.beta) == ("resnet18", "resnet34", 1, 0.5)
    assert (d.gi, d.temperature, d.weight_temperature, d.warmup, d.ce_weight) == (True, 1, 1, 1, 1)
    assert (r.data.batch_size, r.train.epochs, r.optim.lr, r.optim.weight_decay) == (
        512,
        100,
        0.2,
        1e-4,
    )
    assert r.sched.milestones == [30, 60, 90]
    m = load_config("kd/imagenet_resnet50_mobilenetv1_ikl").distill
    assert (m.alpha, m.beta, m.teacher.name) == (4, 1, "resnet50")
    kd = load_config("kd/imagenet_resnet34_resnet18_kd").distill
    assert (kd.ce_weight, kd.kd_weight, kd.temperature) == (0.5, 0.5, 1)
    assert load_config("kd/imagenet_resnet34_resnet18_dkd").distill.beta == 0.5
    assert load_config("kd/imagenet_resnet50_mobilenetv1_dkd").distill.beta == 2


def test_every_bundled_preset_validates():
    names = list_presets("kd")
    assert len(names) >= 11 * 3 + 2 * 3
    for name in names:
        load_config(name)


# --------------------------------------------------------------------------------------------
# A run's config holds its own recipe's section only
# --------------------------------------------------------------------------------------------


def test_kd_config_has_only_its_own_section(tmp_path):
    import yaml

    from dkl.api import train

    cfg = load_config(
        "kd/digits_ce",
        [
            f"train.out_dir={tmp_path}",
            "train.epochs=1",
            "train.max_steps_per_epoch=2",
            "train.progress=false",
            "train.plot=false",
            "train.threads=1",
        ],
    )
    assert cfg.distill is not None and cfg.adversarial is None and cfg.semisup is None
    assert cfg.sections == {}
    d = config_to_dict(cfg)
    assert "distill" in d and "adversarial" not in d and "semisup" not in d
    train(cfg, log=lambda m: None)
    written = yaml.safe_load((tmp_path / cfg.name / "config.yaml").read_text())
    assert "distill" in written and "adversarial" not in written and "semisup" not in written
    assert load_config(tmp_path / cfg.name / "config.yaml") == cfg


def test_ambiguous_short_key_lists_the_full_names():
    # `warmup` is both sched.warmup and distill.warmup in a distillation run
    with pytest.raises(ConfigError, match="ambiguous") as info:
        load_config("kd/digits_ikl", ["warmup=3"])
    msg = str(info.value)
    assert "sched.warmup" in msg and "distill.warmup" in msg and "\n" not in msg
    # the full names still work, and a recipe without that key resolves it uniquely
    cfg = load_config("kd/digits_ikl", ["sched.warmup=3", "distill.warmup=5"])
    assert (cfg.sched.warmup, cfg.distill.warmup) == (3, 5)
    assert load_config("adversarial/digits_ikl_at", ["warmup=3"]).sched.warmup == 3


def test_short_keys_resolve_among_the_runs_sections_only():
    # `uratio` is a semisup key: unknown to a distillation run, short for semisup.uratio there
    with pytest.raises(ConfigError, match=r"^unknown key 'uratio'"):
        load_config("kd/digits_ikl", ["uratio=3"])
    assert load_config("semisup/digits_fixmatch", ["uratio=3"]).semisup.uratio == 3


def test_a_section_of_another_recipe_is_rejected(tmp_path):
    (tmp_path / "run.yaml").write_text("_base_: kd/digits_ikl\nadversarial: {method: trades}\n")
    with pytest.raises(ConfigError, match=r"section 'adversarial' belongs to recipe") as info:
        load_config(str(tmp_path / "run.yaml"))
    assert "'distill'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"section 'semisup' belongs to recipe"):
        load_config("kd/digits_ikl", ["semisup.uratio=2"])
    with pytest.raises(ConfigError, match=r"section 'distill' belongs to recipe"):
        config_from_dict({"recipe": "adversarial", "distill": {"method": "kd"}})


def test_recipe_from_outside_dkl_gets_its_section_in_sections():
    from dataclasses import dataclass

    from dkl.recipes import register_recipe
    from dkl.train import Task

    @dataclass
    class ToySection:
        smoothing: float = 0.1

    @register_recipe("test_config_toy", config=ToySection)
    class Toy(Task):
        pass

    cfg = load_config({"recipe": "test_config_toy"}, ["smoothing=0.3"])  # a short key too
    assert cfg.sections == {"test_config_toy": ToySection(0.3)} and cfg.section.smoothing == 0.3
    assert cfg.distill is None
    # a distillation preset keeps its distill section: it cannot become a toy run
    with pytest.raises(ConfigError, match=r"section 'distill' belongs to recipe"):
        load_config("kd/digits_ce", ["recipe=test_config_toy"])
    d = config_to_dict(cfg)
    assert d["test_config_toy"] == {"smoothing": 0.3} and "distill" not in d
    assert config_from_dict(d) == cfg


# --------------------------------------------------------------------------------------------
# What importing a piece of dkl pulls in (fresh interpreters)
# --------------------------------------------------------------------------------------------


def _fresh_python(code: str) -> str:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_importing_the_config_imports_no_training_code():
    code = (
        "import dkl.config, sys; "
        "print('dkl.train' in sys.modules or 'dkl.api' in sys.modules "
        "or 'dkl.recipes' in sys.modules)"
    )
    assert _fresh_python(code) == "False"


def test_models_alone_build_a_vit():
    code = (
        "import dkl.models; "
        "m = dkl.models.create_model('vit_tiny_patch2_32', 10); "
        "import torch; print(tuple(m(torch.rand(2, 3, 32, 32)).shape))"
    )
    assert _fresh_python(code) == "(2, 10)"


def test_fragments_are_hidden_from_the_preset_list_but_still_load():
    shown = list_presets("kd")
    everything = list_presets("kd", fragments=True)
    assert "kd/_digits_base" not in shown and "kd/_digits_base" in everything
    assert all(not n.split("/")[-1].startswith("_") for n in shown)
    # kd/digits_ikl reaches kd/_digits_student and kd/_digits_base through _base_
    assert load_config("kd/digits_ikl").data.name == "digits"


# A mapping given for a section merges into it (as _base_ does); null for a section is refused
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "changes"),
    [
        ("distill={beta: 2}", {"beta": 2.0}),
        ("distill={}", {}),
        ("distill={teacher: {checkpoint: t.pt}, alpha: 0.5}", {"alpha": 0.5}),
    ],
)
def test_a_mapping_override_changes_only_the_keys_it_gives(override, changes):
    """``distill={beta: 2}`` replaced the whole section: the IKL preset trained plain CE."""
    expected = load_config("kd/digits_ikl")
    for key, value in changes.items():
        setattr(expected.distill, key, value)
    if "teacher" in override:
        expected.distill.teacher.checkpoint = "t.pt"
    cfg = load_config("kd/digits_ikl", [override])
    assert cfg == expected
    assert cfg.distill.method == "ikl" and cfg.distill.teacher.name == "digits_cnn"


@pytest.mark.parametrize(
    ("override", "example"),
    [
        ("distill=null", "distill.temperature=..."),
        ("data=null", "data.name=..."),
        ("model=null", "model.name=..."),
        ("distill.teacher=null", "distill.teacher.name=..."),
        ("distill={teacher: null}", "distill.teacher.name=..."),
    ],
)
def test_null_for_a_whole_section_is_refused(override, example):
    with pytest.raises(ConfigError, match="null would reset every") as info:
        load_config("kd/digits_ikl", [override])
    assert str(info.value).startswith(f"override '{override}'") and example in str(info.value)
    assert "\n" not in str(info.value)


def test_a_yaml_section_merges_and_null_is_refused_as_on_the_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text("_base_: kd/digits_ikl\ndistill: {beta: 2}\n")
    assert load_config(str(tmp_path / "run.yaml")) == load_config(
        "kd/digits_ikl", ["distill={beta: 2}", "name=run"]
    )
    (tmp_path / "bad.yaml").write_text("_base_: kd/digits_ikl\ndistill:\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml': distill: null would reset every"):
        load_config(str(tmp_path / "bad.yaml"))


def test_a_mapping_value_is_replaced_whole_not_merged():
    """``model.kwargs`` is a value (the options of model.name), not a section of settings: a
    new model's options replace the old model's, and null clears them."""
    cfg = load_config("kd/digits_ikl", ["model.name=digits_cnn", "model.kwargs={width: 4}"])
    assert cfg.model.kwargs == {"width": 4}
    assert load_config("kd/digits_ikl", ["model.kwargs=null"]).model.kwargs == {}


def test_a_yaml_file_keeps_its_bases_other_model_options(tmp_path):
    """A YAML file over its _base_ that changes one model option keeps the base's others (it
    merged before; dropping them would silently build the model at its default width)."""
    (tmp_path / "base.yaml").write_text(
        "_base_: kd/digits_ikl\nmodel: {kwargs: {hidden: [32, 16], dropout: 0.1}}\n"
    )
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel: {kwargs: {dropout: 0.2}}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.model.kwargs == {"hidden": [32, 16], "dropout": 0.2}
