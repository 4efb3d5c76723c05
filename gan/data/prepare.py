"""Prepared datasets: images from any source, converted once into uint8 shards and a manifest.

Sources (local or any fsspec URI): a folder of images (labels from one sub-folder per class
or from a CSV), a .zip or .tar[.gz|.bz2|.xz] of images, MNIST IDX (optionally .gz, labels
from an IDX labels file) or .npz. Every image is composited on ``background`` if it has
transparency, converted to grayscale or RGB, centre-cropped to a square and resized to
``resolution``. The result, a folder or object-store prefix::

    images-00000-<sha256[:16]>.npy   uint8, N x C x H x W (np.load(allow_pickle=False); mmap-able)
    labels-00000-<sha256[:16]>.npy   int64, N (labelled datasets only)
    manifest.json                    count, shape, class names, per-shard sha256, the whole
                                     sha256 (gan.data.manifest_sha256), source, tool version

``gan.data.load_dataset`` reads it; its fingerprint is the manifest's sha256.

Publishing never leaves a partial dataset under the final name, in two ways:

- A local destination is written into a hidden sibling ``.<name>.partial-<random>/``,
  manifest last, and renamed into place in one step. An exception removes the partial
  folder; a killed process may leave it, and no reader takes it for a dataset.
- An object store (s3://) has no rename, and copying every shard to its final key would
  upload the data twice. There the shards go straight under the final prefix with
  content-addressed names and manifest.json is the last object written: one PUT is
  atomic, so the dataset exists exactly when its manifest does. An interrupted run
  leaves shards without a manifest (readers refuse the prefix; the tool deletes what it
  wrote when it still can; a rerun writes the same names again). ``overwrite`` writes the
  new manifest over the old one, then deletes the shards only the old one named.

Unreadable, undecodable, unsupported, oversized (decompression bombs) or unsafely named
(absolute or ``..``) inputs are skipped, each named on stderr, with a count at the end;
nothing readable at all is an error. Problems with the request itself (no such source,
unknown format, bad resolution or colour, an existing destination) are one error before
any image is read.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from gan.data.datasets import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    DataError,
    decode_image,
    manifest_sha256,
    parse_idx,
    parse_npz,
    read_bytes,
    read_manifest,
    to_uint8,
)
from gan.data.storage import url_to_fs

RESOLUTIONS = (28, 32, 64, 128)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_SHARD_PREFIXES = ("images-", "labels-")
_FETCH_BATCH = 32
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az"}
# Modes that convert to 8-bit L/RGB without losing meaning; 16-bit and float images
# (I;16, I, F) would be clipped, so they are skipped with a message instead.
_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}


class PrepareError(ValueError):
    """A request the tool cannot carry out; the message names the input and the problem."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PrepareConfig:
    source: str
    """Images to prepare: a folder, .zip, .tar[.gz|.bz2|.xz], MNIST IDX file (optionally .gz)
    or .npz; a local path or any fsspec URI (s3://, https://, memory://)."""
    dest: str
    """Where the prepared dataset goes: a new folder or an s3:// prefix."""
    labels: str = ""
    """A CSV of ``path,label`` rows for a folder or archive (paths relative to the folder, or
    member names in the archive), or an IDX labels file for IDX images. Empty: sub-folder
    names give labels when every image sits in one, .npz key 'labels'."""
    infer_labels: bool = True
    """Take labels from sub-folders or the .npz; False prepares an unlabelled dataset."""
    resolution: int = 64
    """Side in pixels of the square images written: 28, 32, 64 or 128."""
    channels: int = 3
    """1 (grayscale) or 3 (RGB)."""
    background: str = "white"
    """Colour that transparent pixels are composited on: a name or #rrggbb."""
    shard_size: int = 4096
    """Images per shard: bounds the tool's memory and the unit a reader fetches."""
    overwrite: bool = False
    """Replace a prepared dataset already at ``dest``."""
    storage_options: str = ""
    """JSON object of fsspec options for every URI (an S3 endpoint_url, say); credentials
    are refused: they come from the environment."""
    max_pixels: int = 89_478_485
    """Images with more pixels are skipped unread (decompression bombs); Pillow's default."""
    max_member_bytes: int = 256 << 20
    """Archive members larger than this (uncompressed) are skipped unread."""
    progress_every_s: float = 5.0
    """Seconds between progress lines on stderr."""
    workers: int = 1
    """Processes that decode and resize images (photos are CPU-bound); the output is the
    same for any number."""

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise PrepareError("no source given: pass a folder, archive, IDX or .npz file")
        if not self.dest.strip():
            raise PrepareError("no destination given: pass a new folder or s3:// prefix")
        if self.resolution not in RESOLUTIONS:
            raise PrepareError(f"resolution {self.resolution} is not one of {', '.join(map(str, RESOLUTIONS))}")
        if self.channels not in (1, 3):
            raise PrepareError(f"channels {self.channels} must be 1 (grayscale) or 3 (RGB)")
        if self.shard_size < 1:
            raise PrepareError(f"shard size {self.shard_size} must be at least 1 image")
        if not 1 <= self.workers <= 256:
            raise PrepareError(f"workers {self.workers} must be between 1 and 256")
        background_rgb(self.background)
        if self.storage_options:
            try:
                options = json.loads(self.storage_options)
            except json.JSONDecodeError as err:
                raise PrepareError(f"storage options are not valid JSON: {err}") from None
            if not isinstance(options, dict):
                raise PrepareError("storage options must be a JSON object")
        from gan.core.config import ConfigError, check_no_credentials

        try:  # the source URI is written into the manifest; every URI is printed in messages
            check_no_credentials("storage options", options=json.loads(self.storage_options or "{}"))
            check_no_credentials("source", self.source)
            check_no_credentials("destination", self.dest)
            check_no_credentials("labels", self.labels)
        except ConfigError as err:
            raise PrepareError(str(err)) from None


