"""Every tensor the project creates names its device: the class of bug that stops a --gpu run.

A CPU-only machine cannot mix devices, so the test makes forgetting one fail here too.
``DeviceTrap`` is a TorchFunctionMode that sees every torch factory call (randn, arange,
zeros, tensor, ...). When the call comes straight from the project's own code (gan/ or
pipelines/) and names no ``device=``, it raises, naming the file and line. On a GPU such
a tensor lands on the CPU and the first op that mixes it with the run's tensors fails;
here it fails at once, on every path the test drives. Library internals (torch,
torchmetrics, optimizers) are left alone: they follow their inputs' devices.

Why not ``torch.set_default_device("meta")``: it also moves what libraries create on
purpose on the host (Adam's step counter), and the models would be built on meta.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gan.core.config import override
from gan.core.sampling import class_grid, interpolation, sample
from gan.runs import checkpoint
from gan.runs.session import LocalSession
from gan.runs.trainer import Trainer

FACTORIES = {
    torch.randn, torch.rand, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.linspace, torch.tensor, torch.eye, torch.as_tensor, torch.normal,
}  # fmt: skip
OURS = ("/gan/", "/pipelines/")


class DeviceTrap(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.caught: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if any(part in where for part in OURS):
                place = f"{where.split('/gan/')[-1]}:{caller.f_lineno}"
                self.caught.append(place)
                raise AssertionError(f"{func.__name__} without device= at {place}")
        return func(*args, **kwargs)


def test_trap_catches_a_tensor_without_device_and_lets_libraries_be():
    with DeviceTrap() as trap:
        torch.nn.Linear(2, 2)  # library code: left alone
        torch.randn(2, device="cpu")
        with pytest.raises(AssertionError, match="randn without device="):
            exec(compile("torch.randn(2)", "/x/gan/fake.py", "exec"), {"torch": torch})
    assert trap.caught == ["fake.py:1"]


def test_whole_run_names_its_device(tiny_cfg, digits, tmp_path):
    """Train, evaluate (FID, grid), checkpoint, resume, sample and interpolate under the trap."""
    cfg = override(tiny_cfg, ["train.total_kimg=0.16", "eval.every_kimg=0.08", "loss.augment=translation,cutout"])
    with DeviceTrap():
        Trainer(cfg, LocalSession(str(tmp_path / "run"), quiet=True), data=digits).train()
        longer = override(cfg, ["train.total_kimg=0.24"])
        resumed = Trainer(longer, LocalSession(str(tmp_path / "run"), resume=True, quiet=True), data=digits)
        assert resumed.loop.step == 10
        resumed.train()
        G = resumed.nets.G_ema
        images, labels = sample(G, 12, seed=3, labels=4, truncation=1.5)
        assert images.shape == (12, 28, 28) and set(labels.tolist()) == {4}
        class_grid(G)
        interpolation(G, steps=3, rows=2)
    state, _ = checkpoint.load(checkpoint.find(str(tmp_path / "run")).latest)
    assert state["loop"]["step"] == 15
