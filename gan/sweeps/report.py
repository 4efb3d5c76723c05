"""The sweep's report: a table of trials, FID against images, the best trial's samples,
its numbers on the parent MLflow run, and its generator registered with the evidence.
No Ray: the Tune adapter (gan/sweeps/ray_tune.py) turns Tune's results into ``TrialSummary`` rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gan.core.sampling import class_grid, generator_from_state, png_bytes
from gan.data.storage import Storage
from gan.registry.tracking import MLflowTracker, git_commit, run_id_of
from gan.runs import checkpoint
from gan.sweeps.plan import Plan, child_run_name, trial_label
from gan.sweeps.space import Dimension, searched


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
    best_checkpoint: str | None  # full URI of the checkpoint with the best FID
    error: str = ""
    floor: float = math.nan
    """FID of real vs held-out real images: the best any generator can score."""
    exploits: int = 0
    """PBT: times this trial continued from another's state."""
    exploited_at: tuple[float, ...] = ()
    """PBT: kimg of the rounds after which it did, among the rounds Tune kept."""

    def status(self, plan: Plan) -> str:
        if self.outcome == "error":
            return f"error: {self.error[:90]}" + ("..." if len(self.error) > 90 else "")
        if self.outcome == "stopped":
            return f"stopped by ASHA at round {self.rounds}/{plan.rounds}"
        exploits = f", {self.exploits} exploit(s)" if self.exploits else ""
        return f"completed {self.rounds}/{plan.rounds} rounds{exploits}"


