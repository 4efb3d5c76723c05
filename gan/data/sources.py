"""Raw sources: what a user hands over, read into images and the keys their labels come from.

A source is a folder of images, a .zip or .tar[.gz|.bz2|.xz] of images, an MNIST IDX file
(optionally gzip) or an .npz, at a local path or any fsspec URI. ``Source`` checks one
before any image is read (it exists, its kind, its labels file) and then yields its
images in a fixed order: encoded bytes for files, uint8 arrays for IDX and .npz.

Label rules, the only ones in the project:

- folders and archives: one sub-folder per class (the folders every image shares, such
  as an archive's top folder, are dropped first), or a CSV of ``path,label`` rows;
- IDX: an IDX labels file beside the images;
- .npz: key 'labels' (or 'y', 'y_train') in the same file.

Everything that reads untrusted bytes is bounded: only regular files are opened (special
files, and links to them or out of a source folder, are skipped by name from ``lstat``
and ``stat``); files and archive members over a size limit are skipped unread, and every
read stops at its limit; an archive's expanded total is capped; an .npz array's size is
checked from its header before it is decompressed; gzip IDX is decompressed into a buffer
of the size its header states, never further; an image's header is checked against a
pixel limit before it is decoded. Each limit's message names the flag of
``pipelines/prepare_data.py`` that raises it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import numpy as np

from gan.data.storage import url_to_fs

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MAX_GUNZIPPED_BYTES = 16 << 30
"""Most bytes one gzip file may expand to (16 GiB; IDX files: what their header states)."""
MAX_MEMBER_BYTES = 256 << 20
"""Files of a folder and archive members larger than this (uncompressed) are skipped unread."""
MAX_ARCHIVE_BYTES = 16 << 30
"""Most bytes the members of one archive (.zip, .tar, .npz) may expand to, all together."""
MAX_ARRAY_BYTES = 4 << 30
"""Largest .npz array or IDX file: it is held whole in memory."""
_GUNZIP_STEP = 8 << 20
_IDX_HEADER_MAX = 4 + 4 * 255  # magic and up to 255 dimensions
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FETCH_BATCH = 32
_HEAD_BYTES = 4096  # what telling a file's format reads of it
# What fsspec backends report that changes when a file does: a listing with these stands
# for the source's content without reading it (local, memory, S3, GCS, HTTP).
_CHANGE_FIELDS = ("size", "mtime", "created", "ETag", "etag", "LastModified", "last_modified", "VersionId",
                  "generation", "md5Hash")  # fmt: skip


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and the problem."""


def raise_with(flag: str) -> str:
    """How a user raises a limit, for messages shown by the dataset tool and by training alike."""
    return f"pipelines/prepare_data.py {flag} raises it"


@dataclass
class Item:
    name: str
    """Shown in messages: the file's URI, archive!member, or source[index]."""
    data: bytes | np.ndarray
    """Encoded image bytes, or decoded pixels (H x W or C x H x W, uint8)."""
    key: str | int | None = None
    """What the label comes from: a relative path (folders, archives) or an int (arrays)."""


class Skips:
    """Inputs left out, each named on ``log`` as it is skipped."""

    def __init__(self, log: TextIO) -> None:
        self.names: list[str] = []
        self.first = ""
        """'name: reason' of the first one, for a message that cannot list them all."""
        self.log = log

    def add(self, name: str, reason: str) -> None:
        self.first = self.first or f"{name}: {reason}"
        self.names.append(name)
        print(f"skipped {name}: {reason}", file=self.log, flush=True)


