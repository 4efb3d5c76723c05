"""The project's claims, measured on this machine, side by side; medians of repeated runs.

    python benchmarks/run.py --quick                 # every benchmark, small budgets (under 10 minutes)
    python benchmarks/run.py                         # the budgets RESULTS.md records (about 1.5 hours on 2 cores)
    python benchmarks/run.py --only quality,overhead --repeats 3

Benchmarks (each also runs alone with --only):
  quality   default preset vs the textbook DCGAN recipe, same training seconds, same data,
            same evaluator (2,500 samples), with the floor; and the time our default needs
            to reach the textbook recipe's final FID
  overhead  img/s of the default `python pipelines/train.py` (Ray Train, default scaling) vs
            the best in-process setting (every core), and of the old default (1 worker x 1 CPU)
  speed     img/s in-process with each speed option on (compile, channels_last, fused and
            foreach Adam, foreach EMA off), against the defaults, in interleaved rounds after
            warm-up (compilation), every core
  scaling   1 vs 2 Ray Train workers: img/s and FID at equal images; bytes all-reduced per
            step, and a projection to N GPU workers (assumptions printed with it)
  tune      the same search space, seeds and trial count with ASHA and without early
            stopping: best FID and worker-seconds
  schedulers PBT vs ASHA vs no early stopping on the same space (the settings PBT can
            perturb), trials and budget (rounds sized by --budget-minutes, so each spends
            about the same worker-seconds): best FID and worker-seconds
  eval      FID evaluation time as a share of training time at the default interval, and
            peak memory of the default training job
  gpu       where a CUDA GPU is present: every preset's training step at batch 64, 256 and 1024
            (quick: 64 and 1024), eager against captured (train.capture): img/s, ms per step, the
            GPU's busy share (torch.profiler) and model FLOPs utilisation (FLOPs per image from
            torch.utils.flop_counter x img/s, against the card's dense peak; GAN_GPU_PEAK_TFLOPS
            sets it); seconds to evaluate 10k samples. benchmarks/gpu_check.py runs it on a GPU
            machine with the GPU tests and a 4-minute emoji training
  tracking  img/s in-process with MLflow tracking to a local `mlflow server` vs without
  s3reads   bytes a sweep on a two-node local cluster reads from an S3 server on 127.0.0.1:
            the digits as one .npz (read whole by every trial) vs as a prepared dataset
            (fetched once per node into its cache)
  emoji     dcgan-64 on the emoji set (64 px RGB) after 10 and 30 minutes, with the floor;
            class accuracy of dcgan-64-cond there; keeps each run's sample grids in the cache
  modern    the modern recipe (R3GAN) against dcgan-64 on the emoji set, same seeds: FID after
            10 and 30 minutes at 64 px, after 10 minutes at 32 px, with the floor; class
            accuracy and variety of modern-64-cond after 10 minutes against the evaluator's own
  screen64  dcgan-64 on the emoji set with DiffAugment, R1, both or neither, and with
            DiffAugment's learning rates halved and doubled: FID at equal training seconds
  streaming img/s streaming a prepared dataset over 10x data.memory_budget_mb from its
            memory-mapped shards vs the same data in memory, peak memory per worker, and
            the data work before a trial's first step on a node that holds the dataset
  conditional class accuracy of dcgan-cond's digits after the quality budget
Nothing here is a test: targets are reported, never asserted.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# Budgets: (full, quick)
QUALITY_SECONDS = (300, 45)
OVERHEAD_SECONDS = (60, 20)
SPEED_ROUNDS = (5, 3)  # (full, quick), times --repeats
SPEED_STEPS = (40, 20)
SPEED_OPTIONS = {
    "defaults": [],
    "train.compile=true": ["train.compile=true"],
    "train.channels_last=true": ["train.channels_last=true"],
    "optim.adam_impl=fused": ["optim.adam_impl=fused"],
    "optim.adam_impl=foreach": ["optim.adam_impl=foreach"],
    "train.foreach_ema=false": ["train.foreach_ema=false"],
}
SCALING_KIMG = (40, 6)
# Eight rounds give ASHA three rungs (1, 2, 4); with four it could at best save half.
TUNE_PLAN = (
    ["--trials", "8", "--rounds", "8", "--kimg-per-round", "10"],
    ["--trials", "4", "--rounds", "2", "--kimg-per-round", "1"],
)
SCHEDULERS_PLAN = (
    ["--trials", "4", "--rounds", "4", "--budget-minutes", "8"],
    ["--trials", "2", "--rounds", "2", "--budget-minutes", "1"],
)
TRACKING_KIMG = (30, 5)
S3READS_PLAN = (
    ["--trials", "8", "--rounds", "2", "--kimg-per-round", "0.5"],
    ["--trials", "4", "--rounds", "1", "--kimg-per-round", "0.25"],
)
EVAL_EVERY_KIMG = 10  # quality runs evaluate this often, to time when a FID is reached
STREAM_CAP_MIB = (32, 8)  # (full, quick) data.memory_budget_mb; the dataset is 10.5x this
STREAM_SECONDS = (30, 10)
EMOJI_MINUTES = ((10, 30), (1, 2))  # FID read at each, from one run as long as the last
EMOJI_EVERY_KIMG = (15, 5)  # quick: an evaluation within the first minute (about 8 kimg)
CONDITIONAL_SECONDS = (300, 45)
SCREEN64_SECONDS = (300, 45)
DIFFAUGMENT = "loss.augment=translation,color"
# R1 strengths around the StyleGAN2-ADA heuristic (0.0002 * 64^2 / batch 64 = 0.013) and far above it.
SCREEN64_SETTINGS = {  # each spelled out, so that the screen does not move with the preset
    "DiffAugment translation,color (the preset before)": [DIFFAUGMENT, "loss.r1_gamma=0"],
    "no augmentation, no R1": ["loss.augment=", "loss.r1_gamma=0"],
    "R1 gamma 0.01, no augmentation": ["loss.augment=", "loss.r1_gamma=0.01"],
    "R1 gamma 1, no augmentation (the preset from 99f960c)": ["loss.augment=", "loss.r1_gamma=1"],
    "R1 gamma 10, no augmentation": ["loss.augment=", "loss.r1_gamma=10"],
    "DiffAugment and R1 gamma 0.01": [DIFFAUGMENT, "loss.r1_gamma=0.01"],
    "DiffAugment and R1 gamma 1": [DIFFAUGMENT, "loss.r1_gamma=1"],
    "DiffAugment, learning rates halved": [DIFFAUGMENT, "loss.r1_gamma=0", "optim.lr_g=5e-4", "optim.lr_d=3e-4"],
    "DiffAugment, learning rates doubled": [DIFFAUGMENT, "loss.r1_gamma=0", "optim.lr_g=2e-3", "optim.lr_d=1.2e-3"],
}
# Every preset: the default first, then the RGB ones meant for GPUs, so a budget cuts the rest.
GPU_PRESETS = ("dcgan", "dcgan-64", "modern-64-gpu", "resnet-64", "dcgan-32", "modern-32-gpu", "dcgan-64-cond",
               "dcgan-cond", "resnet", "textbook", "mlp", "modern-128-gpu")  # fmt: skip
GPU_BATCHES = ((64, 256, 1024), (64, 1024))  # (full, quick)
GPU_SECONDS = (1.0, 0.3)  # per timed round
GPU_PROFILE_STEPS = (20, 5)
GPU_BUDGET_S = (900, 100)  # settings reached past this are reported as not run
GPU_EVAL_SAMPLES = 10_000
# Dense (no sparsity) peaks of the matrix units in TFLOP/s by precision, from NVIDIA's datasheets;
# cards by the name CUDA reports, first match wins (NVL boards run at other clocks: unknown).
PRECISIONS = ("bf16", "tf32", "fp32")
GPU_PEAKS = {
    "H100 SXM": (989.4, 494.7, 66.9),
    "H100 PCIe": (756.5, 378.0, 51.2),
    "H200": (989.4, 494.7, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "L4": (121.0, 60.0, 30.3),
}
GPU_MODELS = ((r"NVL", None), (r"H200", "H200"), (r"H100.*PCIe", "H100 PCIe"), (r"H100", "H100 SXM"),
              (r"A100", "A100"), (r"\bL4\b", "L4"))  # fmt: skip
PEAK_ENV = "GAN_GPU_PEAK_TFLOPS"  # TFLOP/s MFU is measured against, for any card and precision
BENCH_CACHE = Path(os.environ.get("GAN_BENCH_CACHE", Path.home() / ".cache" / "gan-bench"))


def train_once(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([PY, "benchmarks/train_once.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"train_once {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values) -> float:
    return statistics.median(values)


def time_to_reach(history: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation with FID <= target (None: never)."""
    return next((h["time/train_s"] for h in history if h["fid"] <= target), None)


