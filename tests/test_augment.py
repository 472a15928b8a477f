import dataclasses

import pytest
import torch
import torch.nn.functional as F

from covidseg.params import TrainParams
from covidseg.training.augment import augment_batch, intensity_luts, sampling_grid


def _batch():
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 4:12, 2:10] = 1.0  # an off-centre block: any flip or rotation moves it
    image = (51 + 153 * mask).to(torch.uint8)  # grey 0.2 outside, 0.8 inside
    return image, torch.cat([mask, mask], 1)


def test_sampling_grid_equals_affine_grid():
    angle = torch.tensor([0.0, 0.3, -0.17, 0.1])
    scale = torch.tensor([1.0, 1.1, 0.9, 1.05])
    flip = torch.tensor([False, True, False, True])
    f = torch.where(flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(4, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = f * cos, -sin, f * sin, cos
    expected = F.affine_grid(theta, [4, 1, 24, 40], align_corners=False)
    torch.testing.assert_close(sampling_grid(angle, scale, flip, 24, 40), expected)


def test_intensity_lut_is_identity_without_intensity_changes_and_hand_checked_otherwise():
    image, _ = _batch()
    off = dataclasses.replace(TrainParams(), aug_brightness=0.0, aug_contrast=0.0, aug_gamma=0.0)
    lut = intensity_luts(image, off, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lut, (torch.arange(256) / 255.0).expand(4, 256), atol=1e-6, rtol=0)
    # contrast 1, gamma 1, brightness b: the table is g / 255 + b, clamped to [0, 1]
    p = dataclasses.replace(TrainParams(), aug_brightness=0.1, aug_contrast=0.0, aug_gamma=0.0)
    lut = intensity_luts(image, p, torch.Generator().manual_seed(0))
    b = 0.1 * (2 * torch.rand(4, generator=torch.Generator().manual_seed(0)) - 1)
    torch.testing.assert_close(lut, ((torch.arange(256) / 255.0)[None] + b[:, None]).clamp(1e-6, 1), atol=1e-6, rtol=0)


def test_rejects_float_images():
    image, masks = _batch()
    with pytest.raises(TypeError, match="uint8"):
        augment_batch(image.float() / 255, masks, TrainParams(augment=True), torch.Generator())


def test_same_generator_state_gives_same_result():
    image, masks = _batch()
    p = TrainParams(augment=True)
    a = augment_batch(image, masks, p, torch.Generator().manual_seed(3))
    b = augment_batch(image, masks, p, torch.Generator().manual_seed(3))
    c = augment_batch(image, masks, p, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_geometry_moves_image_and_masks_together_and_masks_stay_binary():
    image, masks = _batch()
    p = dataclasses.replace(
        TrainParams(), aug_brightness=0.0, aug_contrast=0.0, aug_gamma=0.0, aug_rotate_deg=20.0, aug_scale=0.2
    )
    out_image, out_masks = augment_batch(image, masks, p, torch.Generator().manual_seed(0))
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    bright = out_image > 0.5
    agree = (bright == (out_masks[:, :1] > 0)).float().mean()
    assert agree > 0.97  # same transform on both (only edge pixels differ by interpolation)
    assert not torch.equal(out_masks, masks)


def test_flip_only_mirrors_left_right():
    image, masks = _batch()
    p = dataclasses.replace(
        TrainParams(), aug_rotate_deg=0.0, aug_scale=0.0, aug_brightness=0.0, aug_contrast=0.0, aug_gamma=0.0
    )
    gen = torch.Generator().manual_seed(1)
    out_image, out_masks = augment_batch(image, masks, p, gen)
    for i in range(4):
        same, mirrored = torch.equal(out_masks[i], masks[i]), torch.equal(out_masks[i], masks[i].flip(-1))
        assert same or mirrored
        expected = image[i].float() / 255
        torch.testing.assert_close(out_image[i], expected if same else expected.flip(-1))


def test_intensity_changes_touch_only_the_image_and_stay_in_range():
    image, masks = _batch()
    p = dataclasses.replace(
        TrainParams(),
        aug_flip=False,
        aug_rotate_deg=0.0,
        aug_scale=0.0,
        aug_brightness=0.3,
        aug_contrast=0.3,
        aug_gamma=0.3,
    )
    out_image, out_masks = augment_batch(image, masks, p, torch.Generator().manual_seed(2))
    assert torch.equal(out_masks, masks)
    assert out_image.min() >= 0 and out_image.max() <= 1
    assert not torch.allclose(out_image, image.float() / 255)
