import math

import pytest
import torch
import torch.nn as nn

from gan.losses import d_adversarial, g_adversarial, gradient_penalty, r1_penalty


def test_non_saturating_at_zero_logits():
    zero = torch.zeros(4)
    assert d_adversarial("ns", zero, zero).item() == pytest.approx(2 * math.log(2))
    assert g_adversarial("ns", zero).item() == pytest.approx(math.log(2))


def test_hinge_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75
    assert d_adversarial("hinge", real, fake).item() == pytest.approx(1.0)
    assert g_adversarial("hinge", fake).item() == pytest.approx(0.75)


def test_wasserstein_by_hand():
    real, fake = torch.tensor([3.0, 1.0]), torch.tensor([0.0, -2.0])
    assert d_adversarial("wgan-gp", real, fake).item() == pytest.approx(-1.0 - 2.0)
    assert g_adversarial("wgan-gp", fake).item() == pytest.approx(1.0)


class Linear(nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, labels=None):
        return (x.flatten(1) * self.w).sum(1)


def test_r1_is_half_gamma_grad_norm_squared():
    D = Linear(torch.tensor([3.0, 4.0]))
    x = torch.randn(5, 2, requires_grad=True)
    assert r1_penalty(D(x), x, gamma=2.0).item() == pytest.approx(0.5 * 2.0 * 25.0)


def test_gradient_penalty_by_hand():
    D = Linear(torch.tensor([0.0, 2.0]))  # ||grad|| = 2 -> (2 - 1)^2 = 1
    real, fake = torch.randn(4, 2), torch.randn(4, 2)
    gp = gradient_penalty(D, real, fake, None, torch.rand(4, 1), weight=10.0)
    assert gp.item() == pytest.approx(10.0)
    gp.backward()
    assert D.w.grad is not None  # the penalty trains D
