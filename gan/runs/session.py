"""Where a run's steps meet the world: the ``Session`` a ``Trainer`` runs behind.

``LocalSession`` is one process without Ray; ``RaySession`` is a Ray Train worker (DDP
over the worker group, reports and checkpoints through Ray). Both keep checkpoints in the
one layout of gan/runs/checkpoint.py and list them with ``checkpoint.find``. Neither
prints evaluations: the trainer's rank 0 does, the same line for both.
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import fsspec
import torch
import torch.distributed as dist
import torch.nn as nn

from gan.runs import checkpoint
from gan.runs.ddp import _for_backend, all_gather, ddp_wrap
from gan.sweeps.population import Exploit


@dataclass
class Snapshot:
    """What a report carries besides metrics: the full state and a sample grid."""

    state: dict[str, Any]
    meta: dict[str, Any]
    grid_png: bytes
    is_best: bool


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device
    in_population: bool
    quiet: bool
    """No progress, stall or evaluation lines (rank 0 prints them otherwise)."""

    def wrap(self, module: nn.Module, *, sync_batchnorm: bool = False) -> nn.Module: ...
    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor: ...
    def all_gather(self, values: torch.Tensor) -> torch.Tensor: ...
    def restore(self) -> tuple[dict[str, Any], str] | None:
        """The state of the run's checkpoint to continue from, and where it was found."""

    def report(self, metrics: dict[str, float], snapshot: Snapshot | None) -> None: ...
    def exploit(self, round_: int, metrics: dict[str, float], params: dict[str, Any]) -> tuple[Exploit, dict] | None:
        """After a round's report: in a PBT population, another trial's state to continue from."""


class LocalSession:
    """One process, no Ray: checkpoints go to ``run_uri`` (local or fsspec URI) in the
    layout Ray Train uses, keeping the latest and the best, as Ray does."""

    rank = 0
    world_size = 1
    in_population = False

    def __init__(
        self,
        run_uri: str,
        resume: bool = False,
        device: str = "cpu",
        quiet: bool = False,
        storage_options: dict | None = None,
    ) -> None:
        self.run_uri = run_uri.rstrip("/")
        self.device = torch.device(device)
        self.resume = resume
        self.quiet = quiet
        self.options = storage_options or {}

    def found(self) -> checkpoint.Found:
        return checkpoint.find(self.run_uri, self.options)

    def wrap(self, module: nn.Module, *, sync_batchnorm: bool = False) -> nn.Module:
        return module

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def restore(self) -> tuple[dict[str, Any], str] | None:
        if not self.resume:
            return None
        state, latest = checkpoint.load_latest(self.run_uri, self.options)
        if state is None:
            print(f"{self.run_uri} holds no checkpoint yet: starting from scratch", flush=True)
            return None
        return state, latest

    def exploit(self, round_: int, metrics: dict[str, float], params: dict[str, Any]) -> None:
        return None

    def report(self, metrics: dict[str, float], snapshot: Snapshot | None) -> None:
        if snapshot is None:
            return
        uri = f"{self.run_uri}/{checkpoint.dir_name(int(metrics['step']))}"
        checkpoint.save(uri, snapshot.state, snapshot.meta, self.options, grid_png=snapshot.grid_png)
        found = self.found()
        fs = fsspec.core.url_to_fs(self.run_uri, **self.options)[0]
        for old in set(found.all) - {found.latest, found.best}:
            fs.rm(old, recursive=True)


@dataclass(frozen=True)
class Member:
    """How a PBT trial's workers reach its population (gan/sweeps/ray_tune.py hosts it in an actor)."""

    actor: str
    """The population actor's name."""
    trial: str
    run_uri: str
    """Full URI of the trial's Ray Train run: its checkpoints are folders in it."""
    storage_options: dict


def _full_uri(ckpt) -> str:
    """A Ray checkpoint's location with its scheme: Ray names one in an object store without it."""
    handler = getattr(ckpt.filesystem, "handler", None)  # storage.ray_args wraps fsspec for remote storage
    if handler is None:
        return ckpt.path
    protocol = handler.fs.protocol
    return f"{protocol if isinstance(protocol, str) else protocol[0]}://{ckpt.path.lstrip('/')}"


