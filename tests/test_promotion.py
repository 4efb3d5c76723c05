"""The promotion gate's arithmetic, without a registry."""

from __future__ import annotations

import pytest

from gan.evaluation.evaluator import FIDEstimate
from gan.registry.promotion import decide


def fid(mean: float, copy_share: float = 0.01) -> FIDEstimate:
    return FIDEstimate(mean, 0.5, (mean - 0.5, mean, mean + 0.5), 6.5, copy_share)


def test_first_candidate_wins_without_a_champion():
    decision = decide(fid(300.0), None, margin=0.05, max_copy_share=0.05)
    assert decision.promoted and decision.reason == "no champion yet"


@pytest.mark.parametrize("champion", [None, 30.0])
def test_a_candidate_that_copies_training_images_is_refused_however_good(champion):
    decision = decide(fid(10.0, copy_share=0.4), None if champion is None else fid(champion), 0.05, 0.05)
    assert not decision.promoted
    assert "40.0% of its samples are near-copies of training images (limit 5.0%" in decision.reason
    assert decide(fid(10.0, copy_share=0.05), None, 0.05, max_copy_share=0.05).promoted  # at the limit: allowed


@pytest.mark.parametrize(
    "candidate, champion, margin, promoted",
    [
        (18.9, 20.0, 0.05, True),  # 5.5% better than the champion
        (19.0, 20.0, 0.05, True),  # exactly the margin
        (19.1, 20.0, 0.05, False),  # better, but not by the margin
        (25.0, 20.0, 0.05, False),  # worse
        (19.9, 20.0, 0.0, True),  # no margin: any improvement
        (20.0, 20.0, 0.0, True),  # no margin: a tie keeps the newer model
        (15.0, 20.0, 0.3, False),  # a demanding margin
    ],
)
def test_candidate_must_beat_the_champion_by_the_margin(candidate, champion, margin, promoted):
    decision = decide(fid(candidate), fid(champion), margin, max_copy_share=0.05)
    assert decision.promoted is promoted
    assert f"{candidate:.2f}" in decision.reason and f"{champion:.2f}" in decision.reason
    if not promoted:
        assert f"{champion * (1 - margin):.2f}" in decision.reason  # says what it would have needed
