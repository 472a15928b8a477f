"""train.snapshots: the checkpoint ensemble of the last K epochs, its model file, and everything downstream of it."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import pandas as pd
import pytest
import torch

from covidseg.evaluation.evaluate import evaluate
from covidseg.evaluation.model_card import render_card
from covidseg.export.graph import export_onnx, parity
from covidseg.export.stage import export_stage
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.inference.forward import predict_all_logits
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.inference.predict import read_csv
from covidseg.model.checkpoint import load_model, save_model
from covidseg.model.ensemble import UNetEnsemble, mean_probability_logits
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import EvaluateParams, ExportParams, ParamsError, TrainParams, from_dict

from helpers import (
    CARD_TEST_DETAILS,
    CARD_TEST_METRICS,
    FAST_PREDICT_FLAGS,
    TINY_TRAIN,
    copy_repo_params,
    interrupt_after,
    invoke_predict,
    save_image,
    train_tiny,
    write_card_per_image,
)

CONFIG = UNetConfig(out_channels=2, base_channels=4, depth=2)
SNAP = dataclasses.replace(TINY_TRAIN, snapshots=2)  # 3 epochs: the model is epochs 2 and 3


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def constant_unet(values: list[float]) -> UNet:
    """A U-Net whose logits are ``values[c]`` at every pixel of channel c."""
    net = UNet(UNetConfig(out_channels=len(values), base_channels=4, depth=2))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor(values))
    return net.eval()


def random_ensemble(k: int = 2, seed: int = 0) -> UNetEnsemble:
    torch.manual_seed(seed)
    ensemble = UNetEnsemble(CONFIG, k)
    for m in ensemble.modules():  # random BatchNorm statistics, so eval-mode normalisation is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    for member in ensemble.members:  # spread the logits so the probabilities are not all ~0.5
        with torch.no_grad():
            member.head.weight.mul_(30.0)
    return ensemble.eval()


# ----------------------------------------------------------------------------- the module


def test_forward_is_the_logit_of_the_mean_probability_by_hand():
    a, b = constant_unet([logit(0.2), logit(0.9)]), constant_unet([logit(0.6), logit(0.5)])
    ensemble = UNetEnsemble.from_state_dicts(a.config, [a.state_dict(), b.state_dict()]).eval()
    assert ensemble.config == a.config and len(ensemble.members) == 2
    out = ensemble(torch.rand(3, 1, 16, 16))
    assert out.shape == (3, 2, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0], torch.full((3, 16, 16), logit(0.4)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:, 1], torch.full((3, 16, 16), logit(0.7)), rtol=0, atol=1e-5)


def test_mean_probability_logits_is_exact_where_sigmoid_saturates():
    z = torch.tensor([[40.0, -40.0, 40.0, 3.0], [40.0, -40.0, -40.0, -1.0]])  # (K=2, 4)
    out = mean_probability_logits(z)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], torch.tensor([40.0, -40.0]))  # agreeing members keep their logit
    assert abs(out[2]) < 1e-6  # 1 and 0 average to 0.5
    p = (torch.sigmoid(torch.tensor(3.0)) + torch.sigmoid(torch.tensor(-1.0))) / 2
    assert out[3].item() == pytest.approx(torch.logit(p).item(), abs=1e-5)
    one = torch.randn(1, 2, 5) * 10
    torch.testing.assert_close(mean_probability_logits(one), one[0], rtol=0, atol=1e-5)  # K=1: the logits themselves


def test_an_ensemble_of_one_net_repeated_predicts_like_that_net():
    net = random_ensemble(2).members[0]
    ensemble = UNetEnsemble.from_state_dicts(CONFIG, [net.state_dict()] * 3).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x), net(x), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="at least 2 members"):
        UNetEnsemble(CONFIG, 1)


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"snapshots": 0}, r"snapshots must be in \[1, epochs=20\]"),
        ({"snapshots": 4, "epochs": 3}, r"snapshots must be in \[1, epochs=3\]"),
        ({"snapshots": 2.0}, "train.snapshots': expected an integer"),
        ({"snapshots": 2, "ema_decay": 0.9}, "snapshots >= 2 cannot be combined with ema_decay > 0"),
    ],
)
def test_bad_snapshots_are_refused_by_name(raw, message):
    with pytest.raises(ParamsError, match=message):
        from_dict(TrainParams, "train", raw)


def test_snapshots_defaults_to_off_and_accepts_all_epochs():
    assert TrainParams().snapshots == 1
    assert from_dict(TrainParams, "train", {"snapshots": 3, "epochs": 3}).snapshots == 3


# ----------------------------------------------------------------------------- the model file


def test_model_file_round_trip_and_plain_files_are_unchanged(tmp_path):
    ensemble = random_ensemble(3)
    save_model(tmp_path / "a.pt", ensemble, {"size": 32})
    save_model(tmp_path / "sub" / "b.pt", ensemble, {"size": 32})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "sub" / "b.pt").read_bytes()  # same weights, same bytes
    payload = torch.load(tmp_path / "a.pt", weights_only=True)
    assert payload["snapshots"] == 3 and payload["config"] == CONFIG.to_dict()
    loaded, meta = load_model(tmp_path / "a.pt")
    assert isinstance(loaded, UNetEnsemble) and len(loaded.members) == 3 and not loaded.training
    assert meta["snapshots"] == 3 and meta["size"] == 32
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(x), rtol=0, atol=1e-5)  # channels_last: rounding only

    save_model(tmp_path / "plain.pt", ensemble.members[0], {"size": 32})
    assert "snapshots" not in torch.load(tmp_path / "plain.pt", weights_only=True)
    plain, meta = load_model(tmp_path / "plain.pt")
    assert type(plain) is UNet and "snapshots" not in meta


def test_a_bad_snapshots_value_in_a_model_file_is_named(tmp_path):
    save_model(tmp_path / "m.pt", random_ensemble(2), {"snapshots": "two"})
    with pytest.raises(ValueError, match=r"m\.pt: 'snapshots' must be an integer >= 1"):
        load_model(tmp_path / "m.pt")
    save_model(tmp_path / "n.pt", random_ensemble(2), {"snapshots": 3})  # claims more members than it holds
    with pytest.raises(ValueError, match=r"n\.pt: model config and weights do not fit"):
        load_model(tmp_path / "n.pt")


def test_onnx_export_of_an_ensemble_matches_torch(tmp_path):
    ensemble = random_ensemble(2)
    cal = Calibration(threshold=0.45, temperature=1.3, lung_gate=True, flip_tta=True)
    path = export_onnx(ensemble, tmp_path / "e.onnx", 32, {}, calibration=cal)  # its own 2-image check passes
    want = lambda im: calibrated_probabilities(ensemble, im, torch.device("cpu"), "fp32", cal)  # noqa: E731
    other = lambda im: calibrated_probabilities(ensemble.members[1], im, torch.device("cpu"), "fp32", cal)  # noqa: E731
    for n in (1, 3):  # one export, batches of one and of three images
        x = np.random.default_rng(n).integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
        assert parity(want, path, x) < 1e-4
        probs = OnnxPredictor(path).predict(x)
        assert probs.std() > 5e-3  # not a constant map
        assert parity(other, path, x) > 1e-3  # the graph holds the ensemble, not one member


# ----------------------------------------------------------------------------- training


def _capture(store):
    """An end-of-epoch hook keeping each epoch's validated weights (as a U-Net state_dict)."""

    def hook(trainer, row):
        store[row["epoch"]] = {k: v.detach().cpu().clone() for k, v in trainer.eval_model.state_dict().items()}

    return hook