def background_rgb(colour: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(colour)[:3]
    except ValueError:
        raise PrepareError(
            f"unknown background colour {colour!r}: use a name (white, black, gray) or #rrggbb"
        ) from None


@dataclass
class _Item:
    name: str
    """Shown in messages: the file's URI, or archive!member."""
    data: bytes | np.ndarray
    """Encoded image bytes, or decoded pixels (H x W or C x H x W, uint8)."""
    key: str | int | None = None
    """What the label comes from: a relative path (folders, archives) or an int (arrays)."""


class _Skips:
    def __init__(self, log: TextIO) -> None:
        self.names: list[str] = []
        self.log = log

    def add(self, name: str, reason: str) -> None:
        self.names.append(name)
        print(f"skipped {name}: {reason}", file=self.log, flush=True)


class _Progress:
    def __init__(self, total: int | None, every_s: float, log: TextIO) -> None:
        self.total, self.every_s, self.log = total, every_s, log
        self.start = self.last = time.monotonic()

    def update(self, images: int, skipped: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else ""
        rate = images / max(now - self.start, 1e-9)
        print(
            f"prepare: {images + skipped}{of} read, {images} kept, {skipped} skipped, {rate:.0f} img/s",
            file=self.log,
            flush=True,
        )


def prepare(cfg: PrepareConfig, log: TextIO | None = None) -> dict:
    """Convert ``cfg.source`` into a prepared dataset at ``cfg.dest``; returns its manifest."""
    log = log or sys.stderr
    options = json.loads(cfg.storage_options) if cfg.storage_options else {}
    src_fs, src_path = url_to_fs(cfg.source, options, PrepareError)
    kind = _detect(src_fs, src_path, cfg.source)
    dest_fs, dest_path = url_to_fs(cfg.dest, options, PrepareError)
    old_manifest = _check_dest(dest_fs, dest_path, cfg)
    csv_labels, idx_labels = _read_labels(cfg, kind, options)
    background = background_rgb(cfg.background)

    skips = _Skips(log)
    items, total = _items(kind, src_fs, src_path, cfg, csv_labels, idx_labels, skips)
    sink = _sink(dest_fs, dest_path, old_manifest)
    progress = _Progress(total, cfg.progress_every_s, log)
    try:
        writer = _ShardWriter(sink, cfg)
        for item, pixels in _converted(items, cfg, background):
            if isinstance(pixels, str):
                skips.add(item.name, pixels)
            else:
                writer.add(pixels, item.key)
            progress.update(writer.count, len(skips.names))
        if writer.count == 0:
            raise PrepareError(f"{cfg.source}: nothing readable ({len(skips.names)} files skipped)")
        manifest = writer.finish(*_labels(writer.keys, kind, csv_labels is not None, cfg.infer_labels, log))
        manifest |= {"source": cfg.source, "skipped": len(skips.names), "tool_version": tool_version()}
        manifest |= {"background": "#{:02x}{:02x}{:02x}".format(*background)}
        sink.publish(json.dumps(manifest, indent=1).encode())
    except BaseException:
        sink.abort()
        raise
    progress.update(writer.count, len(skips.names), force=True)
    if skips.names:
        print(f"skipped {len(skips.names)} files (each named above)", file=log, flush=True)
    return manifest


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gan {version('gan')}, format {FORMAT_VERSION}"
    except PackageNotFoundError:
        return f"gan (not installed), format {FORMAT_VERSION}"


# --- request checks: all before any image is read -------------------------------------


def _detect(fs, path: str, uri: str) -> str:
    """'folder', 'zip', 'tar', 'npz' or 'idx'."""
    try:
        if fs.isdir(path):
            return "folder"
        exists = fs.exists(path)
    except Exception as err:  # network and permission errors differ per backend
        raise PrepareError(f"{uri}: cannot reach it ({type(err).__name__}: {err})") from None
    if not exists:
        raise PrepareError(f"{uri}: no such file or folder")
    name = posixpath.basename(path).lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(".npz"):
        return "npz"
    try:
        with fs.open(path, "rb") as handle:
            head = handle.read(64)
    except Exception as err:
        raise PrepareError(f"{uri}: cannot read it ({type(err).__name__}: {err})") from None
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
    if len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E):
        return "idx"
    raise PrepareError(
        f"{uri}: unknown format; expected a folder of images, .zip, .tar[.gz|.bz2|.xz], .npz or MNIST IDX (optionally .gz)"
    )


def _check_dest(fs, path: str, cfg: PrepareConfig) -> dict | None:
    """The manifest of a dataset ``overwrite`` may replace, or None; refuses anything else there."""
    try:
        return _check_dest_contents(fs, path, cfg)
    except PrepareError:
        raise
    except Exception as err:  # network and permission errors differ per backend
        raise PrepareError(f"{cfg.dest}: cannot reach it ({type(err).__name__}: {err})") from None


def _check_dest_contents(fs, path: str, cfg: PrepareConfig) -> dict | None:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    bucket = path.split("/", 1)[0]
    if protocols & _BUCKET_PROTOCOLS and not fs.exists(bucket):
        # Found now, not after every image was decoded and the first shard upload failed.
        raise PrepareError(f"{cfg.dest}: no bucket {bucket!r} (create it first, or check the endpoint)")
    manifest_path = f"{path}/{MANIFEST}"
    if fs.isfile(manifest_path):
        if not cfg.overwrite:
            raise PrepareError(f"{cfg.dest}: a prepared dataset is already there; pass --overwrite to replace it")
        try:
            return read_manifest(fs.cat_file(manifest_path), cfg.dest)
        except DataError:
            return None  # replaced all the same; only its old shards stay behind
    if fs.isfile(path):
        raise PrepareError(f"{cfg.dest}: a file is there; choose a new folder or prefix")
    if fs.isdir(path):
        # Shards without a manifest are an interrupted run's, which a rerun may write over.
        others = [p for p in fs.ls(path, detail=False) if not posixpath.basename(p).startswith(_SHARD_PREFIXES)]
        if others:
            raise PrepareError(f"{cfg.dest}: exists and is not a prepared dataset; choose a new folder or prefix")
    return None


def _read_labels(cfg: PrepareConfig, kind: str, options: dict) -> tuple[dict | None, np.ndarray | None]:
    """(CSV labels by relative path, IDX labels); at most one is not None."""
    if not cfg.labels:
        return None, None
    if kind == "npz":
        raise PrepareError(f"{cfg.labels}: an .npz file carries its own labels (key 'labels')")
    fs, path = url_to_fs(cfg.labels, options, PrepareError)
    if not fs.isfile(path):
        raise PrepareError(f"{cfg.labels}: no such labels file")
    if kind == "idx":
        labels = parse_idx(read_bytes(fs, path, cfg.labels), cfg.labels)
        if labels.ndim != 1:
            raise PrepareError(f"{cfg.labels}: an IDX labels file must be 1-D, found shape {labels.shape}")
        return None, labels
    with fs.open(path, "rb") as handle:
        text = handle.read().decode("utf-8-sig", errors="replace")
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]  # a header row
    labels = {}
    for number, row in enumerate(rows, 1):
        if len(row) < 2 or not row[1].strip():
            raise PrepareError(f"{cfg.labels}: row {number} is {row!r}; expected path,label")
        labels[row[0].strip().lstrip("/")] = row[1].strip()
    if not labels:
        raise PrepareError(f"{cfg.labels}: no path,label rows")
    return labels, None


