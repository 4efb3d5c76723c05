"""Promotion through the model registry, sampling a registered model, and serving it:
a real MLflow server (PostgreSQL, artefacts in the S3 server on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from services import ROOT, free_port

from gan.config import override, preset

pytestmark = pytest.mark.integration
NAME = "digits"


def train_run(url: str, run_name: str, kimg: float, tmp_path, overrides: tuple[str, ...] = ()) -> str:
    """A real (tiny) training run tracked on the server; returns its run id."""
    from gan.tracking import MLflowTracker, TrackingTarget
    from gan.trainer import LocalSession, Trainer

    cfg = override(
        preset("debug"), [f"train.total_kimg={kimg}", f"eval.every_kimg={kimg}", "eval.num_samples=300", *overrides]
    )
    tracker = MLflowTracker(TrackingTarget(url, "candidates", run_name))
    Trainer(cfg, LocalSession(str(tmp_path / run_name), quiet=True), tracker=tracker).train()
    return tracker.run_id


def cli(script: str, *args: str, url: str, check_rc: int | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, f"pipelines/{script}", *args, "--tracking-uri", url], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if check_rc is not None:
        assert result.returncode == check_rc, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def registry(mlflow_server_module, tmp_path_factory):
    """Two candidates on one server: a trained generator and a barely trained one."""
    url, bucket = mlflow_server_module
    tmp = tmp_path_factory.mktemp("registry")
    good = train_run(url, "good", 1.6, tmp)
    weak = train_run(url, "weak", 0.016, tmp)
    return url, bucket, good, weak


def aliases(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(url).get_registered_model(NAME).aliases


def test_promotion_gate_and_rollback(registry):
    from mlflow.tracking import MlflowClient

    url, _, good, weak = registry
    client = MlflowClient(url)
    common = ["--model-name", NAME, "--seeds", "2", "--num-samples", "300"]
    first = cli("promote.py", "--run", weak, *common, url=url, check_rc=0)  # no champion yet: any candidate wins
    assert "no champion yet" in first.stdout and aliases(url) == {"champion": "1"}

    dry = cli("promote.py", "--run", good, *common, "--dry-run", url=url, check_rc=0)
    assert "PROMOTE" in dry.stdout and len(client.search_model_versions(f"name = '{NAME}'")) == 1  # nothing changed

    better = cli("promote.py", "--run", good, *common, url=url, check_rc=0)
    assert "PROMOTE" in better.stdout and aliases(url) == {"champion": "2", "previous": "1"}
    promoted = client.get_model_version(NAME, "2")
    assert promoted.run_id == good and promoted.tags["promotion.decision"] == "promoted"
    for tag in ("dataset_fingerprint", "evaluator_sha256", "git_commit", "source_run", "promotion.fid"):
        assert promoted.tags[tag], tag
    assert "95% CI, 2 seeds" in promoted.tags["promotion.fid"]

    worse = cli("promote.py", "--version", "1", *common, url=url, check_rc=1)  # the weak one again: refused
    assert "REFUSE" in worse.stdout and aliases(url) == {"champion": "2", "previous": "1"}
    refused = client.get_model_version(NAME, "1")
    assert refused.tags["promotion.decision"] == "refused" and refused.tags["promotion.champion_version"] == "2"
    cand, champ = (float(refused.tags[k].split()[0]) for k in ("promotion.fid", "promotion.champion_fid"))
    assert cand > champ  # the evidence says why

    cli("promote.py", "--rollback", "--model-name", NAME, url=url, check_rc=0)
    assert aliases(url) == {"champion": "1", "previous": "2"}  # the previous champion is back
    cli("promote.py", "--rollback", "--model-name", NAME, url=url, check_rc=0)
    assert aliases(url) == {"champion": "2", "previous": "1"}  # and the rollback undoes itself

    version = client.get_model_version(NAME, "2")
    assert version.description.startswith("dcgan GAN generator") and version.tags["classes"] == ",".join(
        map(str, range(10))
    )
    import mlflow.models

    mlflow.set_tracking_uri(url)
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.metadata["config"]["model"]["family"] == "dcgan" and info.metadata["classes"] == list(range(10))
    assert info.signature is not None and info.saved_input_example_info is not None


def test_sampling_a_registered_model(registry, tmp_path):
    url, *_ = registry
    uri = f"models:/{NAME}@champion"
    for name in ("a", "b"):
        cli("sample.py", "--model", uri, "--n", "12", "--seed", "5", "--class", "3",
            "--out", str(tmp_path / f"{name}.npz"), "--grid", str(tmp_path / f"{name}.png"), url=url, check_rc=0)  # fmt: skip
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (12, 28, 28) and a["images"].dtype == np.uint8
    assert (a["labels"] == 3).all()
    np.testing.assert_array_equal(a["images"], b["images"])  # same seed, same images
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "models:/nope@champion"], "nope"),
        (["--model", f"models:/{NAME}@nope"], "nope"),
        (["--model", f"models:/{NAME}@champion", "--class", "12"], "class label 12 is out of range"),
    ],
)
def test_sampling_bad_input_gets_one_clear_line(registry, tmp_path, args, message):
    url, *_ = registry
    result = cli("sample.py", *args, "--out", str(tmp_path / "x.npz"), url=url, check_rc=2)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_promote_bad_input(registry):
    url, *_ = registry
    unknown = cli("promote.py", "--version", "1", "--model-name", "nope", url=url, check_rc=2)
    assert "no registered model 'nope'" in unknown.stderr
    missing = cli("promote.py", "--version", "99", "--model-name", NAME, url=url, check_rc=2)
    assert "has no version 99" in missing.stderr
    norun = cli("promote.py", "--run", "0" * 32, "--model-name", NAME, url=url, check_rc=2)
    assert "no run" in norun.stderr


def one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


def test_promote_refuses_too_few_samples_before_scoring(registry):
    url, _, good, _ = registry
    one_line(cli("promote.py", "--run", good, "--num-samples", "5", url=url, check_rc=2),
             "--num-samples=5 is not allowed: must be in [10, 100000]")  # fmt: skip


def test_promote_a_candidate_whose_data_is_gone(registry, s3_server, tmp_path):
    """Trained on digits in the S3 bucket that were deleted since: one line naming the URI,
    nothing registered."""
    import io
    import json

    import boto3
    from mlflow.tracking import MlflowClient

    from gan.config import DataConfig
    from gan.data import load_dataset

    url, bucket, *_ = registry
    digits = load_dataset(DataConfig())
    payload = io.BytesIO()
    np.savez(payload, images=digits.images[:400, 0].numpy(), labels=digits.labels[:400].numpy())
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="data/digits.npz", Body=payload.getvalue())
    data_uri = f"s3://{bucket}/data/digits.npz"
    options = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
    run = train_run(url, "orphan", 0.016, tmp_path, (f"data.uri={data_uri}", f"data.storage_options={options}"))
    s3.delete_object(Bucket=bucket, Key="data/digits.npz")
    result = cli("promote.py", "--run", run, "--model-name", "orphan", "--num-samples", "100", url=url, check_rc=2)
    one_line(result, f"{data_uri}: no such file or folder")
    assert not MlflowClient(url).search_registered_models("name = 'orphan'")


def test_names_with_a_quote(registry, tmp_path):
    """A run and a model named with a quote are found by name (filter strings quote them),
    promoted and sampled; a name with both kinds of quote is refused before any work."""
    from mlflow.tracking import MlflowClient

    url, *_ = registry
    run = train_run(url, "o'brien", 0.016, tmp_path)
    model = "o'brien-digits"
    cli("promote.py", "--run", run, "--model-name", model, "--seeds", "2", "--num-samples", "100", url=url,
        check_rc=0)  # fmt: skip
    assert MlflowClient(url).get_registered_model(model).aliases["champion"] == "1"
    cli("sample.py", "--model", f"models:/{model}@champion", "--n", "4", "--out", str(tmp_path / "x.npz"), url=url,
        check_rc=0)  # fmt: skip
    assert np.load(tmp_path / "x.npz")["images"].shape == (4, 28, 28)
    one_line(cli("promote.py", "--sweep", "o'brien", "--experiment", "candidates", url=url, check_rc=2),
             "no finished sweep \"o'brien\" in experiment 'candidates'")  # fmt: skip
    one_line(cli("promote.py", "--run", run, "--model-name", "say \"o'brien\"", url=url, check_rc=2),
             "holds both ' and \"")  # fmt: skip


def test_loading_needs_only_the_models_declared_requirements(registry):
    """Without the project on sys.path (no editable install, no repo), the registered model
    loads from its own bundled code and samples."""
    url, *_ = registry
    site = [p for p in sys.path if p.endswith("site-packages")][0]
    script = f"""
