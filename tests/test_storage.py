"""Run storage: full URIs everywhere, schemes checked, one layout for a run's checkpoints."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest
import torch
from services import FlakyS3

from gan.core.config import debug
from gan.data.storage import Storage
from gan.runs import checkpoint


@pytest.mark.parametrize(
    "uri, message",
    [
        ("S3://bucket/runs", "schemes are lower case: s3://"),
        ("gs://bucket/runs", "unsupported scheme gs://"),
        ("hdfs://nn/runs", "unsupported scheme hdfs://"),
        ("s3:///runs", "no bucket name"),
        ("", "--storage is empty"),
        ("s3:/bucket/runs", "starts like a URI but is not one; write s3://bucket/runs"),
        ("s3:bucket/runs", "starts like a URI but is not one; write s3://bucket/runs"),
    ],
)
def test_a_bad_scheme_is_an_error_never_a_local_folder(uri, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        Storage.parse(uri)
    assert not any(tmp_path.iterdir()), "nothing may be created for a refused URI"


def test_local_storage_is_absolute_and_ray_paths_come_back_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Storage.parse("runs")
    assert local.uri == str(tmp_path / "runs") and not local.is_remote
    assert local.ray_args("sweep", "trials") == (f"{tmp_path}/runs/sweep/trials", None)
    assert local.full(f"{tmp_path}/runs/x") == f"{tmp_path}/runs/x"

    remote = Storage.parse("s3://bucket/runs/", "http://127.0.0.1:9")
    path, filesystem = remote.ray_args("sweep")
    assert path == "bucket/runs/sweep" and filesystem is not None  # Ray wants it without the scheme
    assert (
        remote.full("bucket/runs/sweep/t1/checkpoint_step00000010")
        == "s3://bucket/runs/sweep/t1/checkpoint_step00000010"
    )
    assert remote.options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


def test_claim_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    storage = Storage.open(str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="nothing to resume: no run 'r'"):
        storage.claim("r", resume=True)
    storage.claim("r", resume=False)
    storage.write(storage.join("r", "checkpoint_step00000001", "meta.json"), b"{}")
    with pytest.raises(ValueError, match="already holds a sweep: pass --resume"):
        storage.claim("r", resume=False, what="sweep")
    storage.claim("r", resume=True)


def test_s3_storage_is_checked_and_written_over_http(bucket, s3_server):
    name, _ = bucket
    with pytest.raises(ValueError, match="bucket s3://no-such-bucket-gan at http://127.0.0.1"):
        Storage.open("s3://no-such-bucket-gan/runs", s3_server)
    storage = Storage.open(f"s3://{name}/runs", s3_server)
    assert not storage.exists("sweep")
    storage.write(storage.join("sweep", "summary.txt"), b"table")
    assert storage.exists("sweep")
    assert storage.filesystem().cat_file(storage.join("sweep", "summary.txt")) == b"table"


@pytest.mark.integration  # an S3 server of its own, stopped and started again
def test_ray_writes_wait_out_a_short_storage_outage(monkeypatch):
    """Ray Train ends a run when its controller fails to write one snapshot: the filesystem
    it is given, as a worker unpickles it too, waits until the S3 server is back."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    s3 = FlakyS3("outage")
    _, filesystem = Storage.open("s3://outage/runs", s3.endpoint).ray_args()
    filesystem = pickle.loads(pickle.dumps(filesystem))
    s3.stop()
    thread = threading.Thread(target=lambda: (time.sleep(10), s3.start()), daemon=True)
    thread.start()
    try:
        with filesystem.open_output_stream("outage/runs/checkpoint_manager_snapshot.json") as f:
            f.write(b'{"checkpoints": []}')
        thread.join(timeout=30)
        body = s3.client.get_object(Bucket="outage", Key="runs/checkpoint_manager_snapshot.json")
        assert body["Body"].read() == b'{"checkpoints": []}'
    finally:
        thread.join(timeout=30)
        s3.stop()


def _save(run, step: int, fid: float, options=None) -> None:
    state = {"loop": {"step": step}, "w": torch.full((2,), float(step)), "config": debug().to_json()}
    meta = {"step": step, "images_seen": step * 16, "fid": fid}
    checkpoint.save(f"{run}/{checkpoint.dir_name(step)}", state, meta, options, grid_png=b"png")


def test_find_tells_latest_from_best_and_skips_torn_checkpoints(tmp_path):
    run = str(tmp_path / "run")
    assert checkpoint.find(run) == checkpoint.Found(None, None, ())
    for step, fid in ((10, 50.0), (20, 30.0), (30, 40.0)):
        _save(run, step, fid)
    (tmp_path / "run" / checkpoint.dir_name(40)).mkdir()  # a checkpoint being written: no meta.json yet
    (tmp_path / "run" / checkpoint.dir_name(40) / "state.pt").write_bytes(b"partial")
    found = checkpoint.find(run)
    assert found.latest.endswith("checkpoint_step00000030") and found.best.endswith("checkpoint_step00000020")
    assert len(found.all) == 3
    # A run folder loads as its best checkpoint.
    state, meta = checkpoint.load(run)
    assert state["loop"]["step"] == 20 and meta["fid"] == 30.0
    assert json.loads((tmp_path / "run/checkpoint_step00000030/meta.json").read_text())["step"] == 30
    assert (tmp_path / "run/checkpoint_step00000030/grid.png").read_bytes() == b"png"


