"""The GAN step: order of phases, optimizers, requires_grad toggling, EMA. No I/O.

All randomness of a step (which images, z, fake labels, augmentation) is drawn for the
*global* batch from a generator every rank holds in the same state, and each rank takes
its own rows. So N workers x batch b trains exactly like 1 worker x batch N*b, and a
result does not depend on how many workers produced it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from gan.augment import DiffAugment
from gan.config import Config
from gan.data import ImageDataset
from gan.losses import GANLoss

ReduceMean = Callable[[torch.Tensor], torch.Tensor]


class DivergenceError(RuntimeError):
    """Training produced NaN/Inf; the message names the step and the quantity."""


def ema_beta(batch_size: int, half_life_kimg: float) -> float:
    """Per-step EMA decay so that the weight of a step halves every ``half_life_kimg``."""
    if half_life_kimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / (half_life_kimg * 1000.0))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def make_ema(G: nn.Module) -> nn.Module:
    return copy.deepcopy(G).eval().requires_grad_(False)


@dataclass
class Nets:
    """Unwrapped modules (for EMA and checkpoints) and the ones to call (maybe DDP)."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    G_train: nn.Module
    D_train: nn.Module


class GANLoop:
    def __init__(
        self,
        cfg: Config,
        nets: Nets,
        data: ImageDataset,
        *,
        rank: int = 0,
        world_size: int = 1,
        reduce_mean: ReduceMean = lambda t: t,
        device: torch.device | str = "cpu",
    ) -> None:
        if cfg.train.batch_size % world_size:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {world_size} workers")
        if cfg.train.batch_size > len(data):
            raise ValueError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(data)} images in the dataset")
        self.cfg, self.nets, self.data = cfg, nets, data
        self.rank, self.world_size, self.reduce_mean = rank, world_size, reduce_mean
        self.device = torch.device(device)
        self.global_batch = cfg.train.batch_size
        self.local_batch = cfg.train.batch_size // world_size
        self.rows = slice(rank * self.local_batch, (rank + 1) * self.local_batch)
        self.num_classes = cfg.model.num_classes
        # One generator for everything random in a step, in the same state on every rank.
        self.rng = torch.Generator().manual_seed(cfg.train.seed)
        self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)
        self.loss = GANLoss(cfg.loss, DiffAugment(cfg.loss.augment, self.rng, rank, world_size), self.autocast)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_g = torch.optim.Adam(nets.G.parameters(), lr=cfg.optim.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(nets.D.parameters(), lr=cfg.optim.lr_d, betas=betas)
        self.beta = ema_beta(self.global_batch, cfg.train.ema_half_life_kimg)
        self.step = 0
        self.images_seen = 0
        self.epoch = 0
        self.cursor = 0
        self.perm = self._permutation(0)

    # --- randomness -----------------------------------------------------------------
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data), generator=g)

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cursor + self.global_batch > len(self.perm):  # drop the ragged tail
            self.epoch += 1
            self.cursor = 0
            self.perm = self._permutation(self.epoch)
        idx = self.perm[self.cursor : self.cursor + self.global_batch][self.rows]
        self.cursor += self.global_batch
        real = self.data.to_float(idx).to(self.device, non_blocking=True)
        labels = self.data.labels[idx].to(self.device) if self.num_classes else None
        return real, labels

    def _latents(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = torch.randn(self.global_batch, self.cfg.model.z_dim, generator=self.rng)[self.rows]
        labels = None
        if self.num_classes:
            labels = torch.randint(0, self.num_classes, (self.global_batch,), generator=self.rng)[self.rows]
            labels = labels.to(self.device)
        return z.to(self.device), labels

    # --- one step -------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One G update after ``optim.d_steps`` D updates; returns rank-averaged stats."""
        n = self.nets
        stats: dict[str, torch.Tensor] = {}
        n.G.requires_grad_(False)
        n.D.requires_grad_(True)
        for _ in range(self.cfg.optim.d_steps):
            real, labels = self._real_batch()
            z, fake_labels = self._latents()
            alpha = None
            if self.cfg.loss.kind == "wgan-gp":
                alpha = torch.rand(self.global_batch, 1, 1, 1, generator=self.rng)[self.rows].to(self.device)
            with torch.no_grad(), self.autocast():
                fake = n.G_train(z, fake_labels).float()
            self.opt_d.zero_grad(set_to_none=True)
            stats.update(self.loss.d_main(n.D_train, real, labels, fake, fake_labels, alpha))
            if self.cfg.loss.r1_gamma > 0 and self.step % self.cfg.loss.r1_every == 0:
                stats.update(self.loss.d_reg(n.D_train, real, labels))
            self.opt_d.step()
            self.images_seen += self.global_batch

        n.D.requires_grad_(False)
        n.G.requires_grad_(True)
        z, fake_labels = self._latents()
        self.opt_g.zero_grad(set_to_none=True)
        # D takes no gradient in this phase: no_sync keeps DDP from waiting for one.
        no_sync = n.D_train.no_sync() if hasattr(n.D_train, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                fake = n.G_train(z, fake_labels)
            stats.update(self.loss.g_main(n.D_train, fake, fake_labels))
        self.opt_g.step()
        n.D.requires_grad_(True)
        update_ema(n.G_ema, n.G, self.beta)
        self.step += 1
        return self._reduce(stats)

    def _reduce(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(stats)
        values = self.reduce_mean(torch.stack([stats[k].float().cpu() for k in names]))
        out = dict(zip(names, values.tolist(), strict=True))
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            raise DivergenceError(
                f"training diverged: {', '.join(bad)} became NaN/Inf at step {self.step} "
                f"({self.images_seen} images seen); lower the learning rates "
                f"(optim.lr_g={self.cfg.optim.lr_g}, optim.lr_d={self.cfg.optim.lr_d})"
            )
        return out

    # --- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "G": self.nets.G.state_dict(),
            "D": self.nets.D.state_dict(),
            "G_ema": self.nets.G_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.nets.G.load_state_dict(state["G"])
        self.nets.D.load_state_dict(state["D"])
        self.nets.G_ema.load_state_dict(state["G_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.perm = self._permutation(self.epoch)
        self.rng.set_state(state["rng"])
