"""Starting and stopping the real services tests use: an MLflow server, an S3 server, ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
# What a training client must not need when artefacts are proxied by the server.
CLIENT_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(postgres: str, bucket_name: str, s3_server: str, port: int) -> dict:
    return {
        **os.environ,
        "BACKEND": postgres,
        "ARTIFACTS": f"s3://{bucket_name}/mlflow",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def start_server(env: dict, log_path: Path, script: str = "mlflow/serve_local.sh") -> subprocess.Popen:
    """A launcher in its own process group; returns once the server answers HTTP."""
    log = open(log_path, "a")
    proc = subprocess.Popen(["bash", script], cwd=ROOT, env=env, stdout=log, stderr=log,
                            start_new_session=True)  # fmt: skip
    log.close()
    url = f"http://127.0.0.1:{env['PORT']}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code < 500:  # 401 counts: it is up
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text()[-3000:])
        time.sleep(0.5)
    stop_server(proc)
    raise AssertionError("mlflow server did not come up in 90 s")


def stop_server(proc: subprocess.Popen) -> None:
    """The whole process group (the server's workers too), by its own id."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class FlakyS3:
    """An S3 API server (moto) on a port of its own that a test stops and starts again to
    make an outage; the buckets and objects outlive a restart (moto keeps them in process)."""

    def __init__(self, bucket: str) -> None:
        import boto3

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                   aws_secret_access_key="testing")  # fmt: skip
        self.client.create_bucket(Bucket=bucket)

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def down_for(self, seconds: float) -> float:
        """Stops the server for ``seconds``; returns how long it was really down."""
        self.stop()
        start = time.time()
        time.sleep(seconds)
        self.start()
        return time.time() - start


@contextlib.contextmanager
def served(url: str, model_uri: str, log_path):
    """`mlflow models serve` on loopback in its own process group; yields its base URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    log = open(log_path, "w")
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
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
            assert server.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


@contextlib.contextmanager
def local_cluster(state_dir: Path, **extra: str):
    """cluster/local_cluster.sh on free ports (a head and a worker node, 1 CPU each, token auth
    on), its nodes started with ``extra`` in their environment; yields the environment its env
    file gives a user. Stopped by the script; whatever its nodes' sessions left is killed by id,
    and the test fails on it."""
    env = {**os.environ, **extra, "STATE_DIR": str(state_dir), "RAY_PORT": str(free_port()),
           "DASHBOARD_PORT": str(free_port()), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    script = ["bash", "cluster/local_cluster.sh"]
    sessions = []
    try:
        started = subprocess.run([*script, "start"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        sessions = [int(p.read_text()) for p in (state_dir / "head.pid", state_dir / "worker.pid") if p.exists()]
        assert started.returncode == 0, started.stdout + started.stderr
        for line in (state_dir / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value
        yield env
    finally:
        subprocess.run([*script, "stop"], cwd=ROOT, env=env, capture_output=True, timeout=180)
        left = [p for sid in sessions for p in session_processes(sid)]
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        assert not left, f"cluster/local_cluster.sh stop left {left}"


class CrashingClient:
    """A real MLflow client whose process dies after ``writes`` alias writes (a crash between
    the writes of a promotion or rollback)."""

    def __init__(self, client, writes: int) -> None:
        self.client, self.writes = client, writes

    def set_registered_model_alias(self, *args) -> None:
        if self.writes == 0:
            raise KeyboardInterrupt
        self.writes -= 1
        self.client.set_registered_model_alias(*args)

    def __getattr__(self, name):
        return getattr(self.client, name)
