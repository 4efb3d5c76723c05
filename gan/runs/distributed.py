"""Ray Train adapter: the worker function, DDP wiring, reports and checkpoints.

The only module that imports ray.train. Each worker runs the same ``Trainer`` as an
in-process run, behind a ``RaySession``: G and D are separate DDP modules (gloo on CPU,
NCCL on GPU), batch norm is synchronised over ranks (``train.sync_batchnorm``; otherwise
BN statistics stay per rank and are averaged for evaluation), and only rank 0 attaches
a checkpoint to its report.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from gan.runs import checkpoint
from gan.core.config import Config, check_split
from gan.core.loop import DivergenceError
from gan.sweeps.plan import Scaling
from gan.sweeps.population import Exploit
from gan.data.storage import Storage
from gan.registry.tracking import TrackingTarget
from gan.runs.trainer import Snapshot, Trainer


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Every rank's loss depends on the sum, so the gradient each rank
    needs is the sum over ranks of theirs: the backward is an all-reduce too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for gloo/CPU workers (torch's SyncBatchNorm runs
    on GPUs only). Mean and variance come from all-reduced sums; the all-reduce is
    differentiable (its backward all-reduces the gradient), so autograd gives each rank
    the gradient of the sum of all ranks' losses, as with one process and the whole batch."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()  # every rank holds the same batch size
        mean = all_reduce(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / count  # two passes: no cancellation
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / max(count - 1, 1), momentum)
        return y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm layer in ``module`` replaced in place by its synchronised form
    (torch's SyncBatchNorm on GPUs, CPUSyncBatchNorm on CPUs), weights and buffers kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, CPUSyncBatchNorm):
            synced = CPUSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(device)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child, device)
    return module


def ddp_wrap(module: nn.Module, device: torch.device, *, sync_bn: bool = False) -> nn.Module:
    """DDP without per-step buffer broadcasts, after one broadcast of every buffer from
    rank 0: with broadcast_buffers=False DDP syncs only parameters at construction, and
    spectral norm's power-iteration vectors are buffers drawn from each rank's own seed.
    ``sync_bn`` turns batch norm into SyncBatchNorm in place (``module`` keeps it too)."""
    if sync_bn:
        sync_batchnorm(module, device)
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def _for_backend(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    # gloo reduces CPU tensors, NCCL device tensors.
    return values.to(device) if dist.get_backend() == "nccl" else values.detach().cpu().clone()


def all_gather(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's ``values`` (same shape on each), concatenated along dim 0 in rank order."""
    on_backend = _for_backend(values, device).contiguous()
    parts = [torch.empty_like(on_backend) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, on_backend)
    return torch.cat(parts).to(values.device)


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
        """``latest``, then the run's other checkpoint folders before it, newest first."""
        from pyarrow.fs import FileSelector, FileType

        parent, name = latest.path.rstrip("/").rsplit("/", 1)
        try:
            infos = latest.filesystem.get_file_info(FileSelector(parent))
        except OSError:
            infos = []
        older = sorted(
            (i.path for i in infos
             if i.type == FileType.Directory and i.base_name.startswith(checkpoint.DIR_PREFIX) and i.base_name < name),
            reverse=True,
        )  # fmt: skip
        return [latest, *(self._train.Checkpoint(path, filesystem=latest.filesystem) for path in older)]

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
        print(
            f"  eval at kimg {metrics['kimg']:.1f}: fid {metrics['fid']:.2f} (best {metrics['best_fid']:.2f}, "
            f"floor {metrics['fid_floor']:.2f})  eval {metrics['time/eval_s']:.1f}s",
            flush=True,
        )


def train_worker(loop_config: dict[str, Any]) -> str | None:
    """Ray Train's train_loop_per_worker: the same Trainer, behind a RaySession; rank 0
    tracks the run (a restarted worker finds the same MLflow run by its name).

    Divergence is returned (its message), not raised: every rank meets it at the same
    step, and Ray would restart the workers from the last checkpoint only to diverge again."""
    from gan.registry.tracking import WORKER_WAIT_S, MLflowTracker, NullTracker

    cfg = Config.from_json(loop_config["config"])
    if cfg.train.threads == 0 and "OMP_NUM_THREADS" in os.environ:  # the CPUs this worker reserved
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    session = RaySession(loop_config.get("member"), loop_config.get("resume_from"))
    tracker = NullTracker()
    if session.rank == 0 and loop_config.get("tracking"):
        import ray

        ray_tags = {
            "ray.experiment": session.context.get_experiment_name(),
            "ray.node_id": ray.get_runtime_context().get_node_id(),  # where rank 0 ran
        }
        tracker = MLflowTracker(loop_config["tracking"], tags=ray_tags, system_metrics=True, wait_s=WORKER_WAIT_S)
    try:
        Trainer(cfg, session, tracker=tracker).train()
    except DivergenceError as err:
        return str(err)
    return None


def fit_trainer(trainer):
    """``trainer.fit()``'s Result; a divergence the workers returned is raised as itself."""
    result = trainer.fit()
    if result.return_value:
        raise DivergenceError(result.return_value)
    return result