# --- sources: each yields _Items in a fixed order -------------------------------------


def _items(kind: str, fs, path: str, cfg: PrepareConfig, csv_labels, idx_labels, skips: _Skips):
    """(iterator of _Item, total count or None when only reading tells)."""
    if kind in ("npz", "idx"):
        images, labels = _read_arrays(kind, fs, path, cfg, idx_labels)
        if not cfg.infer_labels and idx_labels is None:
            labels = None  # an explicit labels file is used even then; the .npz's own are not
        keys = (None for _ in images) if labels is None else (int(k) for k in labels)
        items = (_Item(f"{cfg.source}[{i}]", x, k) for i, (x, k) in enumerate(zip(images, keys, strict=True)))
        return items, len(images)
    if kind == "folder":
        files = sorted(fs.find(path))
        label_file = fs._strip_protocol(cfg.labels) if cfg.labels else None
        files = [f for f in files if f != label_file]
        return _folder_items(fs, path, files, cfg, csv_labels, skips), len(files)
    return _archive_items(kind, fs, path, cfg, csv_labels, skips), None


def _read_arrays(kind: str, fs, path: str, cfg: PrepareConfig, idx_labels) -> tuple[np.ndarray, np.ndarray | None]:
    raw = read_bytes(fs, path, cfg.source)
    if kind == "npz":
        images, labels = parse_npz(raw, cfg.source)
    else:
        images, labels = parse_idx(raw, cfg.source), idx_labels
        if images.ndim != 3:
            raise PrepareError(f"{cfg.source}: an IDX images file must be 3-D (N x H x W), found {images.shape}")
        images = to_uint8(images, cfg.source)
    if labels is not None:
        if len(labels) != len(images):
            raise PrepareError(f"{cfg.labels or cfg.source}: {len(labels)} labels for {len(images)} images")
        if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
            raise PrepareError(f"{cfg.labels or cfg.source}: labels must be non-negative integers")
    return images, labels


