"""load_dataset: the embedded digits, and raw sources prepared by the dataset tool into the
node cache (the same pixels, labels and fingerprint as preparing them by hand)."""

import gzip
import io
import struct
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gan.core.config import DataConfig
from gan.data import datasets as data_mod
from gan.data.datasets import DataError, load_dataset
from gan.data.prepare import PrepareConfig, convert_pixels, prepare


def idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data_mod.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def small():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 3


def test_embedded_digits(digits):
    assert digits.images.shape == (5000, 1, 28, 28) and digits.images.dtype == torch.uint8
    assert torch.bincount(digits.labels).tolist() == [500] * 10
    assert len(digits.fingerprint) == 64
    assert load_dataset(DataConfig()).fingerprint == digits.fingerprint  # stable
    # As they ship, unconverted: the default preset's data and fingerprint never change.
    assert digits.fingerprint == "d3d0083f1c091e7c9d76974f9d3fbb92b521258ccebc03de8bbd6c3c226e8239"


def test_embedded_digits_at_another_size_convert_as_the_tool_does(digits, tmp_path):
    rgb32 = load_dataset(DataConfig(resolution=32, channels=3))
    assert rgb32.images.shape == (5000, 3, 32, 32) and torch.equal(rgb32.labels, digits.labels)
    every_50th = slice(None, None, 50)
    np.savez(tmp_path / "d.npz", images=digits.images[every_50th, 0].numpy(), labels=digits.labels[every_50th].numpy())
    prepare(PrepareConfig(source=str(tmp_path / "d.npz"), dest=str(tmp_path / "d32"), resolution=32), log=io.StringIO())
    tool = load_dataset(DataConfig(uri=str(tmp_path / "d32"), resolution=32, channels=3))
    assert torch.equal(rgb32.images[every_50th], tool.images)


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


def test_npz_rgb_resized_by_the_tool(tmp_path):
    rgb = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    np.savez(tmp_path / "d.npz", images=rgb, labels=np.array([0, 1, 0, 1]))
    ds = load_dataset(DataConfig(uri=str(tmp_path / "d.npz"), resolution=32, channels=3))
    assert ds.images.shape == (4, 3, 32, 32) and ds.class_names == ("0", "1")
    assert ds.images[:, 0].min() == 255 and ds.images[:, 1].max() == 0
    gray = load_dataset(DataConfig(uri=str(tmp_path / "d.npz"), resolution=64, channels=1))
    assert gray.images.shape == (4, 1, 64, 64) and int(gray.images[0, 0, 0, 0]) == round(0.299 * 255)
    assert torch.equal(gray.images[0], torch.from_numpy(convert_pixels(rgb[0].transpose(2, 0, 1), 64, 1).copy()))


