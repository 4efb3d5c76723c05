"""Ray Tune adapter: the search space, the trial function, ASHA, and the sweep's MLflow runs.

Each trial is a Ray Train run (Train V2 shape): a function that builds a ``TorchTrainer``
with ``make_trainer`` and calls ``fit()``; ``TuneReportCallback`` forwards rank 0's
report after every evaluation, so one Tune iteration is one evaluation round and ASHA
compares trials at equal numbers of images. The sweep is one MLflow parent run; each
trial's worker logs its own child run, and ``TrialRuns`` on the driver closes the runs
of trials that ASHA stopped (code after a trial's last report never runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from gan.config import Config, ConfigError, override
from gan.distributed import Scaling

# Kinds of dimension and how many values each takes (None: one or more). A grid runs
# every value for each of --trials samples of the rest of the space.
KINDS = {"choice": None, "grid": None, "loguniform": 2, "uniform": 2, "randint": 2}

# Everything the issue asks a GPU sweep to cover: both learning rates, Adam's betas, the
# loss, the architecture, EMA and augmentation on/off.
GPU_SPACE: dict[str, Any] = {
    "optim.lr_g": {"loguniform": [1e-4, 2e-3]},
    "optim.lr_d": {"loguniform": [1e-4, 2e-3]},
    "optim.beta1": {"choice": [0.0, 0.5]},
    "optim.beta2": {"choice": [0.9, 0.99, 0.999]},
    "loss.kind": {"choice": ["ns", "hinge"]},
    "model.family": {"choice": ["dcgan", "resnet"]},
    "model.width": {"choice": [32, 64, 128]},
    "model.depth": {"choice": [0, 1]},
    "train.ema_half_life_kimg": {"choice": [0.0, 1.0]},
    "loss.augment": {"choice": ["", "translation"]},
}
# On one CPU thread a ResNet G/D trains at about 50 img/s (DCGAN 200 to 600) and width 128
# is no better: the local space keeps DCGAN at widths 32/64 so a sweep fits in minutes.
CPU_SPACE: dict[str, Any] = {**GPU_SPACE, "model.family": "dcgan", "model.width": {"choice": [32, 64]}}


@dataclass(frozen=True)
class Dimension:
    """One searched config field: a constant, a choice, or a range."""

    key: str
    kind: str  # "constant" or one of KINDS
    values: tuple

    def extremes(self) -> tuple:
        """Values that must all build a valid config (both ends of a range, every choice)."""
        return self.values

    def to_tune(self):
        from ray import tune

        if self.kind == "constant":
            return self.values[0]
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "randint":  # inclusive upper bound, as a user writes it
            return tune.randint(self.values[0], self.values[1] + 1)
        return getattr(tune, self.kind)(*self.values)

    def describe(self) -> str:
        if self.kind == "constant":
            return repr(self.values[0])
        if self.kind in ("choice", "grid"):
            return self.kind + "{" + ", ".join(map(repr, self.values)) + "}"
        return f"{self.kind}[{self.values[0]:g}, {self.values[1]:g}]"


def dimension(key: str, spec: Any) -> Dimension:
    """From a YAML/JSON entry: a plain value, or ``{kind: [args]}``."""
    if not isinstance(spec, dict):
        return Dimension(key, "constant", (spec,))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"space {key}: write a value or one of {{{', '.join(KINDS)}: [...]}}, got {spec!r}")
    kind, args = next(iter(spec.items()))
    args = tuple(args) if isinstance(args, list | tuple) else (args,)
    if not args or (KINDS[kind] and len(args) != KINDS[kind]):
        raise ConfigError(f"space {key}: {kind} takes {KINDS[kind] or 'one or more'} values, got {list(args)}")
    if KINDS[kind]:  # YAML reads 1e-5 (no dot) as a string
        try:
            args = tuple(int(a) if kind == "randint" else float(a) for a in args)
        except (TypeError, ValueError):
            raise ConfigError(f"space {key}: {kind} takes numbers, got {list(args)}") from None
    if KINDS[kind] and not args[0] < args[1]:
        raise ConfigError(f"space {key}: {kind} needs low < high, got {list(args)}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"space {key}: loguniform needs a positive low end, got {args[0]}")
    return Dimension(key, kind, args)


def _scalar(text: str) -> Any:
    """A command-line value: int, float (1e-5 too), bool, or the string itself."""
    import yaml

    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return yaml.safe_load(text) if text else ""


def parse_override(text: str) -> tuple[str, Any]:
    """``--space KEY=VALUE`` or ``KEY=KIND:ARGS``: ``optim.lr_g=loguniform:1e-5:1e-3``,
    ``model.width=choice:32,64``, ``model.depth=1``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--space {text!r}: write SECTION.FIELD=VALUE or SECTION.FIELD=KIND:ARGS")
    kind, colon, args = value.partition(":")
    if colon and kind in KINDS:
        separator = "," if kind in ("choice", "grid") else ":"
        return key.strip(), {kind: [_scalar(a) for a in args.split(separator)]}
    return key.strip(), _scalar(value)