def _folder_items(fs, root: str, files: list[str], cfg, csv_labels, skips: _Skips) -> Iterator[_Item]:
    prefix = root.rstrip("/") + "/"
    wanted = []
    for file in files:
        rel = file[len(prefix) :] if file.startswith(prefix) else posixpath.basename(file)
        item = _labelled(_display(cfg.source, rel), rel, csv_labels, skips)
        if item is not None:
            wanted.append((file, item))
    # Batches: an object store answers one GET per file; an async one (s3fs) gets a batch at once.
    for start in range(0, len(wanted), _FETCH_BATCH):
        batch = wanted[start : start + _FETCH_BATCH]
        for (_, item), payload in zip(batch, _fetch_many(fs, [file for file, _ in batch]), strict=True):
            if isinstance(payload, BaseException):
                skips.add(item.name, f"cannot read it ({type(payload).__name__}: {payload})")
                continue
            item.data = payload
            yield item


def _fetch_many(fs, files: list[str]) -> list[bytes | BaseException]:
    """The bytes of each file, or its error. Not fs.cat(list): that reads '[' in names as a glob."""
    from fsspec.asyn import AsyncFileSystem, sync

    if isinstance(fs, AsyncFileSystem):
        import asyncio

        async def gather():
            return await asyncio.gather(*(fs._cat_file(file) for file in files), return_exceptions=True)

        return sync(fs.loop, gather)
    payloads: list[bytes | BaseException] = []
    for file in files:
        try:
            payloads.append(fs.cat_file(file))
        except Exception as err:
            payloads.append(err)
    return payloads