class Source:
    """A raw source, checked before any image is read: it exists, what kind it is, and its
    labels file if one is given. DataError names the URI otherwise."""

    def __init__(
        self,
        uri: str,
        *,
        labels_uri: str = "",
        infer_labels: bool = True,
        options: dict | None = None,
        max_member_bytes: int = MAX_MEMBER_BYTES,
        max_archive_bytes: int = MAX_ARCHIVE_BYTES,
        max_array_bytes: int = MAX_ARRAY_BYTES,
        follow_links: bool = False,
    ) -> None:
        self.uri, self.labels_uri, self.infer_labels = uri, labels_uri, infer_labels
        self.max_member_bytes, self.max_archive_bytes = max_member_bytes, max_archive_bytes
        self.max_array_bytes, self.follow_links = max_array_bytes, follow_links
        self.options = options or {}
        self.fs, self.path = url_to_fs(uri, self.options, DataError)
        self.kind = _detect(self.fs, self.path, uri)
        """'folder', 'zip', 'tar', 'npz' or 'idx'."""
        self.csv_labels, self.idx_labels = self._read_labels()

    def items(self, skips: Skips) -> tuple[Iterator[Item], int | None]:
        """(the images in a fixed order, their count or None when only reading tells)."""
        if self.kind in ("npz", "idx"):
            images, labels = self._read_arrays()
            if not self.infer_labels and self.idx_labels is None:
                labels = None  # an explicit labels file is used even then; the .npz's own are not
            keys = (None for _ in images) if labels is None else (int(k) for k in labels)
            items = (Item(f"{self.uri}[{i}]", x, k) for i, (x, k) in enumerate(zip(images, keys, strict=True)))
            return items, len(images)
        if self.kind == "folder":
            listing = self.fs.find(self.path, detail=True)
            label_file = self.fs._strip_protocol(self.labels_uri) if self.labels_uri else None
            files = [f for f in sorted(listing) if f != label_file]
            return self._folder_items(files, listing, skips), len(files)
        return self._archive_items(skips), None

    def class_labels(self, keys: list, log: TextIO) -> tuple[list[str], list[int]]:
        """(class names, a label per image) from the images' keys; ([], []) when unlabelled."""
        if self.kind in ("npz", "idx"):
            if keys[0] is None:
                return [], []
            return [str(i) for i in range(int(max(keys)) + 1)], keys
        if self.csv_labels is None:
            if not self.infer_labels:
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

    # --- labels files ----------------------------------------------------------------

    def _read_labels(self) -> tuple[dict | None, np.ndarray | None]:
        """(CSV labels by relative path, IDX labels); at most one is not None."""
        uri = self.labels_uri
        if not uri:
            return None, None
        if self.kind == "npz":
            raise DataError(f"{uri}: an .npz file carries its own labels (key 'labels')")
        fs, path = url_to_fs(uri, self.options, DataError)
        try:
            found = fs.isfile(path)
        except Exception as err:  # network and permission errors differ per backend
            raise DataError(f"{uri}: cannot reach it ({type(err).__name__}: {err})") from None
        if not found:
            _check_regular(fs, path, uri)  # a FIFO or device is not 'no such file'
            raise DataError(f"{uri}: no such labels file")
        if self.kind == "idx":
            labels = parse_idx(self._read_array_file(fs, path, uri), uri)
            if labels.ndim != 1:
                raise DataError(f"{uri}: an IDX labels file must be 1-D, found shape {labels.shape}")
            return None, labels
        text = fetch(fs, path, uri, self.max_member_bytes, "--max-file-mib").decode("utf-8-sig", errors="replace")
        rows = [row for row in csv.reader(io.StringIO(text)) if row and any(cell.strip() for cell in row)]
        if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
            rows = rows[1:]  # a header row
        labels = {}
        for number, row in enumerate(rows, 1):
            if len(row) < 2 or not row[1].strip():
                raise DataError(f"{uri}: row {number} is {row!r}; expected path,label")
            labels[row[0].strip().lstrip("/")] = row[1].strip()
        if not labels:
            raise DataError(f"{uri}: no path,label rows")
        return labels, None

    # --- arrays ----------------------------------------------------------------------

    def _read_array_file(self, fs, path: str, uri: str) -> bytes | memoryview:
        """An IDX file's bytes, gunzipped; at most ``max_array_bytes`` and its header."""
        limit = self.max_array_bytes + _IDX_HEADER_MAX
        return read_bytes(fs, path, uri, limit, "--max-array-mib")

    def _read_arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self.kind == "npz":
            raw = fetch(self.fs, self.path, self.uri, self.max_archive_bytes, "--max-archive-mib")
            images, labels = parse_npz(raw, self.uri, self.max_array_bytes)
        else:
            images, labels = parse_idx(self._read_array_file(self.fs, self.path, self.uri), self.uri), self.idx_labels
            if images.ndim != 3:
                raise DataError(f"{self.uri}: an IDX images file must be 3-D (N x H x W), found shape {images.shape}")
            images = pixels_as_uint8(images, self.uri)
        if labels is not None:
            where = self.labels_uri or self.uri
            if len(labels) != len(images):
                raise DataError(f"{where}: {len(labels)} labels for {len(images)} images")
            if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and labels.min() < 0):
                raise DataError(f"{where}: labels must be non-negative integers")
        return images, labels

    # --- folders and archives: image files in name order ------------------------------

    def _folder_items(self, files: list[str], listing: dict, skips: Skips) -> Iterator[Item]:
        prefix = self.path.rstrip("/") + "/"
        root = os.path.realpath(self.path) if _is_local(self.fs) else ""
        too_big = f"over the limit of {self.max_member_bytes:,} bytes per file ({raise_with('--max-file-mib')})"
        wanted = []
        for file in files:
            rel = file[len(prefix) :] if file.startswith(prefix) else posixpath.basename(file)
            name = f"{self.uri.rstrip('/')}/{rel}"
            size = listing[file].get("size")
            if root:  # a local file: what it is, from lstat and stat, before anything opens it
                why, size = _local_file(file, root, self.follow_links)
                if why:
                    skips.add(name, why)
                    continue
            if size is not None and size > self.max_member_bytes:
                skips.add(name, f"{size:,} bytes is {too_big}")
                continue
            item = self._labelled(name, rel, skips)
            if item is not None:
                wanted.append((file, item))
        # Batches: an object store answers one GET per file; an async one (s3fs) gets a batch at once.
        for start in range(0, len(wanted), _FETCH_BATCH):
            batch = wanted[start : start + _FETCH_BATCH]
            payloads = _fetch_many(self.fs, [file for file, _ in batch], self.max_member_bytes)
            for (_, item), payload in zip(batch, payloads, strict=True):
                if isinstance(payload, BaseException):
                    skips.add(item.name, f"cannot read it ({type(payload).__name__}: {payload})")
                elif len(payload) > self.max_member_bytes:  # it grew since it was listed
                    skips.add(item.name, f"more than {self.max_member_bytes:,} bytes: {too_big}")
                else:
                    item.data = payload
                    yield item

    def _archive_items(self, skips: Skips) -> Iterator[Item]:
        with self.fs.open(self.path, "rb") as handle:
            try:
                if self.kind == "zip":
                    yield from self._zip_members(handle, skips)
                else:
                    yield from self._tar_members(handle, skips)
            except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as err:
                raise DataError(f"{self.uri}: corrupt archive ({type(err).__name__}: {err})") from None

    def _zip_members(self, handle, skips: Skips) -> Iterator[Item]:
        expanded = 0
        with zipfile.ZipFile(handle) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                item = self._member(info.filename, info.file_size, skips)
                if item is None:
                    continue
                expanded += info.file_size
                self._check_expanded(expanded)
                try:
                    # Reads stop at the declared size, so a lying header cannot inflate memory.
                    item.data = archive.read(info)
                except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, zlib.error) as err:
                    skips.add(item.name, f"cannot extract it ({type(err).__name__}: {err})")
                    continue
                yield item

    def _tar_members(self, handle, skips: Skips) -> Iterator[Item]:
        # Stream mode: one pass over a compressed tar, no seeking back (fine over s3://).
        with tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                # Stream mode decompresses every member it passes, skipped ones too.
                self._check_expanded(member.offset_data + member.size)
                if member.isdir():
                    continue
                if not member.isfile():
                    skips.add(f"{self.uri}!{member.name}", "a link or special file, not an image")
                    continue
                item = self._member(member.name, member.size, skips)
                if item is None:
                    continue
                extracted = archive.extractfile(member)
                item.data = extracted.read() if extracted else b""
                yield item

    def _check_expanded(self, expanded: int) -> None:
        if expanded > self.max_archive_bytes:
            raise DataError(
                f"{self.uri}: its members expand beyond {self.max_archive_bytes:,} bytes, the limit for one "
                f"archive (an archive bomb? {raise_with('--max-archive-mib')})"
            )

    def _member(self, name: str, size: int, skips: Skips) -> Item | None:
        display = f"{self.uri}!{name}"
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (parts and parts[0].endswith(":")):
            skips.add(display, "unsafe member name (absolute or with '..'), ignored")
            return None
        if size > self.max_member_bytes:
            limit = f"{self.max_member_bytes:,} bytes per member ({raise_with('--max-file-mib')})"
            skips.add(display, f"{size:,} bytes is over the limit of {limit}")
            return None
        return self._labelled(display, name.replace("\\", "/"), skips)

    def _labelled(self, name: str, rel: str, skips: Skips) -> Item | None:
        """An item for an image file with its label key, or None (skipped and named)."""
        if not rel.lower().endswith(IMAGE_SUFFIXES):
            skips.add(name, f"not an image ({', '.join(IMAGE_SUFFIXES)})")
            return None
        if self.csv_labels is None:
            return Item(name, b"", posixpath.dirname(rel))
        if rel not in self.csv_labels:
            skips.add(name, "no row in the labels CSV")
            return None
        return Item(name, b"", self.csv_labels[rel])


