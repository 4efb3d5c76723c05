"""Ray Train on a real local Ray cluster: DDP equivalence, worker loss, resume from S3, early errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from gan.core.config import override, preset
from gan.registry.tracking import TrackingTarget
from gan.runs import checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def fit(cfg, tmp_path, name, workers, tracking=None):
    from gan.runs.ray_train import Scaling, make_trainer

    trainer = make_trainer(cfg, Scaling(workers=workers), name=name, storage_path=str(tmp_path), max_failures=2,
                           tracking=tracking)  # fmt: skip
    return trainer.fit()


def test_two_workers_match_one_worker_with_twice_the_batch(ray_cluster, tmp_path):
    # No batch norm, so per-rank statistics cannot differ from single-process ones.
    sets = ["train.batch_size=32", "train.total_kimg=0.064", "model.g_norm=none", "model.d_norm=spectral",
            "loss.augment=translation,cutout", "eval.num_samples=100", "eval.kid_subset_size=50"]  # fmt: skip
    one = fit(override(preset("debug"), sets), tmp_path, "one", workers=1)
    two = fit(override(preset("debug"), sets), tmp_path, "two", workers=2)
    s1, _ = checkpoint.load(one.checkpoint.path)
    s2, _ = checkpoint.load(two.checkpoint.path)
    assert s1["loop"]["step"] == s2["loop"]["step"] == 2
    for net in ("G", "D", "G_ema"):
        for key, value in s1["loop"][net].items():
            torch.testing.assert_close(s2["loop"][net][key], value, rtol=1e-5, atol=1e-6)
    # Every rank scored the same G_ema: the reported FIDs agree.
    assert one.metrics["fid"] == pytest.approx(two.metrics["fid"], rel=1e-6)


def _worker_pids():
    """This test's Ray Train workers: descendants of this process, which started the local
    Ray, so that a test running beside it keeps its own."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_worker_is_replaced_and_run_finishes_from_checkpoint(ray_cluster, tmp_path):
    cfg = override(preset("debug"), ["train.total_kimg=4.8", "eval.every_kimg=0.48"])
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list(tmp_path.glob("victim/checkpoint_*/state.pt")):
                pids = _worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    tracking = TrackingTarget(f"sqlite:///{tmp_path}/mlflow.db", "victim", "victim")
    result = fit(cfg, tmp_path, "victim", workers=1, tracking=tracking)
    thread.join(timeout=5)
    assert killed, "the test never saw a worker to kill"
    state, _ = checkpoint.load(result.checkpoint.path)
    # Exactly the configured number of images: no step was trained twice into the count.
    assert state["loop"]["images_seen"] == 4800 and state["loop"]["step"] == 300
    steps = [int(h["step"]) for h in state["history"]]
    assert steps == sorted(set(steps)), f"evaluations repeated or out of order: {steps}"
    assert len(steps) == 10
    kept = sorted(p.name for p in (tmp_path / "victim").glob("checkpoint_step*"))
    assert kept and all((tmp_path / "victim" / k / "state.pt").exists() for k in kept)
    # The MLflow run has every evaluation exactly once across the restart.
    from mlflow.tracking import MlflowClient

    from gan.registry.tracking import run_id_of

    run_id = run_id_of(tracking)
    logged = [m.step for m in MlflowClient(tracking.uri).get_metric_history(run_id, "fid")]
    assert sorted(logged) == [int(h["images_seen"]) for h in state["history"]]
    assert MlflowClient(tracking.uri).get_run(run_id).info.status == "FINISHED"


