"""Shared fixtures: a real S3 API server on 127.0.0.1 (moto), tiny configs, the digits."""

from __future__ import annotations

import os
import uuid

import pytest

from gan.config import DataConfig, debug
from gan.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset(DataConfig())


@pytest.fixture
def tiny_cfg():
    return debug()


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API server on loopback, reached over real HTTP like a bucket would be."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket; returns (name, storage_options for fsspec/s3fs)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name, {"client_kwargs": {"endpoint_url": s3_server}}


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server on 127.0.0.1 (Debian's binaries), stopped by its own pid file."""
    import glob
    import shutil
    import socket
    import subprocess
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL server binaries not found: tests/run.sh installs Debian's postgresql package")
    bindir = bins[-1]
    # initdb refuses to run as root; run the server as the postgres user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="gan-pg-")
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = f"{root}/data"

    def pg(*args):
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(f"{bindir}/initdb", "-D", data, "-U", "gan", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    pg(f"{bindir}/pg_ctl", "-D", data, "-o", options, "-l", f"{root}/log", "-w", "start")
    try:
        pg(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "gan", "mlflow")
        yield f"postgresql+psycopg2://gan@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