def load_space_file(uri: str) -> dict[str, Any]:
    import fsspec
    import yaml

    try:
        with fsspec.open(uri, "r") as handle:
            spec = yaml.safe_load(handle)  # YAML is a superset of JSON
    except FileNotFoundError:
        raise ConfigError(f"search space file {uri} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"search space file {uri} is not valid YAML/JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"search space file {uri} must map SECTION.FIELD to a value or {{kind: [...]}}")
    return spec


def build_space(base: Config, spec: dict[str, Any]) -> dict[str, Dimension]:
    """Parse and validate every dimension against the config before any trial starts."""
    space = {key: dimension(key, value) for key, value in spec.items()}
    for dim in space.values():
        for value in dim.extremes():
            try:
                override(base, [f"{dim.key}={_as_override(value)}"])
            except ConfigError as err:
                raise ConfigError(f"search space {dim.key}={dim.describe()}: {err}") from None
    return space


def _as_override(value: Any) -> str:
    return "" if value is None else str(value)


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
    scaling: Scaling = Scaling()
    max_failures: int = 2
    """Worker failures a trial survives (it restarts from its last checkpoint)."""

    def __post_init__(self) -> None:
        if self.trials < 1 or self.rounds < 1 or self.kimg_per_round <= 0:
            raise ConfigError("--trials, --rounds and --kimg-per-round must be positive")
        if not 1 <= self.grace_rounds <= self.rounds:
            raise ConfigError(f"--grace-rounds {self.grace_rounds}: must be in [1, --rounds={self.rounds}]")
        if self.reduction_factor < 2:
            raise ConfigError(f"--reduction-factor {self.reduction_factor}: must be >= 2")
        if self.search not in ("random", "optuna"):
            raise ConfigError(f"--search {self.search!r}: choose random or optuna")


def expected_rounds(plan: Plan) -> float:
    """Rounds trained in all, if ASHA keeps 1/reduction_factor of the trials at each rung
    (rungs at grace * factor^k): what a budget is spread over."""
    total, done, alive, rung = 0.0, 0, float(plan.trials), plan.grace_rounds
    while done < plan.rounds:
        end = min(rung, plan.rounds)
        total += alive * (end - done)
        done, alive, rung = end, max(alive / plan.reduction_factor, 1.0), rung * plan.reduction_factor
    return total


