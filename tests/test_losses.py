import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gan.core.config import LossConfig, ModelConfig
from gan.core.losses import GANLoss, d_adversarial, g_adversarial, gradient_penalty, r1_penalty
from gan.core.models import build_models


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


def test_class_weight_adds_the_cross_entropy_of_ds_class_scores():
    """D learns to classify real images; G is pushed toward what D reads as the label."""
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(width=8, num_classes=10), 28, 1)
    D.eval()
    real, real_labels = torch.rand(6, 1, 28, 28) * 2 - 1, torch.arange(6)
    fake_labels = torch.tensor([9, 8, 7, 6, 5, 4])
    fake = G(torch.randn(6, G.z_dim), fake_labels).detach()
    real_logits, real_scores = D(real, real_labels, classes=True)
    fake_logits, fake_scores = D(fake, fake_labels, classes=True)
    d_class, g_class = F.cross_entropy(real_scores, real_labels), F.cross_entropy(fake_scores, fake_labels)

    loss = GANLoss(LossConfig(class_weight=0.5))
    d = loss.d_main(D, real, real_labels, fake, fake_labels)
    assert d["loss/d/class"].item() == pytest.approx(d_class.item(), rel=1e-5)
    assert d["loss/d"].item() == pytest.approx((d_adversarial("ns", real_logits, fake_logits) + 0.5 * d_class).item())
    g = loss.g_main(D, fake, fake_labels)
    assert g["loss/g/class"].item() == pytest.approx(g_class.item(), rel=1e-5)
    assert g["loss/g"].item() == pytest.approx((g_adversarial("ns", fake_logits) + 0.5 * g_class).item())
    assert "loss/d/class" not in GANLoss(LossConfig()).d_main(D, real, real_labels, fake, fake_labels)
