"""models/MODEL_CARD.md: every number from the files, the licence follows the data, the -S line re-creates the run."""

from __future__ import annotations

import dataclasses

import yaml

from covidseg.evaluation.model_card import recipe_flags, render_card
from covidseg.params import SECTIONS, from_dict, read_params

from helpers import CARD_TEST_DETAILS, CARD_TEST_METRICS, copy_repo_params, write_card_per_image

TRAIN = {"best_epoch": 3, "epochs_run": 4}
META = {"threshold": 0.45, "temperature": 1.25, "lung_gate": True, "flip_tta": False, "size": 64, "seed": 42,
        "provenance": {"data_source": "synthetic", "synthetic": True, "split_counts": {"train": 6}, "train_images": 6}}  # fmt: skip
EXPORT = {"opset": 18, "parity_images": 10, "parity_max_abs_diff": 6e-08, "parity_tolerance": 0.0001}


def _card(tmp_path, meta=META, details=CARD_TEST_DETAILS) -> str:
    """The card of the fixed test files above, with ``meta`` / ``details`` in place of theirs."""
    return render_card(
        copy_repo_params(tmp_path), meta, CARD_TEST_METRICS, details, TRAIN, write_card_per_image(tmp_path), EXPORT
    )


def test_card_holds_every_section_with_the_numbers_of_the_files(tmp_path):
    card = _card(tmp_path)
    for heading in ("Intended use", "Training data", "Licence of the weights", "Input contract", "Metrics",
                    "Per class", "Calibration", "Known failure modes", "How it was made"):  # fmt: skip
        assert f"## {heading}" in card, heading
    assert "not for diagnosis" in card
    assert (
        "| rmse | 0.1235 | 0.1100 to 0.1400 |" in card and "| dice | 0.7654 | n/a |" in card
    )  # no dice interval given
    assert "| rmse | 0.1235 |" in card and "| dice | 0.7654 |" in card and "| iou | 0.6543 |" in card
    assert "| share_mae | 9.87 | 7.11 to 12.34 |" in card
    assert "| Normal | 5 | 0.0000 | 0.0000 | 0.0500 | 3 of 5 |" in card
    assert "- threshold: 0.450" in card and "- temperature: 1.2500" in card
    assert "- lung gate: on" in card and "- flip averaging: off" in card
    assert "max |p_torch - p_onnx| 6e-08 on 10 test images" in card
    assert "marks 2.00 times the true area" in card and "up to 1.0 % of the image" in card
    assert "Negatives (Normal): 3 of 5 test images" in card
    assert "over-estimated by 8.8 percentage points" in card
    assert "image left = the patient's right" in card and "64 x 64" in card


def test_card_names_the_training_and_evaluation_precisions(tmp_path):
    card = _card(tmp_path, {**META, "train_precision": "bf16"}, {**CARD_TEST_DETAILS, "evaluate_precision": "fp32"})
    assert "trained in bf16, test metrics computed in fp32" in card
    old = _card(tmp_path)
    assert "trained in unknown, test metrics computed in unknown" in old  # files from before it was recorded


def test_licence_follows_the_data_source(tmp_path):
    params, per_image = copy_repo_params(tmp_path), write_card_per_image(tmp_path)
    synthetic = render_card(params, META, CARD_TEST_METRICS, CARD_TEST_DETAILS, TRAIN, per_image)
    real_meta = {**META, "provenance": {**META["provenance"], "data_source": "covidqu.zip", "synthetic": False}}
    real = render_card(params, real_meta, CARD_TEST_METRICS, CARD_TEST_DETAILS, TRAIN, per_image)
    assert "MIT, like the code" in synthetic and "CC BY-SA" not in synthetic
    assert "CC BY-SA 4.0" in real and "MIT, like the code" not in real
    assert "covidqu.zip" in real and "Computers in Biology and Medicine 139:105002" in real
    assert "10.34740/kaggle/dsv/3122958" in real and "anasmohammedtahir/covidqu" in real


def test_s_line_recreates_the_run_params(tmp_path):
    overrides = {
        "seed": 7,
        "data": {"source": "/data/covidqu", "classes": ["COVID-19", "Normal"]},
        "preprocess": {"image_size": 128},
        "train": {"lr": 0.0003, "augment": True, "epochs": 12},
        "plots": {"dpi": 60},  # not part of the model's recipe
    }
    params = copy_repo_params(tmp_path, overrides)
    flags = recipe_flags(params)
    assert not any(f.startswith("plots.") for f in flags)
    assert "data.classes=[COVID-19,Normal]" in flags and "train.augment=true" in flags
    card = render_card(params, META, CARD_TEST_METRICS, CARD_TEST_DETAILS, TRAIN, write_card_per_image(tmp_path))
    assert "dvc exp run " + " ".join(f"-S {f}" for f in flags) in card

    # Apply the flags the way `dvc exp run -S` does (YAML values) to the defaults: the run's sections come back.
    rebuilt: dict = {}
    for flag in flags:
        key, value = flag.split("=", 1)
        *path, leaf = key.split(".")
        node = rebuilt
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    assert rebuilt["seed"] == 7
    run = read_params(params)
    for section in ("synth", "data", "preprocess", "train"):
        cls = SECTIONS[section]
        assert dataclasses.asdict(from_dict(cls, section, rebuilt.get(section, {}))) == dataclasses.asdict(
            from_dict(cls, section, run[section])
        ), section


def test_default_params_say_so(tmp_path):
    assert recipe_flags(copy_repo_params(tmp_path)) == []
    assert "`dvc repro` with the params.yaml defaults (no `-S` overrides)" in render_card(
        copy_repo_params(tmp_path), META, CARD_TEST_METRICS, CARD_TEST_DETAILS, TRAIN, write_card_per_image(tmp_path)
    )


def test_input_contract_names_the_contrast_normalisation_of_the_model(tmp_path):
    params, per_image = copy_repo_params(tmp_path), write_card_per_image(tmp_path)
    plain = render_card(params, META, CARD_TEST_METRICS, CARD_TEST_DETAILS, TRAIN, per_image)
    assert "(the model's fixed input size).\n" in plain and "contrast-normalised" not in plain
    clahe = render_card(params, {**META, "contrast": "clahe"}, CARD_TEST_METRICS, CARD_TEST_DETAILS, TRAIN, per_image)
    assert "then contrast-normalised by `clahe`" in clahe and "a caller of the raw ONNX graph must" in clahe
