"""What promotion reads and writes when the store is not to be trusted: a model's config
names data and an evaluator, but promote.py reads only what its user names; two promote.py
processes at once end with one champion; a rollback that crashed long ago is not finished
over a registry that has moved on. Real promote.py processes on a SQLite tracking store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from services import ROOT, CrashingClient

from gan.core.config import override, preset
from gan.core.models import build_models
from gan.registry import models as registry
from gan.registry import promotion

pytestmark = pytest.mark.integration  # promote.py processes, an HTTP server: minutes
DEBUG = preset("debug")
SCORING = ["--seeds", "2", "--num-samples", "100"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, client): one SQLite file, which several processes share like a server."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    client.create_experiment("candidates", artifact_location=(root / "artifacts").as_uri())
    return uri, client


def logged_run(store, cfg=DEBUG, experiment: str = "candidates", best_fid: float | None = None) -> tuple[str, str]:
    """(run id, models:/ URI) of a run that logged a generator (the same weights every time)
    with ``cfg`` as its config; finished with ``best_fid`` when given."""
    uri, client = store
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id).info.run_id
    torch.manual_seed(0)
    G = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)[0]
    model_uri = registry.log_generator(uri, run_id, "generator_best", G.state_dict(), cfg.to_json())
    if best_fid is not None:
        client.log_metric(run_id, "best_fid", best_fid)
        client.set_terminated(run_id, "FINISHED")
    return run_id, model_uri


def registered(store, name: str, cfg=DEBUG) -> str:
    uri, _ = store
    run_id, model_uri = logged_run(store, cfg)
    return str(registry.register(uri, model_uri, name, cfg, {"source_run": run_id}).version)


def promote_py(store, *args: str) -> subprocess.CompletedProcess:
    uri, _ = store
    return subprocess.run([sys.executable, "pipelines/promote.py", *args, "--tracking-uri", uri], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def one_line(result: subprocess.CompletedProcess, rc: int, message: str) -> None:
    assert result.returncode == rc, result.stdout[-3000:] + result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]


def aliases(store, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in store[1].get_registered_model(name).aliases.items()}


@pytest.fixture
def data_server(tmp_path, digits):
    """(URI, requests): 417 of the digits as an .npz on an HTTP server on loopback that
    records every request, as a bucket's access log would."""
    folder = tmp_path / "served"
    folder.mkdir()
    every_12th = slice(None, None, 12)  # the digits are sorted by class: all ten
    np.savez(folder / "digits.npz", images=digits.images[every_12th, 0].numpy(),
             labels=digits.labels[every_12th].numpy())  # fmt: skip
    requests: list[str] = []

    class Recording(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format, *args) -> None:
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recording)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/digits.npz", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def booby_trapped_network(tmp_path):
    """(path, marker): a TorchScript feature network whose loading creates ``marker`` (its
    __setstate__ runs at torch.jit.load): code that would run on the promoting machine."""
    marker = tmp_path / "network-from-the-store-ran"

    class Trapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.marker = str(marker)
            self.touched = torch.zeros(1, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().flatten(1)

        @torch.jit.export
        def __getstate__(self) -> tuple[str, bool]:
            return self.marker, self.training

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]) -> None:
            self.marker, self.training = state
            self.touched = torch.from_file(self.marker, shared=True, size=1)  # creates the file

    path = tmp_path / "features.pt"
    torch.jit.script(Trapped()).save(str(path))
    marker.unlink(missing_ok=True)  # scripting ran __setstate__ too
    torch.jit.load(str(path))
    assert marker.exists(), "the trap does not work: the test would prove nothing"
    marker.unlink()
    return str(path), marker


