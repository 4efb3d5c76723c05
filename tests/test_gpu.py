"""The GPU path, where a CUDA GPU is present (skipped otherwise).

A minute of the default preset with --gpu through Ray Train: evaluate, checkpoint,
resume, sample and register; and an in-process run under the device trap of
test_device.py, checking that data, draws, EMA and the evaluator live on the GPU.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_trainer_on_cuda_keeps_every_tensor_on_the_device(tiny_cfg, digits, tmp_path):
    from test_device import DeviceTrap

    from gan.core.config import override
    from gan.core.sampling import class_grid, interpolation, sample
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    cfg = override(tiny_cfg, ["train.total_kimg=0.32", "eval.every_kimg=0.16", "loss.augment=translation,cutout"])
    with DeviceTrap():
        trainer = Trainer(cfg, LocalSession(str(tmp_path / "run"), device="cuda", quiet=True), data=digits)
        loop = trainer.loop
        assert loop.images.is_cuda and loop.labels.is_cuda and loop.rng.device.type == "cuda"
        assert all(
            t.is_cuda for net in (trainer.nets.G, trainer.nets.D, trainer.nets.G_ema) for t in net.state_dict().values()
        )
        assert trainer.evaluator.real_features.is_cuda and all(
            p.is_cuda for p in trainer.evaluator.backbone.parameters()
        )
        result = trainer.train()
        assert math.isfinite(result.best_fid) and result.step == 20
        longer = override(cfg, ["train.total_kimg=0.48"])
        resumed = Trainer(
            longer, LocalSession(str(tmp_path / "run"), resume=True, device="cuda", quiet=True), data=digits
        )
        assert resumed.loop.step == 20
        assert resumed.train().step == 30
        G = resumed.nets.G_ema
        images, _ = sample(G, 10, seed=1, labels=3)
        assert images.shape == (10, 28, 28)
        class_grid(G)
        interpolation(G, steps=3, rows=2)


def test_same_seed_same_images_on_cpu_and_gpu(tiny_cfg):
    """Latents come from a CPU generator: a seed means the same digits on either device."""
    from gan.core.models import build_models
    from gan.core.sampling import sample

    G, _ = build_models(tiny_cfg.model, 28, 1)
    G.eval()
    cpu, _ = sample(G, 20, seed=7)
    gpu, _ = sample(G.cuda(), 20, seed=7)
    assert (abs(cpu.astype(int) - gpu.astype(int)) <= 1).all()  # kernels differ: at most one uint8 level


def test_default_preset_for_a_minute_with_gpu(tmp_path):
    """`python pipelines/train.py --gpu` as a user runs it: one worker per GPU, the default
    preset for 60 s, evaluated, checkpointed; resumed; sampled; registered and loaded."""
    storage, db = tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db"
    base = ("pipelines/train.py", "--gpu", "--storage", str(storage), "--name", "gpu", "--tracking-uri", db)
    out = run(*base, "--time-budget-s", "60", "--set", "eval.every_kimg=100")
    assert re.search(r"Ray Train run 'gpu': \d+ worker\(s\)", out) and "best FID" in out
    best = re.search(r"best checkpoint:\s+(\S+)", out).group(1)
    saved = re.search(r"latest checkpoint:\s+(\S+)", out).group(1).rstrip("/").rsplit("/", 1)[-1]
    from gan.runs import checkpoint

    first, _ = checkpoint.load(best)
    assert math.isfinite(first["best_fid"]) and first["loop"]["step"] > 0

    out = run(*base, "--time-budget-s", "75", "--set", "eval.every_kimg=100", "--resume")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    (tracked,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])  # one run, resumed
    assert f"/{saved} (step " in tracked.data.tags["resumed_from"]  # the first run's last checkpoint
    latest = re.search(r"latest checkpoint:\s+(\S+)", out).group(1)
    state, _ = checkpoint.load(latest)
    assert state["loop"]["step"] > first["loop"]["step"]

    run("pipelines/sample.py", "--checkpoint", best, "--n", "64", "--out", str(tmp_path / "s.npz"),
        "--grid", str(tmp_path / "g.png"))  # fmt: skip
    assert (tmp_path / "s.npz").exists() and (tmp_path / "g.png").exists()

    import mlflow
    from mlflow.tracking import MlflowClient

    from gan.core.config import Config
    from gan.core.sampling import sample
    from gan.registry.models import load_generator, logged_model_uri, register

    client = MlflowClient(db)
    (tracked,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.tags["device"].startswith("cuda")
    mlflow.set_tracking_uri(db)
    version = register(db, logged_model_uri(db, tracked, "generator_best"), "gpu-generator",
                       Config.from_json(first["config"]), tags={"test": "gpu"})  # fmt: skip
    G, _ = load_generator(f"models:/gpu-generator/{version.version}")
    images, _ = sample(G, 5, seed=0)
    assert images.shape == (5, 28, 28)


def test_the_captured_step_replays_cuda_graphs_and_trains_as_the_eager_one(capsys):
    """train.capture on a GPU: past the warm-up each phase is a CUDAGraph replay, and the
    weights follow the eager step's (TF32 off on both; kernels may differ in the last bits)."""
    from test_capture import SETS

    from gan.core.config import override, preset
    from gan.core.loop import GANLoop, Nets, make_ema
    from gan.core.models import build_models
    from gan.data.datasets import load_dataset

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def build(capture: bool) -> GANLoop:
        cfg = override(preset("debug"), [*SETS, f"train.capture={capture}"])
        torch.manual_seed(0)
        G, D = (net.cuda() for net in build_models(cfg.model, 28, 1))
        return GANLoop(cfg, Nets(G, D, make_ema(G), G, D), load_dataset(cfg.data), device="cuda")

    eager, captured = build(False), build(True)
    for _ in range(10):
        eager.train_step()
        captured.train_step()
    assert "train.capture" not in capsys.readouterr().out  # neither refused nor broken
    assert all(isinstance(replay.__self__, torch.cuda.CUDAGraph) for replay in captured.captured.graphs.values())
    assert set(captured.captured.graphs) == {"d", "g"}
    for net in ("G", "D", "G_ema"):
        reference = getattr(eager.nets, net).state_dict()
        for key, value in getattr(captured.nets, net).state_dict().items():
            torch.testing.assert_close(
                value, reference[key], rtol=1e-3, atol=1e-4, msg=lambda m, k=f"{net}.{key}": f"{k}: {m}"
            )
    assert captured.read_stats().keys() >= eager.read_stats().keys()
