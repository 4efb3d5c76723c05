"""Build the feature network FID, precision/recall and class accuracy are measured with.

Deterministic (fixed seeds, one thread, deterministic kernels): the same data gives the
same weights, byte for byte, so the sha256 every result records can be checked.

    python pipelines/build_evaluator.py                          # the digit classifier in gan/assets
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
import hashlib
import io
import json
import os
import posixpath
import sys
import time

import fsspec
import torch
import torch.nn as nn
import torch.nn.functional as F

from gan.cli import fail
from gan.core.augment import translate
from gan.core.config import DataConfig, EvalConfig
from gan.data.datasets import DataError, Dataset, load_dataset, prepared_manifest
from gan.data.storage import s3_options
from gan.evaluation.metrics import (
    DOMAIN_EVALUATOR_FORMAT,
    DigitClassifier,
    DomainClassifier,
    evaluator_path,
    evaluator_uri,
)

SEED, BATCH, LR, EPOCHS = 0, 64, 1e-3, 12
DIGIT_HELD_OUT = 500  # the committed digit classifier's split
HELD_OUT_SHARE = 0.1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="a labelled prepared dataset (path or URI); default: the digits")
    parser.add_argument("--out", default="", help="where to write it (default gan/assets, or beside --data)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"passes over the data (default {EPOCHS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an evaluator already at --out")
    parser.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                        help="S3 API endpoint URL for s3:// URIs (default $AWS_ENDPOINT_URL or AWS)")  # fmt: skip
    args = parser.parse_args(argv)
    options = s3_options(args.s3_endpoint)
    if args.epochs < 1:
        return fail(f"--epochs must be >= 1, not {args.epochs}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)  # before the network is made: its initial weights come from it
    try:
        if args.data:
            data, model, out = open_domain(args.data, args.out, options, args.overwrite)
            held_out = max(1, round(HELD_OUT_SHARE * len(data)))
        else:
            data, model, out = load_dataset(DataConfig()), DigitClassifier(), args.out or str(evaluator_path())
            held_out = DIGIT_HELD_OUT
            check_writable(out, options, overwrite=True)  # the committed file is rebuilt in place
    except (DataError, ValueError) as err:
        return fail(str(err))

    accuracy = train(model, data, held_out, args.epochs)
    if isinstance(model, DomainClassifier):
        meta = {"channels": model.channels, "resolution": model.resolution, "num_classes": model.num_classes,
                "class_names": list(data.class_names), "dataset": args.data, "dataset_fingerprint": data.fingerprint,
                "held_out_accuracy": accuracy, "held_out_images": held_out, "epochs": args.epochs}  # fmt: skip
        payload = {"format": DOMAIN_EVALUATOR_FORMAT, "meta": meta, "state_dict": model.state_dict()}
    else:
        payload = model.state_dict()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    raw = buffer.getvalue()
    try:
        with fsspec.open(out, "wb", **options) as handle:  # one write: a local file or one object PUT
            handle.write(raw)
    except Exception as err:  # fsspec backends raise many types; the message says which
        return fail(f"{out}: cannot write it ({type(err).__name__}: {err})")
    sha = hashlib.sha256(raw).hexdigest()
    print(f"wrote {out} ({len(raw) / 1024:.0f} KiB): held-out accuracy {accuracy:.3%}, sha256 {sha}")
    return 0


def open_domain(uri: str, out: str, options: dict, overwrite: bool) -> tuple[Dataset, DomainClassifier, str]:
    """(the dataset, an untrained classifier for it, where to write it), or a one-line error."""
    manifest = prepared_manifest(uri, options)
    if manifest is None:
        raise ValueError(f"{uri}: not a prepared dataset (make one with pipelines/prepare_data.py)")
    if not manifest.get("class_names"):
        raise ValueError(
            f"{uri}: the dataset has no labels to learn features from: prepare it with labels (one sub-folder "
            "per class, or --labels), or give your own network (--set eval.backbone=torchscript or onnx)"
        )
    out = out or evaluator_uri(EvalConfig(backbone="classifier"), uri)
    check_writable(out, options, overwrite)
    channels, resolution, _ = manifest["shape"]
    data = load_dataset(
        DataConfig(uri=uri, resolution=resolution, channels=channels, storage_options=json.dumps(options))
    )
    return data, DomainClassifier(channels, resolution, len(manifest["class_names"])), out


def check_writable(out: str, options: dict, overwrite: bool) -> None:
    """Before minutes of training: the file can be written, and replaces nothing unasked."""
    fs, path = fsspec.core.url_to_fs(out, **options)
    if fs.exists(path) and not overwrite:
        raise ValueError(f"{out} exists; runs scored with it record its sha256: pass --overwrite to replace it")
    parent = posixpath.dirname(path)
    if "://" not in out and not fs.isdir(parent):  # object stores have no folders to make first
        raise ValueError(f"{out}: no folder {parent} to write it in")


def train(model: nn.Module, data: Dataset, held_out: int, epochs: int) -> float:
    """Train on all but ``held_out`` images (a fixed random choice); their accuracy."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED))
    val_idx, train_idx = perm[:held_out], perm[held_out:]
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(SEED + 1)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            # Small shifts make the features robust to where a generator draws an object.
            shifted = translate(
                data.rows(idx).float(), lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g), 0.08
            )
            loss = F.cross_entropy(model(shifted.round().to(torch.uint8)), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, data.rows(val_idx), data.labels[val_idx])
        print(
            f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  held-out accuracy {acc:.3%}  {time.time() - start:.0f}s",
            flush=True,
        )
    return acc


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


if __name__ == "__main__":
    sys.exit(main())