def _archive_items(kind: str, fs, path: str, cfg, csv_labels, skips: _Skips) -> Iterator[_Item]:
    with fs.open(path, "rb") as handle:
        try:
            if kind == "zip":
                yield from _zip_members(handle, cfg, csv_labels, skips)
            else:
                yield from _tar_members(handle, cfg, csv_labels, skips)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
            raise PrepareError(f"{cfg.source}: corrupt archive ({type(err).__name__}: {err})") from None


def _zip_members(handle, cfg, csv_labels, skips: _Skips) -> Iterator[_Item]:
    with zipfile.ZipFile(handle) as archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            item = _member(info.filename, info.file_size, cfg, csv_labels, skips)
            if item is None:
                continue
            try:
                # Reads stop at the declared size, so a lying header cannot inflate memory.
                item.data = archive.read(info)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, zlib.error) as err:
                skips.add(item.name, f"cannot extract it ({type(err).__name__}: {err})")
                continue
            yield item


def _tar_members(handle, cfg, csv_labels, skips: _Skips) -> Iterator[_Item]:
    # Stream mode: one pass over a compressed tar, no seeking back (fine over s3://).
    with tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            if member.isdir():
                continue
            if not member.isfile():
                skips.add(f"{cfg.source}!{member.name}", "a link or special file, not an image")
                continue
            item = _member(member.name, member.size, cfg, csv_labels, skips)
            if item is None:
                continue
            extracted = archive.extractfile(member)
            item.data = extracted.read() if extracted else b""
            yield item


def _member(name: str, size: int, cfg, csv_labels, skips: _Skips) -> _Item | None:
    display = f"{cfg.source}!{name}"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts and parts[0].endswith(":")):
        skips.add(display, "unsafe member name (absolute or with '..'), ignored")
        return None
    if size > cfg.max_member_bytes:
        skips.add(display, f"{size:,} bytes is over the limit of {cfg.max_member_bytes:,} per member")
        return None
    return _labelled(display, name.replace("\\", "/"), csv_labels, skips)


def _labelled(name: str, rel: str, csv_labels, skips: _Skips) -> _Item | None:
    """An item for an image file with its label key, or None (skipped and named)."""
    if not rel.lower().endswith(IMAGE_SUFFIXES):
        skips.add(name, f"not an image ({', '.join(IMAGE_SUFFIXES)})")
        return None
    if csv_labels is None:
        return _Item(name, b"", posixpath.dirname(rel))
    if rel not in csv_labels:
        skips.add(name, "no row in the labels CSV")
        return None
    return _Item(name, b"", csv_labels[rel])


