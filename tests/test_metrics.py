import hashlib
import io

import pytest
import torch

from gan.config import EvalConfig
from gan.metrics import DigitClassifier, Evaluator, evaluator_path, split_real


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
