"""A real `mlflow server`: PostgreSQL backend, artefacts proxied to the S3 API server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from services import CLIENT_SECRETS, ROOT, free_port, server_env, start_server, stop_server

pytestmark = pytest.mark.integration


def test_tracking_fills_the_gap_after_a_server_outage(bucket, s3_server, postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    from gan.registry.tracking import MLflowTracker, TrackingTarget

    name, _ = bucket
    env = server_env(postgres, name, s3_server, free_port())
    url = f"http://127.0.0.1:{env['PORT']}"
    proc = start_server(env, tmp_path / "server.log")
    try:
        target = TrackingTarget(url, "outage", "run")
        tracker = MLflowTracker(target)
        tracker.log_metrics({"fid": 3.0}, step=1)
        stop_server(proc)
        started = time.monotonic()
        tracker.log_metrics({"fid": 2.0}, step=2)  # training goes on: queued, no exception
        assert time.monotonic() - started < 60 and len(tracker.pending) == 1
        # A worker Ray restarts now waits for the server instead of failing (a retry used up).
        restarted: dict = {}
        worker = threading.Thread(target=lambda: restarted.update(tracker=MLflowTracker(target, wait_s=300)))
        worker.start()
        worker.join(timeout=8)
        assert worker.is_alive()  # still waiting, not failed
        proc = start_server(env, tmp_path / "server.log")
        worker.join(timeout=120)
        assert restarted["tracker"].run_id == tracker.run_id  # it found its run again
        tracker.log_metrics({"fid": 1.0}, step=3)  # the gap is sent first
        assert tracker.pending == []
        tracker.close("FINISHED")
        client = MlflowClient(url)
        history = [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "fid")]
        assert sorted(history) == [(1, 3.0), (2, 2.0), (3, 1.0)]
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        stop_server(proc)


def test_ray_train_run_tracked_on_a_server_with_artifacts_in_s3(mlflow_server, s3_server, tmp_path):
    import boto3
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    url, bucket_name = mlflow_server
    # The training client holds no bucket credentials: artefacts go through the server.
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_SECRETS}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "pipelines/train.py", "--preset", "debug", "--storage", str(tmp_path / "runs"),
         "--name", "served", "--tracking-uri", url],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("gan").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "16"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid")] == [160, 320]
    assert len(client.list_artifacts(run.info.run_id, "images")) >= 2

    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/generator")
    for n in (1, 7, 64):
        images = model.predict(pd.DataFrame([{"n": n, "seed": 1, "class": 2, "truncation": 0.0}]))
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8

    s3 = boto3.client("s3", endpoint_url=s3_server)
    keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket_name, Prefix="mlflow/").get("Contents", [])]
    assert any(key.endswith("config.json") for key in keys)
    assert any(key.endswith(".png") for key in keys)
    assert any(key.endswith("generator.pt") for key in keys)


ADMIN_PASSWORD = "s3cret-Pa%ss-w0rd-for-test"  # a % broke the generated auth config
# The test database trusts loopback and ignores the password; it must still never be on a command line.
DB_PASSWORD = "fake-db-password-7d1e"


def production_env(postgres: str, name: str, s3_server: str, tmp_path: Path) -> dict:
    """Settings of mlflow/serve_production.sh for a fresh database and bucket prefix."""
    return {
        **server_env(postgres, name, s3_server, free_port()),
        "MLFLOW_BACKEND_URI": postgres.replace("//gan@", f"//gan:{DB_PASSWORD}@"),
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{name}/prod",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth%25.db",  # URL-encoded, as passwords often are
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-key-for-test",
        "HOST": "127.0.0.1",
        "WORKERS": "1",
    }


def test_production_server_requires_authentication(postgres, bucket, s3_server, tmp_path):
    import psutil

    name, _ = bucket
    password, db_password = ADMIN_PASSWORD, DB_PASSWORD
    env = production_env(postgres, name, s3_server, tmp_path)
    missing = {k: v for k, v in env.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    refused = subprocess.run(["bash", "mlflow/serve_production.sh"], cwd=ROOT, env=missing, capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    assert refused.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in refused.stderr

    assert "//gan:" in env["MLFLOW_BACKEND_URI"]
    proc = start_server(env, tmp_path / "prod.log", script="mlflow/serve_production.sh")
    try:
        api = f"http://127.0.0.1:{env['PORT']}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(api, timeout=10).status_code == 401
        assert requests.get(api, auth=("admin", "wrong"), timeout=10).status_code == 401
        assert requests.get(api, auth=("admin", password), timeout=10).status_code == 200
        server = [p for p in psutil.process_iter(["cmdline"]) if _in_group(p, proc.pid)]
        assert len(server) >= 2  # the launcher and mlflow's server processes
        for process in server:  # what any user on the machine sees in ps
            assert not any(db_password in arg for arg in process.info["cmdline"] or []), process.info["cmdline"]
        assert not list(Path("/tmp").glob("mlflow-auth-*.ini"))  # the server reads it by a descriptor
        os.kill(proc.pid, signal.SIGTERM)  # the script's own pid, as Kubernetes or systemd stop it
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # a guard: the server's workers stop first
        while _alive_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_in_group(proc.pid), "the server outlived the script's SIGTERM"
        with pytest.raises(ConnectionRefusedError):  # the port is free
            socket.create_connection(("127.0.0.1", int(env["PORT"])), timeout=5).close()
    finally:
        stop_server(proc)
    assert password not in (tmp_path / "prod.log").read_text()
    assert not list(Path("/tmp").glob("mlflow-auth-*.ini"))  # the generated config is gone


def test_refused_credentials_stop_tracking_instead_of_queueing_for_ever(postgres, bucket, s3_server, tmp_path,
                                                                      monkeypatch, capsys):  # fmt: skip
    """Credentials that stop working mid-run (a rotated password, revoked permissions):
    one error line, tracking stops, training never waits on a queue that cannot drain."""
    from mlflow.tracking import MlflowClient

    from gan.registry.tracking import MLflowTracker, TrackingTarget

    name, _ = bucket
    env = production_env(postgres, name, s3_server, tmp_path)
    proc = start_server(env, tmp_path / "prod.log", script="mlflow/serve_production.sh")
    try:
        url = f"http://127.0.0.1:{env['PORT']}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        tracker = MLflowTracker(TrackingTarget(url, "refused", "run"))
        tracker.log_metrics({"fid": 3.0}, step=1)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "rotated-away")  # MLflow reads it for every request
        tracker.log_metrics({"fid": 2.0}, step=2)
        tracker.log_metrics({"fid": 1.0}, step=3)
        assert tracker.pending == [] and tracker.refused.startswith("401")
        assert tracker.dropped == ["metrics at step 2", "metrics at step 3"]
        tracker.close("FINISHED")
        err = capsys.readouterr().err
        assert err.count("refused this run's credentials (401") == 2  # once when it stops, once at the end
        assert "metrics at step 2, metrics at step 3, status" in err
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        history = MlflowClient(url).get_metric_history(tracker.run_id, "fid")
        assert [(m.step, m.value) for m in history] == [(1, 3.0)]  # what was logged before stays
    finally:
        stop_server(proc)


def _in_group(process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid
    except ProcessLookupError:
        return False


def _alive_in_group(pgid: int) -> bool:
    import psutil

    processes = psutil.process_iter(["status"])
    return any(_in_group(p, pgid) and p.info["status"] != psutil.STATUS_ZOMBIE for p in processes)


def test_training_goes_on_while_the_server_is_down(bucket, s3_server, postgres, tmp_path):
    """The server stops after the 2nd evaluation and comes back after the 6th: training and
    checkpoints never wait for it, and afterwards the run holds every evaluation, FINISHED."""
    from mlflow.tracking import MlflowClient

    from gan.core.config import override, preset
    from gan.registry.tracking import MLflowTracker, TrackingTarget
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    name, _ = bucket
    env = server_env(postgres, name, s3_server, free_port())
    url = f"http://127.0.0.1:{env['PORT']}"
    server = {"proc": start_server(env, tmp_path / "server.log")}

    class OutageSession(LocalSession):
        evaluations = 0

        def report(self, metrics, snapshot):
            super().report(metrics, snapshot)  # the checkpoint lands first, server or not
            self.evaluations += 1
            if self.evaluations == 2:
                stop_server(server["proc"])
            if self.evaluations == 6:
                server["proc"] = start_server(env, tmp_path / "server.log")

    cfg = override(preset("debug"), ["train.total_kimg=1.6", "eval.every_kimg=0.16", "eval.num_samples=100"])
    try:
        tracker = MLflowTracker(TrackingTarget(url, "outage-training", "run"))
        session = OutageSession(str(tmp_path / "run"), quiet=True)
        result = Trainer(cfg, session, tracker=tracker).train()
        assert session.evaluations == 10 and len(result.history) == 10
        from gan.runs import checkpoint

        latest, _ = checkpoint.load(checkpoint.find(str(tmp_path / "run")).latest)
        assert len(latest["history"]) == 10  # every evaluation was checkpointed
        client = MlflowClient(url)
        steps = sorted(m.step for m in client.get_metric_history(tracker.run_id, "fid"))
        assert steps == [int(h["images_seen"]) for h in result.history]  # the gap was filled
        assert client.get_run(tracker.run_id).info.status == "FINISHED" and tracker.pending == []
    finally:
        stop_server(server["proc"])