@pytest.mark.parametrize("how", ["first promotion", "dry run", "best of experiment", "registered version"])
def test_a_model_naming_data_and_a_network_the_promoter_did_not_give_is_refused_before_anything_is_read(
    store, data_server, booby_trapped_network, how
):
    """Whoever can log a run or register a version writes its config: promotion must not
    fetch its data URI with the promoter's credentials, nor run its network, with no champion
    to compare with, under --dry-run, through --best-of-experiment or --version."""
    _, client = store
    data_uri, requests = data_server
    network, marker = booby_trapped_network
    cfg = override(DEBUG, [f"data.uri={data_uri}", "eval.backbone=torchscript", f"eval.backbone_uri={network}"])
    name = f"trust-{how.replace(' ', '-')}"
    if how == "registered version":
        version = registered(store, name, cfg)
        pick = ["--version", version]
    elif how == "best of experiment":
        logged_run(store, cfg, experiment=name, best_fid=0.5)  # the lowest FID: the one picked
        pick = ["--best-of-experiment", name]
    else:
        pick = ["--run", logged_run(store, cfg)[0], *(["--dry-run"] if how == "dry run" else [])]

    refused = promote_py(store, *pick, "--model-name", name, *SCORING)
    assert requests == [], "promotion fetched the data the stored config names"
    assert not marker.exists(), "promotion ran the network the stored config names"
    one_line(refused, 2, f"its config names data.uri={data_uri} and this promotion was given no --data")
    assert f"pass --data {data_uri} if you trust it" in refused.stderr
    if how == "first promotion":  # the data trusted, the network not yet
        refused = promote_py(store, *pick, "--model-name", name, *SCORING, "--data", data_uri)
        one_line(refused, 2, f"eval.backbone_uri={network} and this promotion was given no --backbone-uri")

    assert requests == [], "promotion fetched the data the stored config names"
    assert not marker.exists(), "promotion ran the network the stored config names"
    if how == "registered version":
        assert aliases(store, name) == {}
        assert not any(k.startswith("promotion.") for k in client.get_model_version(name, version).tags)
    else:
        assert not client.search_registered_models(f"name = '{name}'")  # nothing registered


def test_the_champions_config_is_held_to_the_same_rule(store, data_server):
    """A champion registered with data the promoter did not name: refused before either model
    is scored, and its data is never fetched."""
    data_uri, requests = data_server
    name = "trust-champion"
    champion = registered(store, name, override(DEBUG, [f"data.uri={data_uri}"]))
    store[1].set_registered_model_alias(name, registry.CHAMPION, champion)
    run_id, _ = logged_run(store)  # the embedded digits: nothing to name
    refused = promote_py(store, "--run", run_id, "--model-name", name, *SCORING)
    one_line(refused, 2, f"the champion, version {champion}: its config names data.uri={data_uri} and")
    assert requests == [] and aliases(store, name) == {"champion": champion}
    assert len(store[1].search_model_versions(f"name = '{name}'")) == 1  # the candidate was not registered


def test_data_the_promoter_names_is_read_from_there(store, data_server):
    data_uri, requests = data_server
    run_id, _ = logged_run(store, override(DEBUG, [f"data.uri={data_uri}"]))
    promoted = promote_py(store, "--run", run_id, "--model-name", "trust-named", *SCORING, "--data", data_uri)
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    assert aliases(store, "trust-named") == {"champion": "1"} and "/digits.npz" in requests


RACER = """
import os, runpy, sys, time
from gan.registry import promotion

barrier, decide = sys.argv.pop(1), promotion.decide

def decide_at_the_barrier(*args, **kwargs):
    # Both processes have scored their candidates and written nothing: from here they race.
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.time() + 300
    while len(os.listdir(barrier)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    return decide(*args, **kwargs)

promotion.decide = decide_at_the_barrier
sys.argv[0] = "pipelines/promote.py"
runpy.run_path("pipelines/promote.py", run_name="__main__")
"""


