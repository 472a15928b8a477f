import pytest

from covidseg.params import (
    SECTIONS,
    DataParams,
    EvaluateParams,
    ParamsError,
    PlotsParams,
    PreprocessParams,
    SynthParams,
    TrainParams,
    from_dict,
    load_section,
    load_seed,
    validate_all,
)

from conftest import REPO


def test_repo_params_file_loads_every_section():
    path = REPO / "params.yaml"
    assert load_section(SynthParams, "synth", path).image_size == 256
    assert load_section(DataParams, "data", path).classes == ("COVID-19",)
    assert load_section(PreprocessParams, "preprocess", path).image_size == 256
    train = load_section(TrainParams, "train", path)
    # The defaults reproduce the report's setup.
    assert (train.loss, train.lr, train.batch_size, train.weight_decay, train.schedule) == (
        "bce",
        1e-4,
        8,
        0.0,
        "constant",
    )
    assert load_section(EvaluateParams, "evaluate", path).threshold == 0.5
    assert load_section(PlotsParams, "plots", path).dpi >= 50
    assert load_seed(path) == 42


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"train.*unknown keys \['lrate'\]"):
        from_dict(TrainParams, "train", {"lrate": 0.1})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lr": "fast"}, "train.lr': expected a finite number"),
        ({"epochs": 2.5}, "train.epochs': expected an integer"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"loss": "hinge"}, "loss must be one of"),
        ({"augment": "yes"}, "expected true or false"),
        ({"downsample": 3}, "downsample must be 1, 2 or 4"),
        ({"warmup_epochs": 10, "epochs": 10}, "warmup_epochs"),
    ],
)
def test_bad_train_values_are_rejected(raw, message):
    with pytest.raises(ParamsError, match=message):
        from_dict(TrainParams, "train", raw)


def test_data_classes_accept_a_single_string_and_validate_names():
    assert from_dict(DataParams, "data", {"classes": "COVID-19"}).classes == ("COVID-19",)
    with pytest.raises(ParamsError, match="unknown class 'Pneumonia'"):
        from_dict(DataParams, "data", {"classes": ["COVID-19", "Pneumonia"]})
    with pytest.raises(ParamsError, match="must include 'COVID-19'"):
        from_dict(DataParams, "data", {"classes": ["Normal"]})


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_section(TrainParams, "train", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=f"{bad}: not valid YAML"):
        load_section(TrainParams, "train", bad)
    neg = tmp_path / "neg.yaml"
    neg.write_text("seed: -1\n")
    with pytest.raises(ParamsError, match="'seed' must be a non-negative integer"):
        load_seed(neg)


@pytest.mark.parametrize(
    "text, value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("0.002", 0.002), (" 2e-4 ", 2e-4), ("+1.5e-2", 0.015)]
)
def test_numeric_strings_are_accepted_for_float_params(text, value):
    # `lr: 1e-3` typed by hand: YAML 1.1 (PyYAML) reads it as the string '1e-3'.
    assert from_dict(TrainParams, "train", {"lr": text}).lr == value


@pytest.mark.parametrize("junk", ["1e-3x", "nan", "inf", "1,5", "", "e-3", "0x10"])
def test_non_numeric_strings_are_still_refused_for_float_params(junk):
    with pytest.raises(ParamsError, match="train.lr': expected a finite number"):
        from_dict(TrainParams, "train", {"lr": junk})


def test_hand_written_scientific_lr_loads_from_a_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n")
    assert load_section(TrainParams, "train", path).lr == 1e-3


def test_a_misspelt_top_level_section_is_refused_by_every_loader(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ntrain:\n  lr: 0.001\ntrian:\n  lr: 0.01\n")
    expected = rf"{path}: unknown top-level section\(s\) \['trian'\].*known ones are \['seed', 'launch', 'synth'"
    for name, cls in SECTIONS.items():
        with pytest.raises(ParamsError, match=expected):
            load_section(cls, name, path)
    with pytest.raises(ParamsError, match=expected):
        load_seed(path)


def test_validate_all_checks_every_section_and_the_launch_command(tmp_path):
    assert set(validate_all(REPO / "params.yaml")) == {"seed", *SECTIONS}
    path = tmp_path / "params.yaml"
    path.write_text("launch:\n  train: ''\n")
    with pytest.raises(ParamsError, match="params 'launch': train must be a command"):
        validate_all(path)


def test_dataclass_defaults_equal_params_yaml_for_every_section():
    """params.yaml (tracked by DVC) and the dataclasses name the same keys with the same default values."""
    import dataclasses

    import yaml

    from covidseg.params import SECTIONS

    from conftest import REPO

    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, cls in SECTIONS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        assert committed[name] == defaults, f"params.yaml '{name}' differs from {cls.__name__}'s defaults"


def test_image_size_must_fit_the_unet_levels(tmp_path):
    """A 48 px image cannot be halved 4 times after a 2x downsample: refused by the check, naming both params."""
    from covidseg.params import validate_all

    path = tmp_path / "params.yaml"
    path.write_text("preprocess: {image_size: 48}\ntrain: {depth: 5, downsample: 2}\n")
    with pytest.raises(ParamsError, match=r"image_size 48 must be divisible by .* = 32"):
        validate_all(path)
    path.write_text("preprocess: {image_size: 64}\ntrain: {depth: 5, downsample: 2}\n")
    assert validate_all(path)["train"].depth == 5


def test_unet_config_and_train_params_share_the_architecture_ranges():
    from covidseg.model.unet import UNetConfig

    with pytest.raises(ValueError, match="depth must be in"):
        UNetConfig(depth=7)
    with pytest.raises(ParamsError, match="depth must be in"):
        from_dict(TrainParams, "train", {"depth": 7})


def test_real_preset_gives_valid_dvc_flags_and_is_the_one_make_real_runs():
    from covidseg.params import preset_flags

    flags = preset_flags(REPO / "presets/real.yaml", REPO / "params.yaml")
    assert flags[0::2] == ["-S"] * (len(flags) // 2)
    assert "train.epochs=28" in flags and "train.augment=true" in flags and "train.flip_tta=true" in flags
    makefile = (REPO / "Makefile").read_text()
    assert 'covidseg preset "$$preset"' in makefile and "covidseg machine-preset" in makefile  # tests/test_presets.py
    assert "-S train." not in makefile  # one copy of the preset: the file


def test_a_preset_with_a_typo_or_bad_value_is_refused_by_name(tmp_path):
    from covidseg.params import preset_flags

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ParamsError, match=r"bad.yaml: .*unknown keys \['epoch'\]"):
        preset_flags(bad, REPO / "params.yaml")
    bad.write_text("train:\n  lr: 2\n")
    with pytest.raises(ParamsError, match=r"bad.yaml: .*lr must be in"):
        preset_flags(bad, REPO / "params.yaml")
    bad.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ParamsError, match=r"unknown section 'trian'"):
        preset_flags(bad, REPO / "params.yaml")


def test_renamed_augmentation_keys_are_refused_with_their_new_names(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  contrast: 0.2\n  gamma: 0.1\n")
    with pytest.raises(ParamsError, match=r"'contrast' is now 'aug_contrast', 'gamma' is now 'aug_gamma'"):
        load_section(TrainParams, "train", path)
    path.write_text("train:\n  aug_contrast: 0.2\n  aug_gamma: 0.1\n")
    assert load_section(TrainParams, "train", path).aug_contrast == 0.2