def trial_config(base: Config, params: dict[str, Any], plan: Plan) -> Config:
    """The sampled values on top of the base config; one evaluation per round."""
    sets = [f"{key}={_as_override(value)}" for key, value in params.items()]
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


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, sent once to the cluster with ``tune.with_parameters``."""

    base_config: str
    plan: Plan
    sweep: str
    storage: str
    s3_endpoint: str | None
    tracking: dict[str, str] | None  # uri, experiment, parent_run_id


def trials_storage(storage_path: str, sweep: str) -> str:
    return f"{storage_path}/{sweep}/trials"


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: a Ray Train run of the sampled config. Restarted trials (a
    resumed sweep) find their Train run by name and continue from its checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from gan.distributed import make_trainer, storage_for

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(Config.from_json(setup.base_config), params, setup.plan)
    storage_path, filesystem = storage_for(setup.storage, setup.s3_endpoint)
    tracking = None
    if setup.tracking:
        tracking = {**setup.tracking, "run_name": child_run_name(setup.sweep, trial_id)}
    trainer = make_trainer(
        cfg,
        setup.plan.scaling,
        name=trial_id,
        storage_path=trials_storage(storage_path, setup.sweep),
        storage_filesystem=filesystem,
        max_failures=setup.plan.max_failures,
        callbacks=[TuneReportCallback()],
        tracking=tracking,
    )
    trainer.fit()


# The trial function only waits on its Train run, whose workers hold the CPUs and GPUs;
# Tune needs some resource in the bundle, so it holds a little memory instead.
TRIAL_RESOURCES = {"CPU": 0, "memory": 128 * 2**20}


def max_concurrent_trials(plan: Plan, cluster: dict[str, float]) -> int:
    """As many trials as the cluster can host at once, never more (no oversubscription)."""
    s = plan.scaling
    fits = math.floor(cluster.get("CPU", 0) / (s.workers * s.cpus_per_worker) + 1e-9)
    if s.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0) / (s.workers * s.gpus_per_worker) + 1e-9))
    return fits


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


def make_scheduler(plan: Plan) -> LastRoundKeptASHA:
    return LastRoundKeptASHA(
        time_attr="training_iteration",
        max_t=plan.rounds,
        grace_period=plan.grace_rounds,
        reduction_factor=plan.reduction_factor,
        stop_last_trials=False,
    )


def stopped_reason(rounds: int, plan: Plan, kimg: float, fid: float) -> str:
    return f"ASHA after round {rounds} of {plan.rounds} (kimg {kimg:.1f}, fid {fid:.2f})"


def close_stopped_runs(rows: list, tracking: dict[str, str], sweep: str, plan: Plan) -> None:
    """After the sweep, the same for every stopped trial whose run is still RUNNING: a
    worker restarted while Tune was stopping its trial reopens the run."""
    from gan.tracking import STOPPED_TAG, TrackingTarget, finish_run

    for row in rows:
        if row.outcome == "stopped":
            target = TrackingTarget(tracking["uri"], tracking["experiment"], child_run_name(sweep, row.trial_id))
            finish_run(target, "KILLED", {STOPPED_TAG: stopped_reason(row.rounds, plan, row.kimg, row.fid)})


def make_trial_runs_callback(tracking: dict[str, str] | None, sweep: str, plan: Plan):
    """A driver-side Tune callback that ends each trial's MLflow child run with the right
    status: KILLED (tagged with the round) when ASHA stopped it, FAILED on an error. A
    trial that completed closed its own run FINISHED after logging its models."""
    from ray.tune import Callback

    from gan.tracking import STOPPED_TAG, TrackingTarget, finish_run

    class TrialRuns(Callback):
        def _target(self, trial) -> TrackingTarget:
            return TrackingTarget(
                tracking["uri"],
                tracking["experiment"],
                child_run_name(sweep, trial.trial_id),
                tracking["parent_run_id"],
            )

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            if tracking is None:
                return
            result = trial.last_result or {}
            rounds = int(result.get("training_iteration", 0))
            if rounds < plan.rounds:
                reason = stopped_reason(rounds, plan, result.get("kimg", 0), result.get("fid", math.nan))
                finish_run(self._target(trial), "KILLED", {STOPPED_TAG: reason})

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            if tracking is None:
                return
            finish_run(self._target(trial), "FAILED", {"sweep.error": trial_error(trial)})

    return TrialRuns()


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    outcome: str  # completed | stopped | error
    rounds: int
    kimg: float
    fid: float
    best_fid: float
    time_s: float
    history: list[tuple[float, float]]  # (kimg, fid) per round
    best_checkpoint: str | None  # path of the checkpoint with the best FID (storage-relative for S3)
    error: str = ""

    def status(self, plan: Plan) -> str:
        if self.outcome == "error":
            return f"error: {self.error[:90]}" + ("..." if len(self.error) > 90 else "")
        if self.outcome == "stopped":
            return f"stopped by ASHA at round {self.rounds}/{plan.rounds}"
        return f"completed {self.rounds}/{plan.rounds} rounds"


def summarize(grid, plan: Plan) -> list[TrialSummary]:
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
                best_checkpoint = str(frame.loc[frame["fid"].idxmin(), "checkpoint_path"])
        rounds = int(metrics.get("training_iteration", len(history)))
        if result.error is not None:
            outcome, error = "error", _first_line(result.error)
        else:
            outcome, error = ("completed" if rounds >= plan.rounds else "stopped"), ""
        rows.append(
            TrialSummary(
                trial_id=metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
                params=dict(result.config or {}),
                outcome=outcome,
                rounds=rounds,
                kimg=float(metrics.get("kimg", 0.0)),
                fid=float(metrics.get("fid", math.inf)),
                best_fid=min((f for _, f in history), default=math.inf),
                time_s=float(metrics.get("time_total_s", 0.0)),
                history=history,
                best_checkpoint=best_checkpoint,
                error=error,
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


def table(rows: list[TrialSummary], space: dict[str, Dimension], plan: Plan) -> str:
    """The sweep at a glance: one line per trial, best first, searched values only."""
    searched = [k for k, d in space.items() if d.kind != "constant"]
    header = ["trial", "best FID", "last FID", "kimg", "time", "status", *searched]
    lines = []
    for row in rows:
        values = [_short(row.params.get(k)) for k in searched]
        best = f"{row.best_fid:.2f}" if math.isfinite(row.best_fid) else "-"
        last = f"{row.fid:.2f}" if math.isfinite(row.fid) else "-"
        lines.append([row.trial_id, best, last, f"{row.kimg:.1f}", f"{row.time_s:.0f}s", row.status(plan), *values])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line) for line in [header, ["-" * w for w in widths], *lines])


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return repr(value) if value == "" else str(value)


def plot_fid(rows: list[TrialSummary], floor: float | None = None) -> bytes:
    """FID against images seen for every trial; an x where ASHA stopped a trial."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for index, row in enumerate(rows):
        if not row.history:
            continue
        kimg, fid = zip(*row.history, strict=True)
        best = index == 0
        ax.plot(kimg, fid, marker="o", markersize=3, linewidth=2.5 if best else 1,
                label=f"{row.trial_id}{' (best)' if best else ''}", zorder=3 if best else 2)  # fmt: skip
        if row.outcome == "stopped":
            ax.plot(kimg[-1], fid[-1], marker="x", color="black", markersize=9, zorder=4)
    if floor:
        ax.axhline(floor, color="grey", linestyle=":", label=f"floor {floor:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("thousands of real images shown to D (kimg)")
    ax.set_ylabel("FID (project evaluator, lower is better)")
    ax.set_title("sweep: FID per trial (x = stopped by ASHA)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def space_as_dict(space: dict[str, Dimension]) -> dict[str, Any]:
    return {k: (d.values[0] if d.kind == "constant" else {d.kind: list(d.values)}) for k, d in space.items()}


def plan_params(plan: Plan) -> dict[str, Any]:
    flat = dataclasses.asdict(plan)
    scaling = flat.pop("scaling")
    return {f"sweep.{k}": v for k, v in {**flat, **scaling}.items()}
