import dataclasses
import math

import pytest
import torch

from covidseg.model.losses import (
    LOSS_BUILDERS,
    bce_loss,
    focal_loss,
    make_loss,
    segmentation_loss,
    soft_dice_loss,
    training_targets,
    tversky_loss,
)
from covidseg.params import LOSSES, TrainParams


def test_bce_hand_checked():
    # logit 0 -> p = 0.5 -> -log(0.5) = ln 2 for either target.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert bce_loss(logits, target).item() == pytest.approx(math.log(2))
    # pos_weight 3 triples the positive pixels' terms: mean of (3, 1, 1, 3) * ln2 = 2 ln 2.
    assert bce_loss(logits, target, pos_weight=3.0).item() == pytest.approx(2 * math.log(2))


def test_soft_dice_perfect_wrong_and_empty():
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    confident = torch.where(target > 0, 50.0, -50.0)
    # Perfect prediction: (2*1 + 1) / (1 + 1 + 1) = 1 -> loss 0.
    assert soft_dice_loss(confident, target).item() == pytest.approx(0.0, abs=1e-6)
    # Everything wrong: intersection 0, |P| = 3, |T| = 1 -> 1 - 1/5.
    assert soft_dice_loss(-confident, target).item() == pytest.approx(1 - 1 / 5, abs=1e-6)
    # Empty truth, empty prediction (a negative image done right) costs nothing.
    empty = torch.zeros_like(target)
    assert soft_dice_loss(torch.full_like(target, -50.0), empty).item() == pytest.approx(0.0, abs=1e-6)


def test_focal_reduces_easy_pixels_and_matches_weighted_bce_at_gamma_zero():
    logits = torch.tensor([[[[3.0, -3.0], [0.5, -0.2]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx((alpha_t * bce).mean().item())
    assert focal_loss(logits, target, gamma=2.0).item() < focal_loss(logits, target, gamma=0.0).item()


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_is_finite_and_differentiable(name):
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.7).float()
    loss = make_loss(TrainParams(loss=name))(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_unknown_loss():
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        make_loss(TrainParams(loss="l1"))


def test_the_registry_holds_exactly_the_names_params_validates():
    """params.LOSSES (checked without torch by the check stage) and the builders never drift apart."""
    assert tuple(LOSS_BUILDERS) == LOSSES


def test_each_builder_reads_its_own_params():
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    p = TrainParams(pos_weight=3.0, focal_gamma=1.5, tversky_alpha=0.6, tversky_gamma=0.8)

    def loss(name):
        return make_loss(dataclasses.replace(p, loss=name))(logits, target)

    torch.testing.assert_close(loss("bce"), bce_loss(logits, target, 3.0))
    torch.testing.assert_close(loss("focal"), focal_loss(logits, target, 1.5))
    torch.testing.assert_close(loss("bce_tversky"), bce_loss(logits, target, 3.0) + tversky_loss(logits, target, 0.6))
    torch.testing.assert_close(
        loss("bce_focal_tversky"), bce_loss(logits, target, 3.0) + tversky_loss(logits, target, 0.6, 0.8)
    )
    torch.testing.assert_close(loss("bce_dice"), bce_loss(logits, target, 3.0) + soft_dice_loss(logits, target))


def test_training_targets_stack_the_lung_mask_only_with_the_lung_head():
    masks = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.uint8)
    lungs = torch.ones_like(masks)
    both = training_targets(masks, lungs, with_lungs=True)
    assert both.shape == (1, 2, 2, 2) and both.dtype == torch.float32
    assert torch.equal(both[:, 0], masks[:, 0].float()) and torch.equal(both[:, 1], lungs[:, 0].float())
    assert torch.equal(training_targets(masks, lungs, with_lungs=False), masks.float())


def test_segmentation_loss_adds_the_weighted_lung_bce_by_hand():
    # Infection channel: logits 0 everywhere -> BCE = log 2 whatever the target.
    # Lung channel: logit +log 3 (p = 3/4) on two pixels with target 1 (-log 3/4 each) and two with
    # target 0 (-log 1/4 each): mean BCE = (2 log 4/3 + 2 log 4) / 4 = (log(4/3) + log 4) / 2.
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]]])
    lung_bce = (math.log(4 / 3) + math.log(4)) / 2
    bce = make_loss(TrainParams(loss="bce"))
    assert segmentation_loss(logits, target, bce, 0.5).item() == pytest.approx(math.log(2) + 0.5 * lung_bce, rel=1e-6)
    assert segmentation_loss(logits, target, bce, 0.0).item() == pytest.approx(
        math.log(2), rel=1e-6
    )  # no lung head term
    assert segmentation_loss(logits[:, :1], target[:, :1], bce, 0.0).item() == pytest.approx(math.log(2), rel=1e-6)


def test_tversky_by_hand():
    """Confident predictions: TP = 2, FP = 1, FN = 1 on one image (smooth 0)."""
    from covidseg.model.losses import soft_dice_loss, tversky_loss

    big = 50.0
    logits = torch.tensor([big, big, big, -big, -big]).reshape(1, 1, 1, 5)
    target = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 5)
    # TI = 2 / (2 + 0.7 * 1 + 0.3 * 1) = 2 / 3
    assert tversky_loss(logits, target, alpha=0.7, smooth=0.0).item() == pytest.approx(1 / 3, abs=1e-6)
    # focal: (1 - 2/3) ** 0.5
    assert tversky_loss(logits, target, 0.7, gamma=0.5, smooth=0.0).item() == pytest.approx((1 / 3) ** 0.5, abs=1e-6)
    # alpha 0.5 is the soft Dice (without smoothing): 2 * 2 / (2 * 2 + 1 + 1)
    assert tversky_loss(logits, target, 0.5, smooth=0.0).item() == pytest.approx(
        soft_dice_loss(logits, target, smooth=0.0).item(), abs=1e-6
    )
    # more false positives cost more than as many false negatives when alpha > 0.5
    fp_heavy = torch.tensor([big, big, big, big, -big]).reshape(1, 1, 1, 5)
    target_fp = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 5)
    target_fn = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 1, 5)
    assert tversky_loss(fp_heavy, target_fp, 0.7).item() > tversky_loss(fp_heavy, target_fn, 0.7).item()
