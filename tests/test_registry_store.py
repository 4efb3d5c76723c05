"""The registry's and the tracker's bookkeeping on a real `mlflow server` (PostgreSQL,
artefacts in the S3 server on 127.0.0.1) when several users share it or a process dies:
no status rewritten, no duplicate version, no champion overwritten unseen or lost, FIDs
that compare."""

from __future__ import annotations

import pytest
from services import CrashingClient

from gan.core.config import override, preset
from gan.core.models import build_models
from gan.registry import models as registry
from gan.registry import promotion
from gan.registry.publish import register_best
from gan.registry.tracking import MLflowTracker, TrackingTarget, finish_run, run_id_of
from gan.sweeps.report import TrialSummary

pytestmark = pytest.mark.integration
DEBUG = preset("debug")


@pytest.fixture(scope="module")
def store(mlflow_server_module):
    from mlflow.tracking import MlflowClient

    url, _ = mlflow_server_module
    client = MlflowClient(url)
    return url, client, client.create_experiment("runs")


def logged_run(store, cfg=DEBUG) -> tuple[str, str]:
    """(run id, models:/ URI) of a run that logged an untrained generator as generator_best."""
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    G = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)[0]
    return run_id, registry.log_generator(uri, run_id, "generator_best", G.state_dict(), cfg.to_json())


def registered(store, name: str, count: int) -> None:
    uri, *_ = store
    for _ in range(count):
        run_id, model_uri = logged_run(store)
        registry.register(uri, model_uri, name, DEBUG, {"source_run": run_id})


def aliases(store, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in store[1].get_registered_model(name).aliases.items()}


def test_a_stopped_trial_stays_stopped_and_a_resumed_sweep_registers_its_best_once(store):
    uri, client, experiment = store
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "KILLED")  # ASHA stopped the trial
    G = build_models(DEBUG.model, 28, 1)[0]
    state = {"loop": {"G_ema": G.state_dict()}, "config": DEBUG.to_json()}
    row = TrialSummary("t1", {}, "stopped", 1, 0.3, 200.0, 200.0, 5.0, [(0.3, 200.0)], None)
    first = register_best(uri, "sweep-best", run_id, state, {}, "sweep", row)
    assert client.get_run(run_id).info.status == "KILLED"  # logging its model did not finish it
    again = register_best(uri, "sweep-best", run_id, state, {}, "sweep", row)  # the report of a resumed sweep
    assert again.version == first.version
    assert len(client.search_model_versions("name = 'sweep-best'")) == 1


def test_logging_a_model_leaves_a_running_run_running(store):
    uri, client, _ = store
    run_id, _ = logged_run(store)
    assert client.get_run(run_id).info.status == "RUNNING"


class MovesTheChampion(promotion.Scorer):
    """Another user's promotion lands while this one scores its candidate."""

    def __init__(self, client, name: str, to: str, *args) -> None:
        super().__init__(*args)
        self.client, self.name, self.to = client, name, to

    def __call__(self, model_uri: str):
        scored = super().__call__(model_uri)
        self.client.set_registered_model_alias(self.name, registry.CHAMPION, self.to)
        return scored


def test_a_champion_that_moves_while_a_candidate_is_scored_is_not_overwritten(store):
    uri, client, _ = store
    registered(store, "moving", 2)
    client.set_registered_model_alias("moving", registry.CHAMPION, "1")
    run_id, model_uri = logged_run(store)
    scorer = MovesTheChampion(client, "moving", "2", uri, 2, 50)
    candidate = promotion.Candidate(model_uri, run_id, None, "the candidate")
    with pytest.raises(registry.RegistryError, match="moved from version 1 to 2 while the candidate was scored"):
        promotion.promote(client, candidate, "moving", scorer, margin=0.0, max_copy_share=1.0, dry_run=False)
    assert aliases(store, "moving") == {"champion": "2"}  # the other user's promotion stands
    assert len(client.search_model_versions("name = 'moving'")) == 2  # nothing registered


@pytest.mark.parametrize("writes", [0, 1, 2])
def test_an_interrupted_rollback_keeps_every_version_and_finishes_when_run_again(store, writes):
    uri, client, _ = store
    name = f"rollback-{writes}"
    registered(store, name, 2)
    client.set_registered_model_alias(name, registry.PREVIOUS, "1")
    client.set_registered_model_alias(name, registry.CHAMPION, "2")
    with pytest.raises(KeyboardInterrupt):
        promotion.rollback(CrashingClient(client, writes), name, dry_run=False)
    assert {"1", "2"} <= set(aliases(store, name).values())  # neither version lost its alias
    assert promotion.rollback(client, name, dry_run=False) == 0
    assert aliases(store, name) == {"champion": "1", "previous": "2"}


def test_the_champion_is_scored_with_the_candidates_evaluation_and_another_evaluator_is_refused(store):
    uri, client, _ = store
    registered(store, "fair", 1)  # its config evaluates 100 samples
    client.set_registered_model_alias("fair", registry.CHAMPION, "1")
    run_id, model_uri = logged_run(store, override(DEBUG, ["eval.num_samples=60", "eval.kid_subset_size=50"]))
    scorer = promotion.Scorer(uri, 2, None)
    candidate = promotion.Candidate(model_uri, run_id, None, "the candidate")
    promotion.promote(client, candidate, "fair", scorer, margin=0.0, max_copy_share=1.0, dry_run=False)
    assert [cfg.num_samples for _, cfg in scorer.evaluators] == [60]  # one evaluation for both models
    (version,) = [v for v in client.search_model_versions("name = 'fair'") if v.run_id == run_id]
    assert version.tags["promotion.eval"] == "60 samples x 2 seeds, both models"

    other = override(DEBUG, ["eval.backbone=torchscript", "eval.backbone_uri=/models/inception.pt"])
    run_id, model_uri = logged_run(store, other)
    refused = promotion.Candidate(model_uri, run_id, None, "a candidate with another evaluator")
    with pytest.raises(registry.RegistryError, match="/models/inception.pt: their FIDs do not compare"):
        promotion.promote(client, refused, "fair", promotion.Scorer(uri, 2, None), 0.0, 1.0, dry_run=False)


def test_one_config_trained_by_two_users_is_two_runs(store, tmp_path):
    uri, client, _ = store
    ann = TrackingTarget(uri, "shared", "dcgan-1a2b3c", location=str(tmp_path / "ann/runs/dcgan-1a2b3c"))
    bob = TrackingTarget(uri, "shared", "dcgan-1a2b3c", location="s3://bob/runs/dcgan-1a2b3c")
    first, other = MLflowTracker(ann), MLflowTracker(bob)
    assert first.run_id != other.run_id
    first.close("FINISHED")
    assert MLflowTracker(ann).run_id == first.run_id  # a restart finds its own run again
    assert run_id_of(bob) == other.run_id
    assert finish_run(bob, "KILLED") == "KILLED" and client.get_run(first.run_id).info.status == "RUNNING"