@pytest.fixture(scope="module")
def snap_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("snap")
    weights = {}
    summary = train_tiny(tiny_prepared, out, SNAP, on_epoch_end=_capture(weights))
    return out, summary, weights


def test_training_saves_the_ensemble_of_the_last_epochs(snap_run, tiny_prepared):
    out, summary, weights = snap_run
    model, meta = load_model(out / "model.pt")
    assert isinstance(model, UNetEnsemble) and len(model.members) == 2
    assert summary["best_epoch"] == 3 and summary["snapshot_epochs"] == [2, 3] and summary["epochs_run"] == 3
    assert meta["snapshots"] == 2 and meta["snapshot_epochs"] == [2, 3] and meta["best_epoch"] == 3
    for member, epoch in zip(model.members, (2, 3)):
        assert all(torch.equal(v, weights[epoch][k]) for k, v in member.state_dict().items())
    images = np.load(tiny_prepared / "val.npz")["images"]
    nets = []
    for epoch in (2, 3):
        net = UNet(model.config)
        net.load_state_dict(weights[epoch])
        nets.append(net.eval())
    dev = torch.device("cpu")
    mean_prob = sum(torch.sigmoid(predict_all_logits(n, images, dev)) for n in nets) / 2
    got = torch.sigmoid(predict_all_logits(model, images, dev))
    torch.testing.assert_close(got, mean_prob, rtol=0, atol=1e-5)
    # val_dice_at_0.5 is the ensemble's own, not a single epoch's
    from covidseg.inference.forward import predict_logits
    from covidseg.training.calibration import val_scores

    s = val_scores(predict_logits(model, images, dev), np.load(tiny_prepared / "val.npz")["masks"])
    assert summary["val_dice_at_0.5"] == pytest.approx(s["dice_sum"] / max(s["scored"], 1), abs=1e-6)


