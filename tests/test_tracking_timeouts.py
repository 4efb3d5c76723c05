"""A tracking server that stops answering (accepts, or drops, and never replies) mid-run:
training reaches its last step in bounded time, with one warning line. The short /health
check that asks whether it is back honours MLflow's TLS settings."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from services import free_port, start_server, stop_server

GUARD_S = 300  # from the moment it goes silent; only a guard: the old tracker waited out
# every call's timeouts (about 48 s each with the defaults), some ten calls here


class BlackHoleProxy:
    """A TCP proxy on 127.0.0.1 to a real server, until ``drop()``: from then on it takes
    every byte and connection and answers nothing, as a server behind a network that drops
    packets. ``close()`` shuts every socket, by its own handle."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.dropping = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)  # the accept loop notices close()
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self) -> None:
        self.dropping.set()

    def close(self) -> None:
        self.closed.set()
        for sock in [self.listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.sockets.append(client)
            if self.dropping.is_set():
                continue  # held open, never read, never answered
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Forwards bytes; once dropping, swallows them (kept-alive connections go silent too)."""
        try:
            while data := source.recv(65536):
                if not self.dropping.is_set():
                    sink.sendall(data)
        except OSError:
            pass


@pytest.mark.integration
def test_a_server_that_stops_answering_never_stalls_training(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from gan.core.config import preset
    from gan.registry.tracking import HTTP_DEFAULTS, MLflowTracker, TrackingTarget
    from gan.runs.session import LocalSession
    from gan.runs.trainer import Trainer

    for key in HTTP_DEFAULTS:  # MLflow's HTTP settings are the tracker's defaults, as a user gets them
        monkeypatch.delenv(key, raising=False)
    env = {
        **os.environ,
        "BACKEND": f"sqlite:///{tmp_path}/mlflow.db",
        "ARTIFACTS": str(tmp_path / "artifacts"),
        "PORT": str(free_port()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    server = start_server(env, tmp_path / "server.log")
    proxy = BlackHoleProxy(int(env["PORT"]))

    class SilencedSession(LocalSession):
        evaluations = 0

        def report(self, metrics, snapshot):
            super().report(metrics, snapshot)
            self.evaluations += 1
            if self.evaluations == 1:  # after its checkpoint, before its log calls
                proxy.drop()

    cfg = preset("debug")  # two evaluations: the second after the server went silent
    session = SilencedSession(str(tmp_path / "run"), quiet=True)
    finished: dict = {}
    training = None
    try:
        tracker = MLflowTracker(TrackingTarget(proxy.url, "black-hole", "run"))
        trainer = Trainer(cfg, session, tracker=tracker)
        training = threading.Thread(target=lambda: finished.update(result=trainer.train()), daemon=True)
        training.start()
        while training.is_alive() and not proxy.dropping.wait(timeout=1):
            pass
        training.join(timeout=GUARD_S)
        assert not training.is_alive(), f"training still waits on the silent tracking server after {GUARD_S} s"
        assert session.evaluations == 2 and len(finished["result"].history) == 2  # its last step
        err = capsys.readouterr().err
        assert len([line for line in err.splitlines() if line.startswith("warning: MLflow at")]) == 1, err
        assert "stayed unreachable; not recorded in run" in err and "metrics at step 160" in err
        run = MlflowClient(f"http://127.0.0.1:{env['PORT']}").get_run(tracker.run_id)
        assert run.data.params["train.batch_size"] == "16"  # what was logged before it went silent stays
        assert run.info.status == "RUNNING" and "fid" not in run.data.metrics
    finally:
        proxy.close()  # a stalled old tracker now fails fast and its thread ends
        if training is not None:
            training.join(timeout=120)
        stop_server(server)


class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_the_health_check_trusts_a_private_ca_as_mlflow_does(tmp_path, monkeypatch):
    """TLS in front of basic auth with a private CA: MLFLOW_TRACKING_SERVER_CERT_PATH."""
    from gan.registry.tracking import TrackingError, check_reachable

    cert, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    server = HTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_port}"
    try:
        for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS", "REQUESTS_CA_BUNDLE"):
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(TrackingError, match="SSLError"):  # an unknown CA is refused
            check_reachable(url)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        check_reachable(url)
    finally:
        server.shutdown()
        server.server_close()
