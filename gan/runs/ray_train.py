"""Ray Train adapter: the worker function, the TorchTrainer, the cluster's resources.

The only module that imports ray.train. Each worker runs the same ``Trainer`` as an
in-process run, behind a ``RaySession`` (gan/runs/session.py): G and D are separate DDP
modules (gloo on CPU, NCCL on GPU), batch norm is synchronised over ranks
(``train.sync_batchnorm``; otherwise BN statistics stay per rank and are averaged for
evaluation), and only rank 0 attaches a checkpoint to its report.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from gan.core.config import Config, check_split
from gan.core.loop import DivergenceError
from gan.data.storage import Storage
from gan.registry.tracking import TrackingTarget
from gan.runs.session import Member, RaySession
from gan.runs.trainer import Trainer
from gan.sweeps.plan import Scaling


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


# How long Ray Train waits for a worker group's CPUs and GPUs before it tries again: its
# 60 s default runs out on a busy two-core machine while the last trial's workers let go.
WORKER_GROUP_START_TIMEOUT_S = 180
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
# Worker groups that could not start before the run fails; Ray's default tries for ever.
WORKER_GROUP_START_TRIES = 3


def fit_trainer(trainer):
    """``trainer.fit()``'s Result; a divergence the workers returned is raised as itself, and
    workers that did not start after every try fail in one line."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        result = trainer.fit()
    except ControllerError as err:
        if not isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        scaling = trainer.scaling_config
        each = " + ".join(f"{amount:g} {name}" for name, amount in scaling.resources_per_worker.items())
        wait_s = float(os.environ.get(START_TIMEOUT_VAR, WORKER_GROUP_START_TIMEOUT_S))
        raise ValueError(
            f"Ray Train workers did not start: {scaling.num_workers} x ({each}) were not free in "
            f"{WORKER_GROUP_START_TRIES} tries of {wait_s:g} s (run {trainer.run_config.name!r}); free them or ask "
            f"for less ({START_TIMEOUT_VAR} sets the wait)"
        ) from None
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
    """Join $RAY_ADDRESS (set under `ray job submit`), or start a local Ray of this process's
    own: never one found by looking, such as a cluster from cluster/local_cluster.sh. A clear
    error naming the address when it cannot be reached, or when ``storage`` is a folder that
    the cluster's other nodes cannot see."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):  # what .ray-local/env sets for `ray job submit`
        raise ValueError(
            f"RAY_ADDRESS={address} is a dashboard address, for `ray job submit`: submit this command with it, "
            "set RAY_ADDRESS to the cluster's host:port (6379), or unset it to run on a local Ray of its own"
        )
    if not address:
        start_local_ray()
    else:
        if ":" in address and "://" not in address:  # host:port of a GCS: Ray would retry for minutes
            host, _, port = address.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=10).close()
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {err}") from None
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        except ConnectionError as err:
            raise ValueError(f"cannot reach the Ray cluster at RAY_ADDRESS={address}: {err}") from None
    storage.check_cluster(sum(1 for node in ray.nodes() if node["Alive"]))


def start_local_ray() -> None:
    """A new local Ray whose processes are told its address. Ray's own helpers inside it (the
    placement-group cleaner of every Train run, Train's state actor) otherwise look for a Ray
    on this machine and, finding two, fail ("Found multiple active Ray instances"): the
    workers of trials that Tune stopped then keep their CPUs and later trials never start."""
    import ray

    with socket.socket() as sock:  # the dashboard answers Ray's state queries
        sock.bind(("127.0.0.1", 0))
        dashboard_port = sock.getsockname()[1]
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"  # inherited by Ray's processes
    try:
        ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=dashboard_port, log_to_driver=True,
                 configure_logging=False)  # fmt: skip
    finally:
        if saved is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


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

    # Ray Train reads the wait from the environment of the process that calls fit().
    os.environ.setdefault(START_TIMEOUT_VAR, str(WORKER_GROUP_START_TIMEOUT_S))
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
            failure_config=FailureConfig(
                max_failures=max_failures, controller_failure_limit=WORKER_GROUP_START_TRIES - 1
            ),
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


def train_on_ray(
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

    from gan.errors import USER_ERRORS
    from gan.registry.tracking import finish_run

    connect(storage)
    scaling = local_scaling(workers, use_gpu, cpus_per_worker)
    check_split(cfg, scaling.workers)
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
