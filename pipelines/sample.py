"""Sample a trained generator: .npz of images (and labels), a PNG grid, an interpolation.

    python pipelines/sample.py --checkpoint runs/train-dcgan-1a2b3c4d --n 2500 \
        --out samples.npz --grid grid.png --interp interp.png          # a run folder: its best checkpoint
    python pipelines/sample.py --checkpoint s3://bucket/run/checkpoint_step00001250 --class 7 --n 64 --grid sevens.png
    python pipelines/sample.py --model models:/gan-generator@champion --n 64 --seed 3 --out s.npz --grid s.png
"""

from __future__ import annotations

import argparse
import sys

import fsspec

from gan.cli import fail
from gan.core.sampling import (
    check_request,
    class_grid,
    generator_from_state,
    interpolation,
    npz_bytes,
    png_bytes,
    sample,
)
from gan.preflight import preflight
from gan.registry.tracking import TrackingError, check_reachable, resolve_uri
from gan.runs import checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint", help="run folder (its best checkpoint), checkpoint folder or state.pt; path or URI"
    )
    source.add_argument("--model", help="MLflow model URI: models:/NAME@champion, models:/NAME/3, runs:/ID/generator")
    parser.add_argument("--tracking-uri", help="for --model (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    parser.add_argument("--n", type=int, default=100, help="number of images for --out (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    parser.add_argument("--class", dest="label", type=int, help="only this class (conditional models)")
    parser.add_argument("--truncation", type=float, help="redraw latent entries beyond this |value|")
    parser.add_argument("--out", help="write images (uint8) and labels to this .npz")
    parser.add_argument("--grid", help="write a PNG grid (one row per class for conditional models)")
    parser.add_argument("--interp", help="write a PNG of latent interpolations")
    args = parser.parse_args(argv)
    if not (args.out or args.grid or args.interp):
        return fail("nothing to write: give --out, --grid and/or --interp")
    if args.n < 1:
        return fail(f"--n {args.n}: must be at least 1")
    try:
        check_request(args.seed, args.truncation)
        preflight(outputs=(("--out", args.out), ("--grid", args.grid), ("--interp", args.interp)))
    except ValueError as err:
        return fail(str(err))

    try:
        G = load(args)
        outputs = {}
        if args.out:
            images, labels = sample(G, args.n, seed=args.seed, labels=args.label, truncation=args.truncation)
            outputs[args.out] = npz_bytes(images, labels)
        if args.grid:
            if args.label is None:
                images, columns = class_grid(G, per_class=10, seed=args.seed)
            else:
                images, _ = sample(G, 100, seed=args.seed, labels=args.label, truncation=args.truncation)
                columns = 10
            outputs[args.grid] = png_bytes(images, columns)
        if args.interp:
            outputs[args.interp] = png_bytes(*interpolation(G, seed=args.seed))
    except (checkpoint.CheckpointError, TrackingError, ValueError) as err:
        return fail(str(err))
    for path, payload in outputs.items():
        with fsspec.open(path, "wb") as handle:
            handle.write(payload)
        print(f"wrote {path}")
    return 0


def load(args: argparse.Namespace):
    """The EMA generator from a training checkpoint or a logged/registered model."""
    if args.checkpoint:
        state, _ = checkpoint.load(args.checkpoint)
        return generator_from_state(state)[0]
    from gan.registry.models import load_generator

    uri = resolve_uri(args.tracking_uri)
    check_reachable(uri)
    return load_generator(args.model, uri)[0]


if __name__ == "__main__":
    sys.exit(main())
