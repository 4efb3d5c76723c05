"""Shared fixtures: a real S3 API server on 127.0.0.1 (moto), tiny configs, the digits."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path

import pytest

# Two lanes share two cores, and a Ray Train worker takes both: more of PyTorch's OpenMP threads
# are busy than there are cores. libgomp's threads spin while they wait for each other, and a
# step beside the other lane took 3 to 5 times as long as alone; passive threads sleep instead.
# Set before torch is imported; every process the tests start (Ray's too) inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gan.core.config import DataConfig, debug  # noqa: E402
from gan.data.datasets import load_dataset

# Modules that start a local Ray: one lane runs them, one test at a time. With two Ray
# instances on one host, Ray Train's placement-group cleaner cannot tell which is its own
# ("Found multiple active Ray instances"), and a trial of the two-node job never got its
# worker until the job timed out.
STARTS_RAY = ("test_faults", "test_tune", "test_ray_train", "test_mlflow_server", "test_ui", "test_gpu",
              "test_ray_hangs")  # fmt: skip
# Tests of those modules that never start Ray (refused before it, in-process, or only a
# tracking server): the other lane may take them.
WITHOUT_RAY = {
    "test_faults": ("test_bad_input_as_a_new_user_types_it", "test_bad_input_is_refused_before_ray_starts",
                    "test_bad_data_fails_in_one_line_and_small_memory", "test_empty_or_corrupt_dataset",
                    "test_unreachable_cluster_address", "test_named_sweep_clash_is_refused_before_ray_starts",
                    "test_secrets_in_the_config_are_refused_and_never_written",
                    "test_a_tracking_uri_with_a_password_is_refused_and_never_printed_with_it"),
    "test_mlflow_server": ("test_tracking_fills_the_gap_after_a_server_outage",
                           "test_production_server_requires_authentication",
                           "test_refused_credentials_stop_tracking_instead_of_queueing_for_ever",
                           "test_training_goes_on_while_the_server_is_down"),
    "test_ray_train": ("test_missing_bucket_fails_before_any_worker", "test_unreachable_storage_fails_before_any_worker",
                       "test_a_class_count_that_differs_from_the_data_fails_before_any_worker"),
    "test_ray_hangs": ("test_a_dashboard_address_is_refused_before_ray_starts",),
}  # fmt: skip
# The tests that start Ray in modules whose other tests do not.
ALSO_RAY = {"test_sweep": ("test_optuna_search_samples_the_space", "test_search_holds_trials_to_the_concurrency"),
            "test_cluster": ("test_a_job_without_the_clusters_token_is_refused",)}  # fmt: skip
# cluster/local_cluster.sh's two nodes, one cluster for the tests that ask for it: started for
# the first, stopped after the last (the Ray lane runs them one after another).
CLUSTER = "two_node_cluster"
# Fixtures that start a server; a test that uses one, even through another fixture, is an
# integration test, as is every test that may start Ray. `tests/run.sh --fast` runs neither.
SERVICES = {"s3_server", "bucket", "postgres", "mlflow_server", "mlflow_server_module", CLUSTER}
# The other modules by their time in the suite, slowest first, so that the other lane
# takes the long ones while the Ray lane runs and the lane that ends first takes what is left.
SLOWEST_OTHERS = ("test_registry", "test_trainer", "test_modern", "test_mlflow_server", "test_tracking_timeouts",
                  "test_promotion_trust", "test_streaming", "test_faults", "test_registry_store", "test_pipelines",
                  "test_ddp", "test_storage", "test_domains", "test_hostile_files", "test_capture", "test_serving",
                  "test_ray_train", "test_gpu_benchmark", "test_metrics")  # fmt: skip


def in_ray_lane(nodeid: str) -> bool:
    """Whether the test ``path::name[params]`` may start a local Ray."""
    path, _, test = nodeid.partition("::")
    module, name = Path(path).stem, test.partition("[")[0]
    if module in ALSO_RAY:
        return name in ALSO_RAY[module]
    return module in STARTS_RAY and name not in WITHOUT_RAY.get(module, ())


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the markers
def pytest_collection_modifyitems(items):
    for item in items:
        if in_ray_lane(item.nodeid) or SERVICES.intersection(item.fixturenames):
            item.add_marker(pytest.mark.integration)

    def rank(item) -> int:
        name = item.module.__name__
        if in_ray_lane(item.nodeid):  # first: the Ray lane, the longest, starts at once;
            return -2 if CLUSTER in item.fixturenames else -1  # the shared cluster's tests together
        return SLOWEST_OTHERS.index(name) if name in SLOWEST_OTHERS else len(SLOWEST_OTHERS)

    items.sort(key=rank)  # stable: tests keep their order within a module


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """The shared cluster stops after the last of the tests that use it (a start costs half a
    minute); its leftover processes fail that test's teardown."""
    cluster = item.config.stash.get(SHARED_CLUSTER, None)
    last = nextitem is None or CLUSTER not in nextitem.fixturenames
    if cluster is not None and CLUSTER in item.fixturenames and last:
        cluster.stop()


