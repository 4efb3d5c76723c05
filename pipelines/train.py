"""Train a GAN on the embedded digits (or any dataset URI) and keep the best checkpoint.

    python pipelines/train.py                          # default preset, embedded digits
    python pipelines/train.py --time-budget-s 300      # stop after 5 minutes of training
    python pipelines/train.py --preset mlp --set optim.lr_g=1e-4 --dry-run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from gan import checkpoint
from gan.cli import add_config_args, fail, parse_config
from gan.config import override
from gan.data import DataError
from gan.loop import DivergenceError
from gan.sampling import generator_from_state, interpolation, png_bytes
from gan.trainer import LocalSession, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--time-budget-s", type=float, help="stop after this many seconds of training")
    parser.add_argument("--steps", type=int, help="stop after this many G steps (sets train.total_kimg)")
    parser.add_argument("--out", default="runs/train", help="output folder or URI (default runs/train)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")

    def budget(args: argparse.Namespace) -> list[str]:
        return [] if args.time_budget_s is None else [f"train.time_budget_s={args.time_budget_s}"]

    args, cfg = parse_config(parser, argv, budget)
    if args.steps is not None:
        cfg = override(cfg, [f"train.total_kimg={args.steps * cfg.train.batch_size * cfg.optim.d_steps / 1000}"])
    session = LocalSession(args.out, resume=args.resume)
    start = time.monotonic()
    try:
        trainer = Trainer(cfg, session)
        print(
            f"training {cfg.name}: {cfg.model.family} on {trainer.data.source} "
            f"({len(trainer.data)} images, fingerprint {trainer.data.fingerprint[:12]}); "
            f"evaluator sha256 {trainer.evaluator.sha256[:12]}; FID floor {trainer.evaluator.floor:.2f}",
            flush=True,
        )
        result = trainer.train()
    except (DataError, checkpoint.CheckpointError, DivergenceError, ValueError) as err:
        return fail(str(err))
    state, _ = checkpoint.load(session.best_uri)
    G, _ = generator_from_state(state)
    images, columns = interpolation(G)
    with open(os.path.join(args.out, "interpolation.png"), "wb") as handle:
        handle.write(png_bytes(images, columns))
    print(
        f"\ndone: {result.step} steps, {result.images_seen / 1000:.1f} kimg in {time.monotonic() - start:.0f}s; "
        f"best FID {result.best_fid:.2f} (floor {trainer.evaluator.floor:.2f})\n"
        f"  best checkpoint:   {session.best_uri}\n"
        f"  latest checkpoint: {session.latest_uri}\n"
        f"  sample grids:      {args.out}/grids/\n"
        f"  interpolation:     {args.out}/interpolation.png\n"
        f"sample it: python pipelines/sample.py --checkpoint {session.best_uri} --n 100 --grid grid.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
