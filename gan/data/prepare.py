"""The dataset tool: images from any source, converted once into uint8 shards and a manifest.

Sources are read by ``gan.data.sources`` (folders, archives, IDX, .npz at any fsspec URI,
with its label rules). Every image is composited on ``background`` if it has transparency,
converted to grayscale or RGB, centre-cropped to a square and resized to ``resolution``
(LANCZOS). This is the only conversion in the project: training given a raw source
prepares it with this code into its node cache (``gan.data.datasets``). The result, a
folder or object-store prefix::

    images-00000-<sha256[:16]>.npy   uint8, N x C x H x W (np.load(allow_pickle=False); mmap-able)
    labels-00000-<sha256[:16]>.npy   int64, N (labelled datasets only)
    manifest.json                    count, shape, class names, per-shard sha256, the whole
                                     sha256 (manifest_sha256), source, tool version

``gan.data.datasets.load_dataset`` reads it; its fingerprint is the manifest's sha256.

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
(absolute or ``..``) inputs, and special files (FIFOs, devices, sockets, links to them or,
unless ``follow_links``, out of the source folder: never opened) are skipped, each named on
the log, with a count at the end; nothing readable at all is an error. A full disk fails in
one line naming the destination; what was there stays as it was. Problems with the request itself (no such source,
unknown format, bad resolution or colour, an existing destination) are one error before
any image is read.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import posixpath
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import numpy as np

from gan.core.config import RESOLUTIONS
from gan.data.sources import (
    MAX_ARCHIVE_BYTES,
    MAX_ARRAY_BYTES,
    MAX_MEMBER_BYTES,
    DataError,
    Item,
    Skips,
    Source,
    decode_image,
)
from gan.data.storage import url_to_fs

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

MANIFEST = "manifest.json"
FORMAT = "gan-prepared-dataset"
FORMAT_VERSION = 1
# What decides the bytes training reads; provenance (source URI, tool version, skipped
# files) stays out, so the same data prepared from a moved copy has the same fingerprint.
IDENTITY_FIELDS = ("format", "format_version", "count", "shape", "dtype", "class_names", "shards")
WHITE = (255, 255, 255)
_SHARD_PREFIXES = ("images-", "labels-")
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az"}
# Modes that convert to 8-bit L/RGB without losing meaning; 16-bit and float images
# (I;16, I, F) would be clipped, so they are skipped with a message instead.
_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
COLOUR_NOTE = "note: colour images made grey:"
"""Starts the log line that says colour images are being made grey (other notes start 'note:')."""
READ_AHEAD_BYTES = 512 << 20
"""Most encoded bytes read ahead for the worker processes (at least one item is)."""
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class PrepareError(DataError):
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
    """Side in pixels of the square images written: one of gan.core.config.RESOLUTIONS."""
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
    max_member_bytes: int = MAX_MEMBER_BYTES
    """Files of a folder and archive members larger than this (uncompressed) are skipped unread."""
    max_archive_bytes: int = MAX_ARCHIVE_BYTES
    """An archive (.zip, .tar, .npz) whose members expand beyond this, all together, is refused."""
    max_array_bytes: int = MAX_ARRAY_BYTES
    """An .npz array or IDX file larger than this (from its header) is refused: it is held whole."""
    follow_links: bool = False
    """Read symbolic links that lead out of a source folder (links to special files never are)."""
    progress_every_s: float = 5.0
    """Seconds between progress lines on the log."""
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
        for name in ("max_member_bytes", "max_archive_bytes", "max_array_bytes"):
            if getattr(self, name) < 1:
                raise PrepareError(f"{name} {getattr(self, name)} must be at least 1 byte")
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
    source = Source(cfg.source, labels_uri=cfg.labels, infer_labels=cfg.infer_labels, options=options,
                    max_member_bytes=cfg.max_member_bytes, max_archive_bytes=cfg.max_archive_bytes,
                    max_array_bytes=cfg.max_array_bytes, follow_links=cfg.follow_links)  # fmt: skip
    dest_fs, dest_path = url_to_fs(cfg.dest, options, PrepareError)
    old_manifest = _check_dest(dest_fs, dest_path, cfg)
    background = background_rgb(cfg.background)

    skips = Skips(log)
    items, total = source.items(skips)
    sink = _sink(dest_fs, dest_path, old_manifest)
    progress = _Progress(total, cfg.progress_every_s, log)
    try:
        writer = _ShardWriter(sink, cfg)
        for item, pixels in _converted(items, cfg, background):
            if isinstance(pixels, str):
                skips.add(item.name, pixels)
            else:
                writer.add(pixels, item.key)
                if writer.count == 1 and cfg.channels == 1 and _in_colour(item):
                    log.write(
                        f"{COLOUR_NOTE} {cfg.source} holds colour images ({item.name}); use --channels 3 for RGB\n"
                    )
            progress.update(writer.count, len(skips.names))
        if writer.count == 0:
            if not skips.names:
                raise PrepareError(f"{cfg.source}: holds no images")
            raise PrepareError(f"{cfg.source}: nothing readable ({len(skips.names)} files skipped; {skips.first})")
        manifest = writer.finish(*source.class_labels(writer.keys, log))
        manifest |= {"source": cfg.source, "skipped": len(skips.names), "tool_version": tool_version()}
        manifest |= {"background": "#{:02x}{:02x}{:02x}".format(*background)}
        sink.publish(json.dumps(manifest, indent=1).encode())
    except BaseException as err:
        sink.abort()
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            raise PrepareError(
                f"{cfg.dest}: the disk is full ({err.strerror}): nothing was published, what was there is untouched"
            ) from None
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


# --- the prepared format: what identifies a dataset, and checking a manifest -----------


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


# --- the destination: checked before any image is read ---------------------------------


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


# --- conversion ------------------------------------------------------------------------


def _converted(items: Iterator[Item], cfg: PrepareConfig, background: tuple[int, int, int]):
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
    # A look-ahead bounded in bytes and in items keeps memory flat and the order fixed:
    # a count alone would hold 8 x workers files of up to max_member_bytes each.
    window: deque = deque()
    ahead = 0
    try:
        for item in items:
            window.append((item, pool.submit(_convert_or_reason, item, cfg, background)))
            ahead += _size(item)
            while window and (len(window) >= 8 * cfg.workers or ahead > READ_AHEAD_BYTES):
                done, future = window.popleft()
                ahead -= _size(done)
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _in_colour(item: Item) -> bool:
    """Whether an image carries colour channels, from its header alone."""
    if isinstance(item.data, np.ndarray):
        return item.data.ndim == 3 and item.data.shape[0] >= 3
    from PIL import Image

    try:
        with Image.open(io.BytesIO(item.data)) as img:
            return img.mode not in ("1", "L", "LA", "La", "I", "I;16", "F")
    except Exception:  # it was decoded once already; a header it cannot read again tells nothing
        return False


def _size(item: Item) -> int:
    return item.data.nbytes if isinstance(item.data, np.ndarray) else len(item.data)


def _convert_or_reason(item: Item, cfg: PrepareConfig, background: tuple[int, int, int]) -> np.ndarray | str:
    try:
        return _convert(item, cfg, background)
    except DataError as err:
        return str(err).removeprefix(f"{item.name}: ")


def _convert(item: Item, cfg: PrepareConfig, background: tuple[int, int, int]) -> np.ndarray:
    """uint8 channels x resolution x resolution; DataError (skipped by the caller) if it cannot be."""
    from PIL import ImageOps

    if isinstance(item.data, np.ndarray):
        return convert_pixels(item.data, cfg.resolution, cfg.channels, background)
    img = decode_image(item.data, item.name, max_pixels=cfg.max_pixels, draft_size=cfg.resolution)
    if img.mode not in _MODES:
        raise DataError(f"{item.name}: mode {img.mode} (16-bit or float) is not supported; save it as 8-bit")
    try:
        img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
    except Exception as err:  # a corrupt EXIF block
        raise DataError(f"{item.name}: unreadable EXIF orientation ({err})") from None
    return _square(img, cfg.resolution, cfg.channels, background)


def convert_pixels(
    pixels: np.ndarray, resolution: int, channels: int, background: tuple[int, int, int] = WHITE
) -> np.ndarray:
    """Decoded uint8 pixels (H x W or C x H x W) as the tool writes them: channels x
    resolution x resolution."""
    from PIL import Image

    pixels = pixels if pixels.ndim == 3 else pixels[None]
    if pixels.shape == (channels, resolution, resolution):
        return pixels  # already what we write: no resampling
    img = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    return _square(img, resolution, channels, background)


def _square(img: PILImage, res: int, channels: int, background: tuple[int, int, int]) -> np.ndarray:
    """Composited on ``background``, gray or RGB, centre-cropped and resized to ``res``."""
    from PIL import Image

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
