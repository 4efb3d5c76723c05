"""Ray Tune adapter: trials, search, ASHA, and the MLflow runs of trials Tune ends.

Each trial is a Ray Train run (Train V2 shape): a function that builds a ``TorchTrainer``
with ``make_trainer`` and calls ``fit()``; ``TuneReportCallback`` forwards rank 0's
report after every evaluation, so one Tune iteration is one evaluation round and ASHA
compares trials at equal numbers of images. Each trial's worker logs its own child run
of the sweep's MLflow run; ``TrialRuns`` on the driver closes the runs of trials that
ASHA stopped (code after a trial's last report never runs). The search space and the
plan are pure modules (gan/sweeps/space.py, gan/sweeps/plan.py); the summary is gan/sweeps/report.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import fsspec
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from gan.core.config import Config, ConfigError
from gan.data.storage import Storage
from gan.registry.tracking import STOPPED_TAG, TrackingTarget, finish_run
from gan.sweeps.plan import Plan, child_run_name, max_concurrent_trials, stopped_reason, trial_config, trial_label
from gan.sweeps.report import TrialSummary
from gan.sweeps.space import Dimension

# The trial function only waits on its Train run, whose workers hold the CPUs and GPUs;
# Tune needs some resource in the bundle, so it holds a little memory instead.
TRIAL_RESOURCES = {"CPU": 0, "memory": 128 * 2**20}


def tune_domain(dim: Dimension):
    if dim.kind == "constant":
        return dim.values[0]
    if dim.kind == "choice":
        return tune.choice(list(dim.values))
    if dim.kind == "grid":
        return tune.grid_search(list(dim.values))
    if dim.kind == "randint":  # inclusive upper bound, as a user writes it
        return tune.randint(dim.values[0], dim.values[1] + 1)
    return getattr(tune, dim.kind)(*dim.values)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, sent once to the cluster with ``tune.with_parameters``."""

    base_config: str
    plan: Plan
    sweep: str
    storage: Storage
    tracking: TrackingTarget | None
    """The sweep's parent run; each trial logs a child run of it."""
    searched: tuple[str, ...] = ()
    """The space's fields that vary: what a trial's run name shows."""

    def trial_tracking(self, trial_id: str, params: dict[str, Any] | None = None) -> TrackingTarget | None:
        if self.tracking is None:
            return None
        label = trial_label(trial_id, params, self.searched) if params is not None else ""
        return self.tracking.child(child_run_name(self.sweep, trial_id), self.tracking.parent_run_id, label)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: a Ray Train run of the sampled config. Restarted trials (a
    resumed sweep) find their Train run by name and continue from its checkpoint."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from gan.runs.ray_train import fit_trainer, make_trainer
    from gan.runs.session import Member

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(Config.from_json(setup.base_config), params, setup.plan)
    storage_path, filesystem = setup.storage.ray_args(setup.sweep, "trials")
    member = None
    if setup.plan.scheduler == "pbt":
        run_uri = setup.storage.join(setup.sweep, "trials", trial_id)
        member = Member(population_name(setup.sweep), trial_id, run_uri, setup.storage.options)
    trainer = make_trainer(
        cfg,
        setup.plan.scaling,
        name=trial_id,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        max_failures=setup.plan.max_failures,
        callbacks=[TuneReportCallback()],
        tracking=setup.trial_tracking(trial_id, params),
        member=member,
        keep_checkpoints=None if member else 2,
    )
    fit_trainer(trainer)


def population_name(sweep: str) -> str:
    return f"pbt-population:{sweep}"


class PopulationHost:
    """A PBT sweep's Population, in a Ray actor that trials' rank 0 asks; every report is
    written to ``population.json`` beside the trials, so a resumed sweep reloads it."""

    def __init__(self, setup: TrialSetup, space: dict[str, Dimension]) -> None:
        from gan.sweeps.population import Population

        self.storage, self.uri = setup.storage, setup.storage.join(setup.sweep, "population.json")
        self.population = Population(setup.plan, space)
        fs, path = fsspec.core.url_to_fs(self.uri, **self.storage.options)
        if fs.exists(path):
            self.population.load_json(fs.cat_file(path).decode())

    def report(self, *args):
        exploit = self.population.report(*args)
        self.storage.write(self.uri, self.population.to_json().encode())
        return exploit


