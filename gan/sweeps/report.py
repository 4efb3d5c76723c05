"""The sweep's report, in two steps without Ray or MLflow: ``summarize`` (pure: the table,
the best trial, the worker time) and ``render`` (the FID plot and the best trial's samples,
written beside the trials). Publishing it on the parent MLflow run and registering the best
generator is gan/registry/publish.py's. The Tune adapter (gan/sweeps/ray_tune.py) turns
Tune's results into ``TrialSummary`` rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gan.core.sampling import class_grid, generator_from_state, png_bytes
from gan.data.storage import Storage
from gan.runs import checkpoint
from gan.sweeps.plan import Plan, trial_label
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
class SweepSummary:
    rows: list[TrialSummary]
    """Every trial, best first."""
    text: str
    """The table of trials."""
    worker_s: float
    best: TrialSummary | None
    """The best trial that finished an evaluation and kept a checkpoint; None when none did."""
    floor: float | None
    searched: tuple[str, ...]


def summarize(rows: list[TrialSummary], space: dict[str, Dimension], plan: Plan) -> SweepSummary:
    ok = [row for row in rows if row.outcome != "error" and row.history and row.best_checkpoint]
    return SweepSummary(
        rows=rows,
        text=table(rows, space, plan),
        worker_s=sum(r.time_s for r in rows) * plan.scaling.workers,
        best=ok[0] if ok else None,
        floor=next((r.floor for r in rows if math.isfinite(r.floor)), None),
        searched=searched(space),
    )


@dataclass(frozen=True)
class Rendered:
    """The report's files, as written beside the sweep's trials."""

    files: dict[str, bytes]
    """summary.txt, fid_vs_kimg.png and, with a best trial, best_samples.png."""
    best_meta: dict[str, Any]
    best_state: dict[str, Any] | None


def render(summary: SweepSummary, storage: Storage, sweep: str) -> Rendered:
    """The plot and the best trial's samples (its best checkpoint loaded), written with the
    table into the sweep's folder."""
    files = {"summary.txt": summary.text.encode(), "fid_vs_kimg.png": plot_fid(summary.rows, summary.floor)}
    state, meta = None, {}
    if summary.best is not None:
        state, meta = checkpoint.load(summary.best.best_checkpoint, storage.options)
        G, _ = generator_from_state(state)
        files["best_samples.png"] = png_bytes(*class_grid(G, per_class=10))
    for name, data in files.items():
        storage.write(storage.join(sweep, name), data)
    return Rendered(files, meta, state)


def sweep_description(summary: SweepSummary, plan: Plan, registered: str | None) -> str:
    """The parent run's paragraph (markdown): the search, its outcome, the best trial and
    a link to its registered version."""
    rows, best = summary.rows, summary.best
    outcomes = {kind: sum(r.outcome == kind for r in rows) for kind in ("completed", "stopped", "error")}
    text = (
        f"Sweep of {len(rows)} trials, up to {plan.rounds} rounds of {plan.kimg_per_round:g} kimg each, "
        f"{plan.search} search with ASHA on FID: {outcomes['completed']} completed, {outcomes['stopped']} stopped "
        f"early, {outcomes['error']} failed; {summary.worker_s:.0f} worker-seconds. "
        f"Best: **{trial_label(best.trial_id, best.params, summary.searched)}**, FID {best.best_fid:.2f} "
        f"(floor {best.floor:.2f}) within {best.kimg:.1f} kimg."
    )
    if registered:
        name, version = registered.rsplit("/", 1)
        text += f" Registered as [{name} version {version}](#/models/{name}/versions/{version})."
    return text
