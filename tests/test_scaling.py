"""What a plain `python pipelines/train.py` reserves: the whole machine, by default."""

from __future__ import annotations

from gan.runs.ray_train import Scaling, default_scaling

LAPTOP = [{"CPU": 2.0, "memory": 1e10}]
GPU_BOX = [{"CPU": 16.0, "GPU": 4.0}]
CLUSTER = [{"CPU": 4.0}, {"CPU": 32.0, "GPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}]


def test_one_machine_one_worker_takes_every_cpu():
    assert default_scaling(LAPTOP) == Scaling(workers=1, cpus_per_worker=2.0)


def test_workers_share_the_machine_and_the_user_overrides():
    assert default_scaling([{"CPU": 8.0}], workers=2) == Scaling(workers=2, cpus_per_worker=4.0)
    assert default_scaling([{"CPU": 2.0}], workers=64).cpus_per_worker == 1.0  # never below one
    assert default_scaling(LAPTOP, cpus=1.0) == Scaling(workers=1, cpus_per_worker=1.0)


def test_gpu_means_one_worker_per_gpu_with_its_share_of_cpus():
    assert default_scaling(GPU_BOX, use_gpu=True) == Scaling(workers=4, use_gpu=True, cpus_per_worker=4.0)
    assert default_scaling(GPU_BOX, workers=2, use_gpu=True).workers == 2


def test_on_a_cluster_a_worker_fits_on_any_node():
    assert default_scaling(CLUSTER) == Scaling(workers=1, cpus_per_worker=1.0)
    # 9 GPUs in all; the leanest GPU node has 4 CPUs per GPU (32/8), so every worker fits.
    assert default_scaling(CLUSTER, use_gpu=True) == Scaling(workers=9, use_gpu=True, cpus_per_worker=4.0)
