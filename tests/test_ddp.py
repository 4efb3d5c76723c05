"""DistributedDataParallel over gloo: 2 processes x batch b train exactly like 1 x 2b.

Also for the default preset, whose G has batch norm: with SyncBatchNorm the two ranks
normalise over the global batch, and their gradients are those of one process. (Its
parameters are compared through gradients, not after several steps: with Adam at
beta1=0 the first update is lr * sign(g), so float-level noise in gradients that are
mathematically zero, such as a conv bias in front of batch norm, flips whole steps of
lr. That happens between any two float32 summation orders, one process or two.)
Evaluation split over the ranks scores the same set as one process, with the same
value on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan.core.config import override, preset
from gan.core.loop import GANLoop, Nets, make_ema
from gan.core.models import build_models
from gan.data.datasets import load_dataset
from gan.evaluation.evaluator import Evaluator
from gan.runs.ddp import all_gather, ddp_wrap

# No batch norm, so per-rank statistics cannot differ from single-process ones.
NO_BN = (
    "debug",
    [
        "train.batch_size=32",
        "model.g_norm=none",
        "model.d_norm=spectral",
        "loss.augment=translation,cutout,color,flip",
        "loss.class_weight=1",
        "loss.r1_gamma=1",  # R1 in the first step: every parameter of D must take part in its backward
    ],
)
# The default preset (batch norm in G) at a smaller batch. D barely moves in the D phase,
# so the G phase of both runs sees the same D (see the module docstring). Minibatch std
# off: where a group's features nearly agree, its sqrt(var + 1e-8) turns float32 rounding
# into G gradients that differ by up to 0.4% between summation orders on some CPUs (AMD
# EPYC; they agree to 1e-14 in float64), more than SyncBatchNorm's own error; NO_BN
# covers minibatch std across ranks.
DEFAULT = (
    "dcgan",
    [
        "train.batch_size=32",
        "optim.lr_d=1e-9",
        "model.minibatch_std=false",
        "eval.num_samples=100",
        "eval.kid_subset_size=50",
    ],
)
DEFAULT_UNSYNCED = ("dcgan", [*DEFAULT[1], "train.sync_batchnorm=false"])


def build(case, rank: int, world: int, ddp: bool) -> GANLoop:
    name, sets = case
    cfg = override(preset(name), sets)
    torch.manual_seed(rank)  # per-rank seeds, as the Trainer does: rank 0's weights and buffers must win
    G, D = build_models(cfg.model, 28, 1)
    sync_bn = cfg.train.sync_batchnorm
    wrap = (lambda m: ddp_wrap(m, torch.device("cpu"), sync_bn=sync_bn)) if ddp else (lambda m: m)
    G_train, D_train = wrap(G), wrap(D)
    return GANLoop(cfg, Nets(G, D, make_ema(G), G_train, D_train), load_dataset(cfg.data), rank=rank, world_size=world)


def grads(loop: GANLoop) -> dict[str, torch.Tensor]:
    """After a step: D's gradients of the D phase, G's of the G phase (rank-averaged)."""
    return {f"{k}.{n}": p.grad.clone() for k in ("G", "D") for n, p in getattr(loop.nets, k).named_parameters()}


def _worker(rank: int, rendezvous: str, out: str, case, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        loop = build(case, rank, 2, ddp=True)
        for _ in range(steps):
            loop.train_step()
        evaluator = Evaluator(loop.cfg.eval, load_dataset(loop.cfg.data))
        gather = lambda t: all_gather(t, torch.device("cpu"))
        fid = evaluator(loop.nets.G_ema, loop.num_classes, rank=rank, world_size=2, gather=gather)["fid"]
        nets = {k: getattr(loop.nets, k).state_dict() for k in ("G", "D", "G_ema")}
        torch.save({**nets, "grads": grads(loop), "fid": fid}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, case, steps: int) -> list[dict]:
    # A rendezvous file, not a free port: a port found free here was taken by the other
    # lane's Ray before the ranks bound it (EADDRINUSE).
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), out, case, steps), nprocs=2)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]


def check_split_evaluation(ranks: list[dict], reference: GANLoop) -> None:
    """Both ranks report one value, that of one process scoring the same G_ema."""
    assert ranks[0]["fid"] == ranks[1]["fid"]
    G = make_ema(reference.nets.G)
    G.load_state_dict(ranks[0]["G_ema"])
    alone = Evaluator(reference.cfg.eval, load_dataset(reference.cfg.data))(G, reference.num_classes)["fid"]
    assert ranks[0]["fid"] == pytest.approx(alone, rel=1e-6)


def reference_run(case, steps: int) -> GANLoop:
    reference = build(case, 0, 1, ddp=False)
    for _ in range(steps):
        reference.train_step()
    return reference


def worst_gradient_error(ranks: list[dict], reference: GANLoop) -> float:
    """Largest |g_2ranks - g_1process| / max|g_1process| over all tensors and both ranks."""
    worst = 0.0
    for key, g in grads(reference).items():
        scale = g.abs().max().item()
        if scale < 1e-6:  # mathematically zero (a bias in front of batch norm): float noise only
            continue
        worst = max(worst, *((r["grads"][key] - g).abs().max().item() / scale for r in ranks))
    return worst


@pytest.mark.integration
def test_two_ddp_ranks_match_one_process_with_twice_the_batch(tmp_path):
    ranks = run_two_ranks(tmp_path, NO_BN, steps=2)
    reference = reference_run(NO_BN, steps=2)
    for net in ("G", "D", "G_ema"):
        for key, value in getattr(reference.nets, net).state_dict().items():
            for two in ranks:
                torch.testing.assert_close(
                    two[net][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=f"{net}.{key}": f"{k}: {m}"
                )
    check_split_evaluation(ranks, reference)


@pytest.mark.integration
def test_default_preset_with_sync_batchnorm_matches_one_process(tmp_path):
    reference = reference_run(DEFAULT, steps=1)
    ranks = run_two_ranks(tmp_path, DEFAULT, steps=1)
    assert worst_gradient_error(ranks, reference) < 1e-4
    check_split_evaluation(ranks, reference)
    # Without SyncBatchNorm each rank normalises over its own half: the test can tell.
    unsynced = run_two_ranks(tmp_path / "unsynced", DEFAULT_UNSYNCED, steps=1)
    assert worst_gradient_error(unsynced, reference) > 1e-2
