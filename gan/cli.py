"""Command-line pieces every entry point shares: presets, --set overrides, --dry-run."""

from __future__ import annotations

import argparse
import sys

from gan.core.config import ConfigError, describe_presets, override, preset
from gan.data.storage import release_claims


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "dcgan") -> None:
    parser.add_argument(
        "--preset", default=default_preset, help=f"starting config (default {default_preset}):\n{describe_presets()}"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set optim.lr_g=1e-4 (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def add_run_args(parser: argparse.ArgumentParser, what: str, experiment: str) -> None:
    """Where a run or sweep keeps its files and its MLflow record."""
    out = parser.add_argument_group("storage and tracking")
    out.add_argument(
        "--storage", default="runs", help=f"folder or s3:// URI for {what}s and checkpoints (default runs/)"
    )
    out.add_argument("--s3-endpoint", help="S3 API endpoint URL (default $AWS_ENDPOINT_URL or AWS)")
    out.add_argument("--shared-storage", action="store_true",
                     help="--storage is a folder every node of the cluster mounts (NFS, a shared volume)")  # fmt: skip
    out.add_argument("--name", help=f"{what} name (default: preset + config hash, so a rerun finds it)")
    out.add_argument("--resume", action="store_true", help=f"continue the {what} from its latest checkpoints")
    out.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    out.add_argument("--experiment", default=experiment, help=f"MLflow experiment (default {experiment})")
    out.add_argument("--no-tracking", action="store_true", help=f"do not record the {what} in MLflow")


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    space = parser.add_argument_group("search space")
    space.add_argument("--space-file", help="YAML/JSON file mapping SECTION.FIELD to a value or {kind: [...]}; "
                       "replaces the default space")  # fmt: skip
    space.add_argument("--space", action="append", default=[], metavar="FIELD=SPEC",
                       help="add or replace one dimension: optim.lr_g=loguniform:1e-5:1e-3, "
                       "model.width=choice:32,64, model.depth=1 (repeatable)")  # fmt: skip
    search = parser.add_argument_group("search and early stopping")
    search.add_argument("--trials", type=int, default=8, help="configurations to try (default 8)")
    search.add_argument("--rounds", type=int, default=4, help="evaluation rounds of a full trial (default 4)")
    search.add_argument("--scheduler", default="asha", choices=("asha", "pbt", "fifo"),
                        help="asha stops weak trials on FID; pbt continues them from strong ones with perturbed "
                        "learning rates, betas and EMA; fifo runs every trial to the end (default asha)")  # fmt: skip
    search.add_argument("--perturbation-rounds", type=int, default=1, help="PBT: rounds between exploits (default 1)")
    search.add_argument("--grace-rounds", type=int, default=1, help="rounds before ASHA may stop a trial (default 1)")
    search.add_argument("--reduction-factor", type=int, default=2, help="ASHA keeps 1/this at each rung (default 2)")
    search.add_argument(
        "--kimg-per-round", type=float, help="thousands of images per round (default: from --budget-minutes)"
    )
    search.add_argument(
        "--budget-minutes", type=float, default=10.0, help="sizes the rounds for a local CPU sweep (default 10)"
    )
    search.add_argument(
        "--search", default="random", choices=("random", "optuna"), help="search algorithm (default random)"
    )
    search.add_argument("--search-seed", type=int, default=0, help="seed of the search algorithm (default 0)")
    place = parser.add_argument_group("resources")
    place.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial (default 1)")
    place.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    place.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker; 0 = CPU with gloo (default 0)"
    )
    place.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster holds now; "
                       "set it on an autoscaling cluster)")  # fmt: skip
    parser.add_argument("--model-name", default="gan-generator", help="registered model for the best generator")
    parser.add_argument("--no-register", action="store_true", help="do not register the best generator")


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    release_claims()  # a start that failed leaves no run or sweep folder to --resume
    return code


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None, extra_fn=None):
    """(args, cfg): the preset, then --set overrides, then ``extra_fn(args, cfg)``'s overrides
    from dedicated flags; or exits with one clear line for a bad config."""
    args = parser.parse_args(argv)
    try:
        cfg = override(preset(args.preset), args.overrides)
        if extra_fn:
            cfg = override(cfg, extra_fn(args, cfg))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    if args.dry_run:
        print(cfg.to_json())
        parser.exit(0)
    return args, cfg
