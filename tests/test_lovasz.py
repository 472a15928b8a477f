"""The Lovasz hinge (Berman et al. 2018) and the bce_lovasz training loss, checked by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from covidseg.model.losses import bce_loss, lovasz_grad, lovasz_hinge, make_loss
from covidseg.params import TrainParams


def test_lovasz_grad_by_hand():
    # Pixels sorted by error with labels (1, 0, 1, 0): making the first k of them wrong gives
    # k=1: prediction {p3} vs truth {p1, p3}: IoU 1/2; k=2: {p2, p3}: 1/3; k=3: {p2}: 0; k=4: {p2, p4}: 0.
    # Jaccard losses 1/2, 2/3, 1, 1 -> increments 1/2, 1/6, 1/3, 0.
    grad = lovasz_grad(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(grad, torch.tensor([[1 / 2, 1 / 6, 1 / 3, 0.0]]))
    # Rows are independent; an empty row: the loss is 1 as soon as one pixel is wrong.
    both = lovasz_grad(torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(both[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # The increments sum to the Jaccard loss of everything wrong (1 unless the truth is everything).
    torch.testing.assert_close(lovasz_grad(torch.tensor([[1.0, 1.0, 1.0]])), torch.full((1, 3), 1 / 3))


def test_lovasz_hinge_by_hand_on_an_unsorted_2x2_image():
    # Pixels a..d: labels 1, 0, 1, 0 and logits -1, 0.5, 0, -2 -> hinge errors 1 - logit * sign =
    # 2, 1.5, 1, -1 (already in decreasing order), weights 1/2, 1/6, 1/3, 0 (test above):
    # loss = 2/2 + 1.5/6 + 1/3 + relu(-1) * 0 = 19/12. Stored in the image as [[c, d], [a, b]].
    logits = torch.tensor([[[[0.0, -2.0], [-1.0, 0.5]]]], requires_grad=True)
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    loss = lovasz_hinge(logits, target)
    torch.testing.assert_close(loss, torch.tensor(19 / 12))
    loss.backward()
    # d loss / d logit = -sign * weight where the error is positive: c -1/3, d 0, a -1/2, b +1/6.
    torch.testing.assert_close(logits.grad, torch.tensor([[[[-1 / 3, 0.0], [-1 / 2, 1 / 6]]]]))


def test_per_image_mean():
    a = torch.tensor([[[[0.0, -2.0], [-1.0, 0.5]]]]), torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    b = torch.tensor([[[[3.0, -0.5], [0.2, 1.0]]]]), torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    batch = lovasz_hinge(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    torch.testing.assert_close(batch, (lovasz_hinge(*a) + lovasz_hinge(*b)) / 2)


def test_perfect_prediction_costs_nothing_and_a_flipped_pixel_costs():
    target = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    logits = 3.0 * (2 * target - 1)  # right side of every pixel with margin >= 1
    assert lovasz_hinge(logits, target).item() == 0.0
    previous = 0.0
    for flips in range(1, 4):  # each further wrong pixel raises the loss
        wrong = logits.clone()
        wrong.view(-1)[:flips] *= -1
        loss = lovasz_hinge(wrong, target).item()
        assert loss > previous
        previous = loss
    # Also from an imperfect prediction: a correct pixel made wrong raises the loss.
    logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:6] = 1
    i = int(((logits > 0) == target.bool()).view(-1).nonzero()[0])
    flipped = logits.clone()
    flipped.view(-1)[i] = -2.0 * flipped.view(-1)[i].sign()
    assert lovasz_hinge(flipped, target) > lovasz_hinge(logits, target)


def test_empty_mask_charges_only_the_most_confident_false_positive():
    logits = torch.tensor([[[[-3.0, 0.5], [-0.2, -1.5]]]], requires_grad=True)
    target = torch.zeros(1, 1, 2, 2)
    loss = lovasz_hinge(logits, target)
    torch.testing.assert_close(loss, torch.tensor(1.5))  # relu(1 + max logit)
    loss.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]]))
    assert lovasz_hinge(torch.full((1, 1, 2, 2), -1.0), target).item() == 0.0  # all negative with margin 1


def test_all_ones_mask_is_the_mean_hinge():
    logits = torch.tensor([[[[2.0, 0.5], [-0.5, 1.0]]]])
    target = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(lovasz_hinge(logits, target), F.relu(1 - logits).mean())  # (0 + .5 + 1.5 + 0) / 4


def test_bce_lovasz_is_bce_plus_lovasz_hinge():
    logits = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    target = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.7).float()
    target[1] = 0  # a negative image
    got = make_loss(TrainParams(loss="bce_lovasz", pos_weight=2.0))(logits, target)
    torch.testing.assert_close(got, bce_loss(logits, target, 2.0) + lovasz_hinge(logits, target))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_finite_and_differentiable_under_cpu_autocast(dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 16, 16)
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 4:9, 5:12] = 1  # image 1 is empty
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits = conv(x)
        loss = make_loss(TrainParams(loss="bce_lovasz"))(logits, target)
    assert logits.dtype == dtype
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in conv.parameters())
