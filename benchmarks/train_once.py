"""One training run for the benchmarks, in a fresh process so its peak memory is its own.

Prints one JSON line: the evaluation history, images, training seconds, img/s (overall, and
of the last logging window: the steady state, after any compilation), peak RSS (the
larger of this process's and its children's; ``peak_rss_self_mib``: this process's alone,
VmHWM), and peak anonymous memory (RssAnon, sampled every 5 ms: RSS minus file-backed pages such as a
streamed dataset's memory-mapped shards, which are page cache shared by the node).
    python benchmarks/train_once.py --preset dcgan --seconds 300 --threads 2
    python benchmarks/train_once.py --preset dcgan --kimg 20 --ray-workers 2
    python benchmarks/train_once.py --seconds 40 --ray-default     # what `python pipelines/train.py` reserves
    python benchmarks/train_once.py --preset dcgan-64 --seconds 1800 --out runs/emoji  # keeps checkpoints and grids
    python3 benchmarks/train_once.py --preset dcgan-64 --seconds 240 --device cuda --progress --set data.uri=DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import threading
from pathlib import Path

from gan.core.config import override, preset

HISTORY_KEYS = ("kimg", "fid", "fid_floor", "precision", "recall", "class_accuracy", "class_variety",
                "time/train_s", "time/eval_s")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="dcgan")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seconds", type=float, help="training-time budget (evaluation excluded)")
    parser.add_argument("--kimg", type=float, help="images budget instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (in-process) or CPUs per Ray worker")
    parser.add_argument("--ray-workers", type=int, default=0, help="0 = in-process, else Ray Train workers")
    parser.add_argument("--ray-default", action="store_true", help="Ray Train with pipelines/train.py's defaults")
    parser.add_argument("--tracking-uri", help="in-process: track the run there, as pipelines/train.py does")
    parser.add_argument("--out", help="keep the run's checkpoints and sample grids here")
    parser.add_argument("--device", default="cpu", help="in-process: 'cpu' or 'cuda' (default cpu)")
    parser.add_argument("--progress", action="store_true", help="in-process: print progress and evaluation lines")
    args = parser.parse_args()
    if args.device != "cpu" and (args.ray_workers or args.ray_default):
        parser.error("--device is for in-process runs; Ray Train workers train on the CPU here")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"--out {args.out} is not empty: name a new folder")
    sets = list(args.overrides)
    sets += [f"train.time_budget_s={args.seconds}"] if args.seconds else []
    sets += [f"train.total_kimg={args.kimg}"] if args.kimg else []
    anon = AnonPeak()
    folder = (
        contextlib.nullcontext(str(Path(args.out).resolve()))
        if args.out
        else tempfile.TemporaryDirectory(prefix="gan-bench-")
    )
    with folder as tmp, anon:
        wall_s = None
        if args.ray_default:
            history = with_ray_defaults(override(preset(args.preset), sets), tmp)
        elif args.ray_workers:
            history = with_ray(override(preset(args.preset), sets), args.ray_workers, args.threads, tmp)
        else:
            cfg = override(preset(args.preset), [*sets, f"train.threads={args.threads}"])
            history, wall_s = in_process(cfg, tmp, args.tracking_uri, args.device, quiet=not args.progress)
    last = history[-1]
    peak_kib = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    )
    print(
        json.dumps(
            {
                "history": [{k: h[k] for k in HISTORY_KEYS if k in h} for h in history],
                "images": last["images_seen"],
                "train_s": last["time/train_s"],
                "img_per_s": last["images_seen"] / last["time/train_s"],
                "img_per_s_last_window": last["throughput/img_per_s"],
                "fid": last["fid"],
                "fid_floor": last["fid_floor"],
                "peak_rss_mib": peak_kib / 1024,
                # In-process: images over the wall time of train() less evaluation, so the
                # time spent logging (which train_s leaves out) counts against speed.
                "img_per_s_wall": wall_s and last["images_seen"] / (wall_s - sum(h["time/eval_s"] for h in history)),
                "peak_rss_self_mib": status_kib("VmHWM") / 1024,
                "peak_anon_mib": anon.peak_kib / 1024,
            }
        )
    )
    return 0


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


class AnonPeak:
    """The highest RssAnon of this process while the block runs (Ray workers are other
    processes: this sees the driver only)."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def read_kib() -> int:
        return status_kib("RssAnon")

    def _sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak_kib = max(self.peak_kib, self.read_kib())

    def __enter__(self) -> AnonPeak:
        self.peak_kib = self.read_kib()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak_kib = max(self.peak_kib, self.read_kib())


def in_process(
    cfg, out: str, tracking_uri: str | None = None, device: str = "cpu", quiet: bool = True
) -> tuple[list[dict], float]:
    import time

    from gan.registry.tracking import MLflowTracker, TrackingTarget
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    tracker = None
    if tracking_uri:
        tracker = MLflowTracker(TrackingTarget(tracking_uri, "bench", f"bench-{time.time_ns()}"), system_metrics=True)
    trainer = Trainer(cfg, LocalSession(out, device=device, quiet=quiet), tracker=tracker)
    started = time.monotonic()
    history = trainer.train().history
    return history, time.monotonic() - started


def with_ray(cfg, workers: int, cpus: int, out: str) -> list[dict]:
    import ray

    from gan.runs.ray_train import Scaling, make_trainer

    ray.init(num_cpus=max(2, workers * cpus), include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        trainer = make_trainer(cfg, Scaling(workers=workers, cpus_per_worker=cpus), name="bench", storage_path=out)
        result = trainer.fit()
    finally:
        ray.shutdown()
    frame = result.metrics_dataframe
    return frame.to_dict("records")


def with_ray_defaults(cfg, out: str) -> list[dict]:
    """As `python pipelines/train.py` runs: local Ray on the whole machine, default scaling."""
    import ray

    from gan.runs.ray_train import local_scaling, make_trainer

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        scaling = local_scaling(None, False, None)
        print(f"default scaling: {scaling}", file=sys.stderr)
        result = make_trainer(cfg, scaling, name="bench", storage_path=out).fit()
    finally:
        ray.shutdown()
    return result.metrics_dataframe.to_dict("records")


if __name__ == "__main__":
    sys.exit(main())
