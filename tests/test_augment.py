import dataclasses

import torch

from covidseg.augment import augment_batch
from covidseg.params import TrainParams


def _batch():
    mask = torch.zeros(4, 1, 32, 32)
    mask[:, :, 4:12, 2:10] = 1.0  # an off-centre block: any flip or rotation moves it
    image = 0.2 + 0.6 * mask
    return image, torch.cat([mask, mask], 1)


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
    p = dataclasses.replace(TrainParams(), brightness=0.0, contrast=0.0, gamma=0.0, rotate_deg=20.0, scale=0.2)
    out_image, out_masks = augment_batch(image, masks, p, torch.Generator().manual_seed(0))
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    bright = out_image > 0.5
    agree = (bright == (out_masks[:, :1] > 0)).float().mean()
    assert agree > 0.97  # same transform on both (only edge pixels differ by interpolation)
    assert not torch.equal(out_masks, masks)


def test_flip_only_mirrors_left_right():
    image, masks = _batch()
    p = dataclasses.replace(TrainParams(), rotate_deg=0.0, scale=0.0, brightness=0.0, contrast=0.0, gamma=0.0)
    gen = torch.Generator().manual_seed(1)
    out_image, out_masks = augment_batch(image, masks, p, gen)
    for i in range(4):
        same, mirrored = torch.equal(out_masks[i], masks[i]), torch.equal(out_masks[i], masks[i].flip(-1))
        assert same or mirrored
        torch.testing.assert_close(out_image[i], image[i] if same else image[i].flip(-1))


def test_intensity_changes_touch_only_the_image_and_stay_in_range():
    image, masks = _batch()
    p = dataclasses.replace(TrainParams(), flip=False, rotate_deg=0.0, scale=0.0, brightness=0.3, contrast=0.3, gamma=0.3)
    out_image, out_masks = augment_batch(image, masks, p, torch.Generator().manual_seed(2))
    assert torch.equal(out_masks, masks)
    assert out_image.min() >= 0 and out_image.max() <= 1
    assert not torch.allclose(out_image, image)
