import numpy as np
import torch

from covidseg.inference.forward import predict_logits, probabilities


class Fixed(torch.nn.Module):
    """Returns the given per-channel logit maps (C, S, S) for every image, whatever the input."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps[None].expand(x.shape[0], -1, -1, -1) + 0 * x


def test_lung_gate_caps_infection_by_lung_and_only_with_a_lung_channel():
    infection = torch.full((4, 4), 3.0)
    lung = torch.full((4, 4), -2.0)
    lung[:, :2] = 5.0
    images = np.zeros((2, 1, 4, 4), np.uint8)
    model = Fixed(torch.stack([infection, lung]))
    plain = predict_logits(model, images, torch.device("cpu"))
    gated = predict_logits(model, images, torch.device("cpu"), lung_gate=True)
    assert torch.equal(plain, infection.expand(2, 4, 4))
    assert torch.equal(gated[:, :, :2], infection[:, :2].expand(2, 4, 2))  # inside the lungs: unchanged
    assert torch.equal(gated[:, :, 2:], lung[:, 2:].expand(2, 4, 2))  # outside: capped by the lung logit
    one_channel = Fixed(infection[None])
    assert torch.equal(
        predict_logits(one_channel, images, torch.device("cpu"), lung_gate=True), infection.expand(2, 4, 4)
    )


def test_flip_tta_averages_the_mirrored_prediction():
    # A model blind to its input that always answers a left-to-right ramp: the mirrored pass,
    # mirrored back, is the reversed ramp, so the average is flat at the ramp's mean.
    ramp = torch.arange(4.0).expand(4, 4)
    images = np.zeros((1, 1, 4, 4), np.uint8)
    tta = predict_logits(Fixed(ramp[None]), images, torch.device("cpu"), flip_tta=True)
    torch.testing.assert_close(tta, torch.full((1, 4, 4), 1.5))


def test_probabilities_apply_the_temperature():
    logits = torch.tensor([[[0.0, 2.0]]])
    np.testing.assert_allclose(probabilities(logits, 2.0), 1 / (1 + np.exp(-np.array([[[0.0, 1.0]]]))), rtol=1e-6)
