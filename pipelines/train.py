"""Train a GAN and keep the best checkpoint by FID.

By default the run is a Ray Train job (Ray starts locally, or joins RAY_ADDRESS):
    python pipelines/train.py                           # default preset, embedded digits
    python pipelines/train.py --workers 2               # DDP over 2 CPU workers (gloo)
    python pipelines/train.py --workers 4 --gpu         # 4 GPU workers (NCCL)
    python pipelines/train.py --storage s3://bucket/runs --resume
    python pipelines/train.py --in-process --time-budget-s 300   # no Ray at all
    python pipelines/train.py --preset mlp --set optim.lr_g=1e-4 --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time

import fsspec

from gan import checkpoint
from gan.cli import add_config_args, fail, parse_config
from gan.config import Config, override
from gan.data import DataError
from gan.distributed import storage_options
from gan.loop import DivergenceError
from gan.sampling import generator_from_state, interpolation, png_bytes
from gan.tracking import MLflowTracker, TrackingError, TrackingTarget, finish_run, prepare, resolve_uri

USER_ERRORS = (DataError, checkpoint.CheckpointError, DivergenceError, TrackingError, ValueError)


def run_name(cfg: Config) -> str:
    """Deterministic, so the same command finds its own run again to resume it."""
    return f"train-{cfg.name}-{hashlib.sha256(cfg.to_json().encode()).hexdigest()[:8]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--time-budget-s", type=float, help="stop after this many seconds of training")
    parser.add_argument("--steps", type=int, help="stop after this many G steps (sets train.total_kimg)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (default 1, or one per GPU with --gpu)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: on one machine, all)")
    parser.add_argument("--storage", default="runs", help="folder or s3:// URI for runs (default runs/)")
    parser.add_argument("--s3-endpoint", help="S3 API endpoint URL (default $AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--name", help="run name (default: preset + config hash, so reruns resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("--in-process", action="store_true", help="train in this process, without Ray")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    parser.add_argument("--experiment", default="gan", help="MLflow experiment name (default gan)")
    parser.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")

    def budget(args: argparse.Namespace) -> list[str]:
        return [] if args.time_budget_s is None else [f"train.time_budget_s={args.time_budget_s}"]

    args, cfg = parse_config(parser, argv, budget)
    if args.steps is not None:
        cfg = override(cfg, [f"train.total_kimg={args.steps * cfg.train.batch_size * cfg.optim.d_steps / 1000}"])
    name = args.name or run_name(cfg)
    start = time.monotonic()
    target = None if args.no_tracking else TrackingTarget(resolve_uri(args.tracking_uri), args.experiment, name)
    try:
        if target is not None:
            prepare(target)
        if args.in_process:
            best_uri, latest_uri, grids, best_fid = train_in_process(cfg, args, name, target)
        else:
            best_uri, latest_uri, grids, best_fid = train_with_ray(cfg, args, name, target)
        state, _ = checkpoint.load(best_uri, storage_options(args.storage, args.s3_endpoint))
    except USER_ERRORS as err:
        return fail(str(err))
    G, _ = generator_from_state(state)
    interp = f"{best_uri}/interpolation.png"
    with fsspec.open(interp, "wb", **storage_options(args.storage, args.s3_endpoint)) as handle:
        handle.write(png_bytes(*interpolation(G)))
    print(
        f"\ndone in {time.monotonic() - start:.0f}s: best FID {best_fid:.2f}\n"
        f"  best checkpoint:   {best_uri}\n"
        f"  latest checkpoint: {latest_uri}\n"
        f"  sample grids:      {grids}\n"
        f"  interpolation:     {interp}\n"
        f"sample it: python pipelines/sample.py --checkpoint {best_uri} --n 100 --grid grid.png"
    )
    if target is not None:
        print(f"MLflow run {name!r} in experiment {target.experiment!r} at {target.uri}")
    return 0


def train_in_process(cfg: Config, args: argparse.Namespace, name: str, target: TrackingTarget | None):
    from gan.trainer import LocalSession, Trainer

    out = f"{args.storage.rstrip('/')}/{name}"
    if not args.resume and fsspec.core.url_to_fs(out)[0].exists(f"{out}/checkpoints/latest"):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or --name for a new one")
    session = LocalSession(out, resume=args.resume, device="cuda" if args.gpu else "cpu")
    trainer = Trainer(cfg, session, tracker=MLflowTracker(target) if target else None)
    _announce(cfg, trainer)
    result = trainer.train()
    return session.best_uri, session.latest_uri, f"{out}/grids/", result.best_fid


def train_with_ray(cfg: Config, args: argparse.Namespace, name: str, target: TrackingTarget | None):

    from gan.distributed import check_resources, connect, local_scaling, make_trainer, run_exists, storage_for

    storage_path, filesystem = storage_for(args.storage, args.s3_endpoint)
    exists = run_exists(storage_path, filesystem, name)
    if exists and not args.resume:
        raise ValueError(
            f"{args.storage}/{name} already holds a run: pass --resume to continue it, or --name for a new one"
        )
    if args.resume and not exists:
        raise ValueError(f"nothing to resume: no run {name!r} under {args.storage}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: need at least 1")
    connect()
    scaling = local_scaling(args.workers, args.gpu, args.cpus_per_worker)
    check_resources(scaling)
    workers = f"{scaling.workers} worker(s) x {scaling.cpus_per_worker:g} CPU"
    print(f"Ray Train run {name!r}: {workers}, storage {args.storage}", flush=True)
    tracking = dataclasses.asdict(target) if target else None
    trainer = make_trainer(
        cfg, scaling, name=name, storage_path=storage_path, storage_filesystem=filesystem, tracking=tracking
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        if target:
            finish_run(target, "KILLED")
        raise
    except Exception as err:  # Ray wraps worker errors; surface the user's error line
        if target:  # a worker that died cannot close its own run
            finish_run(target, "FAILED")
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        raise
    best, metrics = min(result.best_checkpoints, key=lambda item: item[1]["fid"])
    scheme = "s3://" if args.storage.startswith("s3://") else ""
    return scheme + best.path, scheme + result.checkpoint.path, "grid.png in each checkpoint", metrics["best_fid"]


def _announce(cfg: Config, trainer) -> None:
    print(
        f"training {cfg.name}: {cfg.model.family} on {trainer.data.source} "
        f"({len(trainer.data)} images, fingerprint {trainer.data.fingerprint[:12]}); "
        f"evaluator sha256 {trainer.evaluator.sha256[:12]}; FID floor {trainer.evaluator.floor:.2f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
