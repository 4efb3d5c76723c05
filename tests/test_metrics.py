import hashlib
import io

import pytest
import torch

from gan.core.config import EvalConfig
from gan.data.datasets import ImageDataset
from gan.evaluation.backbone import load_digit_classifier
from gan.evaluation.evaluator import Evaluator, proportional_labels, split_real
from gan.evaluation.evaluator_file import digits_evaluator_path
from gan.evaluation.features import DigitClassifier
from gan.evaluation.stats import class_variety, copy_share, copy_threshold, precision_recall


@pytest.fixture(scope="module")
def evaluator(digits):
    return Evaluator(EvalConfig(num_samples=1000, kid_subset_size=200), digits)


def test_weights_are_safe_to_load_and_hashed(evaluator):
    raw = digits_evaluator_path().read_bytes()
    assert hashlib.sha256(raw).hexdigest() == evaluator.sha256
    DigitClassifier().load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))


def test_classifier_is_accurate(digits):
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
    from gan.core.config import preset
    from gan.core.models import build_models

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


@pytest.fixture(scope="module")
def readable(digits, evaluator):
    """The digits the classifier reads right: an obedient generator of them scores exactly 1."""
    with torch.no_grad():
        right = evaluator.backbone.logits(evaluator.features(digits.images)).argmax(1) == digits.labels
    return digits.images[right], digits.labels[right]


def test_class_accuracy_is_one_for_an_obedient_generator_and_chance_for_one_that_ignores_labels(readable, evaluator):
    images, labels = readable
    assert evaluator(ClassCopier(images, labels, obey=True), num_classes=10)["class_accuracy"] == 1.0
    ignoring = evaluator(ClassCopier(images, labels, obey=False), num_classes=10)["class_accuracy"]
    assert 0.05 < ignoring < 0.15, ignoring  # 1,000 samples: chance (0.1) within about 5 standard errors
    unconditional = evaluator(Copier(images), num_classes=0)
    assert not {"class_accuracy", "class_variety"} & unconditional.keys()  # nothing to score per class


def test_class_variety_on_hand_made_features():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 200 + [1] * 200)
    real = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 50])
    alike = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 50])
    assert 0.9 < class_variety(real, labels, alike, labels) < 1.1  # varied as the data within each class
    one_each = torch.cat([torch.zeros(200, 4), torch.full((200, 4), 50.0)])  # one image per class
    assert class_variety(real, labels, one_each, labels) == 0.0
    assert 0.9 < class_variety(real, labels, 2 * one_each + alike, labels) < 1.1  # only the centres moved


class OnePerClass(ClassCopier):
    """Returns the same training image for every request of a class, whatever its latents."""

    def forward(self, z, labels=None):
        return self.images[torch.stack([self.by_class[k][0] for k in labels.tolist()])].float() / 127.5 - 1


def test_class_variety_tells_one_image_per_class_from_real_variety(readable, evaluator):
    varied = evaluator(ClassCopier(*readable, obey=True), num_classes=10)
    collapsed = evaluator(OnePerClass(*readable, obey=True), num_classes=10)
    assert 0.9 < varied["class_variety"] < 1.1 and collapsed["class_variety"] == 0.0, (varied, collapsed)
    assert collapsed["class_accuracy"] == 1.0  # every sample right, and collapsed: accuracy cannot see it


def test_proportional_labels_keep_the_class_mix_exactly():
    shares = torch.tensor([0.6, 0.0, 0.3, 0.1])
    assert torch.bincount(proportional_labels(shares, 1000), minlength=4).tolist() == [600, 0, 300, 100]
    seven = torch.bincount(proportional_labels(shares, 7), minlength=4)
    assert seven.sum() == 7 and seven[1] == 0 and (seven - 7 * shares).abs().max() < 1


def test_a_conditional_generator_is_scored_in_the_data_class_mix(digits):
    # Half zeros, 30% ones, 20% twos, no other digit: FID compares against that mix, so the
    # samples must be drawn in it (uniform labels would ask for sevens the data never shows).
    keep = torch.cat([torch.nonzero(digits.labels == k).flatten()[:n] for k, n in ((0, 500), (1, 300), (2, 200))])
    data = ImageDataset(digits.images[keep], digits.labels[keep], "mix", digits.source)
    asked = []

    class Recorder(Copier):
        def forward(self, z, labels=None):
            asked.append(labels)
            return super().forward(z, labels)

    Evaluator(EvalConfig(num_samples=400, kid_subset_size=100), data)(Recorder(data.images), num_classes=10)
    assert torch.bincount(torch.cat(asked), minlength=10).tolist() == [200, 120, 80] + [0] * 7
