import pytest
import torch

from gan.core.config import ModelConfig
from gan.core.models import build_models


@pytest.mark.parametrize("family", ["mlp", "dcgan", "resnet"])
@pytest.mark.parametrize("resolution", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("g_norm", ["batch", "none"])
def test_shapes(family, resolution, channels, num_classes, g_norm):
    cfg = ModelConfig(family=family, z_dim=8, width=8, depth=1, num_classes=num_classes, g_norm=g_norm)
    G, D = build_models(cfg, resolution, channels)
    z = torch.randn(3, 8)
    labels = torch.tensor([0, 4, 9]) if num_classes else None
    x = G(z, labels)
    assert x.shape == (3, channels, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x, labels).shape == (3,)


@pytest.mark.parametrize("norm", ["spectral", "batch", "none"])
def test_discriminator_norms_and_gradients(norm):
    G, D = build_models(ModelConfig(width=8, d_norm=norm, num_classes=10), 28, 1)
    out = D(torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4]))
    out.sum().backward()
    assert all(p.grad is not None for p in D.parameters() if p.requires_grad)


def test_conditional_models_require_labels():
    G, D = build_models(ModelConfig(width=8, num_classes=10), 28, 1)
    with pytest.raises(ValueError, match="class-conditional"):
        G(torch.randn(2, G.z_dim))
    with pytest.raises(ValueError, match="class-conditional"):
        D(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("family", ["mlp", "dcgan", "resnet"])
def test_class_scores_are_the_projection_term_of_every_class(family):
    torch.manual_seed(0)
    _, D = build_models(ModelConfig(family=family, width=8, num_classes=10), 28, 1)
    D.eval()  # spectral norm's power iteration would change the weights between calls
    x, labels = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])
    logits, scores = D(x, labels, classes=True)
    assert scores.shape == (4, 10)
    torch.testing.assert_close(logits, D(x, labels))
    for k in (0, 7):  # changing the label moves the logit by exactly the change in score
        other = D(x, torch.full((4,), k))
        torch.testing.assert_close(other - logits, scores[:, k] - scores.gather(1, labels[:, None])[:, 0])
    _, unconditional = build_models(ModelConfig(family=family, width=8), 28, 1)
    with pytest.raises(ValueError, match="no class scores"):
        unconditional(x, None, classes=True)


def test_labels_change_the_output():
    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(width=8, num_classes=10), 28, 1)
    for module in G.modules():  # conditional BN starts as the identity for every class
        if hasattr(module, "embed") and module.embed is not None:
            torch.nn.init.normal_(module.embed.weight)
    G.eval()
    z = torch.randn(1, G.z_dim)
    assert not torch.allclose(G(z, torch.tensor([1])), G(z, torch.tensor([7])))


def test_minibatch_std_groups_are_consecutive():
    from gan.core.models import MinibatchStd

    h = torch.cat([torch.zeros(4, 2), torch.arange(8.0).view(4, 2)])  # group 1 constant, group 2 not
    out = MinibatchStd(group=4)(h)
    assert out[:4, 2].lt(1e-3).all() and out[4:, 2].gt(1).all()
    torch.testing.assert_close(MinibatchStd(4)(h[4:]), out[4:])  # a half-batch sees the same groups
