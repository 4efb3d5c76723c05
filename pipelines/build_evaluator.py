"""Build the feature network FID, precision/recall and class accuracy are measured with.

Deterministic (fixed seeds, one thread, deterministic kernels): the same data gives the
same weights, byte for byte, so the sha256 every result records can be checked.

    python pipelines/build_evaluator.py --out digits.pt          # the digit classifier (--overwrite to replace gan/assets')
    python pipelines/build_evaluator.py --data prepared/emoji64  # any labelled prepared dataset

With --data it trains a classifier on that dataset's labels and writes it beside the dataset
(evaluator.pt), where every run on that data with eval.backbone=classifier (the RGB presets)
finds it. Its held-out accuracy and sha256 are printed and stored in the file.

Unlabelled data has no classes to learn features from: give a TorchScript or ONNX feature
network (an exported Inception-v3, say) with --set eval.backbone=torchscript (or onnx)
--set eval.backbone_uri=URI; its sha256 is recorded the same way.
"""

from __future__ import annotations

import argparse
import os
import sys

from gan.cli import fail
from gan.data.storage import s3_options
from gan.evaluation.build import EPOCHS, BuildConfig, EvaluatorBuild


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="a labelled prepared dataset (path or URI); default: the digits")
    parser.add_argument("--out", default="", help="where to write it (default gan/assets, or beside --data)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"passes over the data (default {EPOCHS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an evaluator already at --out")
    parser.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3 API endpoint URL for s3:// URIs (default $AWS_ENDPOINT_URL or AWS)")  # fmt: skip
    args = parser.parse_args(argv)
    try:  # DataErrors are ValueErrors: every one the user can act on is one line
        cfg = BuildConfig(data=args.data, out=args.out, epochs=args.epochs, overwrite=args.overwrite,
                          storage_options=s3_options(args.s3_endpoint))  # fmt: skip
        build = EvaluatorBuild(cfg, log=lambda line: print(line, flush=True))
        built = build.run()
    except ValueError as err:
        return fail(str(err))
    print(f"wrote {built.out} ({built.size_bytes / 1024:.0f} KiB): held-out accuracy "
          f"{built.held_out_accuracy:.3%}, sha256 {built.sha256}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
