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
import hashlib
import sys
import time

from gan.cli import add_config_args, add_run_args, fail, parse_config
from gan.core.config import Config, ConfigError
from gan.core.redact import redact_uri
from gan.core.sampling import generator_from_state, interpolation, png_bytes
from gan.data.storage import Storage
from gan.errors import USER_ERRORS
from gan.preflight import preflight
from gan.registry.tracking import (
    MLflowTracker,
    TrackingTarget,
    prepare_experiment,
    resolve_uri,
    source_tags,
    ui_link,
)
from gan.runs import checkpoint


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
    parser.add_argument("--in-process", action="store_true", help="train in this process, without Ray")
    add_run_args(parser, "run", experiment="gan")
    args, cfg = parse_config(parser, argv, budget_overrides)
    name = args.name or run_name(cfg)
    start = time.monotonic()
    try:
        storage = Storage.parse(args.storage, args.s3_endpoint, args.shared_storage)
        # A resumed run's checkpoint is checked before its MLflow run is reopened or Ray starts.
        resume_from = preflight(
            cfg, workers=None if args.in_process else args.workers, names=() if args.no_tracking else (name,),
            storage=storage, claim=name, resume=args.resume,
        )  # fmt: skip
        source = source_tags("pipelines/train.py")
        target = (
            None
            if args.no_tracking
            else TrackingTarget(
                resolve_uri(args.tracking_uri), args.experiment, name, source=source, location=storage.join(name)
            )  # fmt: skip
        )
        if target is not None:
            prepare_experiment(target)
        if args.in_process:
            best_fid = train_in_process(cfg, storage, name, target, args.resume, args.gpu)
        else:
            from gan.runs.ray_train import train_on_ray

            best_fid = train_on_ray(
                cfg, storage, name, target, args.workers, args.gpu, args.cpus_per_worker, resume_from
            )
        found = checkpoint.find(storage.join(name), storage.options)
        state, best = checkpoint.load_best(storage.join(name), storage.options)
    except USER_ERRORS as err:
        return fail(str(err))
    G, _ = generator_from_state(state)
    interp = f"{best}/interpolation.png"
    storage.write(interp, png_bytes(*interpolation(G)))
    print(
        f"\ndone in {time.monotonic() - start:.0f}s: best FID {best_fid:.2f}\n"
        f"  best checkpoint:   {best}\n"
        f"  latest checkpoint: {found.latest}\n"
        f"  sample grids:      {checkpoint.GRID_FILE} in each checkpoint\n"
        f"  interpolation:     {interp}\n"
        f"sample it: python pipelines/sample.py --checkpoint {best} --n 100 --grid grid.png"
    )
    if target is not None:
        print(
            f"MLflow run {name!r} in experiment {target.experiment!r} at {redact_uri(target.uri)}\n"
            f"  review: {redact_uri(ui_link(target, find_run=True))}"
        )
    return 0


def budget_overrides(args: argparse.Namespace, cfg: Config) -> list[str]:
    """--time-budget-s and --steps (a step shows D batch x d_steps real images) as overrides."""
    sets = [] if args.time_budget_s is None else [f"train.time_budget_s={args.time_budget_s}"]
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps}: must be at least 1")
        sets.append(f"train.total_kimg={args.steps * cfg.train.batch_size * cfg.optim.d_steps / 1000}")
    return sets


def train_in_process(
    cfg: Config, storage: Storage, name: str, target: TrackingTarget | None, resume: bool, gpu: bool
) -> float:
    from gan.data.datasets import MappedDataset
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    session = LocalSession(
        storage.join(name), resume=resume, device="cuda" if gpu else "cpu", storage_options=storage.options
    )
    trainer = Trainer(cfg, session, tracker=MLflowTracker(target, system_metrics=True) if target else None)
    streamed = ", streamed from its shards" if isinstance(trainer.data, MappedDataset) else ""
    print(
        f"training {cfg.name}: {cfg.model.family} on {trainer.data.source} "
        f"({len(trainer.data)} images{streamed}, fingerprint {trainer.data.fingerprint[:12]}); "
        f"evaluator sha256 {trainer.evaluator.sha256[:12]}; FID floor {trainer.evaluator.floor:.2f}",
        flush=True,
    )
    return trainer.train().best_fid


if __name__ == "__main__":
    sys.exit(main())