@functools.cache  # the eval benchmark reads the quality benchmark's runs of the default
def timed_runs(recipe: str, quick: bool, repeats: int) -> list[dict]:
    """``repeats`` runs of ``recipe`` for the quality budget, seeds 0, 1, ..., in-process."""
    seconds = str(QUALITY_SECONDS[quick])
    every = f"eval.every_kimg={EVAL_EVERY_KIMG}"
    return [
        train_once("--preset", recipe, "--seconds", seconds, "--threads", "2", "--set", every, "--set", f"train.seed={seed}")
        for seed in range(repeats)
    ]  # fmt: skip


def quality(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    seconds = QUALITY_SECONDS[quick]
    runs = {recipe: timed_runs(recipe, quick, repeats) for recipe in ("dcgan", "textbook")}
    ours, textbook = (median(r["fid"] for r in runs[k]) for k in ("dcgan", "textbook"))
    reach = [time_to_reach(r["history"], textbook) for r in runs["dcgan"]]
    reached = [t for t in reach if t is not None]
    floor = runs["dcgan"][0]["fid_floor"]
    rows = [
        (f"FID after {seconds}s, default (dcgan)", f"{ours:.1f}", f"runs {[round(r['fid'], 1) for r in runs['dcgan']]}, floor {floor:.2f}"),
        (f"FID after {seconds}s, textbook DCGAN", f"{textbook:.1f}", f"runs {[round(r['fid'], 1) for r in runs['textbook']]}, floor {runs['textbook'][0]['fid_floor']:.2f}"),
        ("ours / textbook FID (target <= 0.5)", f"{ours / textbook:.2f}", ""),
        ("seconds for ours to reach textbook's FID (target < 1/3 of budget)",
         f"{median(reached):.0f}" if len(reached) == len(reach) else "not reached",
         f"runs {[None if t is None else round(t) for t in reach]}, budget {seconds}s, evaluated every {EVAL_EVERY_KIMG} kimg"),
        ("img/s, default / textbook", f"{median(r['img_per_s'] for r in runs['dcgan']):.0f} / "
         f"{median(r['img_per_s'] for r in runs['textbook']):.0f}", "2 threads, in-process"),
    ]  # fmt: skip
    return rows


def overhead(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    seconds = str(OVERHEAD_SECONDS[quick])
    cores = os.cpu_count() or 1
    sets = ["--set", "eval.every_kimg=1000", "--set", "eval.num_samples=500", "--seconds", seconds]
    local = [train_once(*sets, "--threads", str(cores))["img_per_s"] for _ in range(repeats)]
    default = [train_once(*sets, "--ray-default")["img_per_s"] for _ in range(repeats)]
    old = [train_once(*sets, "--threads", "1", "--ray-workers", "1")["img_per_s"] for _ in range(repeats)]
    return [
        (f"img/s in-process, {cores} threads (best in-process)", f"{median(local):.0f}", f"runs {[round(x) for x in local]}"),
        ("img/s `pipelines/train.py` default (Ray Train, all local CPUs)", f"{median(default):.0f}", f"runs {[round(x) for x in default]}"),
        ("img/s old default (Ray Train, 1 worker x 1 CPU)", f"{median(old):.0f}", f"runs {[round(x) for x in old]}"),
        ("default / best in-process (target >= 0.9)", f"{median(default) / median(local):.2f}", f"{seconds}s of training each"),
        ("old default / best in-process", f"{median(old) / median(local):.2f}", ""),
    ]  # fmt: skip


def speed(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Each option's loop built by the Trainer as a run would, warmed up (compiled), then
    timed in interleaved rounds: on a shared machine, drift hits every option alike, and
    each round's ratio to the defaults is what the median is taken over."""

    from gan.core.config import preset
    from gan.data.datasets import load_dataset

    rounds, steps = SPEED_ROUNDS[quick] * repeats, SPEED_STEPS[quick]
    cores = os.cpu_count() or 1
    base = preset("dcgan")
    data = load_dataset(base.data)
    loops, warmup = {}, {}
    with tempfile.TemporaryDirectory(prefix="gan-bench-speed-") as tmp:
        for i, (name, sets) in enumerate(SPEED_OPTIONS.items()):
            trainer, warmup[name] = warmed_trainer(base, [*sets, f"train.threads={cores}"], f"{tmp}/{i}", data)
            loops[name] = trainer.loop
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            started = time.monotonic()
            for _ in range(steps):
                loop.train_step()
            loop.read_stats()
            rates[name].append(steps * loop.global_batch / (time.monotonic() - started))
    rows = []
    for name, values in rates.items():
        ratios = [v / d for v, d in zip(values, rates["defaults"], strict=True)]
        rows.append((f"img/s, {name}", f"{median(values):.0f} ({median(ratios):.2f}x)",
                     f"{cores} threads, {rounds} rounds x {steps} steps; per round {[round(v) for v in values]}; "
                     f"build + 5 steps {warmup[name]:.0f}s"))  # fmt: skip
    return rows


def communication_bytes() -> tuple[int, int]:
    """Parameters of the default G and D: DDP all-reduces every gradient once per step."""
    from gan.core.config import preset
    from gan.core.models import build_models

    cfg = preset("dcgan")
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return count(G), count(D)


def scaling(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    kimg = str(SCALING_KIMG[quick])
    sets = ["--kimg", kimg, "--threads", "1", "--set", f"eval.every_kimg={kimg}"]
    one = [train_once(*sets, "--ray-workers", "1") for _ in range(repeats)]
    two = [train_once(*sets, "--ray-workers", "2") for _ in range(repeats)]
    g, d = communication_bytes()
    step_bytes = 4 * (g + d)  # float32 gradients: D's in the D step, G's in the G step
    step_s = 64 / median(r["img_per_s"] for r in one)  # one global batch of 64 on one worker
    rows = [
        ("img/s, 1 worker", f"{median(r['img_per_s'] for r in one):.0f}", f"runs {[round(r['img_per_s']) for r in one]}"),
        ("img/s, 2 workers", f"{median(r['img_per_s'] for r in two):.0f}", f"runs {[round(r['img_per_s']) for r in two]}"),
        (f"FID at {kimg} kimg, 1 / 2 workers", f"{median(r['fid'] for r in one):.1f} / {median(r['fid'] for r in two):.1f}", "same global batch 64"),
        ("bytes all-reduced per step", f"{step_bytes / 1e6:.2f} MB", f"G {g:,} + D {d:,} float32 parameters"),
    ]  # fmt: skip
    for n, bandwidth in ((8, 10e9), (8, 100e9)):
        ring = 2 * (n - 1) / n * step_bytes / bandwidth
        rows.append((f"projected all-reduce time per step, {n} GPUs at {bandwidth / 1e9:.0f} GB/s",
                     f"{ring * 1e3:.2f} ms", f"ring all-reduce 2(N-1)/N x bytes / bandwidth; CPU step here {step_s * 1e3:.0f} ms"))  # fmt: skip
    return rows


def tune(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    plan = TUNE_PLAN[quick]
    rounds = plan[plan.index("--rounds") + 1]
    results = {}
    for label, grace in (("ASHA", "1"), ("no early stopping", rounds)):
        with tempfile.TemporaryDirectory(prefix="gan-bench-tune-") as tmp:
            started = time.monotonic()
            proc = subprocess.run([PY, "pipelines/tune.py", *plan, "--grace-rounds", grace, "--storage", tmp,
                                   "--no-tracking", "--name", "bench"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"tune ({label}) failed:\n{proc.stderr[-3000:]}")
            best = float(re.search(r"best: trial \S+, FID ([\d.]+)", proc.stdout).group(1))
            worker_s = float(re.search(r"(\d+) worker-seconds", proc.stdout).group(1))
            results[label] = (best, worker_s, time.monotonic() - started)
    (asha_fid, asha_s, asha_wall), (full_fid, full_s, full_wall) = results["ASHA"], results["no early stopping"]
    return [
        ("best FID, ASHA / no early stopping", f"{asha_fid:.1f} / {full_fid:.1f}", f"{' '.join(plan)}, search seed 0"),
        ("ASHA best within 10% of full search's (target)", f"{asha_fid / full_fid - 1:+.1%}", ""),
        (
            "worker-seconds, ASHA / no early stopping",
            f"{asha_s:.0f} / {full_s:.0f}",
            f"wall {asha_wall:.0f}s / {full_wall:.0f}s",
        ),
        ("ASHA compute share (target <= 40%)", f"{asha_s / full_s:.0%}", ""),
    ]


def schedulers(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    from gan.sweeps import space as spaces

    plan = SCHEDULERS_PLAN[quick]
    results = {}
    with tempfile.TemporaryDirectory(prefix="gan-bench-pbt-") as tmp:
        space = Path(tmp) / "space.json"
        space.write_text(json.dumps(spaces.mutable_only(spaces.default(gpu=False))))
        for scheduler in ("pbt", "asha", "fifo"):
            started = time.monotonic()
            proc = subprocess.run([PY, "pipelines/tune.py", *plan, "--scheduler", scheduler, "--space-file", str(space),
                                   "--storage", f"{tmp}/{scheduler}", "--no-tracking", "--name", "bench"], cwd=ROOT,
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"tune --scheduler {scheduler} failed:\n{proc.stderr[-3000:]}")
            best = float(re.search(r"best: trial \S+, FID ([\d.]+)", proc.stdout).group(1))
            worker_s = float(re.search(r"(\d+) worker-seconds", proc.stdout).group(1))
            kimg = re.search(r"rounds of ([\d.]+) kimg", proc.stdout).group(1)
            exploits = sum(int(n) for n in re.findall(r"(\d+) exploit\(s\)", proc.stdout))
            results[scheduler] = (best, worker_s, time.monotonic() - started, kimg, exploits)
    pbt, asha, fifo = results["pbt"], results["asha"], results["fifo"]
    return [
        ("best FID, PBT / ASHA / no early stopping", f"{pbt[0]:.1f} / {asha[0]:.1f} / {fifo[0]:.1f}",
         f"{' '.join(plan)}, search seed 0"),
        ("PBT at least as good as ASHA (target)", f"{pbt[0] / asha[0] - 1:+.1%}", "negative: PBT better"),
        ("worker-seconds, PBT / ASHA / no early stopping", f"{pbt[1]:.0f} / {asha[1]:.0f} / {fifo[1]:.0f}",
         f"rounds of {pbt[3]} / {asha[3]} / {fifo[3]} kimg; wall {pbt[2]:.0f}s / {asha[2]:.0f}s / {fifo[2]:.0f}s"),
        ("PBT exploits", str(pbt[4]), ""),
    ]  # fmt: skip


def eval_cost(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    from gan.core.config import preset

    default_every = preset("dcgan").eval.every_kimg
    runs = timed_runs("dcgan", quick, repeats)
    per_eval = median(median(h["time/eval_s"] for h in r["history"]) for r in runs)
    img_per_s = median(r["img_per_s"] for r in runs)
    share = per_eval / (default_every * 1000 / img_per_s)
    return [
        ("seconds per FID evaluation (2,500 samples)", f"{per_eval:.1f}", f"{img_per_s:.0f} img/s training"),
        (f"evaluation share at every {default_every:g} kimg (target < 10%)", f"{share:.1%}", "eval seconds / training seconds between evals"),
        ("peak memory of the default training job", f"{median(r['peak_rss_mib'] for r in runs):.0f} MiB", "RSS, in-process, 2 threads"),
    ]  # fmt: skip


def gpu(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Every preset's training step on the CUDA GPU, eager against captured, at each batch
    size; evaluation of 10k samples. Profiles are written to BENCH_CACHE/gpu-profiles."""
    import torch

    if not torch.cuda.is_available():
        return [("gpu", "skipped", "no CUDA GPU on this machine")]
    return gpu_rows("cuda", quick, repeats, BENCH_CACHE / "gpu-profiles")


def gpu_rows(
    device: str,
    quick: bool,
    repeats: int,
    profiles: Path,
    presets: tuple[str, ...] = GPU_PRESETS,
    batches: tuple[int, ...] | None = None,
    budget_s: float | None = None,
) -> list[tuple[str, str, str]]:
    """A row per preset, batch and step (eager, captured): img/s, ms per step, the GPU's busy
    share and MFU. Each setting's Trainer is built as a run builds it (only the training step
    is timed, so every setting takes the committed digits evaluator at its smallest) and freed
    before the next. On a CPU (a smoke run) the step runs eager either way and the busy share
    is n/a. Settings reached past ``budget_s`` are reported as not run; each row is also
    printed to stderr as it comes, so a run stopped from outside still says what it measured."""
    import torch

    from gan.core.config import preset

    batches = batches or GPU_BATCHES[quick]
    budget_s = GPU_BUDGET_S[quick] if budget_s is None else budget_s
    profiles.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    card = torch.cuda.get_device_name() if device == "cuda" else device
    rows = [("device", card, f"peak TFLOP/s (dense) {peak_tflops(card, 'tf32')[1]}; MFU = FLOPs per image of a "
                             "training step (torch.utils.flop_counter) x img/s / peak")]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gan-bench-gpu-") as tmp:
        loaded: dict = {}
        for name in presets:
            for batch in batches:
                labels = [f"{name}, batch {batch}, {mode}" for mode in ("eager", "captured")]
                if time.monotonic() - started > budget_s:
                    pair = [(f"img/s, {label}", "not run", f"past the {budget_s:.0f}s budget") for label in labels]
                else:
                    pair = eager_and_captured(preset(name), batch, labels, card, device, quick, repeats, profiles,
                                              tmp, loaded, max(batches))  # fmt: skip
                for row in pair:
                    print(f"    {row[0]}: {row[1]}", file=sys.stderr, flush=True)
                rows += pair
        if device == "cuda" and time.monotonic() - started < budget_s:
            rows.append(eval_row(loaded, f"{tmp}/eval", device, repeats))
    return rows


def eager_and_captured(base, batch: int, labels: list[str], card: str, device: str, quick: bool, repeats: int,
                       profiles: Path, tmp: str, loaded: dict, data_count: int) -> list[tuple[str, str, str]]:  # fmt: skip
    """The rows of a preset at a batch size: its eager step, then its captured step, which
    takes the eager step's FLOPs (a replayed graph runs outside the counter). A setting that
    fails (out of memory, say) is one row saying why."""
    import torch

    rows, flops = [], None
    for captured, label in zip((False, True), labels, strict=True):
        try:
            uri, about, data = speed_data(base.data, tmp, data_count, loaded)
            sets = [f"data.uri={uri}", f"train.batch_size={batch}", f"train.capture={captured}", *SPEED_EVAL]
            name = label.replace(", ", "-").replace(" ", "")
            m = measure_step(base, sets, data, f"{tmp}/{name}", device, quick, repeats, profiles / f"{name}.txt", flops)
        except Exception as err:
            rows.append((f"img/s, {label}", "failed", f"{type(err).__name__}: {str(err).splitlines()[0]}"))
        else:
            flops = m["flops_per_image"]
            rows.append(gpu_row(label, captured, m, about, peak_tflops(card, m["precision"])[0]))
        gc.collect()  # the next setting gets the device's memory
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


SPEED_EVAL = ["eval.backbone=digits", "eval.backbone_uri=", "eval.backbone_sha256=", "eval.num_samples=10",
              "eval.kid_subset_size=10"]  # fmt: skip
"""Speed rows time the training step only: the smallest evaluator that needs no file."""


def measure_step(base, sets: list[str], data, folder: str, device: str, quick: bool, repeats: int, profile: Path,
                 flops_per_image: float | None = None) -> dict:  # fmt: skip
    """One setting: img/s and ms per step, FLOPs per image (counted here unless given; None
    for a captured step, whose replays the counter cannot see) and, on CUDA, the profile."""
    trainer, warm_s = warmed_trainer(base, sets, folder, data, device)
    loop = trainer.loop
    captured = getattr(loop, "captured", None) is not None
    rates, step_ms = timed_steps(loop, repeats, GPU_SECONDS[quick])
    if flops_per_image is None and not captured:
        flops_per_image = step_flops_per_image(loop)
    busy = profile_step(loop, profile, median(step_ms), GPU_PROFILE_STEPS[quick]) if device == "cuda" else None
    return {"img_per_s": median(rates), "rates": rates, "step_ms": median(step_ms), "warm_s": warm_s,
            "flops_per_image": flops_per_image, "busy": busy, "precision": step_precision(trainer.cfg, device),
            "captured": captured}  # fmt: skip


def gpu_row(label: str, captured: bool, m: dict, about: str, peak: float | None) -> tuple[str, str, str]:
    """img/s, then: ms/step, GPU busy, GFLOP/img, MFU (fixed order: tests read them back)."""
    busy, flops = m["busy"], m["flops_per_image"]
    mfu = "unknown" if peak is None or flops is None else f"{flops * m['img_per_s'] / (peak * 1e12):.2%}"
    how = ("" if not captured else "; the step replays its CUDA graphs" if m["captured"]
           else "; not captured: the loop said why and trained eager")  # fmt: skip
    profile = (f"; {busy['kernels']:.0f} kernels/step, {busy['kernel_ms']:.2f} ms in kernels, matrix share "
               f"{busy['matrix']:.0%}: bound by {busy['bound']} ({busy['file']})") if busy else ""  # fmt: skip
    return (f"img/s, {label}", f"{m['img_per_s']:.0f}",
            f"{m['step_ms']:.2f} ms/step, GPU busy {'n/a' if busy is None else format(busy['share'], '.0%')}, "
            f"{'unknown' if flops is None else format(flops / 1e9, '.4g')} GFLOP/img, MFU {mfu}; {about}{how}; rounds "
            f"{[round(r) for r in m['rates']]}; build + 5 steps {m['warm_s']:.0f}s{profile}")  # fmt: skip


def speed_data(data_cfg, folder: str, largest_batch: int, loaded: dict) -> tuple[str, str, object]:
    """(data.uri, what it is, the dataset) for a preset's speed rows, each dataset loaded once
    into ``loaded``: the digits as embedded; for RGB the emoji set where
    benchmarks/emoji_data.py prepared it under BENCH_CACHE, else noise in 10 classes prepared in
    ``folder``, twice the largest batch (a step's speed does not depend on what images show)."""
    from dataclasses import replace

    from gan.data.datasets import load_dataset

    res = data_cfg.resolution
    if data_cfg.channels == 1:
        uri, about = data_cfg.uri, "the embedded digits"
    elif (BENCH_CACHE / f"emoji-twitter-{res}" / "manifest.json").exists():
        uri, about = str(BENCH_CACHE / f"emoji-twitter-{res}"), "the emoji set"
    else:
        uri, about = f"{folder}/noise-{res}", f"RGB noise (no emoji set prepared at {res} px in {BENCH_CACHE})"
    key = (uri, res, data_cfg.channels)  # textbook reads the digits at 32 px
    if key not in loaded:
        if uri.startswith(f"{folder}/noise-"):
            synthetic_rgb(uri, res, max(2 * largest_batch, 100))
        loaded[key] = load_dataset(replace(data_cfg, uri=uri))
    return uri, about, loaded[key]


def synthetic_rgb(dest: str, resolution: int, count: int) -> None:
    """A prepared dataset of ``count`` RGB noise images in 10 classes at ``resolution``."""
    import io

    import numpy as np

    from gan.data.prepare import PrepareConfig, prepare

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, resolution, resolution, 3), dtype=np.uint8)
    np.savez(f"{dest}.npz", images=images, labels=np.arange(count) % 10)
    prepare(PrepareConfig(source=f"{dest}.npz", dest=dest, resolution=resolution, channels=3), log=io.StringIO())
    os.remove(f"{dest}.npz")


def eval_row(loaded: dict, folder: str, device: str, repeats: int) -> tuple[str, str, str]:
    """Seconds the default preset's evaluator takes for GPU_EVAL_SAMPLES samples."""
    from gan.core.config import preset

    base = preset("dcgan")
    _, _, data = speed_data(base.data, folder, base.train.batch_size, loaded)
    trainer, _ = warmed_trainer(base, [f"eval.num_samples={GPU_EVAL_SAMPLES}"], folder, data, device)
    G = trainer.nets.G_ema
    seconds = []
    for _ in range(1 + repeats):  # the first pays cuDNN's choice of kernels
        start = time.monotonic()
        scores = trainer.evaluator(G, trainer.cfg.model.num_classes)
        seconds.append(time.monotonic() - start)
    return (f"seconds to evaluate {GPU_EVAL_SAMPLES} samples", f"{median(seconds[1:]):.2f}",
            f"first {seconds[0]:.2f}s; {trainer.evaluator.num_real} real images in the reference; "
            f"FID {scores['fid']:.1f} (G after 5 steps)")  # fmt: skip


def step_precision(cfg, device: str) -> str:
    """The precision of a step's matrix work, whose peak MFU is measured against."""
    if cfg.train.bf16:
        return "bf16"
    return "tf32" if device == "cuda" and cfg.train.tf32 else "fp32"


def peak_tflops(card: str, precision: str) -> tuple[float | None, str]:
    """(the card's dense peak in TFLOP/s at ``precision``, where it comes from): $GAN_GPU_PEAK_TFLOPS
    when set, else GPU_PEAKS by the name CUDA reports ('NVIDIA H100 80GB HBM3'); None if unknown."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]), f"{os.environ[PEAK_ENV]}, from {PEAK_ENV}"
    model = next((model for pattern, model in GPU_MODELS if re.search(pattern, card, re.IGNORECASE)), None)
    if model is None:
        return None, f"unknown for {card!r}: MFU unknown (set {PEAK_ENV})"
    peaks = GPU_PEAKS[model]
    return peaks[PRECISIONS.index(precision)], f"{model}: " + ", ".join(
        f"{p} {v:g}" for p, v in zip(PRECISIONS, peaks, strict=True)
    )


class _NoModuleTracker(contextlib.nullcontext):
    """Stands in for the module tracker of FlopCounterMode, whose hooks refuse autograd.grad
    with a module's leaf input (pytorch#131753: R1 on resnet-64, whose real images reach D
    unaugmented); only the total is read, so every FLOP counts under 'Global'."""

    parents = frozenset({"Global"})


def counted_flops(fn) -> int:
    """FLOPs of the matrix multiplications and convolutions ``fn()`` runs, forward and
    backward, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    with counter:
        fn()
    return counter.get_total_flops()


def step_flops_per_image(loop) -> float:
    """FLOPs of one training step per image, over one lazy-R1 period when R1 is on (one D
    step in ``r1_every`` adds the penalty's double backward): their mean per step."""
    steps = loop.cfg.loss.r1_every if loop.cfg.loss.r1_gamma > 0 else 1

    def run() -> None:
        for _ in range(steps):
            loop.train_step()

    flops = counted_flops(run)
    loop.read_stats()
    return flops / (steps * loop.global_batch)


def warmed_trainer(base, sets: list[str], folder: str, data, device: str = "cpu"):
    """A Trainer built as a run builds it, after 5 steps (which compile G and D when asked to
    and let cuDNN choose its kernels); and the seconds that took."""
    from gan.core.config import override
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    started = time.monotonic()
    trainer = Trainer(override(base, sets), LocalSession(folder, device=device, quiet=True), data=data)
    for _ in range(5):
        trainer.loop.train_step()
    trainer.loop.read_stats()
    return trainer, time.monotonic() - started


def timed_steps(loop, repeats: int, seconds: float) -> tuple[list[float], list[float]]:
    """img/s and ms per step over ``repeats`` rounds of about ``seconds`` each; steps are
    queued without reading anything back, as in training, and the round ends at a read."""
    start = time.monotonic()
    for _ in range(10):
        loop.train_step()
    loop.read_stats()
    steps = max(10, round(seconds / ((time.monotonic() - start) / 10)))
    rates, step_ms = [], []
    for _ in range(repeats):
        start = time.monotonic()
        for _ in range(steps):
            loop.train_step()
        loop.read_stats()
        elapsed = time.monotonic() - start
        rates.append(steps * loop.global_batch / elapsed)
        step_ms.append(1000 * elapsed / steps)
    return rates, step_ms


def profile_step(loop, path: Path, step_ms: float, steps: int) -> dict:
    """What bounds a step: the share of its time (``step_ms``, timed without the profiler,
    which slows the host) the GPU spends in kernels (low: the host cannot launch kernels
    fast enough), the kernels per step, and the share of kernel time in matrix units
    (convolutions, GEMMs) against elementwise and reductions. The profile goes to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.monotonic()
        for _ in range(steps):
            loop.train_step()
        loop.read_stats()
        wall_us = (time.monotonic() - start) * 1e6
    # GPU-side annotations (the optimizer's step) span kernels and the gaps between them.
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and not e.is_user_annotation]
    busy_us = sum(e.device_time_total for e in kernels)
    matrix = ("gemm", "conv", "xmma", "cutlass", "sm90", "wgrad", "dgrad", "fprop", "implicit")
    matrix_us = sum(e.device_time_total for e in kernels if any(k in e.name.lower() for k in matrix))
    path.write_text(
        f"{path.stem}: {steps} steps, wall {wall_us / 1000:.1f} ms, kernels {len(kernels)}, GPU busy {busy_us / 1000:.1f} ms\n\n"
        + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    )
    share = busy_us / steps / 1000 / step_ms
    bound = (
        "kernel launches (host)"
        if share < 0.5
        else "matrix units"
        if matrix_us > busy_us / 2
        else "memory (elementwise)"
    )
    return {"share": share, "kernels": len(kernels) / steps, "kernel_ms": busy_us / steps / 1000,
            "matrix": matrix_us / max(busy_us, 1), "bound": bound, "file": path.name}  # fmt: skip


@contextlib.contextmanager
def counting_s3_server():
    """moto's S3 API on 127.0.0.1, counting the body bytes of every GET by request path."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    served: collections.Counter = collections.Counter()
    lock = threading.Lock()
    app = DomainDispatcherApplication(create_backend_app)

    def counting(environ, start_response):
        path = environ.get("PATH_INFO", "") if environ["REQUEST_METHOD"] == "GET" else None
        for chunk in app(environ, start_response):
            if path:
                with lock:
                    served[path] += len(chunk)
            yield chunk

    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", served
    finally:
        server.shutdown()
        thread.join()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_cluster(tmp: str, endpoint: str):
    """cluster/local_cluster.sh: a head and a worker node, each with its own data cache."""
    env = {**os.environ, "STATE_DIR": f"{tmp}/ray", "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
           "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "PATH": f"{Path(PY).parent}:{os.environ['PATH']}"}  # fmt: skip
    script = ["bash", "cluster/local_cluster.sh"]
    try:
        subprocess.run([*script, "start"], cwd=ROOT, env=env, check=True, timeout=240, capture_output=True)
        for line in Path(f"{tmp}/ray/env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        temp = f"/tmp/gan-ray-{env['RAY_PORT']}"
        yield env, [Path(f"{temp}/data-cache"), Path(f"{temp}-worker/data-cache")]
    finally:
        subprocess.run([*script, "stop"], cwd=ROOT, env=env, timeout=180, capture_output=True)


@contextlib.contextmanager
def local_mlflow_server(tmp: str):
    """`mlflow server` on loopback with a SQLite store, stopped by its process group."""
    import signal

    import requests

    port = free_port()
    proc = subprocess.Popen([str(Path(PY).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                             "--default-artifact-root", f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start in 2 minutes")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def tracking(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Alternating runs, so drift on a shared machine hits both alike."""
    sets = ["--kimg", str(TRACKING_KIMG[quick]), "--threads", "2", "--set", "eval.every_kimg=1000"]
    off, on = [], []
    with tempfile.TemporaryDirectory(prefix="gan-bench-tracking-") as tmp, local_mlflow_server(tmp) as url:
        for _ in range(repeats):
            off.append(train_once(*sets)["img_per_s_wall"])
            on.append(train_once(*sets, "--tracking-uri", url)["img_per_s_wall"])
    return [
        ("img/s, tracking off / on", f"{median(off):.0f} / {median(on):.0f}",
         f"runs {[round(x) for x in off]} / {[round(x) for x in on]}; {TRACKING_KIMG[quick]} kimg, 2 threads, in-process"),
        ("tracking on / off (target >= 0.99)", f"{median(on) / median(off):.3f}",
         "wall time of training less evaluation; curves at every logging step (50), system metrics every 10 s"),
    ]  # fmt: skip


def s3reads(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Each layout gets a fresh cluster (empty node caches) and a fresh bucket prefix."""
    import boto3
    import numpy as np

    from gan.data.datasets import _embedded_mnist

    plan = S3READS_PLAN[quick]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gan-bench-s3-") as tmp, counting_s3_server() as (endpoint, served):
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="bench")
        images, labels = _embedded_mnist()
        np.savez(f"{tmp}/digits.npz", images=images, labels=labels)
        s3.upload_file(f"{tmp}/digits.npz", "bench", "raw/digits.npz")
        subprocess.run([PY, "pipelines/prepare_data.py", f"{tmp}/digits.npz", "s3://bench/prepared/digits",
                        "--resolution", "28", "--channels", "1", "--s3-endpoint", endpoint], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, "AWS_ACCESS_KEY_ID": "bench",
                                                 "AWS_SECRET_ACCESS_KEY": "bench"})  # fmt: skip
        sizes = {
            prefix: sum(o["Size"] for o in s3.list_objects_v2(Bucket="bench", Prefix=prefix)["Contents"])
            for prefix in ("raw/", "prepared/")
        }
        for label, prefix, uri in (("one .npz, read by every trial", "raw/", "s3://bench/raw/digits.npz"),
                                   ("prepared dataset, node cache", "prepared/", "s3://bench/prepared/digits")):  # fmt: skip
            with local_cluster(f"{tmp}/{prefix}", endpoint) as (env, caches):
                before = sum(n for path, n in served.items() if path.startswith(f"/bench/{prefix}"))
                job = subprocess.run(["ray", "job", "submit", "--working-dir", ".", "--", "python", "pipelines/tune.py",
                                      *plan, "--set", "eval.num_samples=200", "--set", "eval.kid_subset_size=50",
                                      "--set", f"data.uri={uri}", "--storage", f"s3://bench/sweeps-{prefix[:-1]}",
                                      "--no-tracking", "--no-register"], cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
                if job.returncode != 0:
                    raise RuntimeError(f"sweep on {uri} failed:\n{(job.stdout + job.stderr)[-3000:]}")
                read = sum(n for path, n in served.items() if path.startswith(f"/bench/{prefix}")) - before
                nodes = sum(cache.is_dir() and any(cache.iterdir()) for cache in caches)
            rows.append((f"bytes read from S3, {label}", f"{read / 1e6:.1f} MB",
                         f"dataset {sizes[prefix] / 1e6:.2f} MB; {read / sizes[prefix] / 2:.2f}x the dataset per node "
                         f"(2 nodes; {nodes} node caches filled); {' '.join(plan)}"))  # fmt: skip
    return rows


def synthetic_prepared(folder: str, count: int) -> str:
    """A prepared dataset of ``count`` 28x28 digits written by pipelines/prepare_data.py: the
    embedded 5,000 repeated, each copy shifted by a random offset (nothing downloaded)."""
    import numpy as np

    from gan.core.config import DataConfig
    from gan.data.datasets import load_dataset

    digits = load_dataset(DataConfig())
    base, labels = digits.images[:, 0].numpy(), digits.labels.numpy()
    rng = np.random.default_rng(0)
    copies = math.ceil(count / len(base))
    shifts = rng.integers(-3, 4, size=(copies, 2))
    images = np.concatenate([np.roll(base, (int(dy), int(dx)), axis=(1, 2)) for dy, dx in shifts])[:count]
    np.savez(f"{folder}/digits.npz", images=images, labels=np.tile(labels, copies)[:count])
    del images
    dest = f"{folder}/prepared"
    proc = subprocess.run([PY, "pipelines/prepare_data.py", f"{folder}/digits.npz", dest, "--resolution", "28",
                           "--channels", "1"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"prepare_data failed:\n{proc.stderr[-3000:]}")
    os.remove(f"{folder}/digits.npz")
    return dest


def streaming(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Streamed and in-memory runs interleaved (drift hits both alike), each a fresh process
    so its peak memory is its own; then, in this process with the dataset's shards already
    hashed on this node, the data work a trial does before its first step."""
    from gan.core.config import override, preset
    from gan.data.datasets import CACHE_ENV, MappedDataset, load_dataset
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    cap, seconds = STREAM_CAP_MIB[quick], STREAM_SECONDS[quick]
    count = math.ceil(10.5 * cap * 2**20 / (28 * 28))
    size_mib = count * 28 * 28 / 2**20
    with tempfile.TemporaryDirectory(prefix="gan-bench-stream-") as tmp:
        env = {**os.environ, CACHE_ENV: f"{tmp}/cache", "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        dest = synthetic_prepared(tmp, count)
        prepare_s = time.monotonic() - started
        shards = len(json.loads(Path(f"{dest}/manifest.json").read_text())["shards"])
        sets = ["--seconds", str(seconds), "--threads", str(os.cpu_count() or 1), "--set", "eval.every_kimg=1000",
                "--set", "eval.num_samples=500", "--set", f"data.uri={dest}"]  # fmt: skip
        budgets = {"streamed": cap, "in memory": math.ceil(2 * size_mib)}
        runs: dict[str, list[dict]] = {label: [] for label in budgets}
        for _ in range(repeats):
            for label, budget in budgets.items():
                runs[label].append(train_once(*sets, "--set", f"data.memory_budget_mb={budget}", env=env))

        saved_cache = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = f"{tmp}/cache-here"  # no stamp yet: the first open hashes
        try:
            cfg = override(preset("dcgan"), [f"data.uri={dest}", f"data.memory_budget_mb={cap}"])
            started = time.monotonic()
            if not isinstance(load_dataset(cfg.data), MappedDataset):
                raise RuntimeError(f"{dest} was loaded, not streamed, under data.memory_budget_mb={cap}")
            first_open_s = time.monotonic() - started
            opens, to_first_step = [], []
            for i in range(repeats):
                started = time.monotonic()
                data = load_dataset(cfg.data)
                opens.append(time.monotonic() - started)
                trainer = Trainer(cfg, LocalSession(f"{tmp}/first-step-{i}", quiet=True), data=data)
                trainer.loop.train_step()
                trainer.loop.read_stats()
                to_first_step.append(time.monotonic() - started)
        finally:
            if saved_cache is None:
                os.environ.pop(CACHE_ENV)
            else:
                os.environ[CACHE_ENV] = saved_cache

    def per_run(label: str, key: str, digits: int = 0) -> str:
        return f"runs {[round(r[key], digits) for r in runs[label]]}"

    img_s = {label: median(r["img_per_s"] for r in rs) for label, rs in runs.items()}
    ratios = [s["img_per_s"] / m["img_per_s"] for s, m in zip(runs["streamed"], runs["in memory"], strict=True)]
    rss = {label: median(r["peak_rss_self_mib"] for r in rs) for label, rs in runs.items()}
    anon = {label: median(r["peak_anon_mib"] for r in rs) for label, rs in runs.items()}
    return [
        ("prepared dataset / data.memory_budget_mb", f"{size_mib:.0f} / {cap} MiB",
         f"{count:,} images 1x28x28 in {shards} shards ({size_mib / cap:.1f}x the cap); prepare_data {prepare_s:.0f}s"),
        ("img/s streamed / in memory", f"{img_s['streamed']:.0f} / {img_s['in memory']:.0f}",
         f"{per_run('streamed', 'img_per_s')} / {per_run('in memory', 'img_per_s')}; {seconds}s each, in-process"),
        ("streamed / in memory img/s (target >= 0.8)", f"{median(ratios):.2f}",
         f"per interleaved pair {[round(r, 2) for r in ratios]}"),
        ("peak RSS per worker, streamed / in memory", f"{rss['streamed']:.0f} / {rss['in memory']:.0f} MiB",
         "VmHWM of the worker: counts the mapped shard pages a streamed run touched (page cache)"),
        ("peak anonymous memory per worker, streamed / in memory", f"{anon['streamed']:.0f} / {anon['in memory']:.0f} MiB",
         "RssAnon sampled every 5 ms: the process's own memory, which the budget is about"),
        ("data work before the first step, node holds the dataset (target < 2 s)", f"{median(opens):.3f} s",
         f"runs {[round(t, 3) for t in opens]}: manifest, stamp check, memory maps, labels"),
        ("first open on the node (hashes every shard once)", f"{first_open_s:.2f} s", f"{size_mib:.0f} MiB"),
        ("trial start to first step done, streamed", f"{median(to_first_step):.2f} s",
         f"runs {[round(t, 2) for t in to_first_step]}: open + Trainer (models, FID real statistics of 5,000 "
         "streamed images) + one step"),
    ]  # fmt: skip


def at_minutes(history: list[dict], minutes: float, run_minutes: float) -> dict:
    """The evaluation that reads a run of ``run_minutes`` at ``minutes`` of training: the last
    one within them, or at the run's own length its final one, whose step may end seconds late."""
    if minutes == run_minutes:
        return history[-1]
    within = [h for h in history if h["time/train_s"] <= minutes * 60 + 1]
    if not within:
        raise RuntimeError(f"no evaluation in the first {minutes} min: evaluate more often (eval.every_kimg)")
    return within[-1]


def train_on_emoji(preset: str, seconds: float, sets: list[str], out: Path | None = None, resolution: int = 64) -> dict:
    """One run of ``preset`` on the emoji set (benchmarks/emoji_data.py fetches it with npm);
    with ``out``, its checkpoints and sample grids are kept there."""
    from emoji_data import prepare

    sets = [f"data.uri={prepare(BENCH_CACHE, resolution=resolution)}", *sets]
    return train_once("--preset", preset, "--seconds", str(seconds), "--threads", "2",
                      *[a for s in sets for a in ("--set", s)], *(["--out", str(out)] if out else []))  # fmt: skip


def emoji(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """The 64-px RGB preset on the emoji set."""
    minutes = EMOJI_MINUTES[quick]
    kept = BENCH_CACHE / "emoji-runs" / time.strftime("%Y%m%d-%H%M%S")

    def run(name: str, length_min: float, seed: int) -> dict:
        sets = [f"eval.every_kimg={EMOJI_EVERY_KIMG[quick]}", f"train.seed={seed}"]
        return train_on_emoji(name, length_min * 60, sets, out=kept / f"{name}-seed{seed}")

    runs = [run("dcgan-64", minutes[-1], seed) for seed in range(repeats)]
    cond = [run("dcgan-64-cond", minutes[0], seed) for seed in range(repeats)]
    rows = []
    for m in minutes:
        evals = [at_minutes(r["history"], m, minutes[-1]) for r in runs]
        fid, floor = median(e["fid"] for e in evals), median(e["fid_floor"] for e in evals)
        rows.append((f"emoji 64 px, dcgan-64: FID after {m} min (floor beside)", f"{fid:.1f} (floor {floor:.1f})",
                     f"runs {[round(e['fid'], 1) for e in evals]}, FID / floor {fid / floor:.1f}, "
                     f"precision {median(e['precision'] for e in evals):.2f}, recall {median(e['recall'] for e in evals):.2f}, "
                     f"kimg {[round(e['kimg'], 1) for e in evals]}"))  # fmt: skip
    finals = [at_minutes(r["history"], minutes[0], minutes[0]) for r in cond]
    rows.append((f"emoji 64 px, dcgan-64-cond: class accuracy after {minutes[0]} min",
                 f"{median(f.get('class_accuracy', math.nan) for f in finals):.2f}",
                 f"{how_conditional(finals)}; the evaluator's held-out accuracy is in its file; labels follow the "
                 "set's class mix, so a generator that ignores them scores about 0.39 (RESULTS.md), not 0.10"))  # fmt: skip
    rows.append(("emoji 64 px: each run's checkpoints and sample grids", str(kept), "checkpoint_step*/grid.png"))
    return rows


def modern(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """The modern presets on the emoji set, against dcgan-64 at equal training time and seeds.
    Each run's EMA generator is copied at the first logging step past 10 minutes of training
    (every 50 steps: seconds late, each copy's own time is reported) and at its end, and scored
    afterwards (benchmarks/ema_screen.py), so no evaluation cadence favours the faster preset."""
    from emoji_data import prepare

    minutes = EMOJI_MINUTES[quick]
    grids = BENCH_CACHE / "emoji-runs" / time.strftime("%Y%m%d-%H%M%S")
    grids.mkdir(parents=True)

    def run(name: str, length_min: float, seed: int, resolution: int = 64) -> list[dict]:
        """The run's scores at each of ``minutes`` within its length: kimg, train_s and its EMA's scores."""
        at = [m * 60 for m in minutes if m < length_min]
        args = [sys.executable, str(ROOT / "benchmarks" / "ema_screen.py"), "--preset", name,
                "--seconds", str(length_min * 60), "--at", ",".join(map(str, at)), "--half-lives", "",
                "--grids", str(grids), "--set", f"data.uri={prepare(BENCH_CACHE, resolution=resolution)}",
                "--set", "eval.every_kimg=100000", "--set", f"train.seed={seed}"]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"ema_screen.py {name} failed:\n{done.stderr[-3000:]}")
        copies = json.loads(done.stdout.strip().splitlines()[-1])["copies"]
        return [c | next(v for k, v in c.items() if k.endswith("(run's)")) for c in copies]

    def row(label: str, reads: list[dict]) -> tuple[str, str, str]:
        fid, floor = median(r["fid"] for r in reads), median(r["fid_floor"] for r in reads)
        return (label, f"{fid:.1f} ({fid / floor:.1f} x {floor:.2f})",
                f"runs {[round(r['fid'], 1) for r in reads]}, kimg {[r['kimg'] for r in reads]}, "
                f"img/s {[round(r['kimg'] * 1000 / r['train_s']) for r in reads]}, "
                f"precision {median(r['precision'] for r in reads):.2f}, recall {median(r['recall'] for r in reads):.2f}")  # fmt: skip

    rows = []
    ours = {name: [run(name, minutes[-1], seed) for seed in range(repeats)] for name in ("modern-64", "dcgan-64")}
    for i, m in enumerate(minutes):
        for name, runs in ours.items():
            target = "; target for modern-64: <= 6 x and below dcgan-64" if name == "modern-64" else ""
            rows.append(row(f"emoji 64 px, {name}: FID after {m} min (x the floor{target})", [r[i] for r in runs]))
    small = [run("modern-32", minutes[0], seed, resolution=32)[-1] for seed in range(repeats)]
    rows.append(row(f"emoji 32 px, modern-32: FID after {minutes[0]} min (x the floor; target <= 6)", small))
    cond = [run("modern-64-cond", minutes[0], seed)[-1] for seed in range(repeats)]
    rows.append((f"emoji 64 px, modern-64-cond after {minutes[0]} min: class accuracy, class variety (targets: "
                 ">= 0.95 x the evaluator's held-out accuracy, >= 0.8)",
                 f"{median(c['class_accuracy'] for c in cond):.3f}, {median(c['class_variety'] for c in cond):.2f}",
                 f"{how_conditional(cond)}; emoji_data.py prints the evaluator's held-out accuracy"))  # fmt: skip
    rows.append(("emoji: the sample grids of each run's EMA at each reading", str(grids), "PRESET_seedS_SECONDSs.png"))
    return rows


def screen64(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Regularisation and learning rates for dcgan-64 on the emoji set, at equal training
    seconds: what the preset's settings were chosen by."""
    seconds = SCREEN64_SECONDS[quick]
    rows = []
    for label, sets in SCREEN64_SETTINGS.items():
        finals = [train_on_emoji("dcgan-64", seconds, ["eval.every_kimg=1000", *sets, f"train.seed={seed}"])["history"][-1]
                  for seed in range(repeats)]  # fmt: skip
        rows.append((f"emoji 64 px, {label}: FID after {seconds}s", f"{median(f['fid'] for f in finals):.1f}",
                     f"runs {[round(f['fid'], 1) for f in finals]}, floor {median(f['fid_floor'] for f in finals):.1f}, "
                     f"precision {median(f['precision'] for f in finals):.2f}, recall {median(f['recall'] for f in finals):.2f}, "
                     f"kimg {[round(f['kimg'], 1) for f in finals]}"))  # fmt: skip
    return rows


def conditional(quick: bool, repeats: int) -> list[tuple[str, str, str]]:
    """Class accuracy of the class-conditional digits preset after the quality budget."""
    seconds = CONDITIONAL_SECONDS[quick]
    runs = [train_once("--preset", "dcgan-cond", "--seconds", str(seconds), "--threads", "2",
                       "--set", f"eval.every_kimg={EVAL_EVERY_KIMG}", "--set", f"train.seed={seed}") for seed in range(repeats)]  # fmt: skip
    finals = [r["history"][-1] for r in runs]
    return [
        (f"digits, dcgan-cond: class accuracy after {seconds}s (target >= 0.95)",
         f"{median(f['class_accuracy'] for f in finals):.3f}", how_conditional(finals)),
    ]  # fmt: skip


def how_conditional(evals: list[dict]) -> str:
    """Class accuracy, variety within classes (1 = as varied as the data), FID and recall of
    conditional runs, one value per run."""

    def runs(key: str, digits: int) -> list[float]:
        return [round(e.get(key, math.nan), digits) for e in evals]

    return (f"class accuracy {runs('class_accuracy', 3)}, class variety {runs('class_variety', 2)}, "
            f"FID {runs('fid', 1)}, recall {runs('recall', 3)}")  # fmt: skip


BENCHMARKS = {
    "quality": quality,
    "overhead": overhead,
    "speed": speed,
    "scaling": scaling,
    "tune": tune,
    "schedulers": schedulers,
    "eval": eval_cost,
    "gpu": gpu,
    "tracking": tracking,
    "s3reads": s3reads,
    "streaming": streaming,
    "emoji": emoji,
    "modern": modern,
    "screen64": screen64,
    "conditional": conditional,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets, one run each (under 10 minutes)")
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--repeats", type=int, help="runs per measurement (default 3, quick 1)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    try:  # a GPU machine may get the working tree without git or its history
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        head = ""
    commit = head.strip() or "unknown"
    print(f"commit {commit}, {'quick' if args.quick else 'full'} budgets, {repeats} run(s) per measurement", flush=True)
    table: dict[str, list] = {}
    for name in names:
        started = time.monotonic()
        print(f"\n== {name} ...", flush=True)
        table[name] = BENCHMARKS[name](args.quick, repeats)
        for row in table[name]:
            print(f"  {row[0]:<70} {row[1]:>14}   {row[2]}", flush=True)
        print(f"  ({time.monotonic() - started:.0f}s)", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"commit": commit, "quick": args.quick, "repeats": repeats, "rows": table}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
