"""DistributedDataParallel over gloo: 2 processes x batch b train exactly like 1 x 2b."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gan.config import override, preset
from gan.data import load_dataset
from gan.distributed import ddp_wrap
from gan.loop import GANLoop, Nets, make_ema
from gan.models import build_models

# No batch norm, so per-rank statistics cannot differ from single-process ones.
SETS = ["train.batch_size=32", "model.g_norm=none", "model.d_norm=spectral", "loss.augment=translation,cutout"]


def build(rank: int, world: int, ddp: bool) -> GANLoop:
    cfg = override(preset("debug"), SETS)
    torch.manual_seed(rank)  # per-rank seeds, as the Trainer does: rank 0's weights and buffers must win
    G, D = build_models(cfg.model, 28, 1)
    wrap = (lambda m: ddp_wrap(m, torch.device("cpu"))) if ddp else (lambda m: m)
    return GANLoop(cfg, Nets(G, D, make_ema(G), wrap(G), wrap(D)), load_dataset(cfg.data), rank=rank, world_size=world)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loop = build(rank, 2, ddp=True)
        for _ in range(2):
            loop.train_step()
        if rank == 0:
            torch.save({"G": loop.nets.G.state_dict(), "D": loop.nets.D.state_dict()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.integration
def test_two_ddp_ranks_match_one_process_with_twice_the_batch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2)
    reference = build(0, 1, ddp=False)
    for _ in range(2):
        reference.train_step()
    two = torch.load(out, weights_only=True)
    for net in ("G", "D"):
        for key, value in getattr(reference.nets, net).state_dict().items():
            torch.testing.assert_close(
                two[net][key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=f"{net}.{key}": f"{k}: {m}"
            )