def default_scaling(
    nodes: list[dict[str, float]], workers: int | None = None, use_gpu: bool = False, cpus: float | None = None
) -> Scaling:
    """What a plain ``pipelines/train.py`` reserves, given the Ray nodes' resources
    (``ray.nodes()[i]["Resources"]``) and what the user set (None = not set).

    On one node the run uses the node: one worker takes all its CPUs, or with ``use_gpu``
    one worker per GPU shares them out. On several nodes a worker cannot span nodes: CPU
    workers keep one CPU each, GPU workers the CPUs per GPU of the leanest GPU node."""
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    if workers is None:
        workers = (int(sum(n["GPU"] for n in gpu_nodes)) or 1) if use_gpu else 1
    if cpus is None:
        if use_gpu and gpu_nodes:
            cpus = min(n.get("CPU", 1) // n["GPU"] for n in gpu_nodes)
        elif len(nodes) == 1:
            cpus = nodes[0].get("CPU", 1) // workers
        else:
            cpus = 1
    return Scaling(workers=workers, use_gpu=use_gpu, cpus_per_worker=max(1.0, float(cpus)))


def local_scaling(workers: int | None, use_gpu: bool, cpus: float | None) -> Scaling:
    """``default_scaling`` over the Ray cluster this process is connected to."""
    import ray

    return default_scaling([n["Resources"] for n in ray.nodes() if n["Alive"]], workers, use_gpu, cpus)


def connect(storage: Storage) -> None:
    """Start local Ray, or join $RAY_ADDRESS (set under `ray job submit`); a clear error
    naming the address when it cannot be reached, or when ``storage`` is a folder that
    the cluster's other nodes cannot see."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address and ":" in address and "://" not in address:  # host:port of a GCS: Ray would retry for minutes
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {err}") from None
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except ConnectionError as err:
        raise ValueError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}: {err}"
        ) from None
    storage.check_cluster(sum(1 for node in ray.nodes() if node["Alive"]))


def check_resources(scaling: Scaling) -> None:
    """Fail before any worker starts when the cluster cannot host the workers."""
    import ray

    total = ray.cluster_resources()
    need_cpu = scaling.workers * scaling.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ValueError(
            f"{scaling.workers} workers x {scaling.cpus_per_worker:g} CPU need {need_cpu:g} CPUs, "
            f"but the Ray cluster has {total.get('CPU', 0):g}; use fewer --workers"
        )
    need_gpu = scaling.workers * scaling.gpus_per_worker
    if scaling.use_gpu and total.get("GPU", 0) < need_gpu:
        raise ValueError(
            f"{scaling.workers} GPU workers need {need_gpu:g} GPUs, but the Ray cluster has "
            f"{total.get('GPU', 0):g}; drop --gpu or use fewer --workers"
        )


def make_trainer(
    cfg: Config,
    scaling: Scaling,
    *,
    name: str,
    storage_path: str,
    storage_filesystem=None,
    keep_checkpoints: int | None = 2,
    max_failures: int = 3,
    callbacks: list | None = None,
    tracking: TrackingTarget | None = None,
    member: Member | None = None,
    resume_from: tuple[str, dict] | None = None,
):
    """A TorchTrainer for ``cfg``; it resumes from its latest checkpoint when a run
    with the same name already exists under ``storage_path`` (Train V2 restoration), or
    from ``resume_from`` (URI, storage options) when Ray's snapshot of the run is missing.
    ``keep_checkpoints`` None keeps every round's (PBT's donors are read by round)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_json(), "tracking": tracking, "member": member, "resume_from": resume_from},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints, checkpoint_score_attribute="fid", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
            worker_runtime_env={
                "env_vars": {
                    "OMP_NUM_THREADS": str(max(1, int(scaling.cpus_per_worker))),
                    # Train V2 both prints and logs a worker's print(): every line twice.
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                }
            },
        ),
    )


def fit(
    cfg: Config,
    storage: Storage,
    name: str,
    tracking: TrackingTarget | None,
    workers: int | None = None,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    resume_from: str | None = None,
) -> float:
    """Train ``cfg`` as the Ray Train run ``name`` under ``storage`` (continuing it when it
    exists, from ``resume_from`` if Ray's snapshot of it is missing) on the cluster's
    resources (``default_scaling`` for what is not given); returns the best FID. A
    worker's user error (bad data, divergence) is raised as itself, not as Ray's wrapper,
    and the run's MLflow run is closed when no worker can."""
    from botocore.exceptions import BotoCoreError

    from gan.cli import USER_ERRORS
    from gan.registry.tracking import finish_run

    connect(storage)
    scaling = local_scaling(workers, use_gpu, cpus_per_worker)
    check_split(cfg.train, scaling.workers)
    check_resources(scaling)
    print(
        f"Ray Train run {name!r}: {scaling.workers} worker(s) x {scaling.cpus_per_worker:g} CPU"
        + (f" + {scaling.gpus_per_worker:g} GPU" if scaling.use_gpu else "")
        + f", storage {storage.join(name)}",
        flush=True,
    )
    storage_path, filesystem = storage.ray_args()
    trainer = make_trainer(
        cfg, scaling, name=name, storage_path=storage_path, storage_filesystem=filesystem, tracking=tracking,
        resume_from=(resume_from, storage.options) if resume_from else None,
    )  # fmt: skip
    try:
        result = fit_trainer(trainer)
    except KeyboardInterrupt:
        if tracking:
            finish_run(tracking, "KILLED")
        raise
    except Exception as err:
        if tracking:  # a worker that died cannot close its own run
            finish_run(tracking, "FAILED")
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, USER_ERRORS):
            raise cause from None
        failure = getattr(err, "controller_failure", None)
        if isinstance(failure, (OSError, BotoCoreError)):  # the controller's own writes: its snapshot of the run
            raise ValueError(
                f"writing to {storage.join(name)} failed ({type(failure).__name__}: {failure}); the checkpoints "
                "there are kept: once the storage works again, the same command with --resume continues the run"
            ) from None
        raise
    return min(metrics["best_fid"] for _, metrics in result.best_checkpoints)
