"""Promotion to the registry's ``champion`` alias behind a quality gate, and rollback.

The candidate and the current champion are scored again on fresh latents (several seeds,
the project's evaluator); ``decide`` (pure arithmetic) lets the candidate win only when
its mean FID is lower by the margin. The decision and its evidence become tags of the
candidate's model version; the old champion keeps the alias ``previous``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from gan.evaluation.evaluator import FIDEstimate
from gan.evaluation.stats import COPY_QUANTILE
from gan.registry.models import (
    CHAMPION,
    PREVIOUS,
    ROLLING_BACK,
    RegistryError,
    champion_of,
    check_model_exists,
    latest_version_of_run,
    load_generator,
    logged_model_uri,
    register,
    set_aliases,
    version_by_alias,
)
from gan.registry.names import filter_value
from gan.registry.tracking import LOCATION_TAG, RUN_NAME_TAG, git_commit


@dataclass(frozen=True)
class Candidate:
    model_uri: str
    run_id: str
    version: str | None
    """Registered version, if it is one already."""
    label: str


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def decide(candidate: FIDEstimate, champion: FIDEstimate | None, margin: float, max_copy_share: float) -> Decision:
    """Refuse a candidate whose samples copy training images (a share above
    ``max_copy_share``); otherwise promote when there is no champion, or when the
    candidate's mean FID is at least ``margin`` (relative) below the champion's."""
    if candidate.copy_share > max_copy_share:
        return Decision(
            False,
            f"{candidate.copy_share:.1%} of its samples are near-copies of training images "
            f"(limit {max_copy_share:.1%}; real images score about {COPY_QUANTILE:.0%})",
        )
    if champion is None:
        return Decision(True, "no champion yet")
    needed = champion.mean * (1 - margin)
    if candidate.mean <= needed:
        return Decision(
            True, f"FID {candidate.mean:.2f} beats the champion's {champion.mean:.2f} by more than {margin:.0%}"
        )
    return Decision(
        False, f"FID {candidate.mean:.2f} is not below {needed:.2f} (champion {champion.mean:.2f} - {margin:.0%})"
    )


def resolve_candidate(
    client, tracking_uri: str, model_name: str, *, run=None, sweep=None, experiment=None, version=None, best_of=None
) -> Candidate:
    """The model to promote from one of: a run id, a sweep (its best trial), a registered
    version, or the best finished run of an experiment."""
    from mlflow.exceptions import MlflowException

    if version:
        check_model_exists(client, model_name)
        try:
            found = client.get_model_version(model_name, version)
        except MlflowException:
            raise RegistryError(f"{model_name} has no version {version}") from None
        return Candidate(
            f"models:/{model_name}/{found.version}", found.run_id, found.version, f"version {found.version}"
        )
    if sweep:
        exp = client.get_experiment_by_name(experiment)
        parents = (
            client.search_runs([exp.experiment_id], f"tags.`{RUN_NAME_TAG}` = {filter_value(sweep)}") if exp else []
        )
        finished = [p for p in parents if p.data.tags.get("best_run_id")]
        if not finished:
            raise RegistryError(f"no finished sweep {sweep!r} in experiment {experiment!r}")
        if len(finished) > 1:  # one name, checkpoints in several places: several users' sweeps
            places = ", ".join(p.data.tags.get(LOCATION_TAG, "?") for p in finished)
            raise RegistryError(f"{len(finished)} sweeps are named {sweep!r} (checkpoints in {places}); pass --run")
        run, label = finished[0].data.tags["best_run_id"], f"best trial of sweep {sweep}"
    elif best_of:
        exp = client.get_experiment_by_name(best_of)
        if exp is None:
            raise RegistryError(f"no experiment {best_of!r}")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and metrics.best_fid > 0",
                                  order_by=["metrics.best_fid ASC"], max_results=50)  # fmt: skip
        runs = [r for r in runs if logged_model_uri(tracking_uri, r, "generator_best")]
        if not runs:
            raise RegistryError(f"experiment {best_of!r} has no finished run with a generator_best model")
        run, label = runs[0].info.run_id, f"best run of experiment {best_of}"
    else:
        label = f"run {run}"
    try:
        found_run = client.get_run(run)
    except MlflowException:
        raise RegistryError(f"no run {run!r} at this tracking server") from None
    model_uri = logged_model_uri(tracking_uri, found_run, "generator_best")
    if model_uri is None:
        raise RegistryError(f"{label} has no generator_best model (did it finish?)")
    latest = latest_version_of_run(client, model_name, run)
    if latest is not None:
        return Candidate(f"models:/{model_name}/{latest.version}", run, latest.version,
                         f"{label} (version {latest.version})")  # fmt: skip
    return Candidate(model_uri, run, None, label)


class Scorer:
    """FID with an interval on fresh seeds. Every model is scored with one evaluation config,
    the first model's (the candidate's, with ``num_samples``): FIDs on other sample counts
    do not compare. A model trained with another evaluator is refused."""

    def __init__(self, tracking_uri: str, seeds: int, num_samples: int | None) -> None:
        self.tracking_uri, self.num_samples = tracking_uri, num_samples
        # Fresh latents: never the seed FID was tracked with during training.
        self.seeds = [10_000 + i for i in range(seeds)]
        self.eval_cfg = None
        self.models: dict = {}
        self.evaluators: dict = {}

    def check(self, model_uris: list[str]) -> None:
        """Load the models; the first one's evaluation (with ``num_samples``) becomes the one
        for all. A model trained with another evaluator is refused before anything is scored."""
        for uri in model_uris:
            _, cfg = self.models[uri] = load_generator(uri, self.tracking_uri)
            if self.eval_cfg is None:
                eval_cfg = cfg.eval
                if self.num_samples is not None:
                    kid_subset = min(eval_cfg.kid_subset_size, self.num_samples)
                    eval_cfg = dataclasses.replace(eval_cfg, num_samples=self.num_samples, kid_subset_size=kid_subset)
                self.eval_cfg = eval_cfg
            elif (cfg.eval.backbone, cfg.eval.backbone_uri) != (self.eval_cfg.backbone, self.eval_cfg.backbone_uri):
                raise RegistryError(
                    f"{uri} was evaluated with the {evaluator_name(cfg.eval)} evaluator, the candidate with "
                    f"{evaluator_name(self.eval_cfg)}: their FIDs do not compare; register the candidate under "
                    "another --model-name"
                )

    def __call__(self, model_uri: str):
        """(FIDEstimate, config, dataset fingerprint, evaluator sha256) of a model ``check`` loaded."""
        from gan.data.datasets import load_dataset
        from gan.evaluation.evaluator import Evaluator, fid_estimate

        G, cfg = self.models[model_uri]
        eval_cfg = self.eval_cfg
        key = (cfg.data, eval_cfg)
        if key not in self.evaluators:
            data = load_dataset(cfg.data)
            self.evaluators[key] = (
                Evaluator(eval_cfg, data, storage_options=cfg.data.fsspec_options()),
                data.fingerprint,
            )
        evaluator, fingerprint = self.evaluators[key]
        return fid_estimate(evaluator, G, cfg.model.num_classes, self.seeds), cfg, fingerprint, evaluator.sha256


def evaluator_name(eval_cfg) -> str:
    return eval_cfg.backbone_uri or f"{eval_cfg.backbone!r}"


def promote(
    client, candidate: Candidate, model_name: str, scorer: Scorer, margin: float, max_copy_share: float, dry_run: bool
) -> int:
    """Score, decide, record the evidence and move the aliases; 0 promoted, 1 refused."""
    champion = champion_of(client, model_name)
    if champion is not None and candidate.version == champion.version:
        print(f"{candidate.label} is already {model_name}@{CHAMPION}; nothing to do")
        return 0
    champion_uri = f"models:/{model_name}/{champion.version}" if champion else None
    scorer.check([candidate.model_uri, *filter(None, [champion_uri])])
    print(f"scoring the candidate, {candidate.label} ({len(scorer.seeds)} fresh seeds)...", flush=True)
    cand_fid, cfg, fingerprint, evaluator_sha = scorer(candidate.model_uri)
    champ_fid = None
    if champion is not None:
        print(f"scoring the champion, version {champion.version}...", flush=True)
        champ_fid, _, champ_fingerprint, champ_evaluator_sha = scorer(champion_uri)
        if champ_fingerprint != fingerprint:
            raise RegistryError(
                f"the candidate was trained on dataset {fingerprint[:12]} and the champion on {champ_fingerprint[:12]}: "
                "their FIDs do not compare; register the candidate under another --model-name"
            )
        if champ_evaluator_sha != evaluator_sha:
            raise RegistryError(
                f"the candidate is scored by evaluator {evaluator_sha[:12]} and the champion by "
                f"{champ_evaluator_sha[:12]}: their FIDs do not compare; register the candidate under another --model-name"
            )
    decision = decide(cand_fid, champ_fid, margin, max_copy_share)
    evidence = {
        "promotion.decision": "promoted" if decision.promoted else "refused",
        "promotion.reason": decision.reason,
        "promotion.fid": str(cand_fid),
        "promotion.fid_values": ",".join(f"{v:.3f}" for v in cand_fid.values),
        "promotion.champion_version": champion.version if champion else "",
        "promotion.champion_fid": str(champ_fid) if champ_fid else "",
        "promotion.margin": str(margin),
        "promotion.copy_share": f"{cand_fid.copy_share:.4f}",
        "promotion.max_copy_share": str(max_copy_share),
        "promotion.eval": f"{scorer.eval_cfg.num_samples} samples x {len(scorer.seeds)} seeds, both models",
        "promotion.time": _now(),
        "dataset_fingerprint": fingerprint,
        "evaluator_sha256": evaluator_sha,
        "git_commit": git_commit(),
        "source_run": candidate.run_id,
    }
    print(f"\ncandidate  {candidate.label}: FID {cand_fid}, near-copies of training images {cand_fid.copy_share:.1%}")
    if champ_fid is not None:
        print(f"champion   version {champion.version}: FID {champ_fid}")
    print(f"decision   {'PROMOTE' if decision.promoted else 'REFUSE'}: {decision.reason}")
    if dry_run:
        print("dry run: nothing changed")
        return 0
    # Scoring takes minutes: another promotion may have moved the alias meanwhile.
    now = champion_of(client, model_name)
    if (now and now.version) != (champion and champion.version):
        raise RegistryError(
            f"{model_name}@{CHAMPION} moved from version {champion.version if champion else '-'} to "
            f"{now.version if now else '-'} while the candidate was scored; nothing changed: promote again to "
            "compare with the new champion"
        )
    version = candidate.version
    if version is None:
        version = register(scorer.tracking_uri, candidate.model_uri, model_name, cfg,
                           {"source_run": candidate.run_id}).version  # fmt: skip
    for key, value in evidence.items():
        client.set_model_version_tag(model_name, version, key, value)
    if not decision.promoted:
        print(f"version {version} keeps its evidence in its tags; {model_name}@{CHAMPION} unchanged")
        return 1
    old = set_aliases(client, model_name, version, decision.reason)
    kept = f"; version {old} is now @{PREVIOUS} (undo: promote.py --rollback)" if old else ""
    print(f"{model_name}@{CHAMPION} -> version {version}{kept}")
    return 0


def rollback(client, model_name: str, dry_run: bool) -> int:
    """Swap ``champion`` and ``previous``, so running it again undoes the rollback.

    The outgoing champion first gets the alias ``rolling-back``: a crash between the alias
    writes leaves every version with an alias, and running it again finishes the swap."""
    check_model_exists(client, model_name)
    champion = version_by_alias(client, model_name, CHAMPION)
    previous = version_by_alias(client, model_name, PREVIOUS)
    outgoing = version_by_alias(client, model_name, ROLLING_BACK)
    finishing = outgoing is not None and champion is not None and champion.version != outgoing.version
    if finishing:  # interrupted after the champion moved: only `previous` is left to write
        print(f"finishing an interrupted rollback: version {outgoing.version} becomes @{PREVIOUS}")
        champion, previous = outgoing, champion
    elif previous is None:
        raise RegistryError(f"{model_name} has no @{PREVIOUS} version to roll back to")
    print(f"{model_name}@{CHAMPION}: version {champion.version if champion else '-'} -> {previous.version}")
    if dry_run:
        print("dry run: nothing changed")
        return 0
    if not finishing:
        if champion is not None:
            client.set_registered_model_alias(model_name, ROLLING_BACK, champion.version)
        client.set_registered_model_alias(model_name, CHAMPION, previous.version)
    if champion is not None:
        client.set_registered_model_alias(model_name, PREVIOUS, champion.version)
        client.set_model_version_tag(model_name, champion.version, "promotion.rolled_back", _now())
        client.delete_registered_model_alias(model_name, ROLLING_BACK)
    print(f"rolled back: {model_name}@{CHAMPION} is version {previous.version}")
    return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
