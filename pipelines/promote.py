"""Promote a generator to the registry's `champion` alias behind a quality gate.

The candidate and the current champion are scored again on fresh latents (several seeds,
the project's evaluator) and the candidate wins only when its mean FID is lower by the
margin. The decision and its evidence become tags of the candidate's model version. The
old champion keeps the alias `previous`, so a rollback is one command.

    python pipelines/promote.py --sweep sweep-dcgan-1a2b3c4d         # best trial of a sweep
    python pipelines/promote.py --run 0123abcd... --margin 0.1       # a run's generator_best
    python pipelines/promote.py --experiment gan --dry-run           # best finished run of an experiment
    python pipelines/promote.py --version 3
    python pipelines/promote.py --rollback                           # champion <-> previous
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from gan.cli import fail
from gan.registry import CHAMPION, PREVIOUS, RegistryError
from gan.tracking import RUN_NAME_TAG, TrackingError, check_reachable, git_commit, resolve_uri


@dataclass(frozen=True)
class Candidate:
    model_uri: str
    run_id: str
    version: str | None  # registered version, if it is one already
    label: str


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pick = parser.add_mutually_exclusive_group(required=True)
    pick.add_argument("--run", help="run id: its generator_best model")
    pick.add_argument("--sweep", help="sweep name (parent run): its best trial")
    pick.add_argument("--version", help="a registered version of --model-name")
    pick.add_argument("--best-of-experiment", dest="best_of", metavar="EXPERIMENT",
                      help="the finished run with the lowest best_fid in this experiment")  # fmt: skip
    pick.add_argument("--rollback", action="store_true", help="swap champion and previous")
    parser.add_argument("--model-name", default="gan-generator", help="registered model (default gan-generator)")
    parser.add_argument("--experiment", default="gan-sweeps", help="experiment that holds --sweep (default gan-sweeps)")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="relative FID improvement needed over the champion (default 0.05 = 5%%)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="fresh latent seeds per model (default 3)")
    parser.add_argument("--num-samples", type=int, help="images per seed (default: the model's eval.num_samples)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument("--dry-run", action="store_true", help="show the decision; change nothing")
    args = parser.parse_args(argv)
    if not 0 <= args.margin < 1:
        return fail(f"--margin {args.margin}: must be in [0, 1)")
    if args.seeds < 2:
        return fail(f"--seeds {args.seeds}: need at least 2 for an interval")

    from mlflow.tracking import MlflowClient

    uri = resolve_uri(args.tracking_uri)
    try:
        check_reachable(uri)
        client = MlflowClient(uri)
        if args.rollback:
            return rollback(client, args)
        candidate = resolve_candidate(client, args)
        return promote(client, args, uri, candidate)
    except (RegistryError, TrackingError) as err:
        return fail(str(err))


def resolve_candidate(client, args: argparse.Namespace) -> Candidate:
    from mlflow.exceptions import MlflowException

    from gan.registry import check_model_exists, logged_model_uri, model_exists, versions_of_run

    if args.version:
        check_model_exists(client, args.model_name)
        try:
            version = client.get_model_version(args.model_name, args.version)
        except MlflowException:
            raise RegistryError(f"{args.model_name} has no version {args.version}") from None
        return Candidate(f"models:/{args.model_name}/{version.version}", version.run_id, version.version,
                         f"version {version.version}")  # fmt: skip
    if args.sweep:
        experiment = client.get_experiment_by_name(args.experiment)
        parents = (
            client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{args.sweep}'")
            if experiment
            else []
        )
        if not parents or not parents[0].data.tags.get("best_run_id"):
            raise RegistryError(f"no finished sweep {args.sweep!r} in experiment {args.experiment!r}")
        run_id, label = parents[0].data.tags["best_run_id"], f"best trial of sweep {args.sweep}"
    elif args.best_of:
        experiment = client.get_experiment_by_name(args.best_of)
        if experiment is None:
            raise RegistryError(f"no experiment {args.best_of!r}")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED' and metrics.best_fid > 0",
                                  order_by=["metrics.best_fid ASC"], max_results=50)  # fmt: skip
        runs = [r for r in runs if logged_model_uri(r, "generator_best")]
        if not runs:
            raise RegistryError(f"experiment {args.best_of!r} has no finished run with a generator_best model")
        run_id, label = runs[0].info.run_id, f"best run of experiment {args.best_of}"
    else:
        run_id, label = args.run, f"run {args.run}"
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RegistryError(f"no run {run_id!r} at this tracking server") from None
    model_uri = logged_model_uri(run, "generator_best")
    if model_uri is None:
        raise RegistryError(f"{label} has no generator_best model (did it finish?)")
    registered = versions_of_run(client, args.model_name, run_id) if model_exists(client, args.model_name) else []
    version = max(registered, key=lambda v: int(v.version)) if registered else None
    if version is not None:
        return Candidate(f"models:/{args.model_name}/{version.version}", run_id, version.version,
                         f"{label} (version {version.version})")  # fmt: skip
    return Candidate(model_uri, run_id, None, label)


def evaluate(model_uri: str, args: argparse.Namespace, evaluators: dict):
    """FID with an interval on fresh seeds; one evaluator (real statistics) per dataset."""
    import dataclasses

    from gan.data import load_dataset
    from gan.metrics import Evaluator, fid_estimate
    from gan.registry import load_generator

    G, cfg = load_generator(model_uri)
    eval_cfg = cfg.eval if args.num_samples is None else dataclasses.replace(cfg.eval, num_samples=args.num_samples)
    key = (cfg.data, eval_cfg)
    if key not in evaluators:
        data = load_dataset(cfg.data)
        evaluators[key] = (Evaluator(eval_cfg, data), data.fingerprint)
    evaluator, fingerprint = evaluators[key]
    # Fresh latents: never the seed FID was tracked with during training.
    seeds = [10_000 + i for i in range(args.seeds)]
    return fid_estimate(evaluator, G, cfg.model.num_classes, seeds), cfg, fingerprint, evaluator.sha256


def promote(client, args: argparse.Namespace, uri: str, candidate: Candidate) -> int:
    from gan.registry import model_exists, register, set_aliases, version_by_alias

    champion = version_by_alias(client, args.model_name, CHAMPION) if model_exists(client, args.model_name) else None
    if champion is not None and candidate.version == champion.version:
        print(f"{candidate.label} is already {args.model_name}@{CHAMPION}; nothing to do")
        return 0
    evaluators: dict = {}
    print(f"scoring the candidate, {candidate.label} ({args.seeds} fresh seeds)...", flush=True)
    cand_fid, cfg, fingerprint, evaluator_sha = evaluate(candidate.model_uri, args, evaluators)
    champ_fid = None
    if champion is not None:
        print(f"scoring the champion, version {champion.version}...", flush=True)
        champ_fid, _, champ_fingerprint, _ = evaluate(f"models:/{args.model_name}/{champion.version}", args, evaluators)
        if champ_fingerprint != fingerprint:
            raise RegistryError(
                f"the candidate was trained on dataset {fingerprint[:12]} and the champion on {champ_fingerprint[:12]}: "
                "their FIDs do not compare; register the candidate under another --model-name"
            )
    if champ_fid is None:
        promoted, reason = True, "no champion yet"
    elif cand_fid.mean <= champ_fid.mean * (1 - args.margin):
        promoted, reason = (
            True,
            f"FID {cand_fid.mean:.2f} beats the champion's {champ_fid.mean:.2f} by more than {args.margin:.0%}",
        )
    else:
        needed = champ_fid.mean * (1 - args.margin)
        promoted, reason = (
            False,
            f"FID {cand_fid.mean:.2f} is not below {needed:.2f} (champion {champ_fid.mean:.2f} - {args.margin:.0%})",
        )
    evidence = {
        "promotion.decision": "promoted" if promoted else "refused",
        "promotion.reason": reason,
        "promotion.fid": str(cand_fid),
        "promotion.fid_values": ",".join(f"{v:.3f}" for v in cand_fid.values),
        "promotion.champion_version": champion.version if champion else "",
        "promotion.champion_fid": str(champ_fid) if champ_fid else "",
        "promotion.margin": str(args.margin),
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset_fingerprint": fingerprint,
        "evaluator_sha256": evaluator_sha,
        "git_commit": git_commit(),
        "source_run": candidate.run_id,
    }
    print(f"\ncandidate  {candidate.label}: FID {cand_fid}")
    if champ_fid is not None:
        print(f"champion   version {champion.version}: FID {champ_fid}")
    print(f"decision   {'PROMOTE' if promoted else 'REFUSE'}: {reason}")
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    version = candidate.version
    if version is None:
        version = register(uri, candidate.model_uri, args.model_name, cfg, {"source_run": candidate.run_id}).version
    for key, value in evidence.items():
        client.set_model_version_tag(args.model_name, version, key, value)
    if promoted:
        old = set_aliases(client, args.model_name, version, reason)
        kept = f"; version {old} is now @{PREVIOUS} (undo: promote.py --rollback)" if old else ""
        print(f"{args.model_name}@{CHAMPION} -> version {version}{kept}")
    else:
        print(f"version {version} keeps its evidence in its tags; {args.model_name}@{CHAMPION} unchanged")
    return 0 if promoted else 1


def rollback(client, args: argparse.Namespace) -> int:
    from gan.registry import check_model_exists, version_by_alias

    check_model_exists(client, args.model_name)
    champion = version_by_alias(client, args.model_name, CHAMPION)
    previous = version_by_alias(client, args.model_name, PREVIOUS)
    if previous is None:
        raise RegistryError(f"{args.model_name} has no @{PREVIOUS} version to roll back to")
    print(f"{args.model_name}@{CHAMPION}: version {champion.version if champion else '-'} -> {previous.version}")
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    client.set_registered_model_alias(args.model_name, CHAMPION, previous.version)
    if champion is not None:  # swapped, so running it again undoes the rollback
        client.set_registered_model_alias(args.model_name, PREVIOUS, champion.version)
        client.set_model_version_tag(args.model_name, champion.version, "promotion.rolled_back",
                                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))  # fmt: skip
    print(f"rolled back: {args.model_name}@{CHAMPION} is version {previous.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
