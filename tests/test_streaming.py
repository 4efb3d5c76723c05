"""Prepared datasets larger than data.memory_budget_mb stream from memory-mapped shards:
the same batches and weights as in memory, hashed once per node, and a real run under a
budget far below the dataset's size trains and resumes without holding it."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gan.core.config import ConfigError, DataConfig, override
from gan.core.loop import GANLoop, Nets, make_ema
from gan.core.models import build_models
from gan.data import datasets as data_mod
from gan.data.datasets import DataError, ImageDataset, MappedDataset, load_dataset
from gan.data.prepare import PrepareConfig, prepare
from gan.evaluation.evaluator import Evaluator
from gan.runs import checkpoint
from gan.runs.session import LocalSession
from gan.runs.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
BIG_IMAGES = 200_000  # 1 x 28 x 28 each: 150 MiB, 20x the 7 MiB budget of the streamed run
BIG_BUDGET_MB = 7


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data_mod.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def prepared(folder: Path, count: int, shard_size: int, seed: int = 0) -> Path:
    """A prepared dataset written by the project's tool from synthetic labelled digits-sized images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    folder.mkdir(parents=True)
    np.savez(folder / "source.npz", images=images, labels=np.arange(count) % 10)
    prepare(PrepareConfig(source=str(folder / "source.npz"), dest=str(folder / "prepared"), resolution=28,
                          channels=1, shard_size=shard_size), log=io.StringIO())  # fmt: skip
    (folder / "source.npz").unlink()
    return folder / "prepared"


def load(uri, budget_mb: float = 4096.0):
    return load_dataset(DataConfig(uri=str(uri), memory_budget_mb=budget_mb))


@pytest.fixture
def small(tmp_path) -> Path:
    """100 images (78 kB) in 7 shards: streamed under a 0.05 MiB budget."""
    return prepared(tmp_path / "small", 100, shard_size=15)


def make_loop(cfg, data, rank=0, world_size=1, read_ahead=None):
    torch.manual_seed(0)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    return GANLoop(cfg, Nets(G, D, make_ema(G), G, D), data, rank=rank, world_size=world_size, read_ahead=read_ahead)


def test_streamed_rows_and_training_equal_in_memory(tiny_cfg, small):
    loaded, streamed = load(small), load(small, budget_mb=0.05)
    assert isinstance(loaded, ImageDataset) and isinstance(streamed, MappedDataset)
    assert streamed.fingerprint == loaded.fingerprint and len(streamed) == 100
    assert torch.equal(streamed.labels, loaded.labels)
    idx = torch.tensor([99, 0, 14, 15, 16, 57, 3, 98, 30])  # across shards, out of order
    assert torch.equal(streamed.rows(idx), loaded.images[idx])
    with pytest.raises(IndexError):
        streamed.rows(torch.tensor([100]))

    # 100 images, batch 16: the 7th step draws a fresh epoch's permutation.
    a, b = make_loop(tiny_cfg, loaded), make_loop(tiny_cfg, streamed)
    for _ in range(7):
        a.train_step()
        b.train_step()
    assert a.epoch == b.epoch == 1
    for net in ("G", "D", "G_ema"):
        for (key, value), other in zip(
            getattr(a.nets, net).state_dict().items(), getattr(b.nets, net).state_dict().values(), strict=True
        ):
            assert torch.equal(value, other), f"{net}.{key}"

    # Two ranks of a streamed run read exactly the rows of one rank's global batch.
    one = make_loop(tiny_cfg, loaded)
    ranks = [make_loop(tiny_cfg, streamed, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(8):
        real, labels = one._real_batch()
        parts = [loop._real_batch() for loop in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), real)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)

    # FID's real statistics are read in batches from the shards, and equal.
    eval_cfg = override(tiny_cfg, ["eval.num_samples=40", "eval.kid_subset_size=20"]).eval
    assert torch.equal(Evaluator(eval_cfg, streamed).real_features, Evaluator(eval_cfg, loaded).real_features)


