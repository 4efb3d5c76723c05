"""Promote a generator to the registry's `champion` alias behind a quality gate.

The candidate and the current champion are scored again on fresh latents (several seeds,
the project's evaluator) and the candidate wins only when its mean FID is lower by the
margin. The decision and its evidence become tags of the candidate's model version. The
old champion keeps the alias `previous`, so a rollback is one command.

    python pipelines/promote.py --sweep sweep-dcgan-1a2b3c4d         # best trial of a sweep
    python pipelines/promote.py --run 0123abcd... --margin 0.1       # a run's generator_best
    python pipelines/promote.py --best-of-experiment gan --dry-run   # best finished run of an experiment
    python pipelines/promote.py --version 3
    python pipelines/promote.py --rollback                           # champion <-> previous

Promotion reads only the data and evaluator you name: a model trained on anything but the
embedded digits, or scored by anything but the committed digit evaluator, needs --data
(--labels-uri, --data-options) or --backbone-uri (--backbone-sha256) equal to what its config
names; otherwise it is refused before anything is read.

    python pipelines/promote.py --run 0123abcd... --data s3://bucket/digits \
        --data-options '{"client_kwargs": {"endpoint_url": "http://minio:9000"}}'
"""

from __future__ import annotations

import argparse
import sys

from gan.cli import fail
from gan.core.config import check_num_samples
from gan.errors import USER_ERRORS
from gan.preflight import preflight
from gan.registry.tracking import check_reachable, resolve_uri


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
    parser.add_argument("--max-copy-share", type=float, default=0.05,
                        help="refuse a candidate when more of its samples than this are near-copies of training "
                             "images (default 0.05; real images score about 0.01)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="fresh latent seeds per model (default 3)")
    parser.add_argument("--num-samples", type=int, help="images per seed (default: the model's eval.num_samples)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument("--dry-run", action="store_true", help="show the decision; change nothing")
    trust = parser.add_argument_group("what scoring may read (a model's config must name the same)")
    trust.add_argument("--data", default="", metavar="URI", help="the training data (default: the embedded digits)")
    trust.add_argument("--labels-uri", default="", metavar="URI", help="its labels file, if the config names one")
    trust.add_argument("--data-options", default="", metavar="JSON", help="fsspec options for the data (an endpoint)")
    trust.add_argument("--backbone-uri", default="", metavar="URI",
                       help="the evaluator file or feature network (default: the committed digit evaluator)")  # fmt: skip
    trust.add_argument("--backbone-sha256", default="", metavar="SHA256", help="the sha256 that file must have")
    args = parser.parse_args(argv)
    if not 0 <= args.margin < 1:
        return fail(f"--margin {args.margin}: must be in [0, 1)")
    if not 0 <= args.max_copy_share <= 1:
        return fail(f"--max-copy-share {args.max_copy_share}: must be in [0, 1]")
    if args.seeds < 2:
        return fail(f"--seeds {args.seeds}: need at least 2 for an interval")
    try:
        if args.num_samples is not None:
            check_num_samples("--num-samples", args.num_samples)
        preflight(names=(args.model_name, args.sweep))
    except USER_ERRORS as err:
        return fail(str(err))

    from mlflow.tracking import MlflowClient

    from gan.registry import promotion

    uri = resolve_uri(args.tracking_uri)
    try:
        trusted = promotion.Trusted(data_uri=args.data, labels_uri=args.labels_uri, data_options=args.data_options,
                                    backbone_uri=args.backbone_uri, backbone_sha256=args.backbone_sha256)  # fmt: skip
        check_reachable(uri)
        client = MlflowClient(uri)
        if args.rollback:
            return promotion.rollback(client, args.model_name, args.dry_run)
        candidate = promotion.resolve_candidate(client, uri, args.model_name, run=args.run, sweep=args.sweep,
                                                experiment=args.experiment, version=args.version, best_of=args.best_of)  # fmt: skip
        scorer = promotion.Scorer(uri, args.seeds, args.num_samples, trusted)
        return promotion.promote(
            client, candidate, args.model_name, scorer, args.margin, args.max_copy_share, args.dry_run
        )
    except USER_ERRORS as err:  # RegistryError; the candidate's data unreachable (DataError)
        return fail(str(err))


if __name__ == "__main__":
    sys.exit(main())
