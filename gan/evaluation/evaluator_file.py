"""What an evaluator file holds, written and read in this one place.

Two kinds, both ``torch.save`` files that load with ``weights_only=True``:

- the digit classifier (gan/assets/digits_evaluator.pt): its bare state dict;
- a classifier built for a labelled dataset (evaluator.pt beside the prepared dataset, or
  wherever the build was told): ``{"format": FORMAT, "meta": EvaluatorInfo as a dict,
  "state_dict": ...}``, so the file alone says how to rebuild the network and what data
  it learnt from.

The bytes are the identity runs record (their sha256): writing the same weights and
information gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from gan.data.datasets import MANIFEST
from gan.data.storage import write_whole
from gan.evaluation.features import DigitClassifier, DomainClassifier

DIGITS_EVALUATOR_FILE = "digits_evaluator.pt"
DOMAIN_EVALUATOR_FILE = "evaluator.pt"  # beside a prepared dataset's manifest
FORMAT = "gan-evaluator/1"


@dataclass(frozen=True, kw_only=True)
class EvaluatorInfo:
    """What a dataset's evaluator file says about its network and how it was built. The
    field order is the order written: changing it changes every file's bytes."""

    channels: int
    """Image channels the network takes (1 or 3)."""
    resolution: int
    """Image side, in pixels, the network takes."""
    num_classes: int
    """Classes it tells apart: the dataset's labels."""
    class_names: list[str]
    """The dataset's class names, in label order."""
    dataset: str
    """The prepared dataset it was trained on, as the build was given it (path or URI)."""
    dataset_fingerprint: str
    """That dataset's manifest sha256 at build time: a dataset prepared again since is
    other data."""
    held_out_accuracy: float
    """Accuracy on the images held out of training."""
    held_out_images: int
    """How many images were held out."""
    epochs: int
    """Passes over the training images."""


def digits_evaluator_path() -> Path:
    """The committed digit classifier."""
    return Path(__file__).parents[1] / "assets" / DIGITS_EVALUATOR_FILE


def beside_dataset(data_uri: str) -> str:
    """Where a dataset's evaluator is written and found by default: beside its manifest."""
    return f"{data_uri.removesuffix(MANIFEST).rstrip('/')}/{DOMAIN_EVALUATOR_FILE}"


def evaluator_bytes(model: DigitClassifier | DomainClassifier, info: EvaluatorInfo | None = None) -> bytes:
    """The file's bytes: a digit classifier's bare state dict, or a dataset classifier's
    weights with ``info``."""
    if isinstance(model, DomainClassifier):
        if info is None:
            raise ValueError("a dataset's evaluator is written with its EvaluatorInfo")
        payload = {"format": FORMAT, "meta": dataclasses.asdict(info), "state_dict": model.state_dict()}
    else:
        payload = model.state_dict()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def digit_classifier_from(raw: bytes) -> DigitClassifier:
    """The digit classifier in the committed file's bytes, in eval mode and frozen."""
    model = DigitClassifier()
    model.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    return model.eval().requires_grad_(False)


def domain_classifier_from(raw: bytes) -> tuple[DomainClassifier, EvaluatorInfo]:
    """(the classifier, in eval mode and frozen, and what the file says of it) from a dataset
    evaluator's bytes; raises whatever torch.load or a mismatched file raises."""
    saved = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError("not written by pipelines/build_evaluator.py")
    info = EvaluatorInfo(**saved["meta"])
    model = DomainClassifier(info.channels, info.resolution, info.num_classes)
    model.load_state_dict(saved["state_dict"])
    return model.eval().requires_grad_(False), info


def check_writable(out: str, storage_options: dict, overwrite: bool) -> None:
    """Before minutes of training: the file can be written, and replaces nothing unasked."""
    fs, path = fsspec.core.url_to_fs(out, **storage_options)
    if fs.exists(path) and not overwrite:
        raise ValueError(f"{out} exists; runs scored with it record its sha256: pass --overwrite to replace it")
    parent = posixpath.dirname(path)
    if "://" not in out and not fs.isdir(parent):  # object stores have no folders to make first
        raise ValueError(f"{out}: no folder {parent} to write it in")


def write(out: str, raw: bytes, storage_options: dict) -> None:
    """Store the file's bytes at ``out`` whole or not at all: a full disk during a rebuild
    leaves the evaluator that was there."""
    try:
        write_whole(out, raw, storage_options)
    except Exception as err:  # fsspec backends raise many types; the message says which
        raise ValueError(f"{out}: cannot write it ({type(err).__name__}: {err})") from None
