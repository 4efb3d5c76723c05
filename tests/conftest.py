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