def source_identity(uri: str, labels_uri: str = "", options: dict | None = None) -> str:
    """sha256 of what the listing says about the source and its labels file (names, sizes,
    modification times or ETags): it changes when a file does, without reading any."""
    digest = hashlib.sha256()
    for where in filter(None, (uri, labels_uri)):
        fs, path = url_to_fs(where, options or {}, DataError)
        root = path.rstrip("/")
        try:
            if fs.isdir(path):
                listing = fs.find(path, detail=True)
            elif fs.exists(path):
                listing = {path: fs.info(path)}
            else:
                raise DataError(f"{where}: no such file or folder (check the spelling and the bucket)")
        except DataError:
            raise
        except Exception as err:  # network and permission errors differ per backend
            raise DataError(f"{where}: cannot reach it ({type(err).__name__}: {err})") from None
        for name in sorted(listing):
            info = listing[name]
            seen = {key: str(info[key]) for key in _CHANGE_FIELDS if key in info}
            digest.update(json.dumps([name.removeprefix(root), seen], sort_keys=True).encode())
    return digest.hexdigest()


def _detect(fs, path: str, uri: str) -> str:
    """'folder', 'zip', 'tar', 'npz' or 'idx'."""
    try:
        if fs.isdir(path):
            return "folder"
        exists = fs.exists(path)
    except Exception as err:  # network and permission errors differ per backend
        raise DataError(f"{uri}: cannot reach it ({type(err).__name__}: {err})") from None
    if not exists:
        raise DataError(f"{uri}: no such file or folder (check the spelling and the bucket)")
    _check_regular(fs, path, uri)
    name = posixpath.basename(path).lower()
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(".npz"):
        return "npz"
    try:
        with fs.open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except Exception as err:
        raise DataError(f"{uri}: cannot read it ({type(err).__name__}: {err})") from None
    if not head:
        raise DataError(f"{uri}: the file is empty")
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:2] == b"\x1f\x8b":
        whole_file = len(head) < _HEAD_BYTES
        stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            head = stream.decompress(head, 64)
        except zlib.error as err:
            raise DataError(f"{uri}: corrupt gzip data ({err})") from None
        if len(head) < 4 and whole_file and not stream.eof:
            raise DataError(f"{uri}: corrupt gzip data (truncated)")
    if len(head) >= 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_DTYPES:
        return "idx"
    raise DataError(
        f"{uri}: unknown format; expected a folder of images, .zip, .tar[.gz|.bz2|.xz], .npz or MNIST IDX (optionally .gz)"
    )


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _special(mode: int) -> str:
    """What a file that is not a regular file is: 'a FIFO', 'a folder', ..."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _local_file(path: str, root: str, follow_links: bool) -> tuple[str, int]:
    """('', size) for a regular file the tool may open, else (why it is skipped, 0). From lstat
    and stat only: opening a FIFO blocks for ever, and reading /dev/zero never ends."""
    try:
        st = os.lstat(path)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(path)
    except OSError as err:
        return f"a broken link ({err.strerror}), not opened", 0
    if not stat.S_ISREG(st.st_mode):
        what = f"a link to {_special(st.st_mode)} ({os.readlink(path)})" if link else _special(st.st_mode)
        return f"{what}, not a regular file: not opened", 0
    if link and not follow_links:
        target = os.path.realpath(path)
        if os.path.commonpath([target, root]) != root:
            how = "pipelines/prepare_data.py --follow-links reads it"
            return f"a link out of the source folder (to {target}), not followed ({how})", 0
    return "", st.st_size


def _check_regular(fs, path: str, uri: str) -> None:
    """DataError unless a local ``path`` is a regular file, a folder or missing; never opens it."""
    if not _is_local(fs):
        return  # object stores and web servers hold nothing but files
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: the caller says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise DataError(f"{uri}: {_special(mode)}, not a regular file: not opened")


def _fetch_many(fs, files: list[str], max_bytes: int) -> list[bytes | BaseException]:
    """The bytes of each file (local ones: at most ``max_bytes`` + 1, so the caller sees it is
    over), or its error. Not fs.cat(list): that reads '[' in names as a glob."""
    from fsspec.asyn import AsyncFileSystem, sync

    if _is_local(fs):
        payloads: list[bytes | BaseException] = []
        for file in files:
            try:
                # O_NONBLOCK: a file swapped for a FIFO since it was listed opens at once, and fstat says so.
                with open(os.open(file, os.O_RDONLY | os.O_NONBLOCK), "rb") as handle:
                    st = os.fstat(handle.fileno())
                    if not stat.S_ISREG(st.st_mode):
                        raise OSError(f"{_special(st.st_mode)}, not a regular file: not read")
                    # read(n) allocates n bytes first: ask for no more than the file holds.
                    payloads.append(handle.read(min(st.st_size, max_bytes) + 1))
            except OSError as err:
                payloads.append(err)
        return payloads
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


# --- bytes: files, gzip, IDX, .npz, encoded images -------------------------------------


def fetch(fs, path: str, uri: str, max_bytes: int = MAX_ARCHIVE_BYTES, flag: str = "") -> bytes:
    """The bytes of one file, at most ``max_bytes`` (``flag`` raises it); DataError names the URI.
    A local file must be a regular file: it is not opened otherwise."""
    _check_regular(fs, path, uri)
    how = f" ({raise_with(flag)})" if flag else ""
    too_big = f"{uri}: larger than {max_bytes:,} bytes, the most read of one file{how}"
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise DataError(too_big)
        with fs.open(path, "rb") as handle:
            # read(n) allocates n bytes first: ask for no more than the file holds.
            raw = handle.read((max_bytes if size is None else min(size, max_bytes)) + 1)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{uri}: cannot read it ({type(err).__name__}: {err})") from None
    if len(raw) > max_bytes:
        raise DataError(too_big)
    return raw


def read_bytes(fs, path: str, uri: str, max_bytes: int = MAX_GUNZIPPED_BYTES, flag: str = "") -> bytes | memoryview:
    """The bytes of one file, gunzipped if they are gzip, at most ``max_bytes`` either way;
    DataError names the URI."""
    raw = fetch(fs, path, uri, max_bytes, flag)
    return gunzip(raw, uri, max_bytes, flag) if raw[:2] == b"\x1f\x8b" else raw


def gunzip(raw: bytes, uri: str, max_bytes: int = MAX_GUNZIPPED_BYTES, flag: str = "") -> memoryview:
    """Decompress gzip data in steps, never past the limit: ``max_bytes``, or for an IDX file
    the size its header states. A few kilobytes that expand to gigabytes (a gzip bomb) fail
    at the limit, not when memory runs out. An IDX file is decompressed into one buffer of
    the size its header states, so it is neither grown nor copied."""
    out: bytearray | np.ndarray = bytearray()
    filled, limit, stated, header_read = 0, max_bytes, None, False
    stream, pending = zlib.decompressobj(wbits=31), raw
    try:
        while True:
            # The header first, alone: then the rest can go straight into a buffer of its stated size.
            room = min(limit + 1 - filled, _GUNZIP_STEP if header_read else _IDX_HEADER_MAX - filled)
            piece = stream.decompress(pending, room)
            pending = stream.unconsumed_tail
            if filled + len(piece) > limit:
                what = "the size its IDX header states" if stated is not None else "the limit"
                raise DataError(
                    f"{uri}: gzip data expands beyond {limit:,} bytes ({what}): a gzip bomb or a corrupt file"
                )
            if isinstance(out, bytearray):
                out += piece
            else:
                out[filled : filled + len(piece)] = np.frombuffer(piece, np.uint8)
            filled += len(piece)
            if not header_read and (filled >= _IDX_HEADER_MAX or stream.eof):
                header_read, stated = True, _idx_size(bytes(out[:_IDX_HEADER_MAX]))
                if stated is not None and stated > max_bytes:
                    how = f" ({raise_with(flag)})" if flag else ""
                    raise DataError(
                        f"{uri}: its IDX header states {stated:,} bytes, over the limit of {max_bytes:,}{how}"
                    )
                if stated is not None:
                    if filled > stated:
                        raise DataError(
                            f"{uri}: gzip data expands beyond {stated:,} bytes (the size its IDX header states): "
                            "a gzip bomb or a corrupt file"
                        )
                    # np.empty leaves pages untouched until written: a lying header costs nothing.
                    limit, whole = stated, _allocate(stated, uri)
                    whole[:filled] = np.frombuffer(out, np.uint8)
                    out = whole
            if stream.eof:  # gzip files may hold several members, one after another
                if stream.unused_data[:2] != b"\x1f\x8b":
                    break
                stream, pending = zlib.decompressobj(wbits=31), stream.unused_data
            elif not pending and len(piece) < room:
                raise DataError(f"{uri}: corrupt gzip data (truncated)")
    except zlib.error as err:
        raise DataError(f"{uri}: corrupt gzip data ({err})") from None
    return memoryview(out)[:filled]


def _allocate(size: int, uri: str) -> np.ndarray:
    try:
        return np.empty(size, np.uint8)
    except MemoryError:
        raise DataError(f"{uri}: its header states {size:,} bytes, more than this process may allocate") from None


def _idx_size(head: bytes) -> int | None:
    """Total bytes an IDX file's header states (header included), or None when it is not IDX."""
    if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_DTYPES or len(head) < 4 + 4 * head[3]:
        return None
    shape = struct.unpack(f">{head[3]}I", head[4 : 4 + 4 * head[3]])
    return 4 + 4 * head[3] + math.prod(shape) * np.dtype(_IDX_DTYPES[head[2]]).itemsize


