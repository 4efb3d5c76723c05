import gzip
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gan.core.config import DataConfig
from gan.data.datasets import DataError, load_dataset


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 3


def test_embedded_digits(digits):
    assert digits.images.shape == (5000, 1, 28, 28) and digits.images.dtype == torch.uint8
    assert torch.bincount(digits.labels).tolist() == [500] * 10
    assert len(digits.fingerprint) == 64
    assert load_dataset(DataConfig()).fingerprint == digits.fingerprint  # stable


@pytest.mark.parametrize("compress", [False, True])
def test_idx_plain_and_gz(tmp_path, small, compress):
    images, labels = small
    write = gzip.compress if compress else (lambda b: b)
    suffix = ".gz" if compress else ""
    (tmp_path / f"img.idx{suffix}").write_bytes(write(idx_bytes(images)))
    (tmp_path / f"lab.idx{suffix}").write_bytes(write(idx_bytes(labels.astype(np.uint8))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when handed a read-only array, which IDX bytes parse to
        ds = load_dataset(
            DataConfig(uri=str(tmp_path / f"img.idx{suffix}"), labels_uri=str(tmp_path / f"lab.idx{suffix}"))
        )
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()


def test_npz_rgb_resized(tmp_path):
    rgb = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    np.savez(tmp_path / "d.npz", images=rgb, labels=np.array([0, 1, 0, 1]))
    ds = load_dataset(DataConfig(uri=str(tmp_path / "d.npz"), resolution=32, channels=3))
    assert ds.images.shape == (4, 3, 32, 32)
    assert ds.images[:, 0].min() == 255 and ds.images[:, 1].max() == 0
    gray = load_dataset(DataConfig(uri=str(tmp_path / "d.npz"), resolution=64, channels=1))
    assert gray.images.shape == (4, 1, 64, 64) and int(gray.images[0, 0, 0, 0]) == round(0.299 * 255)


def test_png_folder_with_classes(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(DataConfig(uri=str(tmp_path)))
    assert ds.images.shape == (6, 1, 28, 28)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_memory_uri(small):
    import fsspec

    images, _ = small
    with fsspec.open("memory://data/x.idx", "wb") as handle:
        handle.write(idx_bytes(images))
    assert len(load_dataset(DataConfig(uri="memory://data/x.idx"))) == 12


def test_npz_through_s3_api_server(bucket, small, tmp_path):
    import s3fs

    name, options = bucket
    images, labels = small
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    s3fs.S3FileSystem(**options).put(str(tmp_path / "d.npz"), f"{name}/data/d.npz")
    import json

    ds = load_dataset(DataConfig(uri=f"s3://{name}/data/d.npz", storage_options=json.dumps(options)))
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))


@pytest.mark.parametrize(
    ("name", "payload", "fragment"),
    [
        ("trunc.idx", idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100], "truncated or corrupt"),
        ("magic.idx", b"\x12\x34\x56\x78rest", "not an IDX file (bad magic number"),
        ("empty.idx", b"", "empty file"),
        ("bad.gz", b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
        ("nopixels.idx", bytes([0, 0, 8, 3, 0, 0, 0, 5]) + bytes(8), "shape (5, 0, 0): items of no size"),
        ("noimg.npz", None, "no image array; expected key 'images'"),
    ],
)
def test_corrupt_files_name_file_and_problem(tmp_path, name, payload, fragment):
    path = tmp_path / name
    if payload is None:
        np.savez(path, something=np.zeros(3))
    else:
        path.write_bytes(payload)
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(uri=str(path)))
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_gzip_expands_no_further_than_its_limit():
    """Plain, multi-member and truncated gzip, and bombs: past what an IDX header states, past
    the size limit, or a header that states more than the limit; each stops at the limit."""
    from gan.data.datasets import gunzip

    images = np.arange(12 * 28 * 28, dtype=np.uint8).reshape(12, 28, 28)
    raw = idx_bytes(images)
    assert gunzip(gzip.compress(raw), "x") == raw
    assert gunzip(gzip.compress(raw[:7]) + gzip.compress(raw[7:]), "x") == raw
    zeros = bytes(8 << 20)
    cases = [
        (gzip.compress(raw + zeros), 1 << 30, f"expands beyond {len(raw):,} bytes (the size its IDX header states)"),
        (gzip.compress(zeros), 1 << 20, f"expands beyond {1 << 20:,} bytes (the limit)"),
        (gzip.compress(idx_bytes(np.zeros((0, 28, 28), np.uint8))[:4] + struct.pack(">3I", 2**31, 2**16, 2**16)),
         1 << 30, "its IDX header states"),
        (gzip.compress(raw)[:-40], 1 << 30, "corrupt gzip data (truncated)"),
    ]  # fmt: skip
    for payload, limit, fragment in cases:
        with pytest.raises(DataError) as err:
            gunzip(payload, "bomb.idx.gz", limit)
        assert str(err.value).startswith("bomb.idx.gz: ") and fragment in str(err.value)


def test_corrupt_png_names_the_file(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "ok.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="ok.png: not a readable image"):
        load_dataset(DataConfig(uri=str(tmp_path)))


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(DataConfig(uri=str(tmp_path / "typo.npz")))
    with pytest.raises(DataError, match="holds no .png"):
        load_dataset(DataConfig(uri=str(tmp_path)))


def test_an_unknown_scheme_is_a_data_error_naming_the_uri_for_images_and_labels(tmp_path, small):
    (tmp_path / "i.idx").write_bytes(idx_bytes(small[0]))
    with pytest.raises(DataError, match=r"^nope://d.npz: cannot open this URI"):
        load_dataset(DataConfig(uri="nope://d.npz"))
    with pytest.raises(DataError, match=r"^nope://l.idx: cannot open this URI"):
        load_dataset(DataConfig(uri=str(tmp_path / "i.idx"), labels_uri="nope://l.idx"))


def test_label_count_mismatch(tmp_path, small):
    images, _ = small
    (tmp_path / "i.idx").write_bytes(idx_bytes(images))
    (tmp_path / "l.idx").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="5 labels for 12 images"):
        load_dataset(DataConfig(uri=str(tmp_path / "i.idx"), labels_uri=str(tmp_path / "l.idx")))


def test_npz_over_http(tmp_path, small):
    """fsspec's HTTP filesystem (the https:// path) against a server on 127.0.0.1."""
    import functools
    import http.server
    import threading

    images, labels = small
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ds = load_dataset(DataConfig(uri=f"http://127.0.0.1:{server.server_port}/d.npz"))
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images)) and ds.labels.tolist() == labels.tolist()
        with pytest.raises(DataError, match="no such file or folder"):
            load_dataset(DataConfig(uri=f"http://127.0.0.1:{server.server_port}/typo.npz"))
    finally:
        server.shutdown()
        server.server_close()
