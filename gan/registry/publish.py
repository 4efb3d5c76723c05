"""A sweep's report published to MLflow: its files and numbers on the parent run, and the
best trial's generator registered with its evidence."""

from __future__ import annotations

from dataclasses import dataclass

from gan.registry.tracking import MLflowTracker, git_commit, run_id_of
from gan.sweeps.plan import Plan, child_run_name
from gan.sweeps.report import Rendered, SweepSummary, TrialSummary, sweep_description


@dataclass(frozen=True)
class Published:
    run_id: str | None
    """The best trial's MLflow run."""
    registered: str | None
    """``name/version`` when its generator was registered."""


def publish(
    summary: SweepSummary, rendered: Rendered, plan: Plan, sweep: str, parent: MLflowTracker, model_name: str | None
) -> Published:
    """Log the report's files on the parent run and, with a best trial, its numbers, tags and
    description, and register its generator as ``model_name`` (None: do not register)."""
    for name, data in rendered.files.items():
        parent.log_artifact(data, name)
    row = summary.best
    if row is None:
        return Published(None, None)
    parent.log_metrics({"best_fid": row.best_fid, "worker_seconds": summary.worker_s, "trials": len(summary.rows)}, 0)
    run_id = run_id_of(parent.target.child(child_run_name(sweep, row.trial_id), parent.run_id))
    registered = None
    if model_name and run_id:
        version = register_best(
            parent.target.uri, model_name, run_id, rendered.best_state, rendered.best_meta, sweep, row
        )
        registered = f"{model_name}/{version.version}"
    tags = {"best_trial": row.trial_id, "best_run_id": run_id or "", "best_checkpoint": row.best_checkpoint}
    parent.set_tags(tags | ({"registered_model": registered} if registered else {}))
    parent.describe(sweep_description(summary, plan, registered))
    return Published(run_id, registered)


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