def concurrency(plan: Plan, max_concurrent: int | None) -> int:
    """Trials at once: ``max_concurrent``, else what the connected cluster holds now."""
    import ray

    if max_concurrent:
        return max_concurrent
    fits = max_concurrent_trials(plan, ray.cluster_resources())
    if fits < 1:
        s = plan.scaling
        raise ValueError(
            f"one trial needs {s.workers} worker(s) x ({s.cpus_per_worker:g} CPU"
            + (f", {s.gpus_per_worker:g} GPU" if s.use_gpu else "")
            + f") but the Ray cluster has {ray.cluster_resources()}; lower the request, or pass --max-concurrent "
            "on an autoscaling cluster"
        )
    return fits


def run_trials(setup: TrialSetup, space: dict[str, Dimension], max_concurrent: int, resume: bool):
    """Run (or with ``resume`` continue) the sweep; returns Tune's ResultGrid. A PBT sweep's
    population lives in an actor for as long as the sweep runs."""
    import ray

    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), TRIAL_RESOURCES)
    population = None
    if setup.plan.scheduler == "pbt":
        actor = ray.remote(num_cpus=0, max_restarts=-1)(PopulationHost)
        population = actor.options(name=population_name(setup.sweep)).remote(setup, space)
    try:
        return make_tuner(trainable, setup, space, max_concurrent, resume).fit()
    finally:
        if population is not None:
            ray.kill(population)


def make_tuner(trainable, setup: TrialSetup, space: dict[str, Dimension], max_concurrent: int, resume: bool):
    """A new Tuner for the sweep, or the interrupted one restored from its storage."""
    storage_path, filesystem = setup.storage.ray_args()
    if resume and not tune.Tuner.can_restore(f"{storage_path}/{setup.sweep}", storage_filesystem=filesystem):
        # A start killed before Tune wrote its state leaves only the claim: begin it again.
        print(f"{setup.storage.join(setup.sweep)} holds no sweep state yet: starting the sweep", flush=True)
        resume = False
    if resume:
        tuner = tune.Tuner.restore(
            f"{storage_path}/{setup.sweep}", trainable, resume_unfinished=True, resume_errored=False,
            storage_filesystem=filesystem,
        )  # fmt: skip
    else:
        plan = setup.plan
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune_domain(dim) for key, dim in space.items()},
            tune_config=tune.TuneConfig(
                metric="fid", mode="min", num_samples=plan.trials,
                scheduler=make_scheduler(plan), search_alg=make_search(plan, max_concurrent),
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=setup.sweep, storage_path=storage_path, storage_filesystem=filesystem,
                callbacks=[TrialRuns(setup)],
            ),
        )  # fmt: skip
    return tuner


def make_search(plan: Plan, max_concurrent: int):
    """The search algorithm, holding at most ``max_concurrent`` trials at once (Tune ignores
    TuneConfig.max_concurrent_trials for a BasicVariantGenerator passed in)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if plan.search == "random":
        return BasicVariantGenerator(random_state=plan.seed, max_concurrent=max_concurrent)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:
        raise ConfigError(f"--search optuna needs optuna: pip install 'gan[tune]' ({err})") from None
    from optuna.samplers import TPESampler

    return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=plan.seed)), max_concurrent=max_concurrent)


class LastRoundKeptASHA(ASHAScheduler):
    """ASHA that never stops a trial at its last round. Stopping there saves nothing, and
    it would kill the worker while it logs the trial's models and closes its MLflow run."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(self._time_attr, 0) >= self._max_t else action


def make_scheduler(plan: Plan) -> TrialScheduler:
    """ASHA; none for fifo, and none for PBT, whose exploits happen inside the trials."""
    if plan.scheduler != "asha":
        return FIFOScheduler()
    return LastRoundKeptASHA(
        time_attr="training_iteration",
        max_t=plan.rounds,
        grace_period=plan.grace_rounds,
        reduction_factor=plan.reduction_factor,
        stop_last_trials=False,
    )


def close_trial_run(setup: TrialSetup, trial_id: str, rounds: int, kimg: float, fid: float) -> None:
    """End a trial's child run KILLED, tagged with the round ASHA stopped it at."""
    target = setup.trial_tracking(trial_id)
    if target is not None:
        finish_run(target, "KILLED", {STOPPED_TAG: stopped_reason(rounds, setup.plan, kimg, fid)})


