"""Hostile files are bounded in time and memory, in the dataset tool and in training's loader:
special files and links to them are never opened, every read has a byte cap, archives and
.npz arrays are checked before they expand, and a full disk keeps what was there.

Each hostile case runs as a user would run it, a new process of pipelines/prepare_data.py or
pipelines/train.py, under an address-space limit (a regression fails instead of eating the
machine) and a timeout guard (a regression that blocks on a FIFO fails instead of hanging the
suite); its process group is killed whatever happens.
"""

from __future__ import annotations

import gzip
import io
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from entry import Exit, call
from PIL import Image

from gan.core.config import DataConfig
from gan.data import datasets as data_mod
from gan.data import prepare as prepare_mod
from gan.data.datasets import load_dataset
from gan.data.prepare import PrepareConfig
from gan.data.sources import Item

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 << 30  # address space of each command: torch and the tool fit in well under this
TIMEOUT_S = 120  # a guard against a hang only: these commands take seconds, more on a loaded machine


def png(color=(255, 0, 0), size=(20, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def run_bounded(tmp_path: Path, script: str, *argv: str, max_file_bytes: int = 0) -> Exit:
    """pipelines/<script> in a new process under MEMORY_LIMIT (and, with ``max_file_bytes``, a
    file-size limit that makes a write fail as on a full disk)."""

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        if max_file_bytes:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = os.environ | {data_mod.CACHE_ENV: str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, f"pipelines/{script}", *argv], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limits, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "Traceback" not in err, err[-3000:]
    return Exit(proc.returncode, out, err)


def train(tmp_path: Path, uri: Path, *sets: str) -> Exit:
    return run_bounded(tmp_path, "train.py", "--preset", "debug", "--in-process", "--no-tracking", "--storage",
                       str(tmp_path / "runs"), "--set", f"data.uri={uri}", *sets)  # fmt: skip


@pytest.fixture
def hostile(tmp_path) -> Path:
    """A folder of images with a FIFO, a socket and a link to /dev/zero named like images, a
    link inside the folder and one out of it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    (folder / "inside.png").symlink_to("ok.png")
    (tmp_path / "blue.png").write_bytes(png((0, 0, 255)))
    (folder / "outside.png").symlink_to(tmp_path / "blue.png")
    os.mkfifo(folder / "x.png")  # opening it for reading blocks until a writer comes: never
    (folder / "zero.png").symlink_to("/dev/zero")  # reading it never ends
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "s.png"))
    yield folder
    server.close()


def test_special_files_and_links_are_skipped_by_name_unopened(hostile, tmp_path):
    made = run_bounded(tmp_path, "prepare_data.py", str(hostile), str(tmp_path / "out"), "--resolution", "32")
    assert made.code == 0, made.err[-3000:]
    assert f"skipped {hostile}/x.png: a FIFO, not a regular file: not opened" in made.err
    assert f"skipped {hostile}/s.png: a socket, not a regular file: not opened" in made.err
    assert f"skipped {hostile}/zero.png: a link to a character device (/dev/zero), not a regular file" in made.err
    assert f"skipped {hostile}/outside.png: a link out of the source folder (to {tmp_path}/blue.png), " in made.err
    assert "--follow-links reads it" in made.err
    assert "2 images of 3x32x32" in made.out and "4 skipped" in made.out  # ok.png and the link inside

    followed = run_bounded(tmp_path, "prepare_data.py", str(hostile), str(tmp_path / "all"), "--resolution", "32",
                           "--follow-links")  # fmt: skip
    assert followed.code == 0 and "3 images of 3x32x32" in followed.out, followed.err[-3000:]
    assert "outside.png" not in followed.err and "zero.png: a link to a character device" in followed.err


def test_training_on_a_folder_of_special_files_fails_in_one_line(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    os.mkfifo(folder / "x.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    train(tmp_path, folder).one_line(f"error: {folder}: nothing readable (2 files skipped; {folder}/x.png: a FIFO")


@pytest.mark.parametrize("script", ["prepare_data.py", "train.py"])
@pytest.mark.parametrize("kind", ["fifo", "link-to-dev-zero"])
def test_a_special_file_as_the_source_is_refused_unopened(tmp_path, script, kind):
    if kind == "fifo":
        source = tmp_path / "train-images-idx3-ubyte"
        os.mkfifo(source)
        message = f"error: {source}: a FIFO, not a regular file: not opened"
    else:
        source = tmp_path / "digits.npz"
        source.symlink_to("/dev/zero")
        message = f"error: {source}: a character device, not a regular file: not opened"
    if script == "train.py":
        refused = train(tmp_path, source)
    else:
        refused = run_bounded(tmp_path, script, str(source), str(tmp_path / "out"), "--resolution", "28")
    refused.one_line(message)
    assert not (tmp_path / "out").exists()


def npz_bomb(path: Path) -> None:
    """An .npz whose 'images' header states uint8 (1281167, 64, 64, 3), 15.7 GB. A real one
    is 15 MB of deflated zeros; only the header is read, so the data here is cut short."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (1281167, 64, 64, 3)}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(1 << 20))
        archive.writestr("labels.npy", header.getvalue()[:0] + _npy(np.zeros(10, np.int64)))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("script", ["prepare_data.py", "train.py"])
def test_an_npz_bomb_is_refused_from_its_header(tmp_path, script):
    bomb = tmp_path / "imagenet64.npz"
    npz_bomb(bomb)
    if script == "train.py":
        refused = train(tmp_path, bomb)
    else:
        refused = run_bounded(tmp_path, script, str(bomb), str(tmp_path / "out"), "--resolution", "64")
    refused.one_line(
        f"error: {bomb}: 'images' is uint8 (1281167, 64, 64, 3), 15,742,980,096 bytes, over the limit of "
        "4,294,967,296 for one array (an .npz bomb? pipelines/prepare_data.py --max-array-mib raises it)"
    )


def test_an_npz_of_objects_is_refused_before_it_is_read(tmp_path, capfd):
    source = tmp_path / "objects.npz"
    np.savez(source, images=np.array([{"a": 1}] * 4, dtype=object))
    call(capfd, "prepare_data.py", str(source), str(tmp_path / "out")).one_line(
        f"{source}: 'images' has dtype object; expected numbers"
    )


def test_gzip_idx_is_decompressed_into_one_buffer_of_its_stated_size(tmp_path):
    """256 MiB of images stated and held: the process's peak grows by that, not by a growing
    buffer and then its copy (twice as much)."""
    stated = 256 << 20
    count = stated // (64 * 64)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        out.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", count, 64, 64))
        for _ in range(stated // (64 << 20)):
            out.write(bytes(64 << 20))
    # VmHWM, the peak since exec; ru_maxrss would start from this test process's, at the fork.
    script = (
        "import sys\n"
        "from gan.data.sources import Skips, Source\n"
        "def peak(): return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "before = peak()\n"
        "items, count = Source(sys.argv[1]).items(Skips(sys.stderr))\n"
        "assert count == int(sys.argv[2]), count\n"
        "print(peak() - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path), str(count)], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    grown = int(done.stdout)
    assert stated <= grown < stated * 1.25, (grown, stated)


def test_an_archive_that_expands_past_its_limit_is_refused(tmp_path, capfd):
    """Each member under the per-file limit, all of them together over the archive's limit."""
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for i in range(8):
            out.writestr(f"x/{i}.png", png() + bytes(300 << 10))  # trailing zeros: Pillow reads past them
    call(capfd, "prepare_data.py", str(archive), str(tmp_path / "out"), "--max-archive-mib", "2").one_line(
        f"error: {archive}: its members expand beyond 2,097,152 bytes, the limit for one archive (an archive bomb? "
        "pipelines/prepare_data.py --max-archive-mib raises it)"
    )
    assert not (tmp_path / "out").exists()


def test_a_tar_counts_the_members_it_skips_towards_its_limit(tmp_path, capfd):
    """Stream mode decompresses a member it skips to reach the next: members skipped for being
    over --max-file-mib still count towards --max-archive-mib."""
    archive = tmp_path / "icons.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        for name, payload in (("a/big1.png", bytes(3 << 19)), ("a/big2.png", bytes(3 << 19)), ("a/ok.png", png())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            out.addfile(info, io.BytesIO(payload))
    refused = call(capfd, "prepare_data.py", str(archive), str(tmp_path / "out"), "--max-file-mib", "1",
                   "--max-archive-mib", "2")  # fmt: skip
    assert (
        f"skipped {archive}!a/big1.png: 1,572,864 bytes is over the limit of 1,048,576 bytes per member" in refused.err
    )
    assert refused.code == 2 and refused.err.strip().splitlines()[-1].startswith(
        f"error: {archive}: its members expand beyond 2,097,152 bytes"
    ), refused.err


def test_folder_files_over_the_limit_are_skipped_by_name(tmp_path, capfd):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    (folder / "huge.png").write_bytes(png() + bytes(2 << 20))
    made = call(capfd, "prepare_data.py", str(folder), str(tmp_path / "out"), "--resolution", "32",
                "--max-file-mib", "1")  # fmt: skip
    assert made.code == 0 and "1 images of 3x32x32" in made.out, made.err
    assert (
        f"skipped {folder}/huge.png: {len(png()) + (2 << 20):,} bytes is over the limit of 1,048,576 bytes per file"
        in made.err
    )


def test_worker_read_ahead_is_bounded_in_bytes(monkeypatch):
    """With --workers, what is read but not yet written stays under READ_AHEAD_BYTES (and one
    file), whatever the number of files: a count alone would hold 8 x workers of them."""
    monkeypatch.setattr(prepare_mod, "READ_AHEAD_BYTES", 3 << 20, raising=False)
    size, read, ahead_most = 1 << 20, 0, 0

    def items():
        nonlocal read
        for i in range(40):
            read += 1
            yield Item(f"f{i}.png", bytes(size))  # not an image: each is skipped, quickly

    cfg = PrepareConfig(source="x", dest="y", workers=2)
    for done, (item, reason) in enumerate(prepare_mod._converted(items(), cfg, (255, 255, 255)), 1):
        assert isinstance(reason, str) and item.name == f"f{done - 1}.png"
        ahead_most = max(ahead_most, (read - done) * size)
    assert ahead_most <= (3 << 20) + size, ahead_most


def test_a_full_disk_keeps_the_previous_dataset(tmp_path):
    """The shard write fails (a file-size limit stands for the full disk): one line naming the
    destination; the dataset there still loads, bit for bit; nothing partial is left beside it."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i}.png").write_bytes(png((6 * i, 0, 255 - 6 * i)))
    dest = tmp_path / "prepared"
    first = run_bounded(tmp_path, "prepare_data.py", str(folder), str(dest), "--resolution", "32")
    assert first.code == 0, first.err[-3000:]
    before = load_dataset(DataConfig(uri=str(dest), resolution=32, channels=3))
    (folder / "new.png").write_bytes(png((0, 255, 0)))
    # 41 images of 3 x 32 x 32 make a shard of 126 KiB: the limit lets it start, not finish.
    full = run_bounded(tmp_path, "prepare_data.py", str(folder), str(dest), "--resolution", "32", "--overwrite",
                       max_file_bytes=64 << 10)  # fmt: skip
    full.one_line(
        f"error: {dest}: the disk is full (File too large): nothing was published, what was there is untouched"
    )
    after = load_dataset(DataConfig(uri=str(dest), resolution=32, channels=3))
    assert after.fingerprint == before.fingerprint and len(after) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "prepared"]


def test_a_prepared_dataset_with_a_special_shard_is_refused(tmp_path):
    """A prepared dataset handed over with a shard that is a link to /dev/zero."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png())
    dest = tmp_path / "prepared"
    prepare_mod.prepare(PrepareConfig(source=str(folder), dest=str(dest), resolution=28, channels=1), log=io.StringIO())
    shard = next(dest.glob("images-*.npy"))
    shard.unlink()
    shard.symlink_to("/dev/zero")
    unconditional = ("--set", "model.num_classes=0", "--set", "loss.class_weight=0")
    train(tmp_path, dest, *unconditional).one_line(f"error: {shard}: this shard is not a regular file: not opened")


def test_a_file_swapped_for_a_fifo_after_listing_is_not_waited_on(tmp_path):
    """Between the listing's lstat and the read, a file can become a FIFO: the read opens it
    without blocking and refuses it by what fstat says."""
    import threading

    import fsspec

    from gan.data.sources import _fetch_many

    (tmp_path / "ok.png").write_bytes(png())
    os.mkfifo(tmp_path / "x.png")
    result = []
    reader = threading.Thread(
        target=lambda: result.extend(_fetch_many(fsspec.filesystem("file"), [str(tmp_path / "ok.png"),
                                                                            str(tmp_path / "x.png")], 1 << 20)),
        daemon=True,
    )  # fmt: skip
    reader.start()
    reader.join(30)
    if reader.is_alive():  # let the blocked open return, so the thread ends
        with open(os.open(tmp_path / "x.png", os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        pytest.fail("the read blocked on a FIFO")
    assert result[0] == png()
    assert isinstance(result[1], OSError) and "a FIFO, not a regular file" in str(result[1])
