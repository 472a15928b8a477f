import pytest
import torch

from covidseg.training.averaging import WeightAverage


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))


def test_first_updates_use_the_warm_up_rate_then_the_decay():
    avg = WeightAverage(_net(), decay=0.9)
    rates = []
    for _ in range(100):  # (1 + n) / (10 + n) reaches 0.9 at n = 80
        rates.append(avg.rate())
        avg.updates += 1
    assert rates[0] == pytest.approx(1 / 10) and rates[1] == pytest.approx(2 / 11) and rates[2] == pytest.approx(3 / 12)
    assert rates[-1] == 0.9 and max(rates) == 0.9


def test_update_is_the_hand_computed_average_of_weights_and_buffers():
    net = _net()
    avg = WeightAverage(net, decay=0.5)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():  # a made-up "optimiser step" and new BatchNorm statistics
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(4.0)
        net[1].num_batches_tracked.fill_(7)
    avg.update(net)  # n = 0: d = 1/10, so avg = 0.1 * old + 0.9 * new
    assert torch.allclose(avg.model[0].weight, w0 + 0.9)
    assert torch.allclose(avg.model[1].running_mean, torch.full((2,), 3.6))
    assert int(avg.model[1].num_batches_tracked) == 7  # integer buffers are copied, not averaged
    with torch.no_grad():
        net[0].weight.add_(1.0)
    avg.update(net)  # n = 1: d = 2/11
    expected = (2 / 11) * (w0 + 0.9) + (9 / 11) * (w0 + 2.0)
    assert torch.allclose(avg.model[0].weight, expected, atol=1e-6)
    assert not avg.model[0].weight.requires_grad


def test_average_of_a_constant_model_is_that_model_and_the_source_is_untouched():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    avg = WeightAverage(net, decay=0.99)
    for _ in range(5):
        avg.update(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
        assert torch.allclose(avg.model.state_dict()[k].to(v.dtype), v)


def test_state_round_trip():
    net = _net()
    avg = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].weight.mul_(2)
    avg.update(net)
    copy = WeightAverage(_net(), decay=0.5)
    copy.load_state_dict(avg.state_dict())
    assert copy.decay == 0.9 and copy.updates == 1
    assert torch.equal(copy.model[0].weight, avg.model[0].weight)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.1])
def test_decay_out_of_range_is_refused(decay):
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(_net(), decay)
