"""The dataset tool (gan/data/prepare.py, pipelines/prepare_data.py) and reading what it writes."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gan.core.config import RESOLUTIONS, ConfigError, DataConfig, ModelConfig
from gan.core.models import build_models
from gan.data import datasets as data_mod
from gan.data import prepare as prepare_mod
from gan.data.datasets import MANIFEST, DataError, load_dataset
from gan.data.prepare import PrepareConfig, PrepareError, prepare

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def png(color=RED, size=(20, 20), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def idx_bytes(array: np.ndarray) -> bytes:
    import struct

    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, payload in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(payload)
    return root


def run(source, dest, log=None, **kw) -> dict:
    return prepare(PrepareConfig(source=str(source), dest=str(dest), **kw), log=log or io.StringIO())


def load(uri, resolution=32, channels=3, **kw):
    return load_dataset(DataConfig(uri=str(uri), resolution=resolution, channels=channels, **kw))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data_mod.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def animals(tmp_path) -> Path:
    """cat/ red and dog/ blue images of different sizes and aspect ratios."""
    files = {f"cat/{i}.png": png(RED, (20 + 7 * i, 16 + i)) for i in range(2)}
    files["cat/2 [copy].png"] = png(RED, (34, 18))  # brackets: not a glob
    files |= {f"dog/{i}.jpg": _jpeg(BLUE, (40, 30 + i)) for i in range(2)}
    return write_tree(tmp_path / "animals", files)


def _jpeg(color, size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_folder_with_subfolder_labels_round_trips_with_the_manifest_fingerprint(animals, tmp_path):
    manifest = run(animals, tmp_path / "out", resolution=32, shard_size=2)
    assert manifest["count"] == 5 and manifest["shape"] == [3, 32, 32] and manifest["class_names"] == ["cat", "dog"]
    assert len(manifest["shards"]) == 3 and manifest["skipped"] == 0 and manifest["source"] == str(animals)
    on_disk = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert on_disk["sha256"] == manifest["sha256"] == prepare_mod.manifest_sha256(on_disk)
    shard = np.load(tmp_path / "out" / manifest["shards"][0]["images"], allow_pickle=False)
    assert shard.dtype == np.uint8 and shard.shape == (2, 3, 32, 32)

    ds = load(tmp_path / "out")
    assert ds.fingerprint == manifest["sha256"] and ds.class_names == ("cat", "dog")
    assert ds.images.shape == (5, 3, 32, 32) and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.images[:3, 0].min() == 255 and ds.images[:3, 2].max() == 0  # red
    assert ds.images[3:, 2].min() >= 250 and ds.images[3:, 0].max() <= 5  # blue (JPEG)
    assert leftovers(tmp_path) == []


def test_csv_labels(tmp_path):
    src = write_tree(tmp_path / "flat", {"a.png": png(RED), "b.png": png(BLUE), "c.png": png(GREEN)})
    (src / "labels.csv").write_text("path,label\na.png,warm\nb.png,cold\n")
    log = io.StringIO()
    manifest = prepare(PrepareConfig(source=str(src), dest=str(tmp_path / "out"), labels=str(src / "labels.csv"),
                                     resolution=28), log=log)  # fmt: skip
    assert manifest["class_names"] == ["cold", "warm"] and manifest["count"] == 2
    assert load(tmp_path / "out", resolution=28).labels.tolist() == [1, 0]
    assert f"skipped {src}/c.png: no row in the labels CSV" in log.getvalue()
    assert f"skipped {src}/labels.csv" not in log.getvalue()  # the CSV itself is no input


def test_zip_strips_its_top_folder_and_ignores_unsafe_members(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("photos/a/1.png", png(RED))
        zf.writestr("photos/a/2.png", png(RED))
        zf.writestr("photos/b/1.png", png(BLUE))
        zf.writestr("../evil.png", png(GREEN))
        zf.writestr("/abs/x.png", png(GREEN))
    log = io.StringIO()
    manifest = run(archive, tmp_path / "out", resolution=28, log=log)
    assert manifest["count"] == 3 and manifest["class_names"] == ["a", "b"] and manifest["skipped"] == 2
    assert f"skipped {archive}!../evil.png: unsafe member name" in log.getvalue()
    assert f"skipped {archive}!/abs/x.png: unsafe member name" in log.getvalue()
    assert load(tmp_path / "out", resolution=28).labels.tolist() == [0, 0, 1]


def test_tar_gz_streams_and_names_links(tmp_path):
    archive = tmp_path / "icons.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, payload in (("x/1.png", png(RED)), ("y/2.png", png(BLUE)), ("y/3.png", png(BLUE))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("y/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    log = io.StringIO()
    manifest = run(archive, tmp_path / "out", resolution=28, channels=1, log=log)
    assert manifest["count"] == 3 and manifest["class_names"] == ["x", "y"] and manifest["shape"] == [1, 28, 28]
    assert f"skipped {archive}!y/link.png: a link or special file" in log.getvalue()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_plain_and_gz_with_labels(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8) % 4
    write = gzip.compress if compress else (lambda b: b)
    (tmp_path / "img.idx").write_bytes(write(idx_bytes(images)))
    (tmp_path / "lab.idx").write_bytes(write(idx_bytes(labels)))
    manifest = run(tmp_path / "img.idx", tmp_path / "out", labels=str(tmp_path / "lab.idx"), resolution=28, channels=1)
    assert manifest["class_names"] == ["0", "1", "2", "3"]
    ds = load(tmp_path / "out", resolution=28, channels=1)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))  # same size: written as they were
    assert ds.labels.tolist() == labels.tolist()


def test_npz_with_and_without_labels(tmp_path):
    rgb = np.zeros((4, 16, 16, 3), np.uint8)
    rgb[..., 1] = 255
    np.savez(tmp_path / "d.npz", images=rgb, labels=np.array([0, 2, 0, 2]))
    manifest = run(tmp_path / "d.npz", tmp_path / "out", resolution=32)
    ds = load(tmp_path / "out")
    assert manifest["class_names"] == ["0", "1", "2"] and ds.labels.tolist() == [0, 2, 0, 2]
    assert ds.images.shape == (4, 3, 32, 32) and ds.images[:, 1].min() == 255 and ds.images[:, 0].max() == 0
    unlabelled = run(tmp_path / "d.npz", tmp_path / "plain", resolution=32, infer_labels=False)
    assert unlabelled["class_names"] == [] and load(tmp_path / "plain").labels is None


@pytest.mark.parametrize(("background", "expected"), [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                                      ("#336699", (0x33, 0x66, 0x99))])  # fmt: skip
def test_rgba_is_composited_on_the_background(tmp_path, background, expected):
    image = Image.new("RGBA", (28, 28), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 255, 0, 255), (10, 10, 18, 18))  # an opaque green square
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_tree(tmp_path / "src", {"a.png": buffer.getvalue()})
    run(tmp_path / "src", tmp_path / "out", resolution=28, background=background)
    pixels = load(tmp_path / "out", resolution=28).images[0]
    assert tuple(pixels[:, 0, 0].tolist()) == expected
    assert tuple(pixels[:, 14, 14].tolist()) == GREEN


def test_grayscale_and_rgb_and_centre_crop(tmp_path):
    wide = Image.new("RGB", (60, 20), RED)
    wide.paste(GREEN, (20, 0, 40, 20))  # only the centre square is green
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    write_tree(tmp_path / "src", {"wide.png": buffer.getvalue()})
    run(tmp_path / "src", tmp_path / "rgb", resolution=28)
    rgb = load(tmp_path / "rgb", resolution=28).images[0]
    assert rgb[1].min() == 255 and rgb[0].max() == 0  # the red sides were cropped away
    run(tmp_path / "src", tmp_path / "gray", resolution=28, channels=1)
    gray = load(tmp_path / "gray", resolution=28, channels=1).images[0]
    assert gray.shape == (1, 28, 28) and int(gray[0, 14, 14]) == round(0.587 * 255)  # ITU-R 601 luma of green


def test_bad_files_are_named_and_counted(tmp_path):
    sixteen = io.BytesIO()
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(sixteen, format="PNG")
    files = {
        "ok/1.png": png(RED),
        "ok/2.png": png(RED),
        "ok/corrupt.png": b"not a png",
        "ok/truncated.png": png(RED, (64, 64))[:60],
        "ok/16bit.png": sixteen.getvalue(),
        "ok/bomb.png": png(RED, (300, 300)),  # over the max_pixels given below
        "ok/notes.txt": b"hello",
    }
    src = write_tree(tmp_path / "src", files)
    log = io.StringIO()
    manifest = run(src, tmp_path / "out", resolution=28, max_pixels=50_000, log=log)
    text = log.getvalue()
    assert manifest["count"] == 2 and manifest["skipped"] == 5
    for name, reason in [
        ("corrupt.png", "not a readable image"),
        ("truncated.png", "not a readable image"),
        ("16bit.png", "mode I;16 (16-bit or float) is not supported"),
        ("bomb.png", "300x300 pixels is over the limit of 50,000"),
        ("notes.txt", "not an image"),
    ]:
        assert f"skipped {src}/ok/{name}: {reason}" in text, text
    assert "skipped 5 files (each named above)" in text


def test_nothing_readable_is_an_error_and_writes_nothing(tmp_path):
    src = write_tree(tmp_path / "src", {"a.png": b"junk", "b.jpg": b"junk"})
    with pytest.raises(PrepareError, match=r"nothing readable \(2 files skipped; .*/a.png: not a readable image"):
        run(src, tmp_path / "out", log=io.StringIO())
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing", "no such file or folder"),
        ("unknown", "unknown format; expected a folder of images"),
        ("resolution", "resolution 48 is not one of 28, 32, 64, 128"),
        ("background", "unknown background colour 'blurple'"),
        ("exists", "a prepared dataset is already there; pass --overwrite"),
        ("not-a-dataset", "exists and is not a prepared dataset"),
        ("labels", "no such labels file"),
    ],
)
def test_bad_requests_fail_before_any_image_is_read(tmp_path, animals, monkeypatch, case, fragment):
    dest = tmp_path / "out"
    if case == "exists":
        run(animals, dest, resolution=28)
    monkeypatch.setattr(prepare_mod, "_convert", lambda *a: pytest.fail("an image was read"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    kw = {
        "missing": {"source": str(tmp_path / "typo")},
        "unknown": {"source": str(tmp_path / "notes.txt")},
        "resolution": {"resolution": 48},
        "background": {"background": "blurple"},
        "not-a-dataset": {"dest": str(tmp_path / "busy")},
        "labels": {"labels": str(tmp_path / "typo.csv")},
    }.get(case, {})
    with pytest.raises(DataError, match=fragment):  # PrepareError for the request, DataError for the source
        prepare(PrepareConfig(**({"source": str(animals), "dest": str(dest), "resolution": 28} | kw)))
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


def test_overwrite_replaces_only_when_asked(animals, tmp_path):
    first = run(animals, tmp_path / "out", resolution=28)
    with pytest.raises(PrepareError, match="already there"):
        run(animals, tmp_path / "out", resolution=32)
    assert load(tmp_path / "out", resolution=28).fingerprint == first["sha256"]
    second = run(animals, tmp_path / "out", resolution=32, overwrite=True)
    assert second["sha256"] != first["sha256"] and load(tmp_path / "out").fingerprint == second["sha256"]
    assert len(list((tmp_path / "out").glob("images-*.npy"))) == len(second["shards"])
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_run_leaves_nothing_under_the_final_name(animals, tmp_path, monkeypatch, error):
    real_put = prepare_mod._LocalSink.put
    calls = []

    def failing_put(self, *args):
        calls.append(args)
        if len(calls) == 2:
            raise error
        return real_put(self, *args)

    monkeypatch.setattr(prepare_mod._LocalSink, "put", failing_put)
    with pytest.raises(type(error)):
        run(animals, tmp_path / "out", resolution=28, shard_size=2)
    assert len(calls) == 2  # one shard was written before the failure
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_dataset(animals, tmp_path, monkeypatch):
    first = run(animals, tmp_path / "out", resolution=28)
    monkeypatch.setattr(prepare_mod._LocalSink, "publish", lambda self, m: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(OSError):
        run(animals, tmp_path / "out", resolution=32, overwrite=True)
    assert load(tmp_path / "out", resolution=28).fingerprint == first["sha256"] and leftovers(tmp_path) == []


def test_reader_refuses_changed_shards_and_mismatched_config(animals, tmp_path):
    manifest = run(animals, tmp_path / "out", resolution=32)
    with pytest.raises(DataError, match=r"prepared at 32 px RGB, but data.resolution=28 and data.channels=1") as err:
        load(tmp_path / "out", resolution=28, channels=1)
    assert str(err.value).endswith("(for RGB images, start from --preset dcgan-32)")
    with pytest.raises(DataError, match="carries its own labels"):
        load(tmp_path / "out", labels_uri=str(tmp_path / "x.idx"))
    shard = tmp_path / "out" / manifest["shards"][0]["images"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{shard}: shard sha256 does not match the manifest"):
        load(tmp_path / "out")
    edited = json.loads((tmp_path / "out" / MANIFEST).read_text()) | {"class_names": ["x", "y"]}
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(edited))
    with pytest.raises(DataError, match="was changed after it was written"):
        load(tmp_path / "out")


def _s3(bucket):
    import s3fs

    name, options = bucket
    return s3fs.S3FileSystem(**options), name, json.dumps(options)


def test_s3_to_s3_and_the_node_cache_reads_no_shard_twice(bucket, animals, tmp_path, cache):
    fs, name, options = _s3(bucket)
    for path in sorted(animals.rglob("*.*")):
        fs.pipe_file(f"{name}/raw/animals/{path.relative_to(animals)}", path.read_bytes())
    dest = f"s3://{name}/prepared/animals32"
    manifest = prepare(PrepareConfig(source=f"s3://{name}/raw/animals", dest=dest, resolution=32, shard_size=2,
                                     storage_options=options), log=io.StringIO())  # fmt: skip
    assert manifest["count"] == 5 and manifest["class_names"] == ["cat", "dog"]
    assert sorted(fs.ls(f"{name}/prepared/animals32", detail=False))[-1].endswith(MANIFEST)

    first = load(dest, storage_options=options)
    assert first.fingerprint == manifest["sha256"] and first.labels.tolist() == [0, 0, 0, 1, 1]
    assert sorted(p.name for p in cache.iterdir() if p.is_dir() and p.name != data_mod.STAMPS) == [manifest["sha256"]]
    # With the shards gone from the bucket, only the node's copy can serve them.
    fs.rm([f"{name}/prepared/animals32/{s['images']}" for s in manifest["shards"]])
    second = load(dest, storage_options=options)
    assert second.fingerprint == first.fingerprint and torch.equal(second.images, first.images)


def test_s3_missing_bucket_fails_before_any_image_is_read(bucket, animals, monkeypatch):
    _, _, options = _s3(bucket)
    monkeypatch.setattr(prepare_mod, "_convert", lambda *a: pytest.fail("an image was read"))
    with pytest.raises(PrepareError, match="no bucket 'no-such-bucket'"):
        prepare(PrepareConfig(source=str(animals), dest="s3://no-such-bucket/x", storage_options=options))


def test_s3_interrupted_run_publishes_no_dataset(bucket, animals, monkeypatch):
    fs, name, options = _s3(bucket)
    real_put = prepare_mod._ObjectSink.put
    calls = []

    def failing_put(self, *args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("connection reset")
        return real_put(self, *args)

    monkeypatch.setattr(prepare_mod._ObjectSink, "put", failing_put)
    dest = f"s3://{name}/prepared/broken"
    with pytest.raises(RuntimeError):
        prepare(PrepareConfig(source=str(animals), dest=dest, resolution=28, shard_size=2, storage_options=options))
    assert not fs.exists(f"{name}/prepared/broken/{MANIFEST}")
    fs.invalidate_cache()
    assert fs.find(f"{name}/prepared") == []  # the shard it wrote was deleted again
    with pytest.raises(DataError):
        load(dest, resolution=28, storage_options=options)


def test_racing_workers_fill_the_cache_once(animals, tmp_path, cache, monkeypatch):
    import fsspec

    run(animals, tmp_path / "out", resolution=32, shard_size=2)
    remote = "memory://racing/animals32"
    fsspec.filesystem("memory").put(str(tmp_path / "out"), "/racing/animals32", recursive=True)
    fetched = []
    real_download = data_mod._download
    monkeypatch.setattr(data_mod, "_download", lambda fs, p, *a: fetched.append(p) or real_download(fs, p, *a))
    results = []
    threads = [threading.Thread(target=lambda: results.append(load(remote))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len({r.fingerprint for r in results}) == 1
    assert len([p for p in fetched if "images-" in p]) == 3  # 3 shards, each fetched once
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no partial copies left


def test_cli_help_and_a_run(tmp_path, animals):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    tool = [sys.executable, "-W", "ignore", "pipelines/prepare_data.py"]
    proc = subprocess.run([*tool, str(animals), str(tmp_path / "out"), "--resolution", "28", "--channels", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "5 images of 1x28x28, 2 classes (cat, dog)" in proc.stdout
        and "prepare: 5/5 read, 5 kept, 0 skipped" in proc.stderr
    )

    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("prepare_data", ROOT / "pipelines" / "prepare_data.py")
    tool_mod = module_from_spec(spec)
    spec.loader.exec_module(tool_mod)
    with pytest.raises(SystemExit) as exit_info:
        tool_mod.main(["--help"])
    assert exit_info.value.code == 0
    assert tool_mod.main([str(animals), str(tmp_path / "out")]) == 2  # exists, refused
    assert tool_mod.main([str(animals), str(tmp_path / "new"), "--background", "blurple"]) == 2


def test_one_list_of_resolutions_for_the_tool_and_training(tmp_path):
    write_tree(tmp_path / "src", {"a.png": png(RED, (200, 150))})
    assert run(tmp_path / "src", tmp_path / "out", resolution=128)["shape"] == [3, 128, 128]
    assert load(tmp_path / "out", resolution=128).images.shape == (1, 3, 128, 128)
    with pytest.raises(DataError, match="prepared at 128 px RGB, but data.resolution=64"):
        load(tmp_path / "out", resolution=64)
    allowed = ", ".join(map(str, RESOLUTIONS))
    with pytest.raises(PrepareError, match=f"^resolution 48 is not one of {allowed}$"):
        run(tmp_path / "src", tmp_path / "out48", resolution=48)
    with pytest.raises(ConfigError, match=f"choose one of {allowed}$"):
        DataConfig(resolution=48)
    for family in ("mlp", "dcgan", "resnet"):  # every family builds at every listed size
        for resolution in RESOLUTIONS:
            G, D = build_models(ModelConfig(family=family, width=4, z_dim=8), resolution, 3)
            fakes = G(torch.randn(2, 8))
            assert fakes.shape == (2, 3, resolution, resolution) and D(fakes).shape == (2,)


def test_worker_processes_write_the_same_dataset(animals, tmp_path):
    (animals / "cat" / "broken.png").write_bytes(b"junk")
    log = io.StringIO()
    one = run(animals, tmp_path / "one", resolution=32, shard_size=2)
    two = run(animals, tmp_path / "two", resolution=32, shard_size=2, workers=2, log=log)
    assert two["sha256"] == one["sha256"] and two["skipped"] == one["skipped"] == 1
    assert f"skipped {animals}/cat/broken.png: not a readable image" in log.getvalue()


def test_zip_and_csv_read_from_s3(bucket, tmp_path):
    fs, name, options = _s3(bucket)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("a.png", png(RED))
        zf.writestr("b.png", png(BLUE))
    fs.pipe_file(f"{name}/raw/icons.zip", buffer.getvalue())
    fs.pipe_file(f"{name}/raw/labels.csv", b"a.png,warm\nb.png,cold\n")
    manifest = prepare(PrepareConfig(source=f"s3://{name}/raw/icons.zip", dest=str(tmp_path / "out"), resolution=28,
                                     labels=f"s3://{name}/raw/labels.csv", storage_options=options))  # fmt: skip
    assert manifest["class_names"] == ["cold", "warm"] and load(tmp_path / "out", resolution=28).labels.tolist() == [
        1,
        0,
    ]