def test_reading_one_batch_ahead_trains_and_resumes_as_reading_on_demand(tiny_cfg, small):
    """What a GPU run does with streamed data (pinned copies on a side stream, one step
    ahead), in its CPU form: the same batches, and a checkpoint names the batch the next
    step trains on, not the one read ahead."""
    streamed = load(small, budget_mb=0.05)
    on_demand, ahead = make_loop(tiny_cfg, streamed), make_loop(tiny_cfg, streamed, read_ahead=True)
    assert on_demand.read_ahead is None and ahead.read_ahead is not None
    for step in range(9):  # 100 images, batch 16: an epoch ends at the 7th
        on_demand.train_step()
        ahead.train_step()
        if step == 5:  # the batch read ahead starts the next epoch
            state = copy.deepcopy(ahead.state_dict())
            assert (state["epoch"], state["cursor"]) == (on_demand.epoch, on_demand.cursor) == (0, 96)
            assert (ahead.epoch, ahead.cursor) == (1, 16)
    resumed = make_loop(tiny_cfg, streamed, read_ahead=True)
    resumed.load_state_dict(state)
    for _ in range(3):
        resumed.train_step()
    for loop in (ahead, resumed):
        for net in ("G", "D", "G_ema"):
            mine, reference = getattr(loop.nets, net).state_dict(), getattr(on_demand.nets, net).state_dict()
            assert all(torch.equal(mine[key], value) for key, value in reference.items()), net


def test_shards_are_hashed_once_per_node_and_a_changed_one_is_caught(small, monkeypatch):
    load(small, budget_mb=0.05)  # hashes every shard and stamps them
    monkeypatch.setattr(data_mod, "_sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    assert len(load(small, budget_mb=0.05)) == 100
    monkeypatch.undo()

    shard = sorted(small.glob("images-*.npy"))[3]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))  # a new mtime: the stamp no longer vouches for it
    with pytest.raises(DataError, match=f"{shard.name}: shard sha256 does not match the manifest"):
        load(small, budget_mb=0.05)


def test_a_remote_dataset_streams_from_the_node_copy_hashed_on_download(small, cache, monkeypatch):
    import fsspec

    fsspec.filesystem("memory").put(str(small), "/remote/small", recursive=True)
    monkeypatch.setattr(data_mod, "_sha256_file", lambda path: pytest.fail(f"{path} hashed after download"))
    streamed = load("memory://remote/small", budget_mb=0.05)
    assert isinstance(streamed, MappedDataset)
    manifest = json.loads((small / "manifest.json").read_text())
    assert all(Path(s.filename).parent == cache / manifest["sha256"] for s in streamed.shards)
    assert torch.equal(streamed.rows(torch.arange(100)), load(small).images)


def test_streaming_never_converts_a_mismatched_resolution_and_raw_sources_stream_too(small, tmp_path):
    with pytest.raises(DataError, match="prepared at 28 px grayscale, but data.resolution=32") as err:
        load_dataset(DataConfig(uri=str(small), resolution=32, memory_budget_mb=0.05))
    assert "\n" not in str(err.value)
    images = np.random.default_rng(2).integers(0, 256, (100, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images=images)  # prepared into the node cache, then read as any prepared set
    streamed = load(tmp_path / "plain.npz", budget_mb=0.05)
    assert isinstance(streamed, MappedDataset) and streamed.labels is None
    assert torch.equal(streamed.rows(torch.arange(100))[:, 0], torch.from_numpy(images))
    assert streamed.fingerprint == load(tmp_path / "plain.npz").fingerprint
    with pytest.warns(UserWarning, match="over data.memory_budget_mb=0.05; the embedded digits are always held whole"):
        assert isinstance(load("embedded:mnist5k", budget_mb=0.05), ImageDataset)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "lots"])
def test_bad_budgets_are_one_line_errors(tiny_cfg, value):
    with pytest.raises(ConfigError) as err:
        override(tiny_cfg, [f"data.memory_budget_mb={value}"])
    assert "data.memory_budget_mb" in str(err.value) and "\n" not in str(err.value)


def test_bad_budget_in_a_config_file_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"data.memory_budget_mb='lots' is not allowed: must be a number of MiB > 0"):
        DataConfig(memory_budget_mb="lots")


