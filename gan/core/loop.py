"""The GAN step: order of phases, optimizers, requires_grad toggling, EMA. No I/O.

All randomness of a step (which images, z, fake labels, augmentation) is drawn for the
*global* batch from a generator every rank holds in the same state, and each rank takes
its own rows. So N workers x batch b trains exactly like 1 worker x batch N*b, and a
result does not depend on how many workers produced it. That generator lives on the run's
device, and so does the dataset when it fits (uint8, converted per batch on the device).
A streamed dataset (``MappedDataset``, over ``data.memory_budget_mb``) stays in its
memory-mapped shards: each rank reads only its rows of the global batch, by the same
per-epoch permutation drawn on the CPU, so it trains exactly like the same data loaded
into CPU memory (on a GPU whose memory would hold the data, the in-memory run draws its
permutation there instead: another order, the same scheme).

Nothing in a step waits for the device: statistics stay device tensors and a cheap
on-device check records the first step where one became NaN/Inf. ``read_stats`` (called
at logging steps) gathers them over ranks, reads them once, and names that step.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from gan.core.augment import AdaptiveAugment, AugmentController, DiffAugment
from gan.core.capture import CapturedStep, capturable_adam, capture_blocker
from gan.core.config import Config
from gan.core.losses import GANLoss
from gan.core.schedule import Settings, ramp, settings_at
from gan.data.datasets import Dataset, MappedDataset, class_shares

Gather = Callable[[torch.Tensor], torch.Tensor]
"""All-gather over ranks: each rank's tensor, concatenated along dim 0 in rank order."""

DATA_DEVICE_SHARE = 0.25  # the dataset moves to an accelerator when it takes at most this share of free memory


class DivergenceError(RuntimeError):
    """Training produced NaN/Inf; the message names the step and the quantity."""


def ema_beta(batch_size: int, half_life_kimg: float) -> float:
    """Per-step EMA decay so that the weight of a step halves every ``half_life_kimg``."""
    if half_life_kimg <= 0:
        return 0.0
    return 0.5 ** (batch_size / (half_life_kimg * 1000.0))


def lr_scale(progress: float, decay_start: float) -> float:
    """The share of the configured learning rates at ``progress`` (0 to 1) through the run:
    1 until ``decay_start``, then falling linearly to 0 at the end."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 if progress <= decay_start else (1.0 - progress) / (1.0 - decay_start)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float | torch.Tensor, foreach: bool = False) -> None:
    """``beta`` may be a device tensor (a captured step's), with ``foreach``."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    ema_buffers, buffers = list(ema.buffers()), list(model.buffers())
    if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
        raise ValueError("EMA and model differ in structure")
    if foreach:  # one kernel launch per group instead of one per tensor
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        return
    for p_ema, p in zip(ema_params, params, strict=True):
        p_ema.lerp_(p, 1.0 - beta)
    for b_ema, b in zip(ema_buffers, buffers, strict=True):
        b_ema.copy_(b)


def load_moments(opt: torch.optim.Optimizer, saved: dict) -> None:
    """The saved optimizer state (Adam's moments) under this run's hyperparameters: a run
    resumed with new learning rates or betas trains with them, as its params say."""
    current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, hyper in zip(opt.param_groups, current, strict=True):
        group.update(hyper)


def adam(params, cfg, lr: float) -> torch.optim.Adam:
    """Adam with the implementation ``optim.adam_impl`` names ('auto': torch's choice)."""
    impl = {"auto": {}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), **impl[cfg.adam_impl])


def fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= DATA_DEVICE_SHARE * free
    return False


def grad_norm(module: nn.Module) -> torch.Tensor:
    """The L2 norm of all of a module's gradients, left on the device."""
    return torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])


def make_ema(G: nn.Module) -> nn.Module:
    return copy.deepcopy(G).eval().requires_grad_(False)