class TrialRuns(tune.Callback):
    """On the driver, ends each trial's MLflow child run with the right status: KILLED
    (tagged with the round) when ASHA stopped it, FAILED on an error. A trial that
    completed closed its own run FINISHED after logging its models."""

    def __init__(self, setup: TrialSetup) -> None:
        self.trial_setup = setup  # not "setup": tune.Callback.setup is a hook

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        rounds = rounds_done(result, self.trial_setup.plan)
        if self.trial_setup.plan.stopped_early(rounds):
            close_trial_run(
                self.trial_setup, trial.trial_id, rounds, result.get("kimg", 0), result.get("fid", math.nan)
            )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        target = self.trial_setup.trial_tracking(trial.trial_id)
        if target is not None:
            finish_run(target, "FAILED", {"sweep.error": trial_error(trial)})


def rounds_done(result: dict, plan: Plan) -> int:
    """Rounds a trial has trained, from its images seen: Tune counts a trial's reports
    again from 1 when a resumed sweep restarts it."""
    if "kimg" not in result:
        return int(result.get("training_iteration", 0))
    return round(float(result["kimg"]) / plan.kimg_per_round)


def close_stopped_runs(rows: list[TrialSummary], setup: TrialSetup) -> None:
    """After the sweep, again for every stopped trial: a worker restarted while Tune was
    stopping its trial can reopen the run."""
    for row in rows:
        if row.outcome == "stopped":
            close_trial_run(setup, row.trial_id, row.rounds, row.kimg, row.fid)


def trial_rows(grid, plan: Plan, storage: Storage) -> list[TrialSummary]:
    """One row per trial from Tune's ResultGrid, best first."""
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        metrics = result.metrics or {}
        history: list[tuple[float, float]] = []
        best_checkpoint = None
        if frame is not None and "fid" in frame:
            frame = frame.dropna(subset=["fid"])
            history = [(float(k), float(f)) for k, f in zip(frame["kimg"], frame["fid"], strict=True)]
            if len(frame) and "checkpoint_path" in frame:
                best_checkpoint = storage.full(str(frame.loc[frame["fid"].idxmin(), "checkpoint_path"]))
        rounds = rounds_done(metrics, plan) if metrics else len(history)
        if result.error is not None:
            outcome, error = "error", _first_line(result.error)
        else:
            outcome, error = ("stopped" if plan.stopped_early(rounds) else "completed"), ""
        params = dict(result.config or {})  # a PBT trial's are the settings it ended with
        params |= {key: metrics[f"hparam/{key}"] for key in params if f"hparam/{key}" in metrics}
        exploited_at: tuple[float, ...] = ()
        if frame is not None and "pbt/exploits" in frame:  # rounds after which it took another's state (shown)
            counts = list(frame["pbt/exploits"])
            exploited_at = tuple(
                float(k) for k, now, then in zip(frame["kimg"], counts, counts[1:], strict=False) if then > now
            )
        rows.append(
            TrialSummary(
                trial_id=metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
                params=params,
                outcome=outcome,
                rounds=rounds,
                kimg=float(metrics.get("kimg", 0.0)),
                fid=float(metrics.get("fid", math.inf)),
                best_fid=min((f for _, f in history), default=math.inf),
                time_s=float(metrics.get("time_total_s", 0.0)),
                history=history,
                best_checkpoint=best_checkpoint,
                error=error,
                floor=float(metrics.get("fid_floor", math.nan)),
                exploited_at=exploited_at,
                exploits=int(metrics.get("pbt/exploits", 0)),
            )
        )
    return sorted(rows, key=lambda row: row.best_fid)


def _first_line(error: BaseException) -> str:
    """The innermost cause's message: 'DivergenceError: loss is NaN at step 3', not Ray's wrapper."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return _error_line(str(cause)) or type(cause).__name__


def _error_line(text: str) -> str:
    """Ray wraps worker errors in text; the user's exception is the last line naming one."""
    lines = text.strip().splitlines()
    named = [line.strip() for line in lines if "Error:" in line]
    return (named[-1] if named else (lines[0] if lines else ""))[:200]


def trial_error(trial) -> str:
    """Why a trial failed, from Tune's pickled error or its error file on the driver."""
    error = trial.get_pickled_error()
    if error is not None:
        return _first_line(error)
    try:
        with open(trial.error_file) as handle:
            return _error_line(handle.read()) or f"see {trial.error_file}"
    except (OSError, TypeError):
        return "see the Ray trial logs"