# The child measures RssAnon: the process's private (anonymous) memory. Pages of the
# memory-mapped shards count as RssFile: page cache, shared by every process on the node
# and reclaimable under pressure, so they are not what the budget is about.
CHILD = r"""
import json, os, sys, tempfile, threading, time
from importlib.util import module_from_spec, spec_from_file_location

import gan.runs.trainer, gan.evaluation.evaluator, torchmetrics.image.kid  # what a run imports, before the baseline

def rss_anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))

spec = spec_from_file_location("train", "pipelines/train.py")
train = module_from_spec(spec)
spec.loader.exec_module(train)

def peak_while(argv):
    # (exit code, highest RssAnon while train.main(argv) runs)
    peak, done = rss_anon_kib(), threading.Event()
    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_kib())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        code = train.main(argv)
    finally:
        done.set()
        sampler.join()
    return code, max(peak, rss_anon_kib())

# The baseline is the peak of the same run on a small prepared dataset held in memory
# ($WARM_ARGS), run once before to pay for torch's thread pools, allocator caches and the
# evaluator's first use (about 70 MiB here, whatever the data). The baseline then holds the
# transient memory of steps, evaluations and checkpoints, and what the streamed run adds
# beyond it is what the dataset costs.
warm = json.loads(os.environ["WARM_ARGS"])
with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
    assert peak_while([*warm, "--storage", first])[0] == 0
    warm_code, baseline = peak_while([*warm, "--storage", second])
    assert warm_code == 0
code, peak = peak_while(sys.argv[1:])
print(json.dumps({"code": code, "growth_mib": (peak - baseline) / 1024}))
"""


@pytest.mark.slow
def test_a_run_under_a_budget_far_below_the_dataset_trains_and_resumes(tiny_cfg, tmp_path, cache):
    big = prepared(tmp_path / "big", BIG_IMAGES, shard_size=4096)
    dataset_mib = BIG_IMAGES * 28 * 28 / 2**20
    assert dataset_mib >= 10 * BIG_BUDGET_MB
    sets = [f"data.uri={big}", f"data.memory_budget_mb={BIG_BUDGET_MB}", "eval.every_kimg=0.16"]
    command = [sys.executable, "-c", CHILD, "--in-process", "--preset", "debug", "--no-tracking",
               "--storage", str(tmp_path / "runs"), "--name", "streamed"]  # fmt: skip
    command += [arg for s in sets for arg in ("--set", s)]
    small = prepared(tmp_path / "warm", 5_000, shard_size=4096)  # 3.7 MiB: held in memory
    warm = ["--in-process", "--preset", "debug", "--no-tracking", "--steps", "10", "--set", f"data.uri={small}",
            "--set", f"data.memory_budget_mb={BIG_BUDGET_MB}", "--set", "eval.every_kimg=0.16"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), data_mod.CACHE_ENV: str(cache), "WARM_ARGS": json.dumps(warm)}

    def child(*args):
        proc = subprocess.run([*command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, proc.stdout[-3000:]
        return proc.stdout, result["growth_mib"]

    out, first_growth = child("--steps", "10")
    assert f"({BIG_IMAGES} images, streamed from its shards" in out
    out, resumed_growth = child("--steps", "20", "--resume")
    assert "(step 10)" in out and "resuming from" in out
    print(f"anonymous memory growth: {first_growth:.1f} MiB, resumed {resumed_growth:.1f} MiB")
    # Loaded whole, the images alone would add 150 MiB to each process; streamed, what grows
    # is the labels and the epoch's permutation (16 bytes an image) and the run's own state.
    for growth in (first_growth, resumed_growth):
        assert growth < 0.3 * dataset_mib, f"anonymous memory grew {growth:.1f} MiB for a {dataset_mib:.0f} MiB dataset"

    # The streamed run, stopped and resumed, equals the same data in memory trained straight.
    cfg = override(tiny_cfg, [*sets[:1], "eval.every_kimg=0.16", "train.total_kimg=0.32"])
    straight = Trainer(cfg, LocalSession(str(tmp_path / "in-memory"), quiet=True))
    assert isinstance(straight.data, ImageDataset)
    straight.train()
    resumed, _ = checkpoint.load(checkpoint.find(str(tmp_path / "runs" / "streamed")).latest)
    assert resumed["loop"]["step"] == 20 and resumed["dataset_fingerprint"] == straight.data.fingerprint
    for net in ("G", "D", "G_ema"):
        for key, value in straight.loop.state_dict()[net].items():
            assert torch.equal(resumed["loop"][net][key], value), f"{net}.{key}"
