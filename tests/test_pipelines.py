"""The entry points as a user runs them: a tracked training run in its own process (the
full suite), and everything they refuse called in this process through main(argv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from entry import call

from gan.core.config import debug, override
from gan.core.loop import GANLoop, Nets, make_ema
from gan.core.models import build_models
from gan.runs import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, digits):
    """A run folder 'r' as train.py leaves it, with one checkpoint of the debug preset after
    two steps: what sample.py and a resume check read, made in a second."""
    cfg = override(debug(), ["train.total_kimg=0.032"])
    torch.manual_seed(0)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    loop = GANLoop(cfg, Nets(G, D, make_ema(G), G, D), digits)
    for _ in range(2):
        loop.train_step()
    state = {"loop": loop.state_dict(), "config": cfg.to_json()}
    run = tmp_path_factory.mktemp("runs") / "r"
    checkpoint.save(f"{run}/{checkpoint.dir_name(2)}", state, {"step": 2, "images_seen": 32, "fid": 300.0})
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    proc = run("pipelines/train.py", "--in-process", "--preset", "debug", "--storage", str(storage), "--name", "r",
               "--tracking-uri", f"sqlite:///{storage}/mlflow.db",
               env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})  # a short run still gets system metrics  # fmt: skip
    return storage / "r", proc.stdout


def latest(out):
    return Path(checkpoint.find(str(out)).latest)


@pytest.mark.slow
def test_train_writes_checkpoints_grids_and_says_where(trained):
    out, stdout = trained
    found = checkpoint.find(str(out))
    best, newest = Path(found.best), Path(found.latest)
    # The layout Ray Train writes too: checkpoint_step<N>/ folders, the latest and the best kept.
    assert newest.name == "checkpoint_step00000020" and set(found.all) <= {found.best, found.latest}
    for folder in (best, newest):
        assert (folder / "state.pt").exists() and (folder / "grid.png").exists()
    assert (best / "interpolation.png").exists()
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["images_seen"] >= 320 and len(meta["dataset_fingerprint"]) == 64
    assert str(best) in stdout and "best FID" in stdout


TRAIN = ("--in-process", "--preset", "debug", "--name", "r", "--storage")


def tracking_args(out):
    return ("--tracking-uri", f"sqlite:///{out.parent}/mlflow.db")


def mlflow_run(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.parent}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("gan").experiment_id])
    assert len(runs) == 1, "one training run, one MLflow run"
    return client, runs[0]


@pytest.mark.slow
def test_run_is_tracked_in_mlflow(trained):
    out, stdout = trained
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["optim.lr_g"] == "0.0002" and run.data.params["model.family"] == "dcgan"
    assert len(run.data.tags["dataset_fingerprint"]) == 64 and len(run.data.tags["evaluator_sha256"]) == 64
    history = client.get_metric_history(run.info.run_id, "fid")
    assert [m.step for m in history] == [160, 320] and all(m.value > 0 for m in history)
    assert {"fid_floor", "kid", "loss/d", "throughput/img_per_s"} <= set(run.data.metrics)
    for name in ("precision", "recall"):  # beside every FID: mode dropping and poor samples apart
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [160, 320]
        assert 0 <= run.data.metrics[name] <= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.json" in artifacts and "images" in artifacts
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert len(images) >= 2  # a sample grid at every evaluation
    assert "MLflow run 'r'" in stdout


@pytest.mark.slow
def test_run_page_shows_lineage_description_source_and_curves(trained):
    out, _ = trained
    client, run = mlflow_run(out)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    data, evaluator = inputs["mnist5k"], inputs["evaluator:digits"]
    fingerprint, sha = run.data.tags["dataset_fingerprint"], run.data.tags["evaluator_sha256"]
    assert data.dataset.digest == fingerprint[:32] and json.loads(data.dataset.profile)["fingerprint"] == fingerprint
    assert (
        json.loads(data.dataset.profile)["count"] == 5000
        and json.loads(data.dataset.source)["uri"] == "embedded:mnist5k"
    )
    assert [t.value for t in data.tags] == ["training"] and [t.value for t in evaluator.tags] == ["evaluation"]
    assert evaluator.dataset.digest == sha[:32]
    description = run.data.tags["mlflow.note.content"]
    assert (
        description.startswith("debug preset: class-conditional (10 classes) dcgan GAN at 28 px")
        and "embedded:mnist5k" in description
    )
    fid = client.get_metric_history(run.info.run_id, "fid")
    assert f"FID {fid[-1].value:.2f}" in description  # the result, written when the run ended
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "pipelines/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == commit == tags["git_commit"]
    # Curves at every logging step (every 5 steps of 16 images), FID at every evaluation.
    for name in ("loss/g", "loss/d", "d/real", "grad_norm/g", "grad_norm/d", "throughput/img_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert steps == [80, 160, 240, 320], (name, steps)
    assert [m.step for m in fid] == [160, 320]
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)


@pytest.mark.slow
def test_logged_generator_samples_any_batch_size(trained):
    import mlflow.pyfunc
    import pandas as pd

    out, _ = trained
    _, run = mlflow_run(out)
    mlflow.set_tracking_uri(f"sqlite:///{out.parent}/mlflow.db")
    for name in ("generator", "generator_best"):
        model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{name}")
        for n in (1, 7, 64):
            images = model.predict(pd.DataFrame([{"n": n, "seed": 5, "class": 3, "truncation": 0.0}]))
            assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    request = pd.DataFrame([{"n": 7, "seed": 5, "class": 3, "truncation": 0.0}])
    assert np.array_equal(model.predict(request), model.predict(request))  # same request, same images
    assert model.metadata.get_input_schema().input_names() == ["n", "seed", "class", "truncation"]


def test_existing_run_is_not_overwritten(saved_run, capfd):
    before = (latest(saved_run) / "state.pt").read_bytes()
    call(capfd, "train.py", *TRAIN, str(saved_run.parent), "--no-tracking").one_line(
        "already holds a run: pass --resume"
    )
    assert (latest(saved_run) / "state.pt").read_bytes() == before


@pytest.mark.slow
def test_resume_continues_the_same_run(trained, tmp_path):
    out, _ = trained
    saved = latest(out)
    step = json.loads((saved / "meta.json").read_text())["step"]
    proc = run("pipelines/train.py", *TRAIN, str(out.parent), "--resume", "--set", "train.total_kimg=0.64",
               *tracking_args(out))  # fmt: skip
    assert f"resuming from {saved} (step {step})" in proc.stdout
    client, tracked = mlflow_run(out)  # the same MLflow run continued
    assert tracked.info.status == "FINISHED"
    assert tracked.data.tags["resumed_from"] == f"{saved} (step {step})"
    assert [m.step for m in client.get_metric_history(tracked.info.run_id, "fid")] == [160, 320, 480, 640]
    assert tracked.data.tags["resumed_with.train.total_kimg"] == "0.64"
    meta = json.loads((latest(out) / "meta.json").read_text())
    assert meta["images_seen"] == 640


def test_resume_with_incompatible_config_fails_clearly(saved_run, capfd):
    refused = call(capfd, "train.py", *TRAIN, str(saved_run.parent), "--resume", "--set", "model.width=16",
                   "--no-tracking")  # fmt: skip
    refused.one_line("incompatible config: model.width: checkpoint has 8, config has 16")


@pytest.mark.slow
def test_refused_resume_leaves_the_mlflow_run_as_it_was(trained, capfd):
    """The incompatible config is refused before the run's MLflow run is reopened."""
    out, _ = trained
    _, before = mlflow_run(out)
    refused = call(capfd, "train.py", *TRAIN, str(out.parent), "--resume", "--set", "model.width=16",
                   *tracking_args(out))  # fmt: skip
    refused.one_line("incompatible config: model.width")
    _, after = mlflow_run(out)
    assert after.info.status == before.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time


