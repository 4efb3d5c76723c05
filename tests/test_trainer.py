"""The Trainer end to end in-process: resume through a checkpoint on disk is bit-for-bit."""

from __future__ import annotations

import pytest
import torch

from gan import checkpoint
from gan.config import override
from gan.trainer import LocalSession, Trainer


def test_resume_from_disk_is_bit_for_bit(tiny_cfg, digits, tmp_path):
    full_cfg = override(tiny_cfg, ["train.total_kimg=0.64", "eval.every_kimg=0.32"])
    half_cfg = override(tiny_cfg, ["train.total_kimg=0.32", "eval.every_kimg=0.32"])
    straight = Trainer(full_cfg, LocalSession(str(tmp_path / "a"), quiet=True), data=digits)
    straight.train()

    Trainer(half_cfg, LocalSession(str(tmp_path / "b"), quiet=True), data=digits).train()
    resumed = Trainer(full_cfg, LocalSession(str(tmp_path / "b"), resume=True, quiet=True), data=digits)
    assert resumed.loop.step == 20
    resumed.train()

    a, _ = checkpoint.load(checkpoint.find(str(tmp_path / "a")).latest)
    b, _ = checkpoint.load(checkpoint.find(str(tmp_path / "b")).latest)
    assert a["loop"]["step"] == b["loop"]["step"] == 40
    for net in ("G", "D", "G_ema"):
        for key, value in a["loop"][net].items():
            assert torch.equal(b["loop"][net][key], value), f"{net}.{key}"
    for opt in ("opt_g", "opt_d"):
        for idx, state in a["loop"][opt]["state"].items():
            assert torch.equal(b["loop"][opt]["state"][idx]["exp_avg_sq"], state["exp_avg_sq"])
    assert [h["fid"] for h in a["history"]] == [h["fid"] for h in b["history"]]


class _Stop(Exception):
    pass


def _tracked_status(tmp_path, tiny_cfg, digits, error):
    from mlflow.tracking import MlflowClient

    from gan.tracking import MLflowTracker, TrackingTarget

    target = TrackingTarget(f"sqlite:///{tmp_path}/mlflow.db", "gan", "run")
    trainer = Trainer(
        tiny_cfg, LocalSession(str(tmp_path / "out"), quiet=True), data=digits, tracker=MLflowTracker(target)
    )

    def boom():
        raise error

    trainer.loop.train_step = boom
    with pytest.raises(type(error)):
        trainer.train()
    client = MlflowClient(target.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])
    return run.info.status


@pytest.mark.parametrize(("error", "status"), [(_Stop("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_failed_and_stopped_runs_end_with_the_right_status(tmp_path, tiny_cfg, digits, error, status):
    assert _tracked_status(tmp_path, tiny_cfg, digits, error) == status
