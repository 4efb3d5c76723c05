"""The training step as two replayed CUDA graphs: one D update, one G update with the EMA.

A small GAN step is hundreds of kernels, each launched by Python: on a large GPU the
launches, not the maths, set the pace. Captured once, a phase replays with one launch.
What a graph needs, and how the loop gives it:
- static inputs: each D update copies its real batch into the same buffers; z, labels and
  augmentation are drawn inside the graph from the loop's generator, registered with it;
- no host values that change: learning rates, Adam's betas and the EMA weight are device
  tensors the host refills (decay, PBT, a resumed run's settings) without a new capture;
  Adam is capturable, its step count on the device, and so is the NaN/Inf watch;
- statistics written into fixed tensors: a logging step reads them like any other.
The D updates that take R1 stay eager (autograd's double backward is not captured here),
and so does a whole step under WGAN-GP, whose penalty comes with every D update. After
``load_state_dict`` (Adam's state is new tensors) the graphs are captured again.

``emulate`` runs the same phase functions, buffers and device-tensor hyperparameters
without CUDA graphs: on a CPU this checks everything but the capture itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gan.core.config import Config
    from gan.core.loop import GANLoop

WARMUP_STEPS = 3
"""Eager steps before capture: Adam's state exists, cuDNN has chosen its kernels."""
WARMUP_STEPS_DDP = 11
"""DDP's reducer settles its buckets over its first iterations (PyTorch's CUDA graph notes ask for 11)."""


def capture_blocker(cfg: Config, device: torch.device) -> str | None:
    """Why a step of ``cfg`` on ``device`` cannot be captured; None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this run trains on {device.type}"
    if cfg.train.compile:
        return (
            "train.compile's graphs are not captured inside another graph; use one of train.compile and train.capture"
        )
    if cfg.loss.kind == "wgan-gp":
        return "WGAN-GP takes its gradient penalty (a double backward) in every D update"
    return None


def capturable_adam(params, cfg, lr: float, device: torch.device, emulate: bool) -> torch.optim.Adam:
    """Adam whose learning rate, betas and step count are device tensors: fused and
    capturable on CUDA; on a CPU (emulation) the single-tensor loop, which takes tensor
    hyperparameters there."""
    hyper = {
        "lr": torch.tensor(lr, device=device),
        "betas": (torch.tensor(cfg.beta1, device=device), torch.tensor(cfg.beta2, device=device)),
    }
    if emulate:
        return torch.optim.Adam(params, **hyper, foreach=False)
    return torch.optim.Adam(params, **hyper, fused=True, capturable=True)


class CapturedStep:
    """``step()`` does what ``GANLoop.train_step`` does, each phase replayed from a graph."""

    def __init__(self, loop: GANLoop, emulate: bool = False) -> None:
        self.loop, self.emulate = loop, emulate
        self.warmup = WARMUP_STEPS_DDP if loop.world_size > 1 else WARMUP_STEPS
        self.graphs: dict[str, Callable[[], None]] = {}
        self.broken: str | None = None
        device = loop.device
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.ema_beta = torch.tensor(loop.beta, device=device)
        self.real: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        """Every statistic a step reports, each in its own fixed tensor."""
        self.warmed = 0
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        self.side = None if emulate else torch.cuda.Stream(device)

    def reset(self) -> None:
        """Capture again after the next warm-up: the tensors the graphs hold were replaced."""
        self.graphs.clear()
        self.step_t.fill_(self.loop.step)
        self.warmed = 0

    def set_ema_beta(self, beta: float) -> None:
        self.ema_beta.fill_(beta)

    # --- one step -------------------------------------------------------------------
    def step(self) -> None:
        loop, n = self.loop, self.loop.nets
        eager = self.broken is not None or self.warmed < self.warmup
        with self._warmup_stream(self.warmed < self.warmup):
            n.G.requires_grad_(False)
            n.D.requires_grad_(True)
            for _ in range(loop.cfg.optim.d_steps):
                # Staged on every D update: the G graph reads its paired real images ('rpgan') there.
                self._stage(*loop._real_batch())
                if eager or loop.penalty_due():
                    self._keep(loop.d_phase(self.real, self.labels, penalty=loop.penalty_due(), grad_norms=True))
                else:
                    self._run("d", self._d_graph_body)
                loop.images_seen += loop.global_batch
            n.D.requires_grad_(False)
            n.G.requires_grad_(True)
            if eager:
                self._g_graph_body()
            else:
                self._run("g", self._g_graph_body)
            n.D.requires_grad_(True)
        loop.step += 1
        loop._last = self.stats
        self.warmed += 1

    def _d_graph_body(self) -> None:
        self._keep(self.loop.d_phase(self.real, self.labels, penalty=False, grad_norms=True))

    def _g_graph_body(self) -> None:
        from gan.core.loop import update_ema  # the loop module imports this one

        loop = self.loop
        self._keep(loop.g_phase(grad_norms=True))
        update_ema(loop.nets.G_ema, loop.nets.G, self.ema_beta, foreach=True)
        finite = torch.isfinite(torch.stack([v.float() for v in self.stats.values()])).all()
        loop._first_bad.copy_(torch.where(~finite & (loop._first_bad < 0), self.step_t, loop._first_bad))
        self.step_t.add_(1)

    def _keep(self, stats: dict[str, torch.Tensor]) -> None:
        """Copy a phase's statistics into their fixed tensors (made at the first step)."""
        for name, value in stats.items():
            if name not in self.stats:
                self.stats[name] = torch.zeros((), dtype=torch.float32, device=self.loop.device)
            self.stats[name].copy_(value.detach())

    def _stage(self, real: torch.Tensor, labels: torch.Tensor | None) -> None:
        if self.real is None:
            self.real = torch.empty_like(real)
            self.labels = None if labels is None else torch.empty_like(labels)
        self.real.copy_(real)
        if labels is not None:
            self.labels.copy_(labels)

    # --- graphs -------------------------------------------------------------------
    def _run(self, name: str, body: Callable[[], None]) -> None:
        if name not in self.graphs:
            self.graphs[name] = body if self.emulate else self._capture(name, body)
        self.graphs[name]()

    def _capture(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        """The graph of ``body``, or ``body`` itself (and eager from then on) where capture fails."""
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.loop.rng)
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                body()
        except RuntimeError as err:
            self.broken = f"{name} phase: {str(err).splitlines()[0]}"
            if self.loop.rank == 0:
                print(
                    f"warning: train.capture: the step could not be captured ({self.broken}); training eager",
                    flush=True,
                )
            return body
        # Capture records the phase without running it: the replay below is its first run.
        return graph.replay

    @contextlib.contextmanager
    def _warmup_stream(self, warming: bool):
        """Warm-up steps on a side stream, as CUDA graphs ask; nothing on a CPU."""
        if self.side is None or not warming:
            yield
            return
        current = torch.cuda.current_stream(self.loop.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            yield
        current.wait_stream(self.side)