class RaySession:
    quiet = False

    def __init__(self, member: Member | None = None, resume_from: tuple[str, dict] | None = None) -> None:
        import ray.train
        import ray.train.torch

        ctx = self.context = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._train = ray.train
        self.dir_suffix = ""
        """Added to checkpoint folder names after falling back past a checkpoint that does not load."""
        self.member = member
        self.resume_from = resume_from
        """(URI, storage options) of the checkpoint --resume found, for when Ray has none."""
        self.in_population = member is not None
        self.last_checkpoint = ""
        """Full URI of the checkpoint this run restored or reported last: what a population gets."""

    def wrap(self, module: nn.Module, *, sync_batchnorm: bool = False) -> nn.Module:
        return ddp_wrap(module, self.device, sync_bn=sync_batchnorm) if self.world_size > 1 else module

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        on_backend = _for_backend(values, self.device)
        dist.all_reduce(on_backend)
        return (on_backend / self.world_size).to(values.device)

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.world_size == 1 else all_gather(values, self.device)

    def restore(self) -> tuple[dict[str, Any], str] | None:
        """The state of Ray's latest checkpoint or, when that one does not load (a torn
        upload), of the newest one before it that does (the same error on every retry
        would otherwise fail the run), and that checkpoint's full URI."""
        latest = self._train.get_checkpoint()
        if latest is None:
            # Ray restores from its snapshot of the run, which a storage outage can leave
            # unwritten while checkpoints are there: continue from the one --resume found.
            if self.resume_from is None:
                return None
            uri, options = self.resume_from
            return checkpoint.load(uri, options)[0], uri
        say = print if self.rank == 0 else (lambda *args, **kwargs: None)
        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        state, found = checkpoint.first_that_loads(
            parent, self._newest_first(latest), self._load, say, "newest", label=lambda ckpt: ckpt.path
        )
        if self.member is not None:
            self.last_checkpoint = f"{self.member.run_uri}/{found.path.rstrip('/').rsplit('/', 1)[-1]}"
        if found is not latest:  # the steps after this one are written again: not into the folders Ray still tracks
            self.dir_suffix = f"-{uuid.uuid4().hex[:6]}"
        return state, _full_uri(found)

    @staticmethod
    def _load(ckpt) -> dict[str, Any]:
        try:
            with ckpt.as_directory() as directory:
                return checkpoint.load(directory)[0]
        except checkpoint.CheckpointError as err:  # it names a local copy: say which checkpoint
            raise checkpoint.CheckpointError(f"{ckpt.path}: {err}") from None

    def _newest_first(self, latest):
        """``latest``, then the run's other whole checkpoints before it, newest first, as
        ``checkpoint.find`` lists them (through the fsspec filesystem under Ray's)."""
        handler = getattr(latest.filesystem, "handler", None)  # storage.ray_args wraps fsspec for remote storage
        fs = handler.fs if handler is not None else fsspec.filesystem("file")
        run, name = _full_uri(latest).rstrip("/").rsplit("/", 1)
        older = sorted((uri for uri in checkpoint.find(run, fs=fs).all if uri.rsplit("/", 1)[-1] < name), reverse=True)
        # Ray names a checkpoint in an object store without the scheme.
        ray_path = (lambda uri: uri.split("://", 1)[1]) if handler is not None else (lambda uri: uri)
        return [latest, *(self._train.Checkpoint(ray_path(uri), filesystem=latest.filesystem) for uri in older)]

    def exploit(self, round_: int, metrics: dict[str, float], params: dict[str, Any]) -> tuple[Exploit, dict] | None:
        """Rank 0 tells the population about this round; every rank gets its answer and,
        when the trial is to continue from another, that trial's checkpoint."""
        if self.member is None:
            return None
        found = [None]
        if self.rank == 0:
            import ray

            population = ray.get_actor(self.member.actor)
            found[0] = ray.get(population.report.remote(
                self.member.trial, round_, metrics["fid"], self.last_checkpoint, int(metrics["images_seen"]), params
            ))  # fmt: skip
        if self.world_size > 1:
            dist.broadcast_object_list(found, src=0)
        exploit = found[0]
        if exploit is None:
            return None
        return exploit, checkpoint.load(exploit.checkpoint, self.member.storage_options)[0]

    def report(self, metrics: dict[str, float], snapshot: Snapshot | None) -> None:
        # Every worker reports the same number of times; only rank 0 attaches the checkpoint.
        if snapshot is None or self.rank != 0:
            self._train.report(metrics)
            return
        name = checkpoint.dir_name(int(metrics["step"])) + self.dir_suffix
        with tempfile.TemporaryDirectory(prefix="gan-ckpt-") as directory:
            checkpoint.write_dir(directory, snapshot.state, snapshot.meta, snapshot.grid_png)
            self._train.report(
                metrics, checkpoint=self._train.Checkpoint.from_directory(directory), checkpoint_dir_name=name
            )
        if self.member is not None:
            self.last_checkpoint = f"{self.member.run_uri}/{name}"