class ReadAhead:
    """Batches from host memory, read one step ahead: the next batch's rows go to pinned
    memory and are copied to the GPU on a side stream while the current step trains (on a
    CPU, the same order of reads without the copy)."""

    def __init__(self, loop: GANLoop) -> None:
        self.loop = loop
        self.stream = torch.cuda.Stream(loop.device) if loop.device.type == "cuda" else None
        self.pending: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.pending_position = {"epoch": 0, "cursor": 0}

    def take(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pending is None:
            self.pending = self._read()
        batch = self.pending
        if self.stream is not None:
            current = torch.cuda.current_stream(self.loop.device)
            current.wait_stream(self.stream)
            for tensor in filter(None, batch):
                tensor.record_stream(current)  # its memory is not reused before this step is done with it
        self.pending = self._read()
        return batch

    def _read(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        loop = self.loop
        self.pending_position = {"epoch": loop.epoch, "cursor": loop.cursor}
        if self.stream is None:
            return loop._rows(loop.device)
        real, labels = loop._rows(torch.device("cpu"))
        with torch.cuda.stream(self.stream):
            real = real.pin_memory().to(loop.device, non_blocking=True)
            labels = None if labels is None else labels.pin_memory().to(loop.device, non_blocking=True)
        return real, labels


@dataclass
class Nets:
    """Unwrapped modules (for EMA and checkpoints) and the ones to call (maybe DDP)."""

    G: nn.Module
    D: nn.Module
    G_ema: nn.Module
    G_train: nn.Module
    D_train: nn.Module
    D_reg: nn.Module | None = None
    """D for penalties that differentiate twice (R1, gradient penalty): compiled graphs
    cannot; None means D_train."""


class GANLoop:
    def __init__(
        self,
        cfg: Config,
        nets: Nets,
        data: Dataset,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_gather: Gather = lambda t: t,
        device: torch.device | str = "cpu",
        emulate_capture: bool = False,
        read_ahead: bool | None = None,
    ) -> None:
        """``emulate_capture``: the captured step's code without CUDA graphs (tests on a CPU).
        ``read_ahead``: read each batch one step ahead (None: where the device is a GPU and
        the data stays on the host)."""
        if cfg.train.batch_size % world_size:
            raise ValueError(f"train.batch_size={cfg.train.batch_size} must divide evenly over {world_size} workers")
        if cfg.train.batch_size > len(data):
            raise ValueError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(data)} images in the dataset")
        self.cfg, self.nets = cfg, nets
        self.rank, self.world_size, self.all_gather = rank, world_size, all_gather
        self.device = torch.device(device)
        self.global_batch = cfg.train.batch_size
        self.local_batch = cfg.train.batch_size // world_size
        self.rows = slice(rank * self.local_batch, (rank + 1) * self.local_batch)
        self.num_classes = cfg.model.num_classes
        # uint8 on the device when it fits: a batch is then an index and a conversion there.
        # A streamed dataset is read from its shards on the host, a batch at a time.
        self.data, self.num_images = data, len(data)
        self.streamed = isinstance(data, MappedDataset)
        on_device = not self.streamed and fits_on(self.device, data.nbytes)
        self.data_device = self.device if on_device else torch.device("cpu")
        self.images = None if self.streamed else data.images.to(self.data_device)
        self.labels = None if data.labels is None else data.labels.to(self.data_device)
        self.class_shares = class_shares(data.labels, self.num_classes).to(self.device) if self.num_classes else None
        # One generator for everything random in a step, in the same state on every rank.
        self.rng = torch.Generator(device=self.device).manual_seed(cfg.train.seed)
        capture = emulate_capture or (cfg.train.capture and not self._capture_refused())
        # A graph must not hold autocast's cache of casts from the capture.
        self.autocast = lambda: torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16, cache_enabled=not capture
        )
        augment, self.ada = self._augmentation()
        self.loss = GANLoss(
            cfg.loss,
            augment,
            self.autocast,
            one_call=cfg.train.d_one_call,
            observe=None if self.ada is None else self.ada.observe,
        )
        self.beta = ema_beta(self.global_batch, cfg.train.ema_half_life_kimg)
        self.paired_real: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.captured: CapturedStep | None = None
        if capture:
            make = lambda params, lr: capturable_adam(params, cfg.optim, lr, self.device, emulate_capture)  # noqa: E731
            self.opt_g, self.opt_d = (
                make(nets.G.parameters(), cfg.optim.lr_g),
                make(nets.D.parameters(), cfg.optim.lr_d),
            )
            self.captured = CapturedStep(self, emulate=emulate_capture)
        else:
            self.opt_g = adam(nets.G.parameters(), cfg.optim, cfg.optim.lr_g)
            self.opt_d = adam(nets.D.parameters(), cfg.optim, cfg.optim.lr_d)
        self.lr_scale = 1.0
        """The share of the learning rates ``optim.lr_decay_start``'s linear decay leaves now."""
        self.settings: Settings = settings_at(cfg, 0)
        """The scheduled settings in force (cfg.schedule), before the decay's share."""
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.step = 0
        self.images_seen = 0
        self.epoch = 0
        self.cursor = 0
        self.perm = self._permutation(0)
        if read_ahead is None:
            read_ahead = self.device.type == "cuda" and self.data_device.type == "cpu"
        self.read_ahead = ReadAhead(self) if read_ahead else None
        self._last: dict[str, torch.Tensor] = {}
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def _augmentation(self) -> tuple[DiffAugment | AdaptiveAugment, AugmentController | None]:
        """D's augmentation, and for adaptive augmentation (loss.ada) the controller of its p."""
        loss = self.cfg.loss
        if not loss.ada:
            return DiffAugment(loss.augment, self.rng, self.rank, self.world_size), None
        fixed = functools.partial(ramp, loss.ada_p, kimg=loss.ada_ramp_kimg)
        start = loss.ada_p if loss.ada_target else fixed(0)
        augment = AdaptiveAugment(
            self.rng,
            self.rank,
            self.world_size,
            p=torch.full((), start, device=self.device),
            groups=loss.ada,
            flips=loss.ada_flips,
        )
        controller = AugmentController(
            augment.p,
            self.global_batch * self.cfg.optim.d_steps,  # the real images D sees in a step
            target=loss.ada_target or None,
            speed_kimg=loss.ada_speed_kimg,
            schedule=None if loss.ada_target else fixed,
            all_gather=self.all_gather,
        )
        return augment, controller

    def set_hyperparameters(self, cfg: Config) -> None:
        """Train on with ``cfg``'s learning rates, betas, EMA half-life and schedule ends
        (config.MUTABLE): PBT's explore step on a running loop."""
        self.cfg = cfg
        self.apply_settings()

    def _capture_refused(self) -> bool:
        """Whether train.capture cannot hold for this run; says why (rank 0, one line)."""
        blocker = capture_blocker(self.cfg, self.device)
        if blocker and self.rank == 0:
            print(f"warning: train.capture is off for this run: {blocker}; training eager", flush=True)
        return blocker is not None

    def scale_learning_rates(self, scale: float) -> None:
        """Train on at ``scale`` times the learning rates (the linear decay's share)."""
        self.lr_scale = scale
        self.apply_settings()

    def apply_settings(self) -> None:
        """The optimizers' learning rates and betas, the EMA decay and the penalties' gamma for
        the images seen so far: the config's, moved along its schedule, times the decay's share."""
        now = self.settings = settings_at(self.cfg, self.images_seen)
        for opt, lr in ((self.opt_g, now.lr_g * self.lr_scale), (self.opt_d, now.lr_d * self.lr_scale)):
            for group in opt.param_groups:
                if torch.is_tensor(group["lr"]):  # held by a captured step: refilled, not replaced
                    for tensor, value in zip((group["lr"], *group["betas"]), (lr, now.beta1, now.beta2), strict=True):
                        tensor.fill_(value)
                else:
                    group.update(lr=lr, betas=(now.beta1, now.beta2))
        self.beta = ema_beta(self.global_batch, now.ema_half_life_kimg)
        if self.captured is not None:
            self.captured.set_ema_beta(self.beta)
        self.loss.gamma_scale = now.gamma_scale

    # --- randomness -----------------------------------------------------------------
    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator(device=self.data_device).manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_images, generator=g, device=self.data_device)

    def _real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        real, labels = self.read_ahead.take() if self.read_ahead is not None else self._rows(self.device)
        real = real.float().div_(127.5).sub_(1.0).contiguous(memory_format=self.memory_format)
        return real, labels

    def _rows(self, to: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch's uint8 rows and labels, moved ``to`` (without waiting for the copy)."""
        if self.cursor + self.global_batch > len(self.perm):  # drop the ragged tail
            self.epoch += 1
            self.cursor = 0
            self.perm = self._permutation(self.epoch)
        idx = self.perm[self.cursor : self.cursor + self.global_batch][self.rows]
        self.cursor += self.global_batch
        real = (self.data.rows(idx) if self.streamed else self.images[idx]).to(to, non_blocking=True)
        labels = self.labels[idx].to(to, non_blocking=True) if self.num_classes else None
        return real, labels

    def _latents(self, paired_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z and class labels for this rank's generated images. A relativistic loss gives each
        generated image the class of the real image it is paired with (as R3GAN does), so a
        pair differs in how real it looks, not in what it shows."""
        z = torch.randn(self.global_batch, self.cfg.model.z_dim, generator=self.rng, device=self.device)[self.rows]
        labels = None
        if self.num_classes and paired_labels is not None and self.cfg.loss.kind == "rpgan":
            labels = paired_labels
        elif self.num_classes:
            labels = torch.multinomial(self.class_shares, self.global_batch, replacement=True, generator=self.rng)
            labels = labels[self.rows]
        return z, labels

    # --- one step -------------------------------------------------------------------
    def train_step(self) -> None:
        """One G update after ``optim.d_steps`` D updates. Queues work on the device and
        returns without waiting for it; ``read_stats`` reads the statistics."""
        if self.cfg.schedule.kimg:  # host floats; a captured step's device tensors are refilled
            self.apply_settings()
        if self.captured is not None:
            self.captured.step()
        else:
            self._eager_step()
        if self.ada is not None:
            self.ada.step(self.images_seen)

    def _eager_step(self) -> None:
        n = self.nets
        stats: dict[str, torch.Tensor] = {}
        # Gradient norms cost a pass over every gradient: only for the step that is logged.
        log_step = (self.step + 1) % self.cfg.train.log_every_steps == 0
        n.G.requires_grad_(False)
        n.D.requires_grad_(True)
        for _ in range(self.cfg.optim.d_steps):
            real, labels = self._real_batch()
            stats.update(self.d_phase(real, labels, penalty=self.penalty_due(), grad_norms=log_step))
            self.images_seen += self.global_batch
        n.D.requires_grad_(False)
        n.G.requires_grad_(True)
        stats.update(self.g_phase(grad_norms=log_step))
        n.D.requires_grad_(True)
        update_ema(n.G_ema, n.G, self.beta, foreach=self.cfg.train.foreach_ema)
        self.step += 1
        self._watch(stats)

    def penalty_due(self) -> bool:
        """Whether this step's D phase takes the lazy R1 penalty."""
        return self.cfg.loss.r1_gamma > 0 and self.step % self.cfg.loss.r1_every == 0

    def d_phase(self, real, labels, *, penalty: bool, grad_norms: bool) -> dict[str, torch.Tensor]:
        """One D update on ``real`` against images G draws now: its statistics."""
        n = self.nets
        z, fake_labels = self._latents(labels)
        alpha = None
        if self.cfg.loss.kind == "wgan-gp":
            alpha = torch.rand(self.global_batch, 1, 1, 1, generator=self.rng, device=self.device)[self.rows]
        with torch.no_grad(), self.autocast():
            fake = n.G_train(z, fake_labels).float()
        self.opt_d.zero_grad(set_to_none=True)
        D_reg = n.D_reg or n.D_train
        stats = self.loss.d_main(n.D_train, real, labels, fake, fake_labels, alpha, D_penalty=D_reg)
        if penalty:
            stats.update(self.loss.d_reg(D_reg, real, labels, fake=fake, fake_labels=fake_labels))
        self.paired_real = (real, labels)  # what a relativistic G phase scores its images against
        if grad_norms:
            stats["grad_norm/d"] = grad_norm(n.D)
        self.opt_d.step()
        return stats

    def g_phase(self, *, grad_norms: bool) -> dict[str, torch.Tensor]:
        """One G update against D as it is: its statistics."""
        n = self.nets
        real, labels = self.paired_real if self.cfg.loss.kind == "rpgan" else (None, None)
        z, fake_labels = self._latents(labels)
        self.opt_g.zero_grad(set_to_none=True)
        # D takes no gradient in this phase: no_sync keeps DDP from waiting for one.
        no_sync = n.D_train.no_sync() if hasattr(n.D_train, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with self.autocast():
                fake = n.G_train(z, fake_labels)
            stats = self.loss.g_main(n.D_train, fake, fake_labels, real=real, real_labels=labels)
        if grad_norms:
            stats["grad_norm/g"] = grad_norm(n.G)
        self.opt_g.step()
        return stats

    def _watch(self, stats: dict[str, torch.Tensor]) -> None:
        """Keep the step's statistics and remember, on the device, the first bad step."""
        finite = torch.isfinite(torch.stack([v.float() for v in stats.values()])).all()
        self._first_bad = torch.where(~finite & (self._first_bad < 0), self.step, self._first_bad)
        self._last = stats

    def read_stats(self) -> dict[str, float]:
        """The last step's statistics, averaged over ranks: one gather, one device read.
        Raises DivergenceError naming the first step (on any rank) where one went NaN/Inf."""
        last = self._last | (self.ada.stats() if self.ada is not None else {})
        names = sorted(last)
        local = torch.stack([last[k].float() for k in names] + [self._first_bad.float()])
        ranks = self.all_gather(local.unsqueeze(0)).double().tolist()
        bad_steps = [int(row[-1]) for row in ranks if row[-1] >= 0]
        if bad_steps:
            step = min(bad_steps)
            last = [sum(row[i] for row in ranks) for i in range(len(names))]
            bad = [k for k, v in zip(names, last, strict=True) if not math.isfinite(v)] or ["a statistic"]
            raise DivergenceError(
                f"training diverged: {', '.join(bad)} became NaN/Inf at step {step} "
                f"({step * self.global_batch * self.cfg.optim.d_steps} images seen); lower the learning rates "
                f"(optim.lr_g={self.cfg.optim.lr_g}, optim.lr_d={self.cfg.optim.lr_d})"
            )
        stats = {k: sum(row[i] for row in ranks) / len(ranks) for i, k in enumerate(names)}
        return stats | self._schedule_stats()

    def _schedule_stats(self) -> dict[str, float]:
        """The scheduled settings in force (the same on every rank), when a schedule is on."""
        if not self.cfg.schedule.kimg:
            return {}
        now = self.settings
        return {
            "schedule/lr_g": now.lr_g * self.lr_scale,
            "schedule/lr_d": now.lr_d * self.lr_scale,
            "schedule/beta2": now.beta2,
            "schedule/gamma": self.cfg.loss.r1_gamma * now.gamma_scale,
            "schedule/ema_half_life_kimg": now.ema_half_life_kimg,
        }

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
            **self._position(),
            "rng": self.rng.get_state(),
            **({"augment": self.ada.state_dict() | {"world_size": self.world_size}} if self.ada is not None else {}),
        }

    def _position(self) -> dict[str, int]:
        """Where the next batch a step trains on starts: before the one read ahead, if any."""
        if self.read_ahead is not None and self.read_ahead.pending is not None:
            return dict(self.read_ahead.pending_position)
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.nets.G.load_state_dict(state["G"])
        self.nets.D.load_state_dict(state["D"])
        self.nets.G_ema.load_state_dict(state["G_ema"])
        load_moments(self.opt_g, state["opt_g"])
        load_moments(self.opt_d, state["opt_d"])
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.perm = self._permutation(self.epoch)
        if self.read_ahead is not None:
            self.read_ahead.pending = None
        if self.captured is not None:
            self.captured.reset()
        if self.ada is not None and "augment" in state:
            # The signs of the interval in progress are each rank's own, and a checkpoint holds
            # rank 0's: one process resumes them exactly; several start the interval afresh.
            alone = state["augment"].get("world_size", 1) == self.world_size == 1
            self.ada.load_state_dict(state["augment"], interval=alone)
        try:
            self.rng.set_state(state["rng"])
        except RuntimeError:
            raise ValueError(
                f"the checkpoint's random state is not a {self.device.type} generator's: "
                "resume on the kind of device that wrote it"
            ) from None