@pytest.hookimpl(optionalhook=True)  # plain pytest, without xdist, still runs the suite
def pytest_xdist_make_scheduler(config, log):
    """Whole modules per lane (module fixtures start once), and every test that may start
    Ray in one."""
    from xdist.scheduler import LoadScopeScheduling

    class OneRayLane(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if in_ray_lane(nodeid) else nodeid.split("::", 1)[0]

    return OneRayLane(config, log)


@pytest.fixture(autouse=True)
def restore_sys_path():
    """mlflow.pyfunc.load_model puts the model's bundled code first on sys.path; processes a
    later test in this worker spawns (DDP ranks) would import that copy of gan, not this one."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


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


def fresh_database(postgres: str) -> str:
    """A new, empty database on the test PostgreSQL: every tracking server starts clean."""
    import psycopg2

    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    dsn = postgres.replace("postgresql+psycopg2://", "postgresql://")
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    conn.close()
    return postgres.rsplit("/", 1)[0] + f"/{name}"


@contextlib.contextmanager
def running_mlflow_server(postgres: str, bucket_name: str, s3_server: str, log_dir):
    """`mlflow server` on a fresh PostgreSQL database with artefacts proxied to the S3
    server; yields its URL and stops its whole process group afterwards."""
    from services import free_port, server_env, start_server, stop_server

    env = server_env(fresh_database(postgres), bucket_name, s3_server, free_port())
    proc = start_server(env, log_dir / "server.log")
    try:
        yield f"http://127.0.0.1:{env['PORT']}"
    finally:
        stop_server(proc)


@pytest.fixture
def mlflow_server(bucket, s3_server, postgres, tmp_path):
    """Yields (url, bucket name)."""
    with running_mlflow_server(postgres, bucket[0], s3_server, tmp_path) as url:
        yield url, bucket[0]


@pytest.fixture(scope="module")
def mlflow_server_module(s3_server, postgres, tmp_path_factory):
    """One server (and bucket) for a whole test module; yields (url, bucket name)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    with running_mlflow_server(postgres, name, s3_server, tmp_path_factory.mktemp("mlflow")) as url:
        yield url, name


class SharedCluster:
    """cluster/local_cluster.sh's cluster (services.local_cluster), started on first use."""

    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir, self.extra_env = state_dir, env
        self.running: contextlib.ExitStack | None = None
        self.env: dict[str, str] = {}

    def start(self) -> dict[str, str]:
        if self.running is None:
            from services import local_cluster

            with contextlib.ExitStack() as stack:
                self.env = stack.enter_context(local_cluster(self.state_dir, **self.extra_env))
                self.running = stack.pop_all()
        return dict(self.env)

    def stop(self) -> None:
        running, self.running = self.running, None
        if running is not None:
            running.close()


SHARED_CLUSTER = pytest.StashKey[SharedCluster]()


@pytest.fixture(scope="session")
def _shared_cluster(request, s3_server, tmp_path_factory):
    cluster = SharedCluster(tmp_path_factory.mktemp("ray-cluster"), {"AWS_ENDPOINT_URL": s3_server})
    request.config.stash[SHARED_CLUSTER] = cluster
    yield cluster
    cluster.stop()


@pytest.fixture
def two_node_cluster(_shared_cluster):
    """A head and a worker node (1 CPU each), token auth on, trials' checkpoints in the S3
    server; yields the environment its env file gives a user. One cluster for every test that
    asks for it (a start and stop cost half a minute): they submit jobs that end, or run beside
    it, and none changes its nodes."""
    yield _shared_cluster.start()
