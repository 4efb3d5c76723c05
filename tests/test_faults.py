"""What goes wrong on shared clusters, tried for real: a worker killed inside a Tune trial,
a diverging trial, the S3 server down during checkpoint upload, bad input as a new user
types it, and secrets that must not leak into anything a run writes."""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from entry import call, ray_is_running
from services import ROOT, FlakyS3, free_port

# The tests that start Ray or a server are integration tests (tests/conftest.py marks them);
# the bad-input tests are not: refused before Ray, most are called in this process.
TINY = ["--set", "eval.num_samples=200", "--set", "eval.kid_subset_size=50"]


def session_workers(sid: int) -> list[psutil.Process]:
    """Ray Train worker processes started under the driver's session."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(proc.pid) == sid and "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def registered_checkpoint(trials: Path) -> bool:
    for snapshot in trials.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            continue
    return False


def test_killed_worker_diverging_trial_and_failed_report_in_one_sweep(tmp_path):
    """Trial 1 loses its worker after a checkpoint and finishes from it, with every
    evaluation logged once; trial 2 diverges, fails with the step, and the sweep goes on;
    the report cannot be written, the parent run is closed FAILED, and --resume reports the
    finished trials without training them again."""
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "pipelines/tune.py", "--trials", "1", "--rounds", "3", "--grace-rounds", "3", *TINY,
               "--kimg-per-round", "1.5", "--space", "loss.r1_gamma=grid:0,1e39", "--space", "loss.r1_every=1",
               "--set", "train.log_every_steps=10", "--max-concurrent", "1", "--storage", str(tmp_path / "runs"), "--name", "faults",
               "--tracking-uri", tracking, "--experiment", "faults"]  # fmt: skip
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    killed = []

    def kill_first_worker_after_a_checkpoint():
        deadline = time.time() + 400
        while time.time() < deadline and driver.poll() is None:
            # A checkpoint Ray has registered (in its snapshot of the run): one only on disk can
            # be lost with the worker, whose replacement would then start from scratch.
            if registered_checkpoint(tmp_path / "runs/faults/trials"):
                workers = session_workers(driver.pid)
                if workers:
                    workers[0].kill()
                    killed.append(workers[0].pid)
                    (tmp_path / "runs/faults/summary.txt").mkdir()  # the report's first write will fail
                    return
            time.sleep(0.3)

    killer = threading.Thread(target=kill_first_worker_after_a_checkpoint, daemon=True)
    killer.start()
    try:
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            for proc in psutil.Process(driver.pid).children(recursive=True) + [psutil.Process(driver.pid)]:
                proc.kill()
    output = log_path.read_text()
    assert killed, "no worker was killed"
    assert driver.returncode == 1, output[-5000:]
    assert "report failed (IsADirectoryError" in output and "with --resume to report them" in output
    # The killed worker is replaced once; a divergence is not retried (it would diverge again).
    assert output.count("Attempting to start training worker group") == 3, output[-5000:]

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("faults")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    by_gamma = {r.data.params["loss.r1_gamma"]: r for r in children}
    healthy, diverged = by_gamma["0.0"], by_gamma["1e+39"]
    assert healthy.info.status == "FINISHED"
    # The replacement worker restored a checkpoint (a tag: Ray may not forward a worker's line).
    resumed_from = healthy.data.tags.get("resumed_from", "")
    assert re.search(r"/checkpoint_step\d+ \(step [1-9]\d*\)$", resumed_from), healthy.data.tags
    steps = [m.step for m in client.get_metric_history(healthy.info.run_id, "fid")]
    assert len(steps) == len(set(steps)) == 3, steps  # none missing, none twice
    assert diverged.info.status == "FAILED"
    assert "diverged" in diverged.data.tags["sweep.error"] and "at step" in diverged.data.tags["sweep.error"]
    assert "error: " in output and "diverged" in output[output.find("done in") :]  # in the summary table
    parent = client.get_run(children[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"

    (tmp_path / "runs/faults/summary.txt").rmdir()
    checkpoints = sorted(glob.glob(str(tmp_path / "runs/faults/trials/*/checkpoint_*")))
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             start_new_session=True)  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-5000:]
    assert sorted(glob.glob(str(tmp_path / "runs/faults/trials/*/checkpoint_*"))) == checkpoints  # nothing trained
    assert "best: trial" in resumed.stdout and (tmp_path / "runs/faults/summary.txt").is_file()
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_storage_outage_during_checkpoint_upload(tmp_path):
    """The S3 server goes away for a few seconds while checkpoints are uploaded: the run
    waits it out (the workers' uploads and the controller's snapshot writes retry), it
    finishes, and every checkpoint Ray registered is complete."""
    import ray

    from gan.core.config import override, preset
    from gan.data.storage import Storage
    from gan.runs import checkpoint
    from gan.runs.ray_train import Scaling, make_trainer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = FlakyS3("flaky")
    storage_path, filesystem = Storage.open("s3://flaky/runs", s3.endpoint).ray_args()
    cfg = override(preset("debug"), ["train.total_kimg=1.6", "eval.every_kimg=0.16", "eval.num_samples=100"])
    outage = {}

    def outage_after_first_checkpoint():
        while True:
            listed = s3.client.list_objects_v2(Bucket="flaky", Prefix="runs/outage/").get("Contents", [])
            if any("checkpoint_step" in o["Key"] for o in listed):
                break
            time.sleep(0.1)
        outage["seconds"] = s3.down_for(4)

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    thread = threading.Thread(target=outage_after_first_checkpoint, daemon=True)
    try:
        thread.start()
        trainer = make_trainer(cfg, Scaling(workers=1), name="outage", storage_path=storage_path,
                               storage_filesystem=filesystem, max_failures=5)  # fmt: skip
        result = trainer.fit()
        thread.join(timeout=30)
        assert outage["seconds"] >= 4
        assert result.metrics["images_seen"] >= 1600
        options = {"client_kwargs": {"endpoint_url": s3.endpoint}}
        for registered, _ in result.best_checkpoints:  # whole, loadable checkpoints only
            state, meta = checkpoint.load(f"s3://{registered.path}", options)
            assert state["loop"]["step"] == meta["step"]
        assert result.checkpoint.path.endswith(f"checkpoint_step{int(result.metrics['step']):08d}")
    finally:
        ray.shutdown()
        thread.join(timeout=30)
        s3.stop()


def test_storage_gone_for_longer_than_retries_then_resume(tmp_path):
    """The S3 server goes away for good after the first checkpoint: the run stops with one
    line saying to resume, and its checkpoints stay. When Ray's snapshot of the run was
    never written (the outage took its first write), --resume still continues from the last
    checkpoint, not from scratch over it."""
    s3 = FlakyS3("gone")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_MAX_ATTEMPTS": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-W", "ignore", "pipelines/train.py", "--preset", "debug", "--no-tracking",
               "--storage", "s3://gone/runs", "--s3-endpoint", s3.endpoint, "--name", "gone", *TINY,
               "--set", "train.total_kimg=1.6", "--set", "eval.every_kimg=0.16"]  # fmt: skip

    def checkpoints() -> list[str]:
        """The whole ones: the outage must not fall between a checkpoint's files, or none loads."""
        listed = s3.client.list_objects_v2(Bucket="gone", Prefix="runs/gone/").get("Contents", [])
        files: dict[str, set[str]] = {}
        for key in (o["Key"] for o in listed if "/checkpoint_step" in o["Key"]):
            files.setdefault(key.split("/")[2], set()).add(key.rsplit("/", 1)[-1])
        return sorted(folder for folder, names in files.items() if {"state.pt", "meta.json"} <= names)

    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not checkpoints() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        s3.stop()
        _, stderr = driver.communicate(timeout=300)
        s3.start()
        assert driver.returncode == 2, stderr[-3000:]
        (error,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert "s3://gone/runs/gone" in error and "with --resume continues the run" in error
        kept = checkpoints()
        assert kept, "the checkpoints written before the outage stay"
        s3.client.delete_object(Bucket="gone", Key="runs/gone/checkpoint_manager_snapshot.json")
        resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=300, start_new_session=True)  # fmt: skip
        output = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, output[-3000:]
        assert f"resuming from s3://gone/runs/gone/{kept[-1]} (step {int(kept[-1][-8:])})" in output
        assert kept[-1] in checkpoints() and "checkpoint_step00000100" in checkpoints()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
        s3.stop()


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/train.py", "--preset", "debug", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "data.uri=embeded:mnist5k"], "embeded:mnist5k"),  # a typo in the scheme
        (["--set", "data.uri=s3://no-such-bucket-gan/digits.npz", "--set",
          'data.storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}'], "no-such-bucket-gan"),
        (["--set", "model.family=vit"], "model.family='vit' is not allowed"),
        (["--set", "train.batch_size=0"], "train.batch_size=0 is not allowed"),
    ],
)  # fmt: skip
def test_bad_input_as_a_new_user_types_it(args, message, tmp_path, capfd):
    refused = call(capfd, "train.py", "--preset", "debug", "--in-process", "--no-tracking", "--storage", str(tmp_path),
                   *args)  # fmt: skip
    refused.one_line(message)
    assert not list(tmp_path.iterdir())  # failed before anything was written


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("train.py", ["--steps", "0"], "--steps 0: must be at least 1"),
        ("train.py", ["--set", "train.seed=1e20"], "train.seed=100000000000000000000 is not allowed: must be in"),
        ("train.py", ["--set", "eval.every_kimg=1e-9"], "eval.every_kimg=1e-09 is less than one training step"),
        ("train.py", ["--set", "eval.backbone=torchscript", "--set", "eval.backbone_uri=/no/such/inception.pt"],
         "eval.backbone_uri=/no/such/inception.pt: no such file"),
        ("train.py", ["--set", "data.channels=3"], "eval.backbone=digits scores grayscale digits, not RGB images"),
        ("train.py", ["--workers", "3", "--set", "train.batch_size=64"],
         "train.batch_size=64 does not split evenly over 3 workers: use --set train.batch_size=63 or 66"),
        ("tune.py", ["--set", "eval.backbone=torchscript", "--set", "eval.backbone_uri=/no/such/inception.pt"],
         "eval.backbone_uri=/no/such/inception.pt: no such file"),
        ("tune.py", ["--name", "it's \"best\""], "holds both ' and \""),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_ray_starts(script, args, message, tmp_path, capfd):
    """Without --in-process: refused in one line before Ray starts (no Ray log lines, no retries)."""
    storage = tmp_path / "runs"
    refused = call(capfd, script, "--preset", "debug", "--storage", str(storage), "--tracking-uri",
                   f"sqlite:///{tmp_path}/mlflow.db", *args)  # fmt: skip
    refused.one_line(message)
    assert not ray_is_running()
    assert not storage.exists() and not (tmp_path / "mlflow.db").exists()