def test_two_promote_processes_at_once_end_with_one_champion_and_one_refusal(store, tmp_path):
    """Two real promote.py processes, each with a candidate that would win on its own (no
    champion yet), wait for each other after scoring, then both write: one becomes champion,
    the other is refused in one line saying the champion moved, and nothing else changed."""
    uri, client = store
    name = "trust-race"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    runs = [logged_run(store)[0] for _ in range(2)]
    racers = []
    try:
        for run_id in runs:
            command = [sys.executable, "-c", RACER, str(barrier), "--run", run_id, "--model-name", name, *SCORING]
            racers.append(subprocess.Popen([*command, "--tracking-uri", uri], cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, start_new_session=True))  # fmt: skip
        outputs = [racer.communicate(timeout=600) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                os.killpg(racer.pid, signal.SIGKILL)
                racer.wait()
    assert len(os.listdir(barrier)) == 2  # both reached the writes
    codes = [racer.returncode for racer in racers]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    stderr = outputs[loser][1]
    assert "@champion moved from version - to 1 while the candidate was scored; nothing changed" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    (version,) = client.search_model_versions(f"name = '{name}'")  # the loser registered nothing
    assert version.run_id == runs[winner] and aliases(store, name) == {"champion": "1"}
    assert not client.search_registered_models(f"name = '{name}{promotion.LOCK_SUFFIX}'")  # the lock is released


def crashed_rollback(store, name: str) -> None:
    """Versions 1, 2, 3 (the same weights); a rollback from 2 to 1 that died after moving
    @champion, leaving @rolling-back on 2."""
    _, client = store
    for _ in range(3):
        registered(store, name)
    client.set_registered_model_alias(name, registry.PREVIOUS, "1")
    client.set_registered_model_alias(name, registry.CHAMPION, "2")
    with pytest.raises(KeyboardInterrupt):
        promotion.rollback(CrashingClient(client, 2), name, dry_run=False)
    assert aliases(store, name) == {"champion": "1", "previous": "1", "rolling-back": "2"}


def test_a_promotion_clears_a_crashed_rollback_and_a_later_rollback_undoes_the_promotion(store, capsys):
    uri, client = store
    name = "trust-stale-promoted"
    crashed_rollback(store, name)
    candidate = promotion.Candidate(f"models:/{name}/3", "", "3", "version 3")
    # Version 3 has the champion's weights: a tie, which margin 0 promotes.
    assert promotion.promote(client, candidate, name, promotion.Scorer(uri, 2, None), 0.0, 1.0, False) == 0
    assert aliases(store, name) == {"champion": "3", "previous": "1"}
    assert promotion.rollback(client, name, dry_run=False) == 0
    assert aliases(store, name) == {"champion": "1", "previous": "3"}  # the promotion undone, not the old rollback
    assert promotion.ROLLING_BACK_TO not in client.get_model_version(name, "2").tags


def test_a_stale_rolling_back_does_not_hijack_a_later_rollback(store, capsys):
    """The crashed rollback's alias is still there when the aliases have moved (by hand,
    or by a release that did not clear it): a rollback warns, clears it and rolls back."""
    _, client = store
    name = "trust-stale-moved"
    crashed_rollback(store, name)
    client.set_registered_model_alias(name, registry.CHAMPION, "3")
    capsys.readouterr()
    assert promotion.rollback(client, name, dry_run=False) == 0
    assert aliases(store, name) == {"champion": "1", "previous": "3"}
    warning = capsys.readouterr().err
    assert "version 2 has a stale @rolling-back (a rollback to version 1 that crashed" in warning, warning
    assert len(warning.strip().splitlines()) == 1


def test_the_alias_lock_of_a_dead_process_is_taken_over_and_a_live_ones_is_waited_for(store, monkeypatch, capsys):
    _, client = store
    name = "trust-lock"
    registered(store, name)
    registered(store, name)
    client.set_registered_model_alias(name, registry.PREVIOUS, "1")
    client.set_registered_model_alias(name, registry.CHAMPION, "2")
    dead = subprocess.Popen(["true"])  # a pid that is free once it exits
    dead.wait()
    lock = name + promotion.LOCK_SUFFIX
    client.create_registered_model(lock, tags={**promotion._owner(), "pid": str(dead.pid), "what": "rollback"})
    assert promotion.rollback(client, name, dry_run=False) == 0  # at once: no waiting for the stated age
    assert f"its process {dead.pid} is gone" in capsys.readouterr().err
    assert aliases(store, name) == {"champion": "1", "previous": "2"}

    client.create_registered_model(lock, tags={**promotion._owner(), "what": "rollback"})  # this live process
    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 1)
    with pytest.raises(registry.RegistryError, match=r"another promotion or rollback \(rollback on .*\) has held"):
        promotion.rollback(client, name, dry_run=False)
    assert aliases(store, name) == {"champion": "1", "previous": "2"}  # nothing changed
    client.delete_registered_model(lock)
