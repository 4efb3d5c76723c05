"""Building an evaluator: a small classifier trained on a labelled dataset's images, whose
features FID, precision/recall and class accuracy are then measured in.

Deterministic (fixed seeds, one thread, deterministic kernels): the same data, machine and
torch version give the same weights, byte for byte, so the sha256 every result records
can be checked. With no dataset it rebuilds the committed digit classifier.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from gan.core.augment import translate
from gan.core.config import DataConfig
from gan.data.datasets import Dataset, load_dataset, prepared_manifest
from gan.evaluation.evaluator_file import (
    EvaluatorInfo,
    beside_dataset,
    check_writable,
    digits_evaluator_path,
    evaluator_bytes,
    write,
)
from gan.evaluation.features import DigitClassifier, DomainClassifier

SEED, BATCH, LR = 0, 64, 1e-3
EPOCHS = 12
DIGIT_HELD_OUT = 500  # the committed digit classifier's split
HELD_OUT_SHARE = 0.1
SHIFT = 0.08  # largest translation, as a share of the side, applied to training images


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """What to build an evaluator on and where to write it."""

    data: str = ""
    """A labelled prepared dataset (path or URI); empty: the digits, for gan/assets."""
    out: str = ""
    """Where to write the file; empty: gan/assets for the digits, beside the dataset otherwise."""
    epochs: int = EPOCHS
    """Passes over the training images."""
    overwrite: bool = False
    """Replace a file already at ``out`` (the committed digit classifier is always rebuilt in place)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for the dataset and the file (an S3 endpoint, say)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, not {self.epochs}")


@dataclass(frozen=True)
class BuiltEvaluator:
    """Where the evaluator was written, the sha256 runs scored with it will record, its
    size and its accuracy on the held-out images."""

    out: str
    sha256: str
    size_bytes: int
    held_out_accuracy: float


class EvaluatorBuild:
    """Opens the data and checks the destination on construction (seconds), so a bad
    dataset or a file it would replace unasked fails before ``run`` trains (minutes)."""

    def __init__(self, cfg: BuildConfig, log: Callable[[str], None] = print) -> None:
        self.cfg, self.log = cfg, log
        self.new_model: Callable[[], nn.Module]
        if cfg.data:
            manifest = labelled_manifest(cfg.data, cfg.storage_options)
            self.out = cfg.out or beside_dataset(cfg.data)
            check_writable(self.out, cfg.storage_options, cfg.overwrite)
            channels, resolution, _ = manifest["shape"]
            options = json.dumps(cfg.storage_options)
            self.data = load_dataset(
                DataConfig(uri=cfg.data, resolution=resolution, channels=channels, storage_options=options)
            )
            self.new_model = partial(DomainClassifier, channels, resolution, len(manifest["class_names"]))
            self.held_out = max(1, round(HELD_OUT_SHARE * len(self.data)))
        else:
            self.out = cfg.out or str(digits_evaluator_path())
            check_writable(
                self.out, cfg.storage_options, cfg.overwrite
            )  # the committed file too: every digits FID uses it
            self.data, self.new_model, self.held_out = load_dataset(DataConfig()), DigitClassifier, DIGIT_HELD_OUT

    def run(self) -> BuiltEvaluator:
        """Train the classifier, write it, and say where, what sha256 and how accurate."""
        with deterministic():
            model = self.new_model()
            accuracy = train(model, self.data, self.held_out, self.cfg.epochs, self.log)
        info = None
        if isinstance(model, DomainClassifier):
            info = EvaluatorInfo(
                channels=model.channels,
                resolution=model.resolution,
                num_classes=model.num_classes,
                class_names=list(self.data.class_names),
                dataset=self.cfg.data,
                dataset_fingerprint=self.data.fingerprint,
                held_out_accuracy=accuracy,
                held_out_images=self.held_out,
                epochs=self.cfg.epochs,
            )
        raw = evaluator_bytes(model, info)
        write(self.out, raw, self.cfg.storage_options)
        return BuiltEvaluator(self.out, hashlib.sha256(raw).hexdigest(), len(raw), accuracy)


@contextmanager
def deterministic() -> Iterator[None]:
    """One thread, deterministic kernels and the global RNG seeded (the network's initial
    weights come from it); the caller's settings and RNG state come back afterwards."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def labelled_manifest(uri: str, storage_options: dict) -> dict:
    """The manifest of the prepared dataset at ``uri``, refused in one line unless the
    dataset has labels to learn."""
    manifest = prepared_manifest(uri, storage_options)
    if manifest is None:
        raise ValueError(f"{uri}: not a prepared dataset (make one with pipelines/prepare_data.py)")
    if not manifest.get("class_names"):
        raise ValueError(
            f"{uri}: the dataset has no labels to learn features from: prepare it with labels (one sub-folder "
            "per class, or --labels), or give your own network (--set eval.backbone=torchscript or onnx)"
        )
    return manifest


def train(model: nn.Module, data: Dataset, held_out: int, epochs: int, log: Callable[[str], None] = print) -> float:
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
                data.rows(idx).float(), lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=g), SHIFT
            )
            loss = F.cross_entropy(model(shifted.round().to(torch.uint8)), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = accuracy(model, data.rows(val_idx), data.labels[val_idx])
        log(
            f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  held-out accuracy {acc:.3%}  {time.time() - start:.0f}s"
        )
    return acc


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()