def table(rows: list[TrialSummary], space: dict[str, Dimension], plan: Plan) -> str:
    """The sweep at a glance: one line per trial, best first, searched values only."""
    fields = searched(space)
    header = ["trial", "best FID", "last FID", "kimg", "time", "status", *fields]
    lines = []
    for row in rows:
        values = [_short(row.params.get(k)) for k in fields]
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
    """FID against images seen for every trial; an x where ASHA stopped a trial, a triangle
    where a PBT trial continued from another's state (its next point is the jump)."""
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
        for k, f in row.history:
            if k in row.exploited_at:
                ax.plot(k, f, marker="v", color="black", markersize=8, zorder=4)
    if floor:
        ax.axhline(floor, color="grey", linestyle=":", label=f"floor {floor:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("thousands of real images shown to D (kimg)")
    ax.set_ylabel("FID (project evaluator, lower is better)")
    ax.set_title("sweep: FID per trial (x = stopped by ASHA, v = PBT exploit)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@dataclass(frozen=True)
class Best:
    """The sweep's best trial and its best checkpoint."""

    row: TrialSummary
    checkpoint: str
    meta: dict[str, Any]
    run_id: str | None
    registered: str | None
    """``name/version`` when its generator was registered."""


def report(
    rows: list[TrialSummary],
    space: dict[str, Dimension],
    plan: Plan,
    storage: Storage,
    sweep: str,
    parent: MLflowTracker | None,
    model_name: str | None,
) -> Best | None:
    """Write summary.txt, fid_vs_kimg.png and best_samples.png beside the sweep's trials,
    log them on the parent run and register the best generator as ``model_name`` (None:
    do not register). Returns None when no trial finished an evaluation."""
    summary = table(rows, space, plan)
    worker_s = sum(r.time_s for r in rows) * plan.scaling.workers
    print(f"{summary}\n{len(rows)} trials, {worker_s:.0f} worker-seconds", flush=True)
    ok = [row for row in rows if row.outcome != "error" and row.history and row.best_checkpoint]
    plot = plot_fid(rows, next((r.floor for r in rows if math.isfinite(r.floor)), None))
    storage.write(storage.join(sweep, "summary.txt"), summary.encode())
    storage.write(storage.join(sweep, "fid_vs_kimg.png"), plot)
    if parent:
        parent.log_artifact(summary.encode(), "summary.txt")
        parent.log_artifact(plot, "fid_vs_kimg.png")
    if not ok:
        return None
    row = ok[0]
    state, meta = checkpoint.load(row.best_checkpoint, storage.options)
    G, cfg = generator_from_state(state)
    samples = png_bytes(*class_grid(G, per_class=10))
    storage.write(storage.join(sweep, "best_samples.png"), samples)
    if parent is None:
        return Best(row, row.best_checkpoint, meta, None, None)
    parent.log_artifact(samples, "best_samples.png")
    parent.log_metrics({"best_fid": row.best_fid, "worker_seconds": worker_s, "trials": len(rows)}, step=0)
    run_id = run_id_of(parent.target.child(child_run_name(sweep, row.trial_id), parent.run_id))
    registered = None
    if model_name and run_id:
        version = register_best(parent.target.uri, model_name, run_id, state, meta, sweep, row)
        registered = f"{model_name}/{version.version}"
    tags = {"best_trial": row.trial_id, "best_run_id": run_id or "", "best_checkpoint": row.best_checkpoint}
    parent.set_tags(tags | ({"registered_model": registered} if registered else {}))
    parent.describe(sweep_description(rows, plan, row, worker_s, registered, searched(space)))
    return Best(row, row.best_checkpoint, meta, run_id, registered)


def sweep_description(
    rows: list[TrialSummary], plan: Plan, best: TrialSummary, worker_s: float, registered, fields: tuple[str, ...]
) -> str:
    """The parent run's paragraph (markdown): the search, its outcome, the best trial and
    a link to its registered version."""
    outcomes = {kind: sum(r.outcome == kind for r in rows) for kind in ("completed", "stopped", "error")}
    text = (
        f"Sweep of {len(rows)} trials, up to {plan.rounds} rounds of {plan.kimg_per_round:g} kimg each, "
        f"{plan.search} search with ASHA on FID: {outcomes['completed']} completed, {outcomes['stopped']} stopped "
        f"early, {outcomes['error']} failed; {worker_s:.0f} worker-seconds. "
        f"Best: **{trial_label(best.trial_id, best.params, fields)}**, FID {best.best_fid:.2f} (floor {best.floor:.2f}) "
        f"within {best.kimg:.1f} kimg."
    )
    if registered:
        name, version = registered.rsplit("/", 1)
        text += f" Registered as [{name} version {version}](#/models/{name}/versions/{version})."
    return text


def register_best(tracking_uri: str, model_name: str, run_id: str, state, meta, sweep: str, row: TrialSummary):
    """The best trial's best generator as a new registered version, with its evidence."""
    from mlflow.tracking import MlflowClient

    from gan.core.config import Config
    from gan.registry import models as registry

    client = MlflowClient(tracking_uri)
    done = registry.latest_version_of_run(client, model_name, run_id)
    if done is not None:  # a resumed sweep that registered its best before
        return done
    run = client.get_run(run_id)
    # A completed trial logged generator_best before closing its run FINISHED; a stopped
    # one never got there, so its best checkpoint's G_ema is logged now.
    model_uri = None
    if run.info.status == "FINISHED":
        model_uri = registry.logged_model_uri(tracking_uri, run, "generator_best")
    if model_uri is None:
        model_uri = registry.log_generator(
            tracking_uri, run_id, "generator_best", state["loop"]["G_ema"], state["config"]
        )
    tags = {
        "fid": f"{row.best_fid:.4f}", "fid_floor": meta.get("fid_floor", ""), "kid": meta.get("kid", ""),
        "dataset_fingerprint": meta.get("dataset_fingerprint", ""), "evaluator_sha256": meta.get("evaluator_sha256", ""),
        "git_commit": git_commit(), "source_run": run_id, "sweep": sweep, "trial": row.trial_id,
    }  # fmt: skip
    return registry.register(tracking_uri, model_uri, model_name, Config.from_json(state["config"]), tags)
