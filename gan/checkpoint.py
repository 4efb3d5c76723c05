"""Full-state checkpoints over fsspec: everything needed to continue bit-for-bit.

A checkpoint is a directory holding ``state.pt`` (torch.save of tensors and plain
Python values only, so it loads with ``torch.load(weights_only=True)``) and
``meta.json`` (step, metrics, fingerprints: readable without torch). Writes go to a
temporary name first and are renamed into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import fsspec
import torch

from gan.config import Config

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible config."""


def write_dir(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write state.pt and meta.json into a local directory (Ray uploads it from there)."""
    os.makedirs(directory, exist_ok=True)
    torch.save(state, os.path.join(directory, STATE_FILE))
    with open(os.path.join(directory, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def save(uri: str, state: dict[str, Any], meta: dict[str, Any], storage_options: dict | None = None) -> None:
    """Write a checkpoint directory at ``uri`` (local or any fsspec URI), atomically per file."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for name, payload in ((STATE_FILE, buffer.getvalue()), (META_FILE, json.dumps(meta, indent=2).encode())):
        target = f"{root.rstrip('/')}/{name}"
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, payload)
        fs.mv(tmp, target)


def load(uri: str, storage_options: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) from a checkpoint directory or a state.pt file at ``uri``."""
    try:
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        state_path = root if root.endswith(".pt") else f"{root.rstrip('/')}/{STATE_FILE}"
        if not fs.exists(state_path):
            raise CheckpointError(f"{uri}: no checkpoint here (expected {STATE_FILE})")
        raw = fs.cat_file(state_path)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{uri}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    try:
        state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as err:
        raise CheckpointError(f"{uri}: corrupt or unsafe checkpoint ({type(err).__name__}: {err})") from None
    meta_path = state_path.rsplit("/", 1)[0] + "/" + META_FILE
    meta = json.loads(fs.cat_file(meta_path)) if fs.exists(meta_path) else {}
    return state, meta


def config_of(state: dict[str, Any]) -> Config:
    return Config.from_json(state["config"])


def check_compatible(state: dict[str, Any], cfg: Config, uri: str = "checkpoint") -> None:
    """Resuming needs the same architecture and image shape; say which field differs."""
    saved, current = config_of(state).flat(), cfg.flat()
    mismatches = [
        f"{key}: checkpoint has {value!r}, config has {current[key]!r}"
        for key, value in saved.items()
        if key.startswith(("model.", "data.resolution", "data.channels")) and current[key] != value
    ]
    if mismatches:
        raise CheckpointError(f"{uri} is from an incompatible config: " + "; ".join(mismatches))