def _display(source: str, rel: str) -> str:
    return f"{source.rstrip('/')}/{rel}"


# --- conversion ------------------------------------------------------------------------


def _converted(items: Iterator[_Item], cfg: PrepareConfig, background: tuple[int, int, int]):
    """(item, pixels or the reason it was skipped), in the items' order, on ``cfg.workers`` processes."""
    if cfg.workers <= 1:
        for item in items:
            yield item, _convert_or_reason(item, cfg, background)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # fork: the workers only decode pixels, and need not import torch again as spawn would.
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("fork"))
    window: deque = deque()  # a bounded look-ahead keeps memory flat and the order fixed
    try:
        for item in items:
            window.append((item, pool.submit(_convert_or_reason, item, cfg, background)))
            if len(window) >= 8 * cfg.workers:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _convert_or_reason(item: _Item, cfg: PrepareConfig, background: tuple[int, int, int]) -> np.ndarray | str:
    try:
        return _convert(item, cfg, background)
    except DataError as err:
        return str(err).removeprefix(f"{item.name}: ")


def _convert(item: _Item, cfg: PrepareConfig, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 channels x resolution x resolution; DataError (skipped by the caller) if it cannot be."""
    from PIL import Image, ImageOps

    res, channels = cfg.resolution, cfg.channels
    if isinstance(item.data, np.ndarray):
        pixels = item.data if item.data.ndim == 3 else item.data[None]
        if pixels.shape == (channels, res, res):
            return pixels  # already what we write: no resampling
        img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    else:
        img = decode_image(item.data, item.name, max_pixels=cfg.max_pixels, draft_size=res)
        if img.mode not in _MODES:
            raise DataError(f"{item.name}: mode {img.mode} (16-bit or float) is not supported; save it as 8-bit")
        try:
            img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
        except Exception as err:  # a corrupt EXIF block
            raise DataError(f"{item.name}: unreadable EXIF orientation ({err})") from None
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    width, height = img.size
    side = min(width, height)
    if (width, height) != (res, res):
        box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
        gap = 3.0 if side >= 3 * res else None  # shrink by an integer factor first: much faster, no visible cost
        # Crop first: resize(box=...) would let the filter reach past the box into the cut-off sides.
        img = img.crop(box).resize((res, res), Image.Resampling.LANCZOS, reducing_gap=gap)
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _labels(keys: list, kind: str, from_csv: bool, infer: bool, log: TextIO) -> tuple[list[str], list[int]]:
    """(class names, a label per image) from the images' keys; ([], []) for an unlabelled dataset."""
    if kind in ("npz", "idx"):
        if keys[0] is None:
            return [], []
        return [str(i) for i in range(int(max(keys)) + 1)], keys
    if not from_csv:
        if not infer:
            return [], []
        # Sub-folder labels: drop the folders every image shares (an archive's top folder),
        # then each image must sit in exactly one more.
        split = [k.split("/") if k else [] for k in keys]
        common = 0
        while all(len(s) > common for s in split) and len({s[common] for s in split}) == 1:
            common += 1
        keys = ["/".join(s[common:]) for s in split]
        if "" in keys or any("/" in k for k in keys):
            if len(set(keys)) > 1:
                print("note: the images are not all one sub-folder deep: the dataset is unlabelled", file=log)
            return [], []
    names = sorted(set(keys))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[k] for k in keys]


