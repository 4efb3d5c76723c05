"""Full-state checkpoints over fsspec: everything needed to continue bit-for-bit.

A checkpoint is a directory holding ``state.pt`` (torch.save of tensors and plain
Python values only, so it loads with ``torch.load(weights_only=True)``), ``meta.json``
(step, metrics, fingerprints: readable without torch) and ``grid.png`` (samples). Writes
go to a temporary name first and are renamed into place, so a reader never sees a
partial file.

One layout for a run's outputs, in-process or under Ray Train: the run folder holds
``checkpoint_step<N>/`` directories; ``find`` tells the latest from the best (by FID).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from gan.core.config import Config
from gan.data.storage import folder_mode

STATE_FILE = "state.pt"
META_FILE = "meta.json"
GRID_FILE = "grid.png"
DIR_PREFIX = "checkpoint_step"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A full disk, a quota, or a file-size limit: what a write that runs out of room raises."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from an incompatible config."""


def dir_name(step: int) -> str:
    return f"{DIR_PREFIX}{step:08d}"


def write_dir(directory: str, state: dict[str, Any], meta: dict[str, Any], grid_png: bytes = b"") -> None:
    """Write state.pt, meta.json and grid.png into a local directory (Ray uploads it from there)."""
    try:
        os.makedirs(directory, exist_ok=True)
        torch.save(state, os.path.join(directory, STATE_FILE))
        with open(os.path.join(directory, META_FILE), "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
        if grid_png:
            with open(os.path.join(directory, GRID_FILE), "wb") as handle:
                handle.write(grid_png)
    except OSError as err:
        raise not_written(directory, err) from None


def save(
    uri: str, state: dict[str, Any], meta: dict[str, Any], storage_options: dict | None = None, grid_png: bytes = b""
) -> None:
    """Write a checkpoint directory at ``uri`` (local or any fsspec URI) so that it is whole
    or absent: a local one is written as a hidden sibling folder and renamed into place;
    an object store has no rename, so each file goes to a temporary key and is moved, and
    meta.json comes last (a directory with meta.json holds a whole checkpoint). A failed
    write leaves no temporary file behind."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files = [(STATE_FILE, buffer.getvalue())] + ([(GRID_FILE, grid_png)] if grid_png else [])
    files.append((META_FILE, json.dumps(meta, indent=2).encode()))
    if isinstance(fs, LocalFileSystem):
        _save_local(root, files)
        return
    fs.makedirs(root, exist_ok=True)
    for name, payload in files:
        target = f"{root}/{name}"
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.pipe_file(tmp, payload)
            fs.mv(tmp, target)
        except BaseException:
            with contextlib.suppress(Exception):
                fs.rm(tmp)
            raise


def _save_local(root: str, files: list[tuple[str, bytes]]) -> None:
    parent, name = os.path.split(root)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    except OSError as err:
        raise not_written(root, err) from None
    try:
        for file_name, payload in files:
            with open(os.path.join(tmp, file_name), "wb") as handle:
                handle.write(payload)
        os.chmod(tmp, folder_mode())  # mkdtemp's 0700 would hide it from the run's other readers
        if os.path.isdir(root):  # the same step written again (a resumed run): replace it whole
            old = f"{tmp}.old"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise not_written(root, err) from None
        raise


def not_written(folder: str, err: OSError) -> CheckpointError:
    """One line for a checkpoint that could not be written: the ones before it are whole."""
    reason = f"disk full: {err.strerror}" if err.errno in DISK_FULL else err.strerror or str(err)
    return CheckpointError(
        f"cannot write checkpoint {folder} ({reason}); the checkpoints before it are kept, and once it can be "
        "written the same command with --resume continues from the last of them"
    )


def load(uri: str, storage_options: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) from a checkpoint directory, a state.pt file, or the best checkpoint
    of a run folder at ``uri``."""
    try:
        fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        state_path = root if root.endswith(".pt") else f"{root.rstrip('/')}/{STATE_FILE}"
        if not fs.exists(state_path):
            best = None if root.endswith(".pt") else find(uri, storage_options).best
            if best is None:
                raise CheckpointError(f"{uri}: no checkpoint here (expected {STATE_FILE} or {DIR_PREFIX}* folders)")
            return load(best, storage_options)
        raw = fs.cat_file(state_path)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{uri}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    try:
        state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as err:
        raise CheckpointError(f"{uri}: corrupt or unsafe checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), str):
        raise CheckpointError(f"{state_path}: not a checkpoint of this project (it holds no config)")
    try:
        config_of(state)
    except ValueError as err:
        raise CheckpointError(f"{state_path}: its config cannot be read ({err})") from None
    meta_path = state_path.rsplit("/", 1)[0] + "/" + META_FILE
    try:
        meta = json.loads(fs.cat_file(meta_path)) if fs.exists(meta_path) else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: corrupt {META_FILE} ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: corrupt {META_FILE} (not a JSON object)")
    step = state.get("loop", {}).get("step") if isinstance(state.get("loop"), dict) else None
    if "step" in meta and step is not None and meta["step"] != step:
        raise CheckpointError(f"{meta_path} says step {meta['step']} but {STATE_FILE} holds step {step}")
    return state, meta


def load_latest(
    run_uri: str, storage_options: dict | None = None, say=print
) -> tuple[dict[str, Any], str] | tuple[None, None]:
    """(state, uri) of the newest checkpoint under ``run_uri`` that loads, saying which were
    skipped and why; (None, None) when the run has no checkpoint."""
    newest_first = sorted(find(run_uri, storage_options).all, reverse=True)  # zero-padded steps
    return first_that_loads(run_uri, newest_first, lambda uri: load(uri, storage_options)[0], say, "newest")


def load_best(run_uri: str, storage_options: dict | None = None, say=print) -> tuple[dict[str, Any], str]:
    """(state, uri) of the lowest-FID checkpoint under ``run_uri`` that loads, saying which were skipped."""
    ranked = find(run_uri, storage_options).ranked
    state, uri = first_that_loads(run_uri, ranked, lambda uri: load(uri, storage_options)[0], say, "best")
    if state is None:
        raise CheckpointError(f"{run_uri}: no checkpoint here (expected {DIR_PREFIX}* folders)")
    return state, uri


def first_that_loads(run_uri: str, candidates, load_one, say=print, which: str = "newest", label=str):
    """(state, candidate) of the first of ``candidates`` that ``load_one`` loads, saying
    which were skipped and why: a corrupt newest checkpoint must not fail every retry the
    same way. (None, None) without candidates; CheckpointError when none loads."""
    errors = []
    for candidate in candidates:
        try:
            state = load_one(candidate)
        except CheckpointError as err:
            errors.append(str(err))
            say(f"warning: skipping a checkpoint that does not load: {err}", flush=True)
            continue
        if errors:
            say(f"falling back to {label(candidate)}, the {which} checkpoint that loads", flush=True)
        return state, candidate
    if errors:
        raise CheckpointError(f"no checkpoint under {run_uri} loads; the first tried: {errors[0]}")
    return None, None


def check_resume(run_uri: str, cfg: Config, storage_options: dict | None = None) -> str | None:
    """Before a resumed run reopens anything (its MLflow run, Ray): the checkpoint it would
    continue from loads and comes from a compatible config. Returns its URI (None: none)."""
    state, uri = load_latest(run_uri, storage_options, say=lambda *args, **kwargs: None)
    if state is not None:
        check_compatible(state, cfg, uri)
    return uri


@dataclass(frozen=True)
class Found:
    """The checkpoints of a run folder, as full URIs (None when it holds none)."""

    latest: str | None
    best: str | None
    all: tuple[str, ...]
    ranked: tuple[str, ...] = ()
    """All of them, lowest FID first."""


def find(run_uri: str, storage_options: dict | None = None, fs: fsspec.AbstractFileSystem | None = None) -> Found:
    """The latest (most images seen) and best (lowest FID) whole checkpoints under ``run_uri``
    (through ``fs`` when given: the filesystem a Ray Train worker writes through)."""
    if fs is None:
        fs, root = fsspec.core.url_to_fs(run_uri, **(storage_options or {}))
    else:
        root = run_uri.split("://", 1)[-1]
    scheme = run_uri.split("://", 1)[0] + "://" if "://" in run_uri else ""
    fs.invalidate_cache(root)  # s3fs keeps listings: one made before a run would hide what it wrote and deleted
    try:
        dirs = sorted(p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith(DIR_PREFIX))
    except FileNotFoundError:
        dirs = []
    metas = {}
    for path in dirs:
        try:
            metas[path] = json.loads(fs.cat_file(f"{path}/{META_FILE}"))
        except (FileNotFoundError, ValueError):  # being written, or torn: not a whole checkpoint
            continue
    if not metas:
        return Found(None, None, ())
    latest = max(metas, key=lambda p: metas[p].get("images_seen", 0))
    ranked = sorted(metas, key=lambda p: (metas[p].get("fid", float("inf")), -metas[p].get("images_seen", 0)))
    full = lambda p: scheme + p if scheme and "://" not in p else p
    return Found(full(latest), full(ranked[0]), tuple(full(p) for p in metas), tuple(full(p) for p in ranked))


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