def test_the_best_and_the_newest_that_load(tmp_path):
    """A torn state.pt (the best by FID and the newest) is skipped with a line saying so."""
    run = str(tmp_path / "run")
    for step, fid in ((10, 50.0), (20, 30.0)):
        _save(run, step, fid)
    torn = tmp_path / "run" / checkpoint.dir_name(20) / "state.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    said = []
    for load in (checkpoint.load_best, checkpoint.load_latest):
        state, uri = load(run, say=lambda line, **_: said.append(line))
        assert state["loop"]["step"] == 10 and uri.endswith(checkpoint.dir_name(10))
    assert said[0].startswith(f"warning: skipping a checkpoint that does not load: {torn.parent}")
    assert said[1] == f"falling back to {run}/{checkpoint.dir_name(10)}, the best checkpoint that loads"
    torn.parent.with_name(checkpoint.dir_name(10)).joinpath("state.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint under .* loads"):
        checkpoint.load_best(run, say=lambda *_, **__: None)


def test_find_returns_full_uris_on_s3(bucket, s3_server):
    name, options = bucket
    run = f"s3://{name}/runs/r"
    _save(run, 10, 9.0, options)
    found = checkpoint.find(run, options)
    assert found.best == f"s3://{name}/runs/r/checkpoint_step00000010"
    assert checkpoint.load(found.best, options)[1]["fid"] == 9.0

    # Another process (Ray's workers and controller) writes a better one and deletes this:
    import s3fs

    other = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    other.rm(f"{name}/runs/r/checkpoint_step00000010", recursive=True)
    _save(f"s3://{name}/runs/other", 20, 5.0, options)
    other.copy(f"{name}/runs/other/checkpoint_step00000020", f"{name}/runs/r/checkpoint_step00000020", recursive=True)
    assert checkpoint.find(run, options).best == f"s3://{name}/runs/r/checkpoint_step00000020"


def test_a_node_local_folder_is_refused_on_a_cluster_of_several_nodes(tmp_path):
    local = Storage.parse(str(tmp_path / "runs"))
    local.check_cluster(1)  # one node: its own disk is everyone's
    with pytest.raises(ValueError, match="cluster has 2 nodes .* --storage s3://bucket/prefix, or --shared-storage"):
        local.check_cluster(2)
    Storage.parse(str(tmp_path / "runs"), shared=True).check_cluster(8)
    Storage.parse("s3://bucket/runs").check_cluster(8)


def test_nothing_is_kept_in_the_temporary_copy_of_a_jobs_working_dir(tmp_path, monkeypatch):
    """Under `ray job submit --working-dir .` the entrypoint runs in Ray's copy of the
    folder, deleted when the job ends: relative storage and SQLite paths are refused there
    (tests/test_tune.py submits a real job for --storage)."""
    from gan.data.storage import JOB_CONFIG_ENV
    from gan.registry.tracking import resolve_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"  # not a job: absolute, kept
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    with pytest.raises(ValueError, match=r"MLflow store sqlite:///mlflow.db is inside Ray's temporary copy.*\$PWD"):
        resolve_uri("sqlite:///mlflow.db")
    with pytest.raises(ValueError, match="--storage runs is inside Ray's temporary copy"):
        Storage.parse("runs")
    assert resolve_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert Storage.parse("/srv/runs").uri == "/srv/runs"
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))  # a job without --working-dir
    assert Storage.parse("runs").uri == f"{tmp_path}/runs"


WRITERS = {
    "state file": "from gan.data.storage import Storage; Storage.parse(folder).write(target, data)",
    "evaluator": "from gan.evaluation.evaluator_file import write; write(target, data, {})",
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_state_file_is_replaced_whole_or_not_at_all_when_the_disk_fills(tmp_path, writer):
    """population.json, the sweep's report and a rebuilt evaluator.pt: with the file size
    limited (a full disk, as a process sees it) the write fails and the previous content
    stays, with no partial file left beside it."""
    import subprocess
    import sys

    target = tmp_path / "population.json"
    target.write_text('{"round": 1}')
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
folder, target, data = {str(tmp_path)!r}, {str(target)!r}, b"x" * (1 << 20)
try:
    {WRITERS[writer]}
except (OSError, ValueError) as err:
    print("refused", err)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("refused"), proc.stdout + proc.stderr[-2000:]
    assert target.read_text() == '{"round": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["population.json"]
