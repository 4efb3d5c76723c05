"""A checkpoint that cannot be written (a full disk) fails in one line and costs nothing
that was already written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from gan.core.config import debug
from gan.runs import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def state_of(step: int) -> dict:
    """A checkpoint of about 1 MiB: larger than the file-size limit below."""
    return {"loop": {"step": step}, "w": torch.full((1 << 18,), float(step)), "config": debug().to_json()}


def test_a_full_disk_during_a_checkpoint_keeps_the_ones_before_it(tmp_path):
    """With the file size limited (a full disk, as the writing process sees it), writing a
    new checkpoint and writing one again (a resumed run's same step) both fail with one line
    naming the folder; the checkpoints there still load and no partial folder is left."""
    run = tmp_path / "run"
    for step in (10, 20):
        checkpoint.save(str(run / checkpoint.dir_name(step)), state_of(step), {"step": step, "images_seen": step})
    script = f"""
import resource, signal
from gan.runs import checkpoint
from tests.test_checkpoint_writes import state_of
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
for step in (30, 20):
    try:
        checkpoint.save({str(run)!r} + "/" + checkpoint.dir_name(step), state_of(step), {{"step": step}})
    except checkpoint.CheckpointError as err:
        print(err)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr[-2000:]
    for line, step in zip(lines, (30, 20), strict=True):
        assert line.startswith(f"cannot write checkpoint {run / checkpoint.dir_name(step)} (disk full: File too large)")
        assert "the checkpoints before it are kept" in line
    assert sorted(p.name for p in run.iterdir()) == [checkpoint.dir_name(10), checkpoint.dir_name(20)]
    for step in (10, 20):
        state, meta = checkpoint.load(str(run / checkpoint.dir_name(step)))
        assert state["loop"]["step"] == meta["step"] == step and torch.equal(state["w"], state_of(step)["w"])
    assert checkpoint.find(str(run)).latest == str(run / checkpoint.dir_name(20))
