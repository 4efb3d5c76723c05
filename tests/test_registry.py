"""Promotion through the model registry, sampling a registered model, and serving it:
a real MLflow server (PostgreSQL, artefacts in the S3 server on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import requests
from services import ROOT, served

from gan.core.config import override, preset

pytestmark = pytest.mark.integration
NAME = "digits"


def train_run(url: str, run_name: str, kimg: float, tmp_path, overrides: tuple[str, ...] = ()) -> str:
    """A real (tiny) training run tracked on the server; returns its run id."""
    from gan.registry.tracking import MLflowTracker, TrackingTarget
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

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
    from mlflow.tracking import MlflowClient

    url, *_ = registry
    unknown = cli("promote.py", "--version", "1", "--model-name", "nope", url=url, check_rc=2)
    assert "no registered model 'nope'" in unknown.stderr
    MlflowClient(url).create_registered_model("no-versions")
    missing = cli("promote.py", "--version", "99", "--model-name", "no-versions", url=url, check_rc=2)
    assert "has no version 99" in missing.stderr
    norun = cli("promote.py", "--run", "0" * 32, "--model-name", NAME, url=url, check_rc=2)
    assert "no run" in norun.stderr


def test_promotion_refuses_a_generator_that_copies_training_images(registry, digits):
    """A real registered model whose every sample is training image 0 (an MLP whose output
    layer is that image's bias): the gate refuses it with the evidence, however its FID."""
    import torch
    from mlflow.tracking import MlflowClient

    from gan.core.models import build_models
    from gan.registry import models as gan_registry

    url, *_ = registry
    client = MlflowClient(url)
    cfg = override(preset("debug"), ["model.family=mlp", "model.depth=0", "model.num_classes=0"])
    G = build_models(cfg.model, 28, 1)[0]
    with torch.no_grad():
        out = G.net[0]
        out.weight.zero_()
        out.bias.copy_((digits.images[0].flatten().float() / 127.5 - 1).clamp(-0.999, 0.999).atanh())
    run = client.create_run(client.get_experiment_by_name("candidates").experiment_id, run_name="copier")
    gan_registry.log_generator(url, run.info.run_id, "generator_best", G.state_dict(), cfg.to_json())
    # A model of its own with no champion yet, where any other candidate would win.
    refused = cli("promote.py", "--run", run.info.run_id, "--model-name", "copier", "--seeds", "2",
                  "--num-samples", "300", url=url, check_rc=1)  # fmt: skip
    assert "REFUSE" in refused.stdout and "100.0% of its samples are near-copies" in refused.stdout, refused.stdout
    assert client.get_registered_model("copier").aliases == {}
    (version,) = client.search_model_versions("name = 'copier'")
    assert version.tags["promotion.decision"] == "refused" and float(version.tags["promotion.copy_share"]) == 1.0
    assert version.tags["promotion.max_copy_share"] == "0.05"


def one_line(result: subprocess.CompletedProcess, message: str) -> None:
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


def test_promote_refuses_too_few_samples_before_scoring(registry):
    url, _, good, _ = registry
    one_line(cli("promote.py", "--run", good, "--num-samples", "5", url=url, check_rc=2),
             "--num-samples=5 is not allowed: must be in [10, 100000]")  # fmt: skip


def test_promote_a_candidate_whose_data_is_gone(registry, s3_server, tmp_path):
    """Trained on digits in the S3 bucket that were deleted since (the promoter names them, as
    promotion reads only what it is given): one line naming the URI, nothing registered."""
    import io
    import json

    import boto3
    from mlflow.tracking import MlflowClient

    from gan.core.config import DataConfig
    from gan.data.datasets import load_dataset

    url, bucket, *_ = registry
    digits = load_dataset(DataConfig())
    payload = io.BytesIO()
    every_12th = slice(None, None, 12)  # the digits are sorted by class: 417 images of all ten
    np.savez(payload, images=digits.images[every_12th, 0].numpy(), labels=digits.labels[every_12th].numpy())
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="data/digits.npz", Body=payload.getvalue())
    data_uri = f"s3://{bucket}/data/digits.npz"
    options = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
    run = train_run(url, "orphan", 0.016, tmp_path, (f"data.uri={data_uri}", f"data.storage_options={options}"))
    s3.delete_object(Bucket=bucket, Key="data/digits.npz")
    result = cli("promote.py", "--run", run, "--model-name", "orphan", "--num-samples", "100", "--data", data_uri,
                 "--data-options", options, url=url, check_rc=2)  # fmt: skip
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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nor a checkout on PYTHONPATH
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd="/", env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
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


