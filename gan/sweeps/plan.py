"""A sweep's plan: how many trials, how long each trains, how ASHA cuts, how trials are
placed, and the budget rule that sizes rounds. Pure: no Ray, no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from gan.core.config import Config, ConfigError, override
from gan.sweeps.space import Dimension, as_override

# The local budget rule: images one CPU worker trains per second (DCGAN at width 32-64,
# one thread, this project's 2-core reference machine), and the share of a sweep's wall
# time that is training rather than trial start-up and evaluation.
CPU_IMG_PER_S = 250
TRAINING_SHARE = 0.6
SCHEDULERS = ("asha", "pbt", "fifo")
PBT_QUANTILE = 0.25
"""Share of the trials at a round that exploit, and that may be exploited (as in Ray's PBT)."""


@dataclass(frozen=True)
class Scaling:
    """Ray Train workers of one run and what each holds."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """GPUs each worker holds when use_gpu (a fraction packs several trials on one GPU)."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers {self.workers}: need at least 1")
        if self.cpus_per_worker <= 0 or (self.use_gpu and self.gpus_per_worker <= 0):
            raise ConfigError("CPUs and GPUs per worker must be positive")


@dataclass(frozen=True)
class Plan:
    """How much each trial trains, how ASHA cuts, and how trials are placed."""

    trials: int = 8
    rounds: int = 4
    """Evaluation rounds of a trial that ASHA never stops (ASHA's max_t)."""
    grace_rounds: int = 1
    """Rounds every trial gets before ASHA may stop it."""
    reduction_factor: int = 2
    kimg_per_round: float = 10.0
    search: str = "random"
    seed: int = 0
    scheduler: str = "asha"
    """asha (stop weak trials), pbt (weak trials continue from strong ones, perturbed), fifo (none)."""
    perturbation_rounds: int = 1
    """PBT: rounds between a trial's chances to exploit."""
    scaling: Scaling = Scaling()
    max_failures: int = 2
    """Worker failures a trial survives (it restarts from its last checkpoint)."""

    def __post_init__(self) -> None:
        for flag, value in (
            ("--trials", self.trials),
            ("--rounds", self.rounds),
            ("--kimg-per-round", self.kimg_per_round),
        ):
            if value <= 0:
                raise ConfigError(f"{flag} {value:g}: must be positive")
        if not 1 <= self.grace_rounds <= self.rounds:
            raise ConfigError(f"--grace-rounds {self.grace_rounds}: must be in [1, --rounds={self.rounds}]")
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor {self.reduction_factor}: must be >= 2")
        if self.search not in ("random", "optuna"):
            raise ConfigError(f"--search {self.search!r}: choose random or optuna")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler {self.scheduler!r}: choose {', '.join(SCHEDULERS)}")
        if not 1 <= self.perturbation_rounds < max(self.rounds, 2):
            raise ConfigError(
                f"--perturbation-rounds {self.perturbation_rounds}: must be in [1, --rounds) so that a trial "
                "can exploit before its last round"
            )

    def stopped_early(self, rounds: int) -> bool:
        """A trial that ended before its last round was stopped by ASHA (the only scheduler that stops)."""
        return self.scheduler == "asha" and rounds < self.rounds

    def exploits_at(self, round_: int) -> bool:
        """PBT: whether a trial that finished ``round_`` may continue from a better one."""
        return self.scheduler == "pbt" and round_ < self.rounds and round_ % self.perturbation_rounds == 0


def expected_rounds(plan: Plan) -> float:
    """Rounds trained in all, if ASHA keeps 1/reduction_factor of the trials at each rung
    (rungs at grace * factor^k): what a budget is spread over. PBT and fifo run every round."""
    if plan.scheduler != "asha":
        return float(plan.trials * plan.rounds)
    total, done, alive, rung = 0.0, 0, float(plan.trials), plan.grace_rounds
    while done < plan.rounds:
        end = min(rung, plan.rounds)
        total += alive * (end - done)
        done, alive, rung = end, max(alive / plan.reduction_factor, 1.0), rung * plan.reduction_factor
    return total


def trial_config(base: Config, params: dict[str, Any], plan: Plan) -> Config:
    """The sampled values on top of the base config; one evaluation per round."""
    sets = [f"{key}={as_override(value)}" for key, value in params.items()]
    sets += [f"train.total_kimg={plan.rounds * plan.kimg_per_round}", f"eval.every_kimg={plan.kimg_per_round}"]
    return override(base, sets)


def sweep_name(base: Config, space: dict[str, Dimension], plan: Plan) -> str:
    """Deterministic, so rerunning the same command finds (and with --resume continues) it."""
    described = json.dumps(
        [base.to_json(), {k: d.describe() for k, d in sorted(space.items())}, repr(plan)], sort_keys=True
    )
    return f"sweep-{base.name}-{hashlib.sha256(described.encode()).hexdigest()[:8]}"


def child_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_label(trial_id: str, params: dict[str, Any], searched: tuple[str, ...] = ()) -> str:
    """How a trial's run reads in the MLflow runs table: its number and the values searched."""
    number = trial_id.rsplit("_", 1)[-1].lstrip("0") or "0"
    shown = {k: v for k, v in sorted(params.items()) if not searched or k in searched}
    values = [f"{k.rsplit('.', 1)[-1]}={f'{v:.3g}' if isinstance(v, float) else v if v != '' else 'none'}"
              for k, v in shown.items()]  # fmt: skip
    return f"trial {number}: {' '.join(values)}"


def kimg_per_round(plan: Plan, budget_minutes: float, concurrency: int) -> float:
    """Round size that fits ``budget_minutes`` of a local CPU sweep if ASHA stops trials
    as expected (rounds on GPUs are the user's to give)."""
    if plan.scaling.use_gpu:
        raise ConfigError("--budget-minutes sizes rounds for CPU workers; on GPUs give --kimg-per-round")
    img_per_s = CPU_IMG_PER_S * concurrency * plan.scaling.workers
    return round(budget_minutes * 60 * TRAINING_SHARE * img_per_s / expected_rounds(plan) / 1000, 1)


def max_concurrent_trials(plan: Plan, cluster: dict[str, float]) -> int:
    """As many trials as the cluster can host at once, never more (no oversubscription)."""
    s = plan.scaling
    fits = math.floor(cluster.get("CPU", 0) / (s.workers * s.cpus_per_worker) + 1e-9)
    if s.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / (s.workers * s.gpus_per_worker) + 1e-9))
    return fits


def describe_scheduler(plan: Plan) -> str:
    if plan.scheduler == "asha":
        return f"ASHA (grace {plan.grace_rounds}, reduction {plan.reduction_factor})"
    if plan.scheduler == "pbt":
        return f"PBT (exploit every {plan.perturbation_rounds} round(s), quantile {PBT_QUANTILE:g})"
    return "no early stopping"


def stopped_reason(rounds: int, plan: Plan, kimg: float, fid: float) -> str:
    return f"ASHA after round {rounds} of {plan.rounds} (kimg {kimg:.1f}, fid {fid:.2f})"


def plan_params(plan: Plan) -> dict[str, Any]:
    flat = dataclasses.asdict(plan)
    scaling = flat.pop("scaling")
    return {f"sweep.{k}": v for k, v in {**flat, **scaling}.items()}
