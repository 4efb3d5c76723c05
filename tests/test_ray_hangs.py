"""A sweep never hangs, tried as a new user would: another Ray cluster up on this machine
(cluster/local_cluster.sh left running) while the Quickstart's sweep runs. The sweep starts a
Ray of its own and addresses it explicitly, trials that ASHA stopped give their CPUs back, and a
trial whose workers cannot start fails in one line after its tries."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from entry import call
from services import ROOT, free_port, session_processes

pytestmark = pytest.mark.integration
TINY = ["--set", "eval.num_samples=200", "--set", "eval.kid_subset_size=50", "--no-tracking"]
# Guards against a hang, not timings: the sweeps below end within a few minutes here.
GUARD_S = 900


def users_shell(**extra: str) -> dict[str, str]:
    """The environment of a shell other than the one that started the other cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    return env | extra


def sweep(args: list[str], env: dict[str, str], log: Path) -> tuple[int | None, str]:
    """pipelines/tune.py in a session of its own; its exit status (None: still running after
    GUARD_S) and its output. The session, the driver and the local Ray it started, is killed
    by its ids afterwards, whatever happened."""
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, "pipelines/tune.py", *args], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        code = driver.wait(timeout=GUARD_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        left = session_processes(driver.pid)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=60)
        driver.wait(timeout=60)
    return code, log.read_text()


def test_stopped_trials_give_their_cpus_back_beside_another_cluster(two_node_cluster, tmp_path):
    """Every trial takes the whole machine, one at a time; ASHA stops the second (its
    generator cannot learn at lr 1e-7). The third starts only if the stopped trial's workers
    gave their CPUs back, which Ray Train's clean-up did not while it could not tell the
    sweep's Ray from the other cluster ("Found multiple active Ray instances")."""
    from ray._private.utils import get_num_cpus

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr_g: {grid: [1.0e-3, 1.0e-7, 1.0e-3]}\n")
    args = ["--space-file", str(space), "--trials", "1", "--rounds", "2", "--kimg-per-round", "1.5",
            "--cpus-per-worker", str(get_num_cpus()), *TINY, "--storage", str(tmp_path / "runs"), "--name", "beside"]  # fmt: skip
    code, output = sweep(args, users_shell(), tmp_path / "sweep.log")
    assert code is not None, f"the sweep was still running after {GUARD_S} s:\n{output[-5000:]}"
    assert code == 0, output[-5000:]
    assert "Found multiple active Ray instances" not in output, output[-5000:]
    summary = (tmp_path / "runs" / "beside" / "summary.txt").read_text()
    assert summary.count("completed 2/2 rounds") == 2 and "stopped by ASHA at round 1/2" in summary, summary


def test_a_trial_whose_workers_cannot_start_fails_in_one_line(two_node_cluster, tmp_path):
    """A GPU trial on a machine without one (--max-concurrent skips the check, as on an
    autoscaling cluster that never brings a GPU node): Ray Train tries to start its workers 3
    times, then the trial fails with one line and the sweep ends; Ray's default tries for ever."""
    args = ["--gpus-per-worker", "1", "--max-concurrent", "1", "--trials", "2", "--rounds", "1",
            "--kimg-per-round", "0.5", *TINY, "--storage", str(tmp_path / "runs"), "--name", "no-gpu"]  # fmt: skip
    # No GPU ever comes: the wait only sets how long each of the 6 tries takes.
    env = users_shell(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="1")
    code, output = sweep(args, env, tmp_path / "sweep.log")
    assert code is not None, f"the sweep was still running after {GUARD_S} s:\n{output[-5000:]}"
    assert code == 1 and "error: no trial finished an evaluation" in output, output[-5000:]
    said = "Ray Train workers did not start: 1 x (1 CPU + 1 GPU) were not free in 3 tries of 1 s"
    failed = [line for line in output.splitlines() if said in line]
    assert failed, output[-5000:]
    summary = (tmp_path / "runs" / "no-gpu" / "summary.txt").read_text()
    assert summary.count("error: ValueError: Ray Train workers did not start") == 2, summary


def test_a_dashboard_address_is_refused_before_ray_starts(tmp_path, capfd, monkeypatch):
    """RAY_ADDRESS as cluster/local_cluster.sh's env file sets it, for `ray job submit`."""
    address = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    refused = call(capfd, "tune.py", *TINY, "--storage", str(tmp_path / "runs"))
    refused.one_line(f"RAY_ADDRESS={address} is a dashboard address, for `ray job submit`")
