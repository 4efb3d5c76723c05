"""The captured step (train.capture) and D's one call on real and generated images.

No CUDA here: the captured step runs emulated (its phase functions, fixed buffers and
device-tensor hyperparameters, without the graphs), and must train as the eager step does.
tests/test_gpu.py captures it for real where a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan.core.capture import capture_blocker
from gan.core.config import ConfigError, check_split, override, preset
from gan.core.loop import DivergenceError, GANLoop, Nets, make_ema
from gan.core.models import build_models
from gan.data.datasets import load_dataset
from gan.runs.ddp import ddp_wrap

# No batch norm in G: with Adam, float noise in a gradient that is mathematically zero (a
# bias in front of batch norm) flips whole steps of lr between any two summation orders.
SETS = [
    "model.g_norm=none",
    "optim.d_steps=2",
    "loss.r1_gamma=1",
    "loss.r1_every=3",
    "loss.augment=translation,cutout,color",
    "loss.class_weight=1",
    "train.batch_size=16",
]


def build(sets, *, emulate: bool = False, rank: int = 0, world: int = 1, ddp: bool = False) -> GANLoop:
    cfg = override(preset("debug"), sets)
    torch.manual_seed(rank)
    G, D = build_models(cfg.model, 28, 1)
    wrap = (lambda m: ddp_wrap(m, torch.device("cpu"))) if ddp else (lambda m: m)
    G_train, D_train = wrap(G), wrap(D)  # before the EMA copy: DDP has broadcast rank 0's weights
    nets = Nets(G, D, make_ema(G), G_train, D_train)
    return GANLoop(cfg, nets, load_dataset(cfg.data), rank=rank, world_size=world, emulate_capture=emulate)


def weights(loop: GANLoop) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": v.clone() for k in ("G", "D", "G_ema") for n, v in getattr(loop.nets, k).state_dict().items()}


def assert_trains_alike(a: GANLoop, b: GANLoop) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


ADA_SETS = [s for s in SETS if not s.startswith("loss.augment")] + [
    "loss.ada=blit,geom,color", "loss.ada_p=0.2", "loss.ada_speed_kimg=0.5", "loss.kind=rpgan",
    "loss.r2_gamma=1", "loss.class_weight=0"]  # fmt: skip


@pytest.mark.parametrize("sets", [SETS, ADA_SETS], ids=["diffaugment", "ada-rpgan"])
def test_the_captured_step_trains_as_the_eager_one(sets):
    eager, captured = build(sets), build(sets, emulate=True)
    for _ in range(8):  # warm-up, then the graphs; R1 every third step stays eager
        eager.train_step()
        captured.train_step()
    assert set(captured.captured.graphs) == {"d", "g"}
    assert (captured.step, captured.images_seen) == (eager.step, eager.images_seen)
    assert_trains_alike(eager, captured)
    stats, reference = captured.read_stats(), eager.read_stats()
    for key in ("loss/d", "loss/g", "d/real", "d/fake", "loss/d/class", "loss/g/class", "augment/p", "augment/rt"):
        if key in reference:
            assert stats[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key
    assert ("augment/p" in stats) == ("augment/p" in reference) == ("loss.ada" in str(sets))
    assert stats["loss/d/r1"] > 0 and stats["grad_norm/g"] > 0  # kept in their fixed tensors


def test_new_settings_reach_the_captured_step_without_a_new_capture():
    """PBT and the decay refill the device tensors the graphs read."""
    eager, captured = build(SETS), build(SETS, emulate=True)
    for _ in range(5):
        eager.train_step()
        captured.train_step()
    graphs = dict(captured.captured.graphs)
    lr_tensor = captured.opt_g.param_groups[0]["lr"]
    changed = override(eager.cfg, ["optim.lr_g=5e-3", "optim.beta2=0.5", "train.ema_half_life_kimg=0.01"])
    for loop in (eager, captured):
        loop.set_hyperparameters(changed)
        loop.scale_learning_rates(0.5)
    assert captured.opt_g.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(2.5e-3)
    for _ in range(4):
        eager.train_step()
        captured.train_step()
    assert captured.captured.graphs == graphs
    assert_trains_alike(eager, captured)


def test_a_captured_run_resumes_bit_for_bit():
    first = build(SETS, emulate=True)
    for _ in range(5):
        first.train_step()
    state = copy.deepcopy(first.state_dict())
    for _ in range(4):
        first.train_step()
    resumed = build(SETS, emulate=True)
    resumed.load_state_dict(state)
    for _ in range(4):
        resumed.train_step()
    for key, value in weights(first).items():
        assert torch.equal(weights(resumed)[key], value), key


def test_a_nan_in_a_captured_step_names_its_step():
    loop = build(SETS, emulate=True)
    for _ in range(6):
        loop.train_step()
    with torch.no_grad():
        next(loop.nets.G.parameters()).fill_(float("nan"))
    loop.train_step()
    loop.train_step()
    with pytest.raises(DivergenceError, match="at step 6 "):
        loop.read_stats()


def test_train_capture_on_a_cpu_says_why_once_and_trains_as_eager(capsys):
    eager, asked = build(SETS), build([*SETS, "train.capture=true"])
    out = capsys.readouterr().out
    assert out.count("warning: train.capture is off for this run: CUDA graphs need a CUDA device") == 1
    assert asked.captured is None
    for _ in range(4):
        eager.train_step()
        asked.train_step()
    for key, value in weights(eager).items():
        assert torch.equal(weights(asked)[key], value), key


@pytest.mark.parametrize(
    ("sets", "reason"),
    [
        (["train.compile=true"], "use one of train.compile and train.capture"),
        (["loss.kind=wgan-gp"], "WGAN-GP takes its gradient penalty"),
    ],
)
def test_steps_that_cannot_be_captured_are_named(sets, reason):
    cfg = override(preset("debug"), sets)
    assert reason in capture_blocker(cfg, torch.device("cuda"))
    assert capture_blocker(preset("debug"), torch.device("cuda")) is None


def _ddp_worker(rank: int, rendezvous: str, out: str, emulate: bool, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        loop = build(SETS, emulate=emulate, rank=rank, world=2, ddp=True)
        for _ in range(steps):
            loop.train_step()
        torch.save(weights(loop), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_the_captured_step_under_ddp_trains_as_the_eager_one(tmp_path):
    """Two gloo ranks; past DDP's 11 warm-up steps, so the graphs' phases run too."""
    results = {}
    for emulate in (False, True):
        folder = tmp_path / ("captured" if emulate else "eager")
        folder.mkdir()
        mp.spawn(_ddp_worker, args=(str(folder / "rendezvous"), str(folder / "w"), emulate, 14), nprocs=2)
        results[emulate] = [torch.load(folder / f"w.{rank}", weights_only=True) for rank in range(2)]
    for key, value in results[False][0].items():
        for rank in range(2):
            torch.testing.assert_close(results[True][rank][key], value, rtol=1e-4, atol=1e-5)


# --- D's one call --------------------------------------------------------------------
def test_one_d_call_trains_as_two_where_d_holds_no_batch_statistics():
    """With minibatch std (groups of 4 within the real or the generated images) and no
    spectral norm, whose power iteration runs once per call, the maths is the same."""
    sets = [*SETS, "model.d_norm=none"]
    two, one = build(sets), build([*sets, "train.d_one_call=true"])
    for _ in range(6):
        two.train_step()
        one.train_step()
    assert_trains_alike(two, one)


def test_one_d_call_is_refused_where_d_would_mix_real_and_generated_images():
    with pytest.raises(ConfigError, match="model.d_norm='batch'"):
        override(preset("textbook"), ["train.d_one_call=true"])
    with pytest.raises(ConfigError, match="multiple of 4.*18 over 1 worker"):
        override(preset("dcgan"), ["train.d_one_call=true", "train.batch_size=18"])
    cfg = override(preset("dcgan"), ["train.d_one_call=true", "train.batch_size=24"])
    with pytest.raises(ConfigError, match="24 over 4 worker"):
        check_split(cfg, 4)  # 6 a worker; 12 on 2 is fine
    check_split(cfg, 2)
    check_split(override(cfg, ["model.minibatch_std=false", "train.batch_size=18"]), 1)
