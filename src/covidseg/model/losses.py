"""Segmentation losses on logits (N, 1, H, W) against binary targets (N, 1, H, W) in {0, 1}, and the training loss.

All losses return a scalar mean over the batch. The soft Dice is computed per image and
averaged, with a smoothing term so that an empty target with an empty prediction costs ~0
(negatives, i.e. Non-COVID and Normal images, have empty masks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from covidseg.params import TrainParams


def bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Pixel-mean binary cross-entropy; ``pos_weight`` > 1 up-weights infected pixels."""
    weight = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over images of (2|P∩T| + s) / (|P| + |T| + s), with P the sigmoid probabilities."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    denom = prob.sum(1) + target.sum(1)
    return 1.0 - ((2 * inter + smooth) / (denom + smooth)).mean()


def tversky_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.7, gamma: float = 1.0, smooth: float = 1.0
) -> torch.Tensor:
    """Mean over images of (1 - TI)^gamma, TI = (TP + s) / (TP + alpha FP + (1 - alpha) FN + s) on soft counts.

    Tversky (Salehi et al. 2017): ``alpha`` > 0.5 charges false positives more than false
    negatives (the fix for over-marked small infections); alpha = 0.5 is the soft Dice. ``gamma``
    < 1 is the focal Tversky loss (Abraham & Khan 2019), which weights hard images more.
    """
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    tp = (prob * target).sum(1)
    fp = (prob * (1 - target)).sum(1)
    fn = ((1 - prob) * target).sum(1)
    index = (tp + smooth) / (tp + alpha * fp + (1 - alpha) * fn + smooth)
    return ((1.0 - index).clamp_min(0) ** gamma).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017): BCE scaled by (1 - p_t)^gamma, positives by alpha."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean()


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss, per row.

    gt_sorted: float (N, P) labels in {0, 1}, each row sorted by decreasing error. Returns
    float (N, P): entry k is Delta_J(first k+1 pixels wrong) - Delta_J(first k pixels wrong),
    where Delta_J(M) = 1 - |T minus M| / |T union M| is the Jaccard loss when the pixels M are
    mispredicted (Berman et al., CVPR 2018, eq. 8-9). With an empty T the Jaccard loss is 1 as soon
    as one pixel is wrong, so the gradient is (1, 0, ..., 0).
    """
    gts = gt_sorted.sum(1, keepdim=True)
    intersection = gts - gt_sorted.cumsum(1)
    union = gts + (1 - gt_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images of the Lovasz hinge (Berman et al., CVPR 2018): a convex surrogate of 1 - IoU.

    logits, target: (N, 1, H, W) (any shape with images on dim 0). Per image, the hinge errors
    e = 1 - logit * sign (sign = +1 on infected pixels, -1 elsewhere) are sorted in decreasing
    order and the loss is dot(relu(e_sorted), lovasz_grad(labels_sorted)). ``relu`` on the errors,
    as in the reference implementation (not its elu + 1 variant): pixels on the right side with a
    margin >= 1 cost nothing, so a confident correct prediction has loss 0.

    Special cases (following the reference): an all-ones mask gives the mean hinge
    mean(relu(1 - logit)); an empty mask gives relu(1 + max logit), so only the most
    confident false positive has a gradient. Computed in float32 whatever the autocast dtype.
    """
    logits = logits.float().flatten(1)
    labels = target.float().flatten(1)
    errors = 1.0 - logits * (2.0 * labels - 1.0)
    errors_sorted, perm = torch.sort(errors, dim=1, descending=True)
    grad = lovasz_grad(torch.gather(labels, 1, perm))
    return (F.relu(errors_sorted) * grad).sum(1).mean()


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) (N, 1, H, W) -> scalar
# params ``train.loss`` -> a builder reading the loss's own params; tests hold the keys equal to
# params.LOSSES (the names the check stage validates without importing torch).
LOSS_BUILDERS: dict[str, Callable[[TrainParams], LossFn]] = {
    "bce": lambda p: lambda lg, t: bce_loss(lg, t, p.pos_weight),
    "dice": lambda p: soft_dice_loss,
    "bce_dice": lambda p: lambda lg, t: bce_loss(lg, t, p.pos_weight) + soft_dice_loss(lg, t),
    "focal": lambda p: lambda lg, t: focal_loss(lg, t, p.focal_gamma),
    "bce_tversky": lambda p: lambda lg, t: bce_loss(lg, t, p.pos_weight) + tversky_loss(lg, t, p.tversky_alpha),
    "bce_focal_tversky": lambda p: (
        lambda lg, t: bce_loss(lg, t, p.pos_weight) + tversky_loss(lg, t, p.tversky_alpha, p.tversky_gamma)
    ),
    "bce_lovasz": lambda p: lambda lg, t: bce_loss(lg, t, p.pos_weight) + lovasz_hinge(lg, t),
}


def make_loss(params: TrainParams) -> LossFn:
    """The loss named by ``params.loss``, built from its registry entry with the params it reads."""
    builder = LOSS_BUILDERS.get(params.loss)
    if builder is None:
        raise ValueError(f"unknown loss {params.loss!r}; choose from {list(LOSS_BUILDERS)}")
    return builder(params)


def training_targets(masks: torch.Tensor, lungs: torch.Tensor, with_lungs: bool) -> torch.Tensor:
    """uint8 (N, 1, S, S) infection and lung masks -> float (N, K, S, S) targets in {0, 1}.

    K = 2 (infection, lung) with the lung auxiliary head, else K = 1 (infection only).
    """
    return torch.cat([masks, lungs], 1).float() if with_lungs else masks.float()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lung_aux_weight: float,
    lung_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss: ``loss_fn`` on the infection channel + ``lung_aux_weight`` x pixel-mean BCE on the lung channel.

    logits, target: float (N, K, S, S), channel 0 infection, channel 1 lung (present when
    ``lung_aux_weight`` > 0). ``lung_weight``: float (N,), 1 for the films that have a true lung
    mask and 0 for the others (None: all have one); the lung term is then the mean of the per-film
    pixel-mean BCE over the films that have one (0 when none in the batch has). Returns a scalar.
    """
    loss = loss_fn(logits[:, :1], target[:, :1])
    if lung_aux_weight <= 0:
        return loss
    if lung_weight is None:
        return loss + lung_aux_weight * F.binary_cross_entropy_with_logits(logits[:, 1:2], target[:, 1:2])
    per_film = F.binary_cross_entropy_with_logits(logits[:, 1:2], target[:, 1:2], reduction="none").mean((1, 2, 3))
    return loss + lung_aux_weight * (per_film * lung_weight).sum() / lung_weight.sum().clamp_min(1.0)