def test_sample_npz_grid_and_same_seed_same_images(saved_run, tmp_path, capfd):
    ckpt = str(saved_run)  # a run folder samples its best checkpoint
    for name in ("a", "b"):
        assert call(capfd, "sample.py", "--checkpoint", ckpt, "--n", "25", "--seed", "3",
                    "--out", str(tmp_path / f"{name}.npz")).code == 0  # fmt: skip
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (25, 28, 28) and a["images"].dtype == np.uint8
    assert a["labels"].tolist() == [i % 10 for i in range(25)]
    assert np.array_equal(a["images"], b["images"])
    drawn = call(capfd, "sample.py", "--checkpoint", ckpt, "--class", "7", "--grid", str(tmp_path / "g.png"),
                 "--interp", str(tmp_path / "i.png"))  # fmt: skip
    assert drawn.code == 0, drawn.err
    assert (tmp_path / "g.png").stat().st_size > 100 and (tmp_path / "i.png").stat().st_size > 100


def test_sample_rejects_out_of_range_class(saved_run, tmp_path, capfd):
    best = checkpoint.find(str(saved_run)).best
    refused = call(capfd, "sample.py", "--checkpoint", best, "--class", "12", "--out", str(tmp_path / "x.npz"))
    refused.one_line("class label 12 is out of range")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("out-folder-missing", "--out /no/dir/x.npz: folder /no/dir does not exist"),
        ("seed-2**70", f"seed={2**70} is not allowed: must be in [0, {2**63 - 1}]"),
        ("truncation-nan", "truncation=nan is not allowed: must be a finite number > 0"),
        ("state-without-config", "state.pt: not a checkpoint of this project (it holds no config)"),
        ("corrupt-meta", "meta.json: corrupt meta.json"),
    ],
)
def test_sample_bad_input_gets_one_clear_line(saved_run, tmp_path, capfd, kind, message):
    """One line naming the flag or file, exit 2, nothing written, the checkpoint untouched."""
    import shutil

    ckpt = latest(saved_run)
    source, extra = str(ckpt), ["--out", str(tmp_path / "x.npz")]
    if kind == "out-folder-missing":
        extra = ["--out", "/no/dir/x.npz"]
    elif kind == "seed-2**70":
        extra += ["--seed", str(2**70)]
    elif kind == "truncation-nan":
        extra += ["--truncation", "nan"]
    elif kind == "state-without-config":
        state = torch.load(ckpt / "state.pt", weights_only=True)
        del state["config"]
        torch.save(state, tmp_path / "state.pt")
        source = str(tmp_path / "state.pt")
    else:
        shutil.copytree(ckpt, tmp_path / "ckpt")
        (tmp_path / "ckpt" / "meta.json").write_text('{"step": 2, "fid": ')  # torn by a full disk
        source = str(tmp_path / "ckpt")
    before = sorted(tmp_path.rglob("*"))
    refused = call(capfd, "sample.py", "--checkpoint", source, *extra)
    refused.one_line(message)
    if kind in ("state-without-config", "corrupt-meta"):
        assert source in refused.err  # names the file
    assert sorted(tmp_path.rglob("*")) == before and not Path("/no").exists()