import sys
sys.path.append({site!r})  # packages only: -S skipped the .pth that installs this project
try:
    import gan
    raise SystemExit("the project is importable; the test would prove nothing")
except ImportError:
    pass
import mlflow.pyfunc, pandas as pd
mlflow.set_tracking_uri({url!r})
model = mlflow.pyfunc.load_model("models:/{NAME}@champion")
images = model.predict(pd.DataFrame([{{"n": 5, "seed": 1, "class": 7, "truncation": 0.0}}]))
print(images.shape, images.dtype)
"""
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(5, 28, 28) uint8" in result.stdout


def test_missing_artifacts_are_named(registry, s3_server, tmp_path):
    import boto3

    url, bucket, good, _ = registry
    # A third version whose files are then deleted from the bucket.
    run = train_run(url, "doomed", 0.016, tmp_path)
    cli("promote.py", "--run", run, "--model-name", "doomed", "--seeds", "2", "--num-samples", "100", url=url,
        check_rc=0)  # fmt: skip
    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if "generator.pt" in o["Key"]]
    from mlflow.tracking import MlflowClient

    source = MlflowClient(url).get_model_version("doomed", "1").source
    model_id = source.rsplit("/", 1)[-1]
    doomed = [k for k in keys if model_id in k]
    assert doomed, (source, keys)
    for key in doomed:
        s3.delete_object(Bucket=bucket, Key=key)
    result = cli(
        "sample.py", "--model", "models:/doomed@champion", "--out", str(tmp_path / "x.npz"), url=url, check_rc=2
    )
    assert "doomed" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_mlflow_models_serve_answers_with_images(registry, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    url, *_ = registry
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        request = {"dataframe_records": [{"n": 4, "seed": 9, "class": 7, "truncation": 0.0}]}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=request, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        images = np.asarray(response.json()["predictions"], dtype=np.uint8)
        assert images.shape == (4, 28, 28)
        mlflow.set_tracking_uri(url)
        local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame(request["dataframe_records"]))
        np.testing.assert_array_equal(images, local)  # the class-7 images, as sampled locally
        bad = requests.post(f"http://127.0.0.1:{port}/invocations", json={"dataframe_records": [{"n": 2, "class": 99}]},
                            timeout=60)  # fmt: skip
        assert bad.status_code >= 400 and "out of range" in bad.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