def test_png_folder_with_classes(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28), 40 * i, dtype=np.uint8)).save(tmp_path / "src" / cls / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        ds = load_dataset(DataConfig(uri=str(tmp_path / "src")))
    assert ds.images.shape == (6, 1, 28, 28) and ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def photos(root):
    """A folder the two paths once converted differently: sizes and aspect ratios that need a
    crop and a resize, a palette image with transparency, eight suffixes."""
    rng = np.random.default_rng(1)
    for i, (cls, size, suffix) in enumerate(
        [("cat", (40, 30), ".png"), ("cat", (33, 33), ".jpg"), ("cat", (20, 50), ".webp"), ("dog", (64, 48), ".bmp"),
         ("dog", (30, 30), ".gif"), ("dog", (45, 60), ".tiff")]
    ):  # fmt: skip
        (root / cls).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        image.save(root / cls / f"{i}{suffix}")
    rgba = Image.new("RGBA", (28, 20), (0, 0, 255, 0))
    rgba.paste((255, 0, 0, 255), (8, 4, 20, 16))
    rgba.save(root / "dog" / "alpha.png")
    return root


def test_a_folder_trains_on_what_the_tool_prepares(tmp_path):
    src = photos(tmp_path / "photos")
    direct = load_dataset(DataConfig(uri=str(src), resolution=32, channels=3))
    prepare(PrepareConfig(source=str(src), dest=str(tmp_path / "prepared"), resolution=32), log=io.StringIO())
    by_hand = load_dataset(DataConfig(uri=str(tmp_path / "prepared"), resolution=32, channels=3))
    assert direct.images.shape == (7, 3, 32, 32)
    assert torch.equal(direct.images, by_hand.images) and torch.equal(direct.labels, by_hand.labels)
    assert direct.class_names == by_hand.class_names == ("cat", "dog")
    assert direct.fingerprint == by_hand.fingerprint and direct.source == str(src)
    white, red = direct.images[6, :, 0, 0].tolist(), direct.images[6, :, 16, 16].tolist()
    assert white == [255, 255, 255] and red == [255, 0, 0]  # composited on white, centre-cropped


def test_a_raw_source_is_prepared_once_per_node_and_again_when_it_changes(tmp_path, cache, monkeypatch):
    src = photos(tmp_path / "photos")
    calls = []
    real_prepare = data_mod.prepare
    monkeypatch.setattr(data_mod, "prepare", lambda *a, **kw: calls.append(a) or real_prepare(*a, **kw))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(load_dataset(DataConfig(uri=str(src))))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len({r.fingerprint for r in results}) == 1 and len(calls) == 1
    converted = cache / data_mod.CONVERTED
    assert len([p for p in converted.iterdir() if p.is_dir()]) == 1  # no partial folders left

    load_dataset(DataConfig(uri=str(src), resolution=32))  # another setting: prepared again
    Image.new("RGB", (30, 30), (0, 255, 0)).save(src / "cat" / "new.png")
    grown = load_dataset(DataConfig(uri=str(src)))  # a changed folder: prepared again
    assert len(calls) == 3 and len(grown) == 8 and grown.fingerprint != results[0].fingerprint


def test_csv_labels_through_labels_uri(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for name, value in (("a", 10), ("b", 200), ("c", 90)):
        Image.fromarray(np.full((28, 28), value, np.uint8)).save(src / f"{name}.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,dark\nb.png,light\nc.png,dark\n")
    ds = load_dataset(DataConfig(uri=str(src), labels_uri=str(tmp_path / "labels.csv")))
    assert ds.class_names == ("dark", "light") and ds.labels.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match=r"labels.csv: row 1 is \['a.png'\]; expected path,label"):
        (tmp_path / "labels.csv").write_text("a.png\n")
        load_dataset(DataConfig(uri=str(src), labels_uri=str(tmp_path / "labels.csv")))
    with pytest.raises(DataError, match=r"x.csv: an .npz file carries its own labels"):
        np.savez(tmp_path / "d.npz", images=np.zeros((2, 28, 28), np.uint8))
        load_dataset(DataConfig(uri=str(tmp_path / "d.npz"), labels_uri=str(tmp_path / "x.csv")))


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
        ("magic.idx", b"\x12\x34\x56\x78rest", "unknown format; expected a folder of images"),
        ("empty.idx", b"", "the file is empty"),
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
    from gan.data.sources import gunzip

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


def test_colour_images_under_grayscale_settings_name_the_rgb_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("GAN_DATA_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((30, 30, 3), (200, 30, 30), np.uint8)).save(src / "red.png")
    with pytest.warns(
        UserWarning,
        match=r"colour images trained in grey \(data.channels=1\); for RGB images start from --preset dcgan-64",
    ):
        load_dataset(DataConfig(uri=str(src)))
    grey = tmp_path / "grey"
    (grey / "deeper").mkdir(parents=True)  # images at two depths: the tool notes it, not as colour
    Image.fromarray(np.full((30, 30), 90, np.uint8)).save(grey / "g.png")
    Image.fromarray(np.full((30, 30), 40, np.uint8)).save(grey / "deeper" / "h.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset(DataConfig(uri=str(grey)))


def test_a_corrupt_png_is_left_out_and_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(src / "a.png")
    (src / "ok.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"1 files left out \(.*ok.png: not a readable image"):
        assert len(load_dataset(DataConfig(uri=str(src)))) == 1
    (src / "a.png").write_bytes(b"not a png either")
    with pytest.raises(DataError, match=r"nothing readable \(2 files skipped; .*a.png: not a readable image") as err:
        load_dataset(DataConfig(uri=str(src)))
    assert str(err.value).startswith(f"{src}: ") and "\n" not in str(err.value)


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_dataset(DataConfig(uri=str(tmp_path / "typo.npz")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: holds no images"):
        load_dataset(DataConfig(uri=str(tmp_path / "empty")))


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