def test_a_tampered_model_runs_no_code_where_it_is_sampled_or_promoted(registry, s3_server, tmp_path):
    """Whoever can write to the artefact store can change a model's code; sampling and
    promotion read only its weights (weights_only), so that code never runs there."""
    import boto3
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from gan.registry.models import logged_model_uri, register

    url, bucket, *_ = registry
    run_id = train_run(url, "tampered", 0.016, tmp_path)
    client = MlflowClient(url)
    model_uri = logged_model_uri(url, client.get_run(run_id), "generator_best")
    register(url, model_uri, "tampered", preset("debug"), {"source_run": run_id})
    s3 = boto3.client("s3", endpoint_url=s3_server)
    model_id = model_uri.rsplit("/", 1)[-1]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if model_id in o["Key"]]
    # The code MLflow runs at load (a copy also sits in the bundled package, code/gan/).
    (entry,) = [k for k in keys if k.endswith("/pyfunc_entry.py") and "/code/" not in k]
    marker = tmp_path / "code-from-the-store-ran"
    original = s3.get_object(Bucket=bucket, Key=entry)["Body"].read().decode()
    s3.put_object(Bucket=bucket, Key=entry, Body=f"open({str(marker)!r}, 'w').write('ran')\n{original}".encode())

    mlflow.set_tracking_uri(url)
    mlflow.pyfunc.load_model("models:/tampered/1")  # MLflow's loader runs it: the tamper works
    assert marker.exists()
    marker.unlink()
    cli("sample.py", "--model", "models:/tampered/1", "--n", "4", "--out", str(tmp_path / "x.npz"), url=url, check_rc=0)
    assert np.load(tmp_path / "x.npz")["images"].shape == (4, 28, 28)
    promoted = cli("promote.py", "--version", "1", "--model-name", "tampered", "--seeds", "2", "--num-samples", "100",
                   "--dry-run", url=url, check_rc=0)  # fmt: skip
    assert "PROMOTE" in promoted.stdout
    assert not marker.exists(), "the model's own code ran while sampling or promoting it"


def test_mlflow_models_serve_answers_with_images(registry, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    url, *_ = registry
    with served(url, f"models:/{NAME}@champion", tmp_path / "serve.log") as base:
        request = {"dataframe_records": [{"n": 4, "seed": 9, "class": 7, "truncation": 0.0}]}
        response = requests.post(f"{base}/invocations", json=request, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        images = np.asarray(response.json()["predictions"], dtype=np.uint8)
        assert images.shape == (4, 28, 28)
        mlflow.set_tracking_uri(url)
        local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(pd.DataFrame(request["dataframe_records"]))
        np.testing.assert_array_equal(images, local)  # the class-7 images, as sampled locally
        bad = requests.post(f"{base}/invocations", json={"dataframe_records": [{"n": 2, "class": 99}]}, timeout=60)
        assert bad.status_code == 400 and "out of range" in bad.json()["message"]


ABUSIVE = [
    [{"n": 10**8}],  # 10^8 images
    [{"n": 600, "seed": 1}, {"n": 600, "seed": 2}],  # over the limit together
    [{"n": 1}] * 1000,  # too many rows
    [{"n": -5}],
    [{"n": 2, "seed": -1}],
    [{"n": 2, "class": 99}],
    [{"n": 2, "truncation": -1.0}],
]


def test_mlflow_models_serve_keeps_answering_under_abusive_load(registry, tmp_path):
    """50 concurrent requests on loopback, a third of them abusive: each abusive one gets a
    400 with one line and no traceback; every well-formed one gets its images, the same as
    asked alone (sampling threads do not disturb each other); the server answers afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    url, *_ = registry
    good = [[{"n": 4, "seed": seed % 5, "class": 3, "truncation": 1e-12 if seed % 2 else 0.0}] for seed in range(34)]
    load = [("good", rows) for rows in good] + [("abusive", rows) for rows in ABUSIVE * 3][:16]
    with served(url, f"models:/{NAME}@champion", tmp_path / "serve.log") as base:

        def ask(rows):
            return requests.post(f"{base}/invocations", json={"dataframe_records": rows}, timeout=120)

        alone = {(r[0]["seed"], r[0]["truncation"]): ask(r).json()["predictions"] for r in good[:10]}
        with ThreadPoolExecutor(len(load)) as pool:
            answers = list(pool.map(lambda item: ask(item[1]), load))
        for (kind, rows), answer in zip(load, answers, strict=True):
            if kind == "good":
                assert answer.status_code == 200, answer.text[:500]
                assert answer.json()["predictions"] == alone[(rows[0]["seed"], rows[0]["truncation"])]
            else:
                assert answer.status_code == 400, (rows[:2], answer.status_code, answer.text[:500])
                message = answer.json()["message"]
                assert "\n" not in message and "Traceback" not in answer.text and "File " not in answer.text, message
        assert requests.get(f"{base}/ping", timeout=10).status_code == 200
        assert ask(good[0]).json()["predictions"] == alone[(0, 0.0)]
    assert "Traceback" not in (tmp_path / "serve.log").read_text()  # refusals are not server errors
