import hashlib
import io

import pytest
import torch

from gan.config import EvalConfig
from gan.metrics import (
    DigitClassifier,
    Evaluator,
    copy_share,
    copy_threshold,
    evaluator_path,
    precision_recall,
    split_real,
)


@pytest.fixture(scope="module")
def evaluator(digits):
    return Evaluator(EvalConfig(num_samples=1000, kid_subset_size=200), digits)


def test_weights_are_safe_to_load_and_hashed(evaluator):
    raw = evaluator_path().read_bytes()
    assert hashlib.sha256(raw).hexdigest() == evaluator.sha256
    DigitClassifier().load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))


def test_classifier_is_accurate(digits):
    from gan.metrics import load_digit_classifier

    model, _ = load_digit_classifier()
    with torch.no_grad():
        acc = (model(digits.images).argmax(1) == digits.labels).float().mean().item()
    assert acc > 0.95


def test_fid_near_zero_against_itself_and_large_against_noise(digits, evaluator):
    ref, _ = split_real(len(digits), 1000)
    itself = evaluator.score_images(digits.images[ref])
    noise = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    far = evaluator.score_images(noise)
    assert abs(itself["fid"]) < 1e-3
    assert 0 < evaluator.floor < 20 and far["fid"] > 50 * evaluator.floor
    # KID is an unbiased estimate over random subsets: near zero, not exactly zero.
    assert abs(itself["kid"]) < 0.01 * far["kid"]


def test_evaluation_leaves_the_global_rng_alone(evaluator, digits):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    evaluator.score_images(digits.images[:500])
    assert torch.equal(torch.rand(3), expected)


def test_copy_share_on_hand_made_features():
    # Training features on a 5-D grid with spacing 1: every real point's nearest other point is at 1.
    grid = torch.cartesian_prod(*[torch.arange(4.0)] * 5)
    threshold = copy_threshold(grid)
    assert threshold == pytest.approx(1.0)
    near = grid[:50] + torch.tensor([0.1, 0, 0, 0, 0])  # a tenth from a training point: copies
    between = grid[:50] + 0.5  # a cell's centre, sqrt(5)/2 from its corners: farther than real points are
    assert copy_share(near, grid, threshold) == 1.0
    assert copy_share(between, grid, threshold) == 0.0
    assert copy_share(torch.cat([near, between]), grid, threshold) == 0.5


class Copier(torch.nn.Module):
    """A "generator" that returns training images, chosen by its latents."""

    z_dim = 16

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def forward(self, z, labels=None):
        idx = (z[:, 0].abs() * 1e6).long() % len(self.images)
        return self.images[idx].float() / 127.5 - 1


def test_a_copying_generator_is_caught_and_a_fresh_one_is_not(digits, evaluator):
    from gan.config import preset
    from gan.models import build_models

    copied = evaluator(Copier(digits.images), num_classes=0)["leakage/copy_share"]
    cfg = preset("dcgan")
    torch.manual_seed(0)
    fresh_G = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)[0]
    fresh = evaluator(fresh_G, num_classes=cfg.model.num_classes)["leakage/copy_share"]
    assert copied > 0.99 and fresh < 0.01, (copied, fresh)


def test_precision_and_recall_on_hand_made_features():
    # Real features: two well-separated clusters (two "modes") of 200 points each.
    g = torch.Generator().manual_seed(0)
    mode_a = torch.randn(200, 4, generator=g)
    mode_b = torch.randn(200, 4, generator=g) + 50
    real = torch.cat([mode_a, mode_b])
    same = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 50])
    precision, recall = precision_recall(real, same)
    assert precision > 0.9 and recall > 0.9  # a generator like the data: both high
    one_mode = torch.randn(400, 4, generator=g)  # every sample real-looking, half the data missed
    precision, recall = precision_recall(real, one_mode)
    assert precision > 0.9 and 0.4 < recall < 0.6
    far = torch.randn(400, 4, generator=g) + 1000  # nothing like the data
    assert precision_recall(real, far) == (0.0, 0.0)


class ClassCopier(Copier):
    """Returns a training image of the class it is asked for, or of any class if ``obey`` is off."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, obey: bool) -> None:
        super().__init__(images)
        self.by_class = [torch.nonzero(labels == k).flatten() for k in range(10)]
        self.obey = obey

    def forward(self, z, labels=None):
        pick = (z[:, 0].abs() * 1e6).long()
        classes = labels if self.obey else pick % 10
        idx = torch.stack(
            [self.by_class[k][p % len(self.by_class[k])] for k, p in zip(classes.tolist(), pick // 10, strict=True)]
        )
        return self.images[idx].float() / 127.5 - 1


def test_class_accuracy_is_one_for_an_obedient_generator_and_chance_for_one_that_ignores_labels(digits, evaluator):
    with torch.no_grad():  # only images the classifier reads right: an obedient generator then scores exactly 1
        right = evaluator.backbone.logits(evaluator.features(digits.images)).argmax(1) == digits.labels
    images, labels = digits.images[right], digits.labels[right]
    assert evaluator(ClassCopier(images, labels, obey=True), num_classes=10)["class_accuracy"] == 1.0
    ignoring = evaluator(ClassCopier(images, labels, obey=False), num_classes=10)["class_accuracy"]
    assert 0.05 < ignoring < 0.15, ignoring  # 1,000 samples: chance (0.1) within about 5 standard errors
    assert "class_accuracy" not in evaluator(Copier(images), num_classes=0)  # unconditional: nothing to score