def test_resume_from_checkpoint_in_s3_past_a_torn_latest_checkpoint(bucket, s3_server, tmp_path):
    """A run in S3 is refused a second start without --resume. Its latest checkpoint then
    loses its state.pt's tail: the resumed run says so, continues from the checkpoint
    before it and finishes, instead of failing every retry the same way; its one MLflow
    run has every evaluation once."""
    import s3fs

    name, _ = bucket
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"AWS_ENDPOINT_URL": s3_server}
    base = [sys.executable, "-W", "ignore", "pipelines/train.py", "--preset", "debug", "--storage", f"s3://{name}/runs",
            "--name", "s3run", "--cpus-per-worker", "1", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]  # fmt: skip

    def run(*extra):
        proc = subprocess.run([*base, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    run("--set", "train.total_kimg=0.32")
    refused = subprocess.run(
        [*base, "--set", "train.total_kimg=0.48"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "already holds a run: pass --resume" in refused.stderr
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    older, newest = (f"{name}/runs/s3run/{checkpoint.dir_name(step)}" for step in (10, 20))
    fs.pipe(f"{newest}/state.pt", fs.cat(f"{newest}/state.pt")[:1000])
    out = run("--set", "train.total_kimg=0.48", "--resume")
    assert f"skipping a checkpoint that does not load: {newest}" in out, out[-3000:]
    latest = max(p for p in fs.ls(f"{name}/runs/s3run") if "checkpoint_" in p)
    state, meta = checkpoint.load(f"s3://{latest}", {"client_kwargs": {"endpoint_url": s3_server}})
    assert state["loop"]["step"] == meta["step"] == 30 and state["loop"]["images_seen"] == 480
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])  # one run, resumed
    assert tracked.info.status == "FINISHED" and tracked.data.tags["world_size"] == "1"
    assert tracked.data.tags["resumed_from"] == f"s3://{older} (step 10)"  # past the torn one
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "fid")] == [160, 320, 480]


def test_missing_bucket_fails_before_any_worker(s3_server):
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_server}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "pipelines/train.py", "--preset", "debug", "--storage", "s3://no-such-bucket/x",
         "--no-tracking"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "bucket s3://no-such-bucket" in proc.stderr and "does not exist" in proc.stderr


def test_too_many_workers_fails_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "pipelines/train.py", "--preset", "debug", "--workers", "64",
         "--set", "train.batch_size=64", "--storage", str(tmp_path), "--no-tracking"],  # a batch that splits
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "64 workers x 1 CPU need 64 CPUs" in proc.stderr


def test_a_class_count_that_differs_from_the_data_fails_before_any_worker(tmp_path):
    """A prepared dataset's manifest names its classes (or none): train.py refuses a
    conditional model with another count on the driver, and tune.py (here --dry-run) the same
    for the embedded digits, before Ray starts or the run's folder is made."""
    import io

    import numpy as np

    from gan.data.prepare import PrepareConfig, prepare

    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "four.npz", images=images, labels=np.arange(40) % 4)
    data, unlabelled = tmp_path / "four", tmp_path / "unlabelled"
    for dest, infer_labels in ((data, True), (unlabelled, False)):
        prepare(PrepareConfig(source=str(tmp_path / "four.npz"), dest=str(dest), resolution=28, channels=1,
                              infer_labels=infer_labels), log=io.StringIO())  # fmt: skip
    runs = tmp_path / "runs"
    commands = {
        f"{data} has 4 classes (labels 0 to 3); set model.num_classes=4": [
            "pipelines/train.py", "--set", f"data.uri={data}", "--storage", str(runs)],
        f"{unlabelled} has no labels; set model.num_classes=0 and loss.class_weight=0 for an unconditional model": [
            "pipelines/train.py", "--set", f"data.uri={unlabelled}", "--storage", str(runs)],
        "embedded:mnist5k has 10 classes (labels 0 to 9); set model.num_classes=10": [
            "pipelines/tune.py", "--set", "model.num_classes=3", "--storage", str(runs), "--dry-run"],
    }  # fmt: skip
    for message, command in commands.items():
        proc = subprocess.run(
            [sys.executable, "-W", "ignore", *command, "--preset", "debug", "--no-tracking"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(message), proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
        assert "Ray Train run" not in proc.stdout and not runs.exists()


def test_unreachable_storage_fails_before_any_worker():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "pipelines/train.py", "--preset", "debug", "--storage", "s3://bucket/x",
         "--no-tracking"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and f"cannot reach s3://bucket at http://127.0.0.1:{port}" in proc.stderr
    assert "Ray Train run" not in proc.stdout  # no Ray, no workers
