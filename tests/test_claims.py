"""A run or sweep belongs to one start: two identical launches race for it and one wins,
a second process is refused a run in use, a failed start leaves nothing behind, and a sweep
is resumed (its pickled state unpickled) only from a folder nobody else can write."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from entry import call

from gan.data.storage import CLAIM_FILE, Storage, release_claims

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def claims_end_with_the_test():
    """This process's claims would otherwise last until pytest exits."""
    yield
    release_claims()


def race(storage: Storage, name: str, monkeypatch) -> list[str]:
    """Two starts of ``name`` that both find it missing before either claims it, as two
    launches do when neither has written yet: what each ended with ("won" or its error)."""
    both_checked = threading.Barrier(2, timeout=30)
    exists = Storage.exists

    def exists_then_wait(self, *parts):
        found = exists(self, *parts)
        both_checked.wait()
        return found

    monkeypatch.setattr(Storage, "exists", exists_then_wait)
    outcomes = [""] * 2

    def start(index: int) -> None:
        try:
            storage.claim(name, resume=False)
            outcomes[index] = "won"
        except ValueError as err:
            outcomes[index] = str(err)

    threads = [threading.Thread(target=start, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    monkeypatch.setattr(Storage, "exists", exists)
    return outcomes


def test_two_starts_of_one_run_on_s3_one_wins(bucket, s3_server, monkeypatch):
    name, _ = bucket
    storage = Storage.open(f"s3://{name}/runs", s3_server)
    outcomes = race(storage, "r", monkeypatch)
    assert sorted(outcomes)[-1] == "won" and outcomes.count("won") == 1, outcomes
    lost = next(outcome for outcome in outcomes if outcome != "won")
    assert lost.startswith(f"s3://{name}/runs/r already holds a run: pass --resume to continue it, or --name")
    assert f"pid {os.getpid()}" in lost and "\n" not in lost  # who claimed it, in one line
    storage.claim("r", resume=True)  # the winner's own, or a later --resume, continues it


def test_two_starts_of_one_local_run_one_wins(tmp_path, monkeypatch):
    storage = Storage.open(str(tmp_path / "runs"))
    outcomes = race(storage, "r", monkeypatch)
    assert outcomes.count("won") == 1, outcomes
    assert "already holds a run: pass --resume" in next(outcome for outcome in outcomes if outcome != "won")
    assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == [CLAIM_FILE]  # no partial claim left


def test_a_run_in_use_is_refused_to_a_second_process(tmp_path):
    """Two resumes of one local run would write the same checkpoints: while one process
    holds the run, another is refused; once it ends, the run can be resumed."""
    runs = tmp_path / "runs"
    Storage.open(str(runs))
    (runs / "r" / "checkpoint_step00000010").mkdir(parents=True)  # a run from before claim files
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gan.data.storage import Storage\n"
         f"Storage.parse({str(runs)!r}).claim('r', resume=True); print('holding', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(ValueError, match=rf"{runs}/r is in use by another process \(.*pid {holder.pid}, at "):
            Storage.parse(str(runs)).claim("r", resume=True)
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait(timeout=60)
    Storage.parse(str(runs)).claim("r", resume=True)


def test_a_start_that_fails_before_writing_leaves_nothing(tmp_path, bucket, s3_server):
    """The same command then starts again without --resume; a run that wrote is kept."""
    name, _ = bucket
    for storage in (Storage.open(str(tmp_path / "runs")), Storage.open(f"s3://{name}/runs", s3_server)):
        storage.claim("failed", resume=False)
        storage.claim("wrote", resume=False)
        storage.write(storage.join("wrote", "checkpoint_step00000010", "meta.json"), b"{}")
        assert storage.exists("failed")
        release_claims()
        assert not storage.exists("failed") and storage.exists("wrote")
        storage.claim("failed", resume=False)
        with pytest.raises(ValueError, match=r"already holds a run: pass --resume to continue it, or --name \(claimed"):
            storage.claim("wrote", resume=False)


def test_a_sweep_others_can_write_is_not_resumed(tmp_path):
    """Ray Tune unpickles a sweep's state when it resumes: a file in the sweep folder that
    every user may write is refused, naming it and its mode."""
    storage = Storage.open(str(tmp_path))
    sweep = tmp_path / "s"
    (sweep / "trials").mkdir(parents=True)
    state = sweep / "tuner.pkl"
    state.write_bytes(b"pickle")
    for writable in (state, sweep / "trials", sweep):
        writable.chmod(writable.stat().st_mode | 0o002)
        with pytest.raises(ValueError, match=rf"will not resume the sweep in {sweep}: {writable} is writable by every "
                           r"user \(mode .*w.\); Ray Tune unpickles"):  # fmt: skip
            storage.claim("s", resume=True, what="sweep")
        writable.chmod(writable.stat().st_mode & ~0o002)
    storage.claim("s", resume=True, what="sweep")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user or group needs root")
def test_a_sweep_another_user_owns_or_their_group_can_write_is_not_resumed(tmp_path):
    storage = Storage.open(str(tmp_path))
    sweep = tmp_path / "s"
    sweep.mkdir()
    state = sweep / "experiment_state-2026.json"
    state.write_text("{}")
    os.chown(state, 65534, -1)  # nobody's
    with pytest.raises(ValueError, match=rf"{state} is owned by nobody, not by you \(root\)"):
        storage.claim("s", resume=True, what="sweep")
    os.chown(state, 0, 1)  # root's, group daemon's, which may write it
    state.chmod(0o664)
    with pytest.raises(ValueError, match=rf"{state} is writable by group daemon"):
        storage.claim("s", resume=True, what="sweep")
    os.chown(state, 0, 0)  # the user's own private group: umask 002 makes such files
    storage.claim("s", resume=True, what="sweep")


def test_tune_resume_of_a_sweep_others_can_write_is_refused_before_ray(tmp_path, capfd):
    sweep = tmp_path / "s"
    sweep.mkdir()
    (sweep / "tuner.pkl").write_bytes(b"pickle")
    sweep.chmod(0o777)
    refused = call(capfd, "tune.py", "--no-tracking", "--storage", str(tmp_path), "--name", "s", "--resume")
    refused.one_line(f"will not resume the sweep in {sweep}: {sweep} is writable by every user (mode drwxrwxrwx)")