def test_snapshots_off_keeps_the_best_epoch_and_no_snapshots(tiny_prepared, tmp_path):
    kept = []
    summary = train_tiny(tiny_prepared, tmp_path, TINY_TRAIN, on_epoch_end=lambda t, row: kept.append(len(t.snapshots)))
    assert kept == [0, 0, 0] and "snapshot_epochs" not in summary
    model, meta = load_model(tmp_path / "model.pt")
    assert type(model) is UNet and "snapshots" not in meta and "snapshot_epochs" not in meta


def test_interrupted_snapshot_run_resumes_to_the_same_model_file(snap_run, tiny_prepared, tmp_path):
    full, _, _ = snap_run
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_prepared, tmp_path, SNAP, on_epoch_end=interrupt_after(2))
    summary = train_tiny(tiny_prepared, tmp_path, SNAP)
    assert summary["snapshot_epochs"] == [2, 3]
    digest = [hashlib.sha256((d / "model.pt").read_bytes()).hexdigest() for d in (full, tmp_path)]
    assert digest[0] == digest[1]


def test_a_run_stopped_after_one_epoch_keeps_that_epochs_unet(tiny_prepared, tmp_path):
    summary = train_tiny(tiny_prepared, tmp_path, SNAP, on_epoch_end=lambda t, row: False)
    model, meta = load_model(tmp_path / "model.pt")
    assert type(model) is UNet and summary["snapshot_epochs"] == [1] and meta["best_epoch"] == 1


# ----------------------------------------------------------------------------- downstream of a trained ensemble


def test_evaluate_export_predict_and_card_work_on_the_ensemble(snap_run, tiny_prepared, tmp_path):
    out, summary, _ = snap_run
    model_pt = out / "model.pt"
    s = evaluate(
        model_pt,
        tiny_prepared,
        tmp_path / "test.json",
        tmp_path / "eval" / "per_image.csv",
        tmp_path / "eval",
        tmp_path / "pred.npz",
        EvaluateParams(bootstrap_resamples=200),
    )
    assert 0 <= s["dice"] <= 1 and s["severity"]["model"]["lung_dice"] == s["severity"]["model"]["lung_dice"]
    e = export_stage(model_pt, tiny_prepared, tmp_path / "model.onnx", ExportParams())
    assert e["parity_max_abs_diff"] <= 1e-4
    inputs = [
        save_image(tmp_path / "in" / "a.png", "grey", 90, 70),
        save_image(tmp_path / "in" / "b.png", "rgb", 64, 64),
    ]
    rows = {}
    for name, model in (("pt", model_pt), ("onnx", tmp_path / "model.onnx")):
        result = invoke_predict(*inputs, "--model", model, "--out", tmp_path / name, *FAST_PREDICT_FLAGS)
        assert result.exit_code == 0, result.output
        assert "no lung head" not in result.stderr  # found in both backends
        rows[name] = pd.DataFrame(read_csv(tmp_path / name / "predictions.csv"))
    assert (rows["pt"]["status"] == "ok").all()
    # the ensemble's lung channel reaches severity (a number, or for these random lungs a refusal with its reason)
    assert (rows["pt"]["severity_status"] != "").all()
    assert rows["pt"]["severity_status"].tolist() == rows["onnx"]["severity_status"].tolist()
    for column in ("mean_probability", "infected_fraction"):
        np.testing.assert_allclose(rows["pt"][column].astype(float), rows["onnx"][column].astype(float), atol=1e-3)
    _, meta = load_model(model_pt)
    card = render_card(
        copy_repo_params(tmp_path), meta, CARD_TEST_METRICS, CARD_TEST_DETAILS, summary, write_card_per_image(tmp_path)
    )
    assert "a snapshot ensemble of epochs 2, 3 of 3" in card
