"""The lung-region cascade: boxes, crop/paste, the training view, the two-pass model, its file and ONNX export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from covidseg.export.graph import export_onnx
from covidseg.inference.calibration import Calibration, calibrated_probabilities
from covidseg.inference.onnx_runtime import OnnxPredictor
from covidseg.model import cascade
from covidseg.model.cascade import LungCascade, crop, crop_batch, lung_boxes, paste
from covidseg.model.checkpoint import load_model
from covidseg.model.ensemble import UNetEnsemble
from covidseg.model.unet import UNet, UNetConfig
from covidseg.params import ParamsError, TrainParams, from_dict
from covidseg.training.run import train

from helpers import TINY_TRAIN, train_tiny


def _mask(h=256, w=256, rows=(64, 191), cols=(32, 223)) -> torch.Tensor:
    m = torch.zeros(1, h, w, dtype=torch.bool)
    m[0, rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def test_box_edges_are_the_outer_pixel_edges_in_normalised_coordinates():
    # columns 32..223 of 256: left edge of pixel 32 is 2*32/256 - 1 = -0.75, right edge of 223 is 2*224/256 - 1 = 0.75
    box = lung_boxes(_mask(), margin=0.0)
    assert torch.allclose(box, torch.tensor([[-0.75, -0.5, 0.75, 0.5]]))
    # a margin of 0.05 of the side is 0.1 in normalised units on each side
    assert torch.allclose(lung_boxes(_mask(), margin=0.05), torch.tensor([[-0.85, -0.6, 0.85, 0.6]]))


def test_empty_mask_gives_the_whole_image_and_boxes_stay_inside():
    assert torch.equal(
        lung_boxes(torch.zeros(2, 16, 16, dtype=torch.bool), margin=0.0), torch.tensor([[-1.0, -1, 1, 1]] * 2)
    )
    near_edge = _mask(rows=(0, 250), cols=(0, 255))
    assert torch.equal(lung_boxes(near_edge, margin=0.05), torch.tensor([[-1.0, -1, 1, 1]]))


def test_a_stray_blob_is_widened_to_the_minimum_side_about_its_centre_and_kept_inside():
    blob = _mask(rows=(100, 101), cols=(0, 1))  # 2x2 pixels in the left edge
    box = lung_boxes(blob, margin=0.0)[0]
    side = 2 * cascade.MIN_SIDE
    assert torch.allclose(box[2:] - box[:2], torch.tensor([side, side]))
    assert box[0] == -1.0  # slid back inside the image instead of leaving it
    centre_y = 2 * 101 / 256 - 1  # the blob's centre row edge (rows 100-101)
    assert torch.isclose((box[1] + box[3]) / 2, torch.tensor(centre_y))


def test_crop_of_a_ramp_reads_the_box_by_hand():
    ramp = torch.arange(256, dtype=torch.float32).expand(1, 1, 256, 256).clone()  # value = column index
    right_half = torch.tensor([[0.0, -1.0, 1.0, 1.0]])
    out = crop(ramp, right_half, (256, 256))
    # output column j samples x = 0.5 * ((2j + 1) / 256 - 1) + 0.5, i.e. pixel coordinate 128 + (j + 0.5) / 2 - 0.5
    j = torch.arange(256, dtype=torch.float32)
    # (the last column's point, 255.25, lies past the last pixel centre: border padding reads 255)
    assert torch.allclose(out[0, 0, 0], (127.75 + j / 2).clamp(max=255), atol=1e-3)
    # the whole-image box is the identity
    assert torch.allclose(crop(ramp, torch.tensor([[-1.0, -1, 1, 1]]), (256, 256)), ramp, atol=1e-4)


def test_paste_undoes_crop_inside_the_box_and_is_outside_logit_elsewhere():
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    field = (torch.sin(3 * x) + torch.cos(2 * y))[None, None]  # smooth, so bilinear round trips closely
    box = torch.tensor([[-0.5, -0.75, 0.75, 0.5]])
    back = paste(crop(field, box, (64, 64)), box, (64, 64))
    cols = (torch.arange(64) * 2 + 1) / 64 - 1
    inside_x = (cols > -0.5) & (cols < 0.75)
    inside_y = (cols > -0.75) & (cols < 0.5)
    inner = inside_y[:, None] & inside_x[None, :]
    assert torch.allclose(back[0, 0][inner], field[0, 0][inner], atol=0.02)
    assert torch.all(back[0, 0][~inner] == cascade.OUTSIDE_LOGIT)


def test_crop_batch_crops_images_and_targets_alike_and_needs_the_lung_channel():
    n = 16
    lungs = _mask(64, 64, rows=(16, 47), cols=(8, 55)).float().expand(n, 64, 64)
    infection = torch.zeros(n, 64, 64)
    infection[:, 20:30, 10:20] = 1
    targets = torch.stack([infection, lungs], 1)
    images = targets[:, 1:2] * 0.5 + targets[:, :1] * 0.5  # the image shows the targets
    with pytest.raises(ValueError, match="lung_aux_weight"):
        crop_batch(images, targets[:, :1], torch.Generator().manual_seed(0))
    x, y = crop_batch(images, targets, torch.Generator().manual_seed(0))
    cropped = (x != images).flatten(1).any(1)
    assert 0 < int(cropped.sum()) < n  # some crops, some whole images
    assert torch.equal(x[~cropped], images[~cropped]) and torch.equal(y[~cropped], targets[~cropped])
    # a crop is the lungs' box: 32x48 lung pixels fill 0.375 of the 64x64 image, and at least
    # 32*48 / (44.8*60.8) = 0.56 of a crop (margins at most 0.1 of the side, 6.4 px, each side)
    assert float(targets[0, 1].mean()) == 0.375
    assert float(y[cropped, 1].mean(dim=(1, 2)).min()) > 0.55
    assert torch.allclose(x[cropped], y[cropped, 1:2] * 0.5 + y[cropped, :1] * 0.5, atol=1e-5)


class _Probe(torch.nn.Module):
    """A fake network: lungs where the image is bright, infection logit = 10 * image - 5 (a known function)."""

    config = UNetConfig(out_channels=2, base_channels=4, depth=2)

    def forward(self, x):
        return torch.cat([10 * x - 5, 20 * (x > 0.25).float() - 10], 1)


def test_the_cascade_takes_lungs_from_the_whole_image_and_infection_from_the_box():
    x = torch.zeros(1, 1, 64, 64)
    x[..., 16:48, 8:56] = 0.5  # the lungs (bright)
    x[..., 24:32, 16:24] = 1.0  # infection inside them
    out = LungCascade(_Probe())(x)
    assert out.shape == (1, 2, 64, 64)
    assert torch.equal(out[:, 1], _Probe()(x)[:, 1])
    box = lung_boxes(x[:, 0] > 0.25)
    assert torch.allclose(out[:, :1], paste(10 * crop(x, box, (64, 64)) - 5, box, (64, 64)))
    assert out[0, 0, 0, 0] == cascade.OUTSIDE_LOGIT and out[0, 0, 28, 20] > 4
    with pytest.raises(ValueError, match="lung head"):
        LungCascade(UNet(UNetConfig(out_channels=1, base_channels=4, depth=2)))


def test_lung_crop_is_refused_without_the_lung_head():
    with pytest.raises(ParamsError, match="lung_crop needs the lung head"):
        from_dict(TrainParams, "train", {"lung_crop": True, "lung_aux_weight": 0.0})


def test_a_cascade_trains_saves_reloads_and_exports_with_parity(tiny_prepared, tmp_path):
    params = dataclasses.replace(TINY_TRAIN, epochs=2, lung_crop=True, flip_tta=True, temperature_scaling=True)
    out = tmp_path / "run"
    train_tiny(tiny_prepared, out, params)
    model, meta = load_model(out / "model.pt")
    assert isinstance(model, LungCascade) and "lung_crop" not in meta
    assert meta["train_params"]["lung_crop"] is True
    # the file holds the plain network: its weights rebuild a U-Net that, wrapped, predicts the same
    plain = UNet(model.config)
    plain.load_state_dict(model.net.state_dict())
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # (the loaded model is channels_last: same maths, other rounding)
        assert torch.allclose(LungCascade(plain.eval())(x), model(x), atol=1e-5)
    calibration = Calibration.from_meta(meta)
    onnx_path = export_onnx(model, tmp_path / "m.onnx", 64, {}, calibration=calibration)
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 64, 64), dtype=np.uint8)
    want = calibrated_probabilities(model, images, torch.device("cpu"), "fp32", calibration)
    assert np.abs(OnnxPredictor(onnx_path).predict(images) - want).max() < 1e-4


def test_the_model_file_says_whether_the_network_runs_as_a_cascade(tiny_prepared, tmp_path):
    params = TrainParams(epochs=1, batch_size=4, base_channels=4, depth=3, downsample=1, lung_aux_weight=0.5)
    a, b = tmp_path / "a", tmp_path / "b"
    for out, p in ((a, params), (b, dataclasses.replace(params, lung_crop=True))):
        train(tiny_prepared, out / "model.pt", out / "r", out / "c.tsv", out / "t.json", p, 0)
    assert not isinstance(load_model(a / "model.pt")[0], LungCascade)
    assert isinstance(load_model(b / "model.pt")[0], LungCascade)


def test_a_snapshot_ensemble_runs_inside_the_cascade(tiny_prepared, tmp_path):
    params = TrainParams(
        epochs=2, batch_size=4, base_channels=4, depth=3, downsample=1, lung_crop=True, snapshots=2, lung_aux_weight=0.5
    )
    out = tmp_path / "run"
    train(tiny_prepared, out / "model.pt", out / "r", out / "c.tsv", out / "t.json", params, 0)
    model, meta = load_model(out / "model.pt")
    assert isinstance(model, LungCascade) and isinstance(model.net, UNetEnsemble)
    assert meta["snapshots"] == 2 and meta["snapshot_epochs"] == [1, 2]