def bad_data(kind: str, folder: Path) -> Path:
    """Data a user may be handed: it looks like a dataset and is not one."""
    if kind == "idx-without-pixels":  # the header says 5 images of 0 x 0
        path = folder / "train-images.idx"
        path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 0, 0))
    elif kind == "gzip-bomb":  # 100 digits stated; 1.5 GiB of zeros in 1.5 MB (24 gzip members of 64 MiB)
        path = folder / "train-images.idx.gz"
        member = gzip.compress(bytes(64 << 20), 9)
        path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 100, 28, 28)) + member * 24)
    else:  # a 90-megapixel PNG of 11 kB, over Pillow's decompression-bomb limit
        from PIL import Image

        path = folder / "images"
        path.mkdir()
        Image.new("1", (10000, 9000)).save(path / "a.png")
    return path


def peak_memory_kib(proc: subprocess.Popen) -> int:
    """The process's own high-water RSS (VmHWM, since its exec), polled until it exits.
    Not ru_maxrss: that counts the pages a child shares with the test process it was
    forked from, which is large after the rest of the suite has run in it."""
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                peak = max([peak] + [int(line.split()[1]) for line in status if line.startswith("VmHWM:")])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.005)
    return peak


@pytest.mark.parametrize(
    "kind, message",
    [
        ("idx-without-pixels", "IDX header says shape (5, 0, 0): items of no size"),
        ("gzip-bomb", "gzip data expands beyond 78,416 bytes (the size its IDX header states)"),
        ("png-bomb", "a.png: 10000x9000 pixels is over the limit of 89,478,485"),
    ],
)
def test_bad_data_fails_in_one_line_and_small_memory(kind, message, tmp_path):
    """One line naming the file, before training; a bomb is refused without expanding it
    (the process's peak memory stays far below what it would expand to)."""
    data = tmp_path / "data"
    data.mkdir()
    uri = bad_data(kind, data)
    storage = tmp_path / "runs"
    command = [sys.executable, "pipelines/train.py", "--preset", "debug", "--in-process", "--no-tracking",
               "--storage", str(storage), "--set", f"data.uri={uri}"]  # fmt: skip
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        peak_kib = peak_memory_kib(proc)
    stderr = (tmp_path / "err").read_text()
    assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
    assert message in stderr and str(uri) in stderr and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    assert 0 < peak_kib * 1024 < 1 << 30, peak_kib  # the bomb expands to 1.5 GiB
    assert not list(storage.iterdir())