def test_dry_run_prints_resolved_config(capfd):
    shown = call(capfd, "train.py", "--preset", "mlp", "--set", "optim.lr_g=1e-4", "--dry-run")
    assert shown.code == 0, shown.err
    cfg = json.loads(shown.out)
    assert cfg["model"]["family"] == "mlp" and cfg["optim"]["lr_g"] == 1e-4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--set", "optim.lr_g=-1"], "optim.lr_g=-1.0 is not allowed"),
        (["--set", "data.uri=/no/such/digits.npz"], "/no/such/digits.npz: no such file or folder"),
        (["--set", "data.resolution=48"], "data.resolution=48 is not allowed"),
        (["--set", "data.uri=s3:/bucket/digits.npz"], "data.uri=s3:/bucket/digits.npz: starts like a URI but is not"),
    ],
)
def test_bad_input_gets_one_clear_line(args, message, tmp_path, capfd):
    refused = call(capfd, "train.py", "--in-process", "--preset", "debug", *args, "--storage", str(tmp_path),
                   "--no-tracking")  # fmt: skip
    refused.one_line(message)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_storage_uri_with_one_slash_is_refused_not_made_a_local_folder(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused = call(capfd, "train.py", "--in-process", "--preset", "debug", "--storage", "s3:/bucket/runs",
                   "--no-tracking")  # fmt: skip
    refused.one_line("--storage s3:/bucket/runs: starts like a URI but is not one; write s3://bucket/runs")
    assert not list(tmp_path.iterdir())


def test_a_refused_command_is_one_line_and_exit_status_2_in_the_shell(tmp_path):
    """The process boundary itself: no traceback, no warning, the status the shell sees."""
    proc = subprocess.run([sys.executable, "pipelines/train.py", "--in-process", "--preset", "debug", "--set",
                           "data.uri=/no/such/digits.npz", "--storage", str(tmp_path), "--no-tracking"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr == "error: /no/such/digits.npz: no such file or folder (check the spelling and the bucket)\n"
    assert not list(tmp_path.iterdir())


def test_unreachable_tracking_server_stops_before_training(tmp_path, capfd):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = call(capfd, "train.py", "--in-process", "--preset", "debug", "--storage", str(tmp_path),
                   "--tracking-uri", f"http://127.0.0.1:{port}")  # fmt: skip
    refused.one_line(f"cannot reach the MLflow tracking server at http://127.0.0.1:{port}")
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written