def parse_idx(raw: bytes, uri: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{uri}: not an IDX file (bad magic number {raw[:4].hex() or 'empty file'})")
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


def parse_npz(raw: bytes, uri: str, max_array_bytes: int = MAX_ARRAY_BYTES) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 images, N x H x W or N x C x H x W; labels or None) of an .npz file. Each array
    is checked from its header (shape and dtype) before it is decompressed."""
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
        keys = set(archive.files)
    except Exception as err:
        raise DataError(f"{uri}: not a readable .npz file ({type(err).__name__}: {err})") from None
    key = next((k for k in ("images", "x", "x_train") if k in keys), None)
    if key is None:
        raise DataError(f"{uri}: no image array; expected key 'images' (found {sorted(keys)})")
    _check_npy_header(archive, key, uri, max_array_bytes)
    try:
        images = archive[key]
    except MemoryError:  # under the limit, but more than this machine or process has
        raise DataError(f"{uri}: '{key}' needs more memory than this process may allocate") from None
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        images = np.moveaxis(images, -1, 1)  # NHWC -> NCHW
    elif images.ndim != 3 and not (images.ndim == 4 and images.shape[1] in (1, 3)):
        raise DataError(f"{uri}: '{key}' has shape {images.shape}; expected N x H x W or N x H x W x C")
    label_key = next((k for k in ("labels", "y", "y_train") if k in keys), None)
    if label_key:
        _check_npy_header(archive, label_key, uri, max_array_bytes)
    labels = archive[label_key].reshape(-1) if label_key else None
    return pixels_as_uint8(images, uri), labels


def _check_npy_header(archive, key: str, uri: str, max_bytes: int) -> None:
    """DataError unless the .npy header of ``key`` in an open .npz states a numeric array of
    at most ``max_bytes``: np.load would allocate what the header states, then decompress."""
    from numpy.lib import format as npy

    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with archive.zip.open(member) as handle:
            version = npy.read_magic(handle)
            if version not in readers:
                raise DataError(f"{uri}: '{key}' is .npy format version {version}; expected 1.0 or 2.0")
            shape, _, dtype = readers[version](handle)
    except DataError:
        raise
    except Exception as err:  # zipfile and numpy raise many types for bad data
        raise DataError(f"{uri}: not a readable .npz file ({type(err).__name__}: {err})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{uri}: '{key}' has dtype {dtype}; expected numbers")
    size = math.prod(shape) * dtype.itemsize
    if size > max_bytes:
        raise DataError(
            f"{uri}: '{key}' is {dtype} {shape}, {size:,} bytes, over the limit of {max_bytes:,} for one "
            f"array (an .npz bomb? {raise_with('--max-array-mib')})"
        )


def pixels_as_uint8(images: np.ndarray, uri: str) -> np.ndarray:
    """Pixel values as uint8: [0, 1] floats are scaled to [0, 255]; anything else outside
    [0, 255] is refused."""
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