@pytest.mark.parametrize("kind", ["empty", "corrupt"])
def test_empty_or_corrupt_dataset(kind, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    if kind == "corrupt":
        (data / "digits.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    uri = str(data) if kind == "empty" else str(data / "digits.npz")
    call(capfd, "train.py", "--preset", "debug", "--in-process", "--no-tracking", "--storage", str(tmp_path / "runs"),
         "--set", f"data.uri={uri}").one_line(uri)  # fmt: skip


def test_unreachable_cluster_address(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    started = time.time()
    refused = call(capfd, "train.py", "--preset", "debug", "--no-tracking", "--storage", str(tmp_path))
    assert refused.code == 2 and "cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1" in refused.err, refused.err
    assert time.time() - started < 120


def test_named_sweep_clash_is_refused_before_ray_starts(tmp_path, capfd, monkeypatch):
    """The cluster address leads nowhere: a sweep that reached Ray would fail on it instead."""
    (tmp_path / "taken").mkdir()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    for name, resume, message in (("taken", [], "already holds a sweep: pass --resume"),
                                  ("typo", ["--resume"], "nothing to resume: no sweep 'typo'")):  # fmt: skip
        refused = call(capfd, "tune.py", "--no-tracking", "--storage", str(tmp_path), "--name", name, *resume)
        assert refused.code == 2 and message in refused.err, refused.err[-2000:]
        assert not ray_is_running()


FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKESECRET000001",
    "AWS_SECRET_ACCESS_KEY": "fake/secret+key/0123456789abcdefABCDEF012",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-password-4f1b",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-9c2e",
    "HF_TOKEN": "hf_fakeTokenThatMustNotLeak123",
}


def test_no_secret_reaches_params_tags_artifacts_logs_or_checkpoints(tmp_path):
    """A Ray Train run tracked in MLflow with fake secrets in its environment; then every
    byte it wrote (store, artefacts, checkpoints, Ray's session logs, its output) is grepped."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="gan-secrets-", dir="/tmp"))  # short: Ray's unix sockets live there
    env = {**os.environ, **FAKE_SECRETS, "RAY_TMPDIR": str(ray_tmp)}
    try:
        leaks = _secrets_written_by_a_run(tmp_path, ray_tmp, env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leaks, leaks


def _secrets_written_by_a_run(tmp_path: Path, ray_tmp: Path, env: dict) -> list:
    result = run_train("--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                       "--set", "train.total_kimg=0.32", "--set", "eval.every_kimg=0.16", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = [p for root in (tmp_path, ray_tmp) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "state.pt" for p in written) and any(p.name == "MLmodel" for p in written)
    assert any("session_" in str(p) and p.suffix in (".log", ".out", ".err") for p in written)
    leaks = []
    for path in written:
        data = path.read_bytes()
        leaks += [(str(path), key) for key, value in FAKE_SECRETS.items() if value.encode() in data]
    for key, value in FAKE_SECRETS.items():
        if value in result.stdout + result.stderr:
            leaks.append(("output", key))
    return leaks


SECRET_IN_CONFIG = FAKE_SECRETS["AWS_SECRET_ACCESS_KEY"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--set", f'data.storage_options={{"client_kwargs": {{"aws_secret_access_key": "{SECRET_IN_CONFIG}"}}}}'],
         "client_kwargs.aws_secret_access_key looks like a credential"),
        (["--set", f'data.storage_options={{"key": "AKIAFAKESECRET000001", "secret": "{SECRET_IN_CONFIG}"}}'],
         "key, secret looks like a credential"),
        (["--set", f"data.uri=https://reader:{SECRET_IN_CONFIG}@data.example.com/digits.npz"],
         "https://reader:***@data.example.com/digits.npz holds credentials"),
        (["--set", f"data.uri=https://data.example.com/digits.npz?X-Amz-Signature={SECRET_IN_CONFIG}"],
         "X-Amz-Signature=*** holds credentials"),
    ],
)  # fmt: skip
def test_secrets_in_the_config_are_refused_and_never_written(tmp_path, args, named, capfd):
    """The config is logged as MLflow params, config.json, every checkpoint and the MLmodel
    file: a credential in data.storage_options or a URI is refused before anything is written."""
    refused = call(capfd, "train.py", "--preset", "debug", "--storage", str(tmp_path / "runs"), "--tracking-uri",
                   f"sqlite:///{tmp_path}/mlflow.db", *args)  # fmt: skip
    refused.one_line(named)
    assert_secret_kept(tmp_path, refused.out + refused.err)


def test_a_tracking_uri_with_a_password_is_refused_and_never_printed_with_it(tmp_path):
    """MLflow's client finds the server unreachable, and its loggers may write to stderr: in a
    process of its own, whatever it prints is checked."""
    uri = f"http://admin:{SECRET_IN_CONFIG}@127.0.0.1:{free_port()}"
    result = run_train("--storage", str(tmp_path / "runs"), "--tracking-uri", uri,
                       env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "http://admin:***@127.0.0.1" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert_secret_kept(tmp_path, result.stdout + result.stderr)


def assert_secret_kept(tmp_path: Path, printed: str) -> None:
    assert SECRET_IN_CONFIG not in printed
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET_IN_CONFIG.encode() in p.read_bytes()]
    assert not any(p.name == "state.pt" for p in written)  # refused before training
