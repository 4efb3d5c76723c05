"""Population-based training's bookkeeping: which trial continues from which, with what.

Every trial reports its FID, checkpoint and current settings after each round. At a
perturbation round, a trial in the bottom quantile of the trials that have reached that
round continues from a top-quantile trial's checkpoint of the same round (so images seen
stay equal) with that trial's settings explored (gan/sweeps/space.py ``perturb``). A trial that
restarts from a checkpoint asks again about that checkpoint's round, and decisions are
seeded, so a crash between an exploit and the next checkpoint loses nothing. Pure: the Ray
Tune adapter hosts one Population in an actor that every trial's rank 0 asks, and keeps
its reports beside the sweep for a resumed driver.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from gan.sweeps.plan import PBT_QUANTILE, Plan
from gan.sweeps.space import Dimension, perturb, searched


@dataclass(frozen=True)
class Exploit:
    """Continue from ``donor``'s checkpoint of round ``round`` with ``params``."""

    donor: str
    checkpoint: str
    round: int
    images_seen: int
    params: dict[str, Any]
    changed: dict[str, tuple[Any, Any]]
    """Setting -> (the trial's value before, its value now)."""

    def describe(self) -> str:
        changes = ", ".join(f"{k.rsplit('.', 1)[-1]} {_short(a)} -> {_short(b)}" for k, (a, b) in self.changed.items())
        return f"from {self.donor} at kimg {self.images_seen / 1000:g} (round {self.round}): {changes or 'no change'}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class _Report:
    fid: float
    checkpoint: str
    images_seen: int
    params: dict[str, Any]


@dataclass
class Population:
    plan: Plan
    space: dict[str, Dimension]
    reports: dict[int, dict[str, _Report]] = field(default_factory=dict)
    """Round -> trial -> what it reported at the end of that round."""

    def report(
        self, trial: str, round_: int, fid: float, checkpoint: str, images_seen: int, params: dict[str, Any]
    ) -> Exploit | None:
        """Record a finished round; an Exploit when this trial should continue from another."""
        peers = self.reports.setdefault(round_, {})
        peers[trial] = _Report(fid, checkpoint, images_seen, dict(params))
        if not self.plan.exploits_at(round_):
            return None
        ranked = sorted((r.fid if math.isfinite(r.fid) else math.inf, t) for t, r in peers.items())
        count = min(math.ceil(len(ranked) * PBT_QUANTILE), len(ranked) // 2)
        if count == 0 or trial not in {t for _, t in ranked[-count:]}:
            return None
        # Seeded by sweep, trial and round: a resumed sweep explores the same way.
        rng = random.Random(f"{self.plan.seed}:{trial}:{round_}")
        donor = rng.choice([t for _, t in ranked[:count]])
        chosen = peers[donor]
        params = perturb(chosen.params, self.space, rng)
        before = peers[trial].params
        changed = {
            key: (before.get(key), params[key]) for key in searched(self.space) if before.get(key) != params[key]
        }
        return Exploit(donor, chosen.checkpoint, round_, chosen.images_seen, params, changed)

    def to_json(self) -> str:
        rounds = {
            str(r): {t: dataclasses.asdict(report) for t, report in peers.items()} for r, peers in self.reports.items()
        }
        return json.dumps(rounds)

    def load_json(self, text: str) -> None:
        """What a previous driver of this sweep recorded: a resumed sweep decides as it would have."""
        for r, peers in json.loads(text).items():
            self.reports[int(r)] = {t: _Report(**report) for t, report in peers.items()}
