"""The feature network a run is scored with: found, read, checked against its sha256, and
tried on the data's images before any training starts.

'digits' is the committed digit classifier; 'classifier' the evaluator built for a
labelled dataset (beside it, or at eval.backbone_uri); 'torchscript' and 'onnx' the user's
network at eval.backbone_uri. Every loader returns the sha256 of the file it read, which
every result records. Errors the user can act on are ConfigErrors of one line.
"""

from __future__ import annotations

import hashlib
import io

import fsspec
import torch
import torch.nn as nn
from fsspec.registry import known_implementations

from gan.core.config import USER_BACKBONES, ConfigError, DataConfig, EvalConfig
from gan.data.datasets import prepared_manifest
from gan.evaluation.evaluator_file import (
    EvaluatorInfo,
    beside_dataset,
    digit_classifier_from,
    digits_evaluator_path,
    domain_classifier_from,
)
from gan.evaluation.features import (
    ClassifierFeatures,
    DigitClassifier,
    DomainClassifier,
    OnnxFeatures,
    ScriptedFeatures,
)


def load_digit_classifier() -> tuple[DigitClassifier, str]:
    """The committed digit classifier and the sha256 of its file."""
    raw = digits_evaluator_path().read_bytes()
    return digit_classifier_from(raw), hashlib.sha256(raw).hexdigest()


def evaluator_uri(eval_cfg: EvalConfig, data_uri: str) -> str:
    """Where a backbone other than 'digits' is read: eval.backbone_uri, else (a classifier)
    the evaluator.pt beside the prepared dataset."""
    return eval_cfg.backbone_uri or beside_dataset(data_uri)


def backbone_file(cfg: EvalConfig, data_uri: str, data_options: dict | None) -> tuple[str, dict]:
    """(where the backbone is read, the storage options to read it with): the data's, for a
    file on the same kind of filesystem only (s3 and s3a are one), since another would take
    an endpoint or credentials meant for the data's."""
    uri = evaluator_uri(cfg, data_uri)
    return uri, dict(data_options or {}) if _filesystem(uri) == _filesystem(data_uri) else {}


def _filesystem(uri: str) -> str:
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    return known_implementations.get(protocol, {}).get("class", protocol)


def read_checked(uri: str, label: str, storage_options: dict, expected_sha256: str, missing: str) -> tuple[bytes, str]:
    """(the file's bytes, their sha256), refused in one line that starts with ``label`` when
    the file is missing (``missing`` says what should be there), unreadable or not the one
    the sha256 names."""
    try:
        with fsspec.open(uri, "rb", **storage_options) as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file ({missing})") from None
    except Exception as err:  # each filesystem raises its own types; the message says which
        raise ConfigError(f"{label}: cannot read it ({one_line(err)})") from None
    sha = hashlib.sha256(raw).hexdigest()
    if expected_sha256 and sha != expected_sha256:
        raise ConfigError(f"{uri}: its sha256 is {sha}, not eval.backbone_sha256={expected_sha256}")
    return raw, sha


def read_domain_evaluator(
    uri: str, storage_options: dict | None = None, expected_sha256: str = ""
) -> tuple[DomainClassifier, EvaluatorInfo, str]:
    """(classifier, what its file says of it, sha256 of the file) from a file
    build_evaluator.py wrote; ``storage_options`` for the file's own filesystem."""
    missing = "an evaluator: pipelines/build_evaluator.py --data DATA"
    raw, sha = read_checked(uri, uri, storage_options or {}, expected_sha256, missing)
    try:
        model, info = domain_classifier_from(raw)
    except Exception as err:  # torch.load and a wrong state dict raise many types; the message says which
        raise ConfigError(f"{uri}: not a readable evaluator ({one_line(err)})") from None
    return model, info, sha


def load_backbone(
    cfg: EvalConfig, data_uri: str = "", storage_options: dict | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str]:
    """(feature module taking uint8 NCHW on ``device``, sha256 of its weights);
    ``storage_options`` are the data's."""
    if cfg.backbone == "digits":
        model, sha = load_digit_classifier()
        return ClassifierFeatures(model).to(device), sha
    uri, options = backbone_file(cfg, data_uri, storage_options)
    if cfg.backbone == "classifier":
        model, _, sha = read_domain_evaluator(uri, options, cfg.backbone_sha256)
        return ClassifierFeatures(model).to(device), sha
    # The entry points checked the file before starting (promote.py does not); a missing file fails this read.
    return read_user_network(cfg, options, device)


