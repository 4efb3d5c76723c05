"""The checks every entry point makes before anything expensive starts (data loaded, Ray
started, an MLflow run opened, a model scored): one function, one order, so train, tune,
sample and promote refuse the same bad input with the same line."""

from __future__ import annotations

import os
from collections.abc import Iterable

from gan.core.config import Config, ConfigError, check_split
from gan.data.datasets import check_classes_before_loading
from gan.data.storage import Storage, check_uri_form
from gan.evaluation.backbone import check_backbone
from gan.registry.names import check_names
from gan.runs import checkpoint


def preflight(
    cfg: Config | None = None,
    *,
    workers: int | None = None,
    classes_vary: bool = False,
    names: Iterable[str | None] = (),
    outputs: Iterable[tuple[str, str | None]] = (),
    storage: Storage | None = None,
    claim: str | None = None,
    resume: bool = False,
    what: str = "run",
) -> str | None:
    """Raise a user error (one line) for the first problem found, in this order:

    - ``cfg``: its URIs are well formed; its batch splits over ``workers``; its evaluator
      exists, fits the data and is the one named by sha256; a conditional model's classes
      are the data's (unless ``classes_vary``: a sweep that searches them checks each trial);
    - ``names``: every run, sweep or model name is one MLflow can search for;
    - ``outputs``: (flag, path) pairs go into folders that exist and are writable;
    - ``claim``: ``storage`` can be used, and the run or sweep named so there is new (or
      exists, when ``resume``); a resumed run's latest checkpoint loads and fits ``cfg``.

    Returns the checkpoint a resumed run continues from (None otherwise)."""
    if cfg is not None:
        for field, uri in (("data.uri=", cfg.data.uri), ("data.labels_uri=", cfg.data.labels_uri),
                           ("eval.backbone_uri=", cfg.eval.backbone_uri)):  # fmt: skip
            if uri and not uri.startswith("embedded:"):
                check_uri_form(uri, field, ConfigError)
        if workers is not None:
            check_split(cfg, workers)
        check_backbone(cfg.eval, cfg.data)
        if not classes_vary:
            check_classes_before_loading(cfg.model.num_classes, cfg.data)
    check_names(*names)
    for flag, path in outputs:
        check_output_folder(flag, path)
    if storage is None or claim is None:
        return None
    storage.check()  # the bucket answers, or the folder is made: after every check that needs neither
    storage.claim(claim, resume, what)
    if resume and what == "run" and cfg is not None:
        return checkpoint.check_resume(storage.join(claim), cfg, storage.options)
    return None


def check_output_folder(flag: str, path: str | None) -> None:
    """An output goes into a folder that exists: a typo must not cost the work, nor make folders."""
    if not path or "://" in path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {path}: folder {folder} is not writable")