# --- shards and publishing -------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class _ShardWriter:
    """Fills one shard at a time (bounded memory) and hands full ones to the sink."""

    def __init__(self, sink, cfg: PrepareConfig) -> None:
        self.sink, self.size = sink, cfg.shard_size
        self.shape = (cfg.channels, cfg.resolution, cfg.resolution)
        self.buffer = np.empty((self.size, *self.shape), dtype=np.uint8)
        self.filled = 0
        self.count = 0
        self.keys: list = []
        self.shards: list[dict] = []

    def add(self, pixels: np.ndarray, key) -> None:
        self.buffer[self.filled] = pixels
        self.filled += 1
        self.count += 1
        self.keys.append(key)
        if self.filled == self.size:
            self.flush()

    def flush(self) -> None:
        if self.filled:
            name, sha256 = self.sink.put("images", len(self.shards), npy_bytes(self.buffer[: self.filled]))
            self.shards.append({"count": self.filled, "images": name, "images_sha256": sha256})
            self.filled = 0

    def finish(self, class_names: list[str], labels: list[int]) -> dict:
        """Labels shards (classes are known only once every image is seen) and the manifest."""
        self.flush()
        if class_names:
            labels = np.asarray(labels, dtype=np.int64)
            start = 0
            for number, shard in enumerate(self.shards):
                end = start + shard["count"]
                name, sha256 = self.sink.put("labels", number, npy_bytes(labels[start:end]))
                shard |= {"labels": name, "labels_sha256": sha256}
                start = end
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "count": self.count,
            "shape": list(self.shape),
            "dtype": "uint8",
            "class_names": class_names,
            "shards": self.shards,
        }
        return manifest | {"sha256": manifest_sha256(manifest)}


def _sink(fs, path: str, old_manifest: dict | None):
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return _LocalSink(path)
    return _ObjectSink(fs, path, old_manifest)


def _shard_name(kind: str, number: int, payload: bytes) -> tuple[str, str]:
    import hashlib

    sha256 = hashlib.sha256(payload).hexdigest()
    return f"{kind}-{number:05d}-{sha256[:16]}.npy", sha256


class _LocalSink:
    """A hidden partial folder beside the destination, renamed into place when complete."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        parent, name = os.path.split(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(self.tmp, 0o777 & ~mask)  # as a plain mkdir would make it, not mkdtemp's 0700

    def put(self, kind: str, number: int, payload: bytes) -> tuple[str, str]:
        name, sha256 = _shard_name(kind, number, payload)
        with open(os.path.join(self.tmp, name), "wb") as handle:
            handle.write(payload)
        return name, sha256

    def publish(self, manifest: bytes) -> None:
        with open(os.path.join(self.tmp, MANIFEST), "wb") as handle:
            handle.write(manifest)
        old = None
        if os.path.isdir(self.path):
            # An old dataset (overwrite) or an empty folder: moved aside, removed once replaced.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.old-", dir=os.path.dirname(self.path))
            os.rename(self.path, os.path.join(old, "dataset"))
        os.rename(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _ObjectSink:
    """Content-addressed shards under the final prefix; the manifest, written last, makes the dataset."""

    def __init__(self, fs, path: str, old_manifest: dict | None) -> None:
        self.fs, self.path = fs, path.rstrip("/")
        self.keep = {s[k] for s in (old_manifest or {}).get("shards", []) for k in ("images", "labels") if s.get(k)}
        self.written: list[str] = []

    def put(self, kind: str, number: int, payload: bytes) -> tuple[str, str]:
        name, sha256 = _shard_name(kind, number, payload)
        self.fs.pipe_file(f"{self.path}/{name}", payload)
        self.written.append(name)
        return name, sha256

    def publish(self, manifest: bytes) -> None:
        self.fs.pipe_file(f"{self.path}/{MANIFEST}", manifest)
        self.keep, stale = set(self.written), self.keep - set(self.written)
        self._delete(stale)  # the replaced dataset's shards

    def abort(self) -> None:
        self._delete(set(self.written) - self.keep)

    def _delete(self, names: set[str]) -> None:
        for name in sorted(names):
            try:
                self.fs.rm_file(f"{self.path}/{name}")
            except Exception:  # best effort: a dataset without its manifest is never read
                pass