def read_user_network(
    cfg: EvalConfig, storage_options: dict | None = None, device: torch.device | str = "cpu"
) -> tuple[nn.Module, str]:
    """(the user's TorchScript or ONNX feature network on ``device``, sha256 of its file);
    ``storage_options`` for the file's own filesystem."""
    kind = "a TorchScript module" if cfg.backbone == "torchscript" else "an ONNX network"
    if cfg.backbone == "onnx":
        try:
            import onnxruntime  # noqa: F401  (optional: only this backbone needs it)
        except ImportError:
            raise ConfigError("eval.backbone=onnx runs the network with onnxruntime: pip install 'gan[onnx]'") from None
    label = f"eval.backbone_uri={cfg.backbone_uri}"
    raw, sha = read_checked(cfg.backbone_uri, label, storage_options or {}, cfg.backbone_sha256, kind)
    try:
        if cfg.backbone == "onnx":
            return OnnxFeatures(raw, device), sha
        return ScriptedFeatures(torch.jit.load(io.BytesIO(raw), map_location=device).eval()), sha
    except Exception as err:  # TorchScript and onnxruntime raise many types; the message says which
        raise ConfigError(f"{label}: cannot be loaded as {kind} ({one_line(err)})") from None


def check_domain_evaluator(cfg: EvalConfig, data: DataConfig) -> None:
    """The evaluator build_evaluator.py wrote loads and takes the data's images; the one
    beside a prepared dataset was built on what that dataset holds now (a dataset prepared
    again over an old one would otherwise be scored by the old one's features)."""
    manifest = None  # only the evaluator beside the data is tied to it; a named one is the user's choice
    if not cfg.backbone_uri:
        manifest = None if data.uri.startswith("embedded:") else prepared_manifest(data.uri, data.fsspec_options())
        if manifest is None:
            raise ConfigError(
                f"eval.backbone=classifier reads the evaluator beside a prepared dataset, and {data.uri} is not one: "
                "prepare it (pipelines/prepare_data.py, then build_evaluator.py --data) or set eval.backbone_uri"
            )
    uri, options = backbone_file(cfg, data.uri, data.fsspec_options())
    _, info, _ = read_domain_evaluator(uri, options, cfg.backbone_sha256)
    shape, wanted = (info.channels, info.resolution), (data.channels, data.resolution)
    if shape != wanted:
        raise ConfigError(
            f"{uri} scores {shape[0]}-channel images at {shape[1]} px, and the data is {wanted[0]}-channel at "
            f"{wanted[1]} px: build an evaluator for it (python pipelines/build_evaluator.py --data {data.uri})"
        )
    if manifest is not None and info.dataset_fingerprint != manifest["sha256"]:
        raise ConfigError(
            f"{uri} was built on other data than {data.uri} holds now (prepared again since?): rebuild it with "
            f"python pipelines/build_evaluator.py --data {data.uri} --overwrite, or name it in eval.backbone_uri "
            "to keep scoring with it"
        )


def check_backbone(cfg: EvalConfig, data: DataConfig | None = None) -> None:
    """The feature network must be there, and fit the data, before any training starts."""
    if data is not None and cfg.backbone == "digits" and data.channels == 3:
        raise ConfigError(
            "eval.backbone=digits scores grayscale digits, not RGB images: build an evaluator for this data "
            f"(python pipelines/build_evaluator.py --data {data.uri}) and --set eval.backbone=classifier, "
            "or give your own feature network (eval.backbone=torchscript or onnx)"
        )
    if data is not None and cfg.backbone == "classifier":
        check_domain_evaluator(cfg, data)
        return
    if cfg.backbone not in USER_BACKBONES:
        return
    if "://" in cfg.backbone_uri and not cfg.backbone_uri.startswith("file://") and not cfg.backbone_sha256:
        raise ConfigError(
            f"eval.backbone_uri={cfg.backbone_uri}: a network fetched from a URI is checked against the sha256 "
            "you expect: --set eval.backbone_sha256=<sha256sum of the file>"
        )
    options = None if data is None else backbone_file(cfg, data.uri, data.fsspec_options())[1]
    network, _ = read_user_network(cfg, options)
    if data is None:
        return
    try:  # one blank image of the data's shape: a network that cannot take it fails here, not mid-run
        with torch.no_grad():
            network(torch.zeros(1, data.channels, data.resolution, data.resolution, dtype=torch.uint8))
    except Exception as err:  # TorchScript and onnxruntime raise many types; the message says which
        raise ConfigError(
            f"eval.backbone_uri={cfg.backbone_uri}: cannot take {data.channels}x{data.resolution}x{data.resolution} "
            f"images in [0, 1] ({one_line(err)})"
        ) from None


def one_line(err: Exception) -> str:
    """'Type: message' on one line. TorchScript's last line is that, after a trace of the
    scripted code; other messages' lines are all the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Traceback of TorchScript" in str(err):
        return lines[-1]
    text = " ".join(lines)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
