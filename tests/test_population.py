"""Population-based training's decisions, pure: who exploits whom, when, and how the
settings are explored (no Ray, no torch)."""

from __future__ import annotations

import math
import random

import pytest

from gan.core.config import ConfigError, preset
from gan.sweeps import plan as plans
from gan.sweeps import space as spaces
from gan.sweeps.population import Population

SPACE = spaces.build_space(
    preset("dcgan"),
    {"optim.lr_g": {"loguniform": [1e-4, 2e-3]}, "optim.beta2": {"choice": [0.9, 0.99, 0.999]}, "optim.lr_d": 6e-4},
)
PARAMS = {"optim.lr_g": 1e-3, "optim.beta2": 0.99, "optim.lr_d": 6e-4}


def population(**plan) -> Population:
    return Population(plans.Plan(scheduler="pbt", **{"rounds": 4, **plan}), SPACE)


def test_the_worst_quarter_continues_from_the_best_quarter_at_the_same_round():
    pbt = population()
    # Each decides against the trials that reached the round before it (asynchronous, as in Ray's PBT).
    fids = {"t2": 30.0, "t1": 20.0, "t0": 10.0, "t3": 40.0}
    decisions = {t: pbt.report(t, 1, f, f"s3://b/{t}/ckpt1", 3200, PARAMS) for t, f in fids.items()}
    assert decisions["t0"] is None and decisions["t1"] is None and decisions["t2"] is None  # each the best so far
    exploit = decisions["t3"]  # the worst of four
    assert exploit.donor == "t0" and exploit.checkpoint == "s3://b/t0/ckpt1" and exploit.images_seen == 3200
    assert exploit.round == 1 and set(exploit.changed) <= {"optim.lr_g", "optim.beta2"}
    assert exploit.params["optim.lr_d"] == 6e-4  # a constant is never explored
    assert "from t0 at kimg 3.2 (round 1)" in exploit.describe()
    # Decisions are seeded by sweep, trial and round: a resumed sweep explores the same way.
    again = population()
    for t, f in fids.items():
        last = again.report(t, 1, f, f"s3://b/{t}/ckpt1", 3200, PARAMS)
    assert last == exploit


def test_no_exploit_alone_at_the_last_round_between_perturbations_or_under_asha():
    assert population().report("t0", 1, 50.0, "c", 100, PARAMS) is None  # nobody to compare with
    for pbt, round_ in ((population(), 4), (population(perturbation_rounds=2), 1)):
        pbt.report("t0", round_, 10.0, "c0", 100, PARAMS)
        assert pbt.report("t1", round_, 99.0, "c1", 100, PARAMS) is None
    pbt = population(perturbation_rounds=2)
    pbt.report("t0", 2, 10.0, "c0", 100, PARAMS)
    assert pbt.report("t1", 2, 99.0, "c1", 100, PARAMS).donor == "t0"
    assert not plans.Plan(rounds=4).exploits_at(1)  # ASHA never exploits


def test_a_diverged_round_counts_as_the_worst():
    pbt = population()
    pbt.report("t0", 1, math.nan, "c0", 100, PARAMS)
    assert pbt.report("t1", 1, 300.0, "c1", 100, PARAMS) is None
    assert population().report("t1", 1, 300.0, "c1", 100, PARAMS) is None
    pbt2 = population()
    pbt2.report("t1", 1, 300.0, "c1", 100, PARAMS)
    assert pbt2.report("t0", 1, math.nan, "c0", 100, PARAMS).donor == "t1"


def test_perturb_stays_inside_the_space_and_moves_choices_to_neighbours():
    rng = random.Random(0)
    seen_lr, seen_beta2 = set(), set()
    for _ in range(400):
        out = spaces.perturb(PARAMS, SPACE, rng)
        assert 1e-4 <= out["optim.lr_g"] <= 2e-3 and out["optim.lr_d"] == 6e-4
        seen_lr.add(round(out["optim.lr_g"] / PARAMS["optim.lr_g"], 6))
        seen_beta2.add(out["optim.beta2"])
    assert {0.8, 1.2} <= seen_lr and len(seen_lr) > 10  # nudges, and fresh draws
    assert seen_beta2 == {0.9, 0.99, 0.999}
    top = spaces.perturb({**PARAMS, "optim.lr_g": 2e-3}, SPACE, random.Random(3))
    assert top["optim.lr_g"] <= 2e-3


def test_pbt_searches_only_what_a_running_trial_can_change():
    with pytest.raises(ConfigError, match="--scheduler pbt copies weights between trials.*model.width"):
        spaces.check_mutable(spaces.build_space(preset("dcgan"), {"model.width": {"choice": [32, 64]}}))
    pbt_space = spaces.mutable_only(spaces.default(gpu=False))
    assert set(pbt_space) == {"optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "train.ema_half_life_kimg"}
    spaces.check_mutable(spaces.build_space(preset("dcgan"), pbt_space))


def test_plan_knows_its_scheduler():
    with pytest.raises(ConfigError, match="--scheduler 'hyperband'"):
        plans.Plan(scheduler="hyperband")
    with pytest.raises(ConfigError, match="--perturbation-rounds 4"):
        plans.Plan(scheduler="pbt", rounds=4, perturbation_rounds=4)
    pbt = plans.Plan(trials=4, rounds=3, scheduler="pbt")
    assert not pbt.stopped_early(1) and plans.expected_rounds(pbt) == 12
    assert plans.expected_rounds(plans.Plan(trials=4, rounds=3, scheduler="fifo")) == 12
