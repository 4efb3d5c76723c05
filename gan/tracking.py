"""MLflow run tracking behind a small interface; the only module that imports mlflow for runs.

Rank 0 gets an ``MLflowTracker``, every other rank a ``NullTracker``. A run is found
again by its name (a tag), so a resumed or restarted training continues its own MLflow
run instead of starting a new one. The local default is a SQLite store
(``sqlite:///mlflow.db``) with artefacts in ``./mlartifacts``; open it with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_NAME_TAG = "gan.run_name"
STOPPED_TAG = "sweep.stopped_early"
STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message names the URI."""


@dataclass(frozen=True)
class TrackingTarget:
    """Where a run is tracked: enough for any process (a Ray worker too) to find it."""

    uri: str
    experiment: str
    run_name: str
    parent_run_id: str = ""
    """A sweep's trials are child runs of the sweep's run."""

    def child(self, run_name: str, parent_run_id: str) -> TrackingTarget:
        return TrackingTarget(self.uri, self.experiment, run_name, parent_run_id)


class Tracker:
    """The tracking interface. This base logs nothing: it is what ranks that do not log,
    and runs without tracking, get."""

    run_id = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, png: bytes, key: str, step: int) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def log_artifact(self, data: bytes, name: str) -> None: ...
    def backfill(self, history: list[dict[str, float]]) -> None: ...
    def log_generator(self, G_ema_state: dict, config_json: str, name: str) -> None: ...
    def close(self, status: str) -> None: ...


NullTracker = Tracker


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local SQLite store. Relative
    sqlite paths become absolute, so Ray workers (in other folders) find the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def prepare(target: TrackingTarget) -> None:
    """On the driver, before any training: reachable, and the experiment exists (a
    local SQLite store keeps its artefacts in ./mlartifacts beside it)."""
    from mlflow.tracking import MlflowClient

    check_reachable(target.uri)
    client = MlflowClient(target.uri)
    try:
        if client.get_experiment_by_name(target.experiment) is None:
            location = None
            if target.uri.startswith("sqlite:///"):
                store = Path(target.uri[len("sqlite:///") :])
                location = (store.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
            client.create_experiment(target.experiment, artifact_location=location)
    except Exception as err:  # the store's own errors vary by backend
        raise TrackingError(f"cannot use MLflow tracking at {target.uri}: {type(err).__name__}: {err}") from None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI, before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as err:
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri}: {type(err).__name__}") from None
    if response.status_code >= 400:
        raise TrackingError(f"the MLflow tracking server at {uri} answered {response.status_code} to /health")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# A server that goes away mid-run must not stall training for minutes per call
# (MLflow's defaults retry 7 times with exponential backoff). Users can override these.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


class MLflowTracker(Tracker):
    """Logs one run. A call that fails (server unreachable) is queued and retried before
    the next one, so a gap is filled once the server is back; what is still unsent when
    the run closes is reported, never dropped silently (checkpoints keep the history)."""

    def __init__(self, target: TrackingTarget, tags: dict[str, Any] | None = None) -> None:
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.target = target
        self.pending: list[tuple[str, Any, tuple]] = []
        prepare(target)
        self.client = MlflowClient(target.uri)
        try:
            experiment_id = self.client.get_experiment_by_name(target.experiment).experiment_id
            found = _find_run(self.client, experiment_id, target.run_name)
        except Exception as err:  # the store's own errors vary by backend
            raise TrackingError(f"cannot use MLflow tracking at {target.uri}: {type(err).__name__}: {err}") from None
        # Evaluations the run already holds: a restarted worker evaluates them again.
        self.logged_steps: set[int] = set()
        if found:
            self.run_id = found[0].info.run_id
            self.logged_params = dict(found[0].data.params)
            if STOPPED_TAG not in found[0].data.tags:  # a trial ASHA stopped stays stopped
                self.client.update_run(self.run_id, status="RUNNING")
            self.logged_steps = {m.step for m in self.client.get_metric_history(self.run_id, "fid")}
        else:
            identity = {RUN_NAME_TAG: target.run_name}
            if target.parent_run_id:
                identity["mlflow.parentRunId"] = target.parent_run_id
            run = self.client.create_run(experiment_id, run_name=target.run_name, tags=identity)
            self.run_id, self.logged_params = run.info.run_id, {}
        self.steps_before_start = frozenset(self.logged_steps)
        self.set_tags({"git_commit": git_commit(), **(tags or {})})

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # A resumed run keeps its params; a changed value (a longer budget, say) becomes a tag.
        new = {k: str(v) for k, v in params.items() if k not in self.logged_params}
        changed = {f"resumed_with.{k}": v for k, v in params.items() if self.logged_params.get(k, str(v)) != str(v)}
        if new:
            self._call("params", self.client.log_batch, self.run_id, params=[Param(k, v) for k, v in new.items()])
            self.logged_params.update(new)
        self.set_tags(changed)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self._call("tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Once per step: a worker restarted from an earlier checkpoint (or from scratch,
        when it died before its first checkpoint was registered) evaluates steps again."""
        from mlflow.entities import Metric

        if step in self.logged_steps:
            return
        self.logged_steps.add(step)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call(f"metrics at step {step}", self.client.log_batch, self.run_id, metrics=batch)

    def backfill(self, history: list[dict[str, float]]) -> None:
        """After a restart: log the evaluations a checkpoint holds but the run lacks (the
        process died between writing a checkpoint and logging its metrics)."""
        for metrics in history:
            self.log_metrics(metrics, step=int(metrics["images_seen"]))

    def log_image(self, png: bytes, key: str, step: int) -> None:
        from PIL import Image

        if step in self.steps_before_start:  # evaluated again after a restart
            return
        self._call(
            f"{key} at step {step}", self.client.log_image, self.run_id, Image.open(io.BytesIO(png)), key=key, step=step
        )

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self._call(name, self.client.log_dict, self.run_id, data, name)

    def log_artifact(self, data: bytes, name: str) -> None:
        self._call(name, _log_bytes, self.client, self.run_id, data, name)

    def log_generator(self, G_ema_state: dict, config_json: str, name: str) -> None:
        """The generator as an MLflow model (pyfunc; samples at any batch size)."""
        from gan.registry import log_generator

        self._call(f"model {name}", log_generator, self.target.uri, self.run_id, name, G_ema_state, config_json)

    def close(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: choose one of {STATUSES}")
        self._call("status", self.client.set_terminated, self.run_id, status)
        if self.pending:
            lost = ", ".join(what for what, _, _ in self.pending)
            print(
                f"error: MLflow at {self.target.uri} stayed unreachable; not recorded in run {self.run_id}: {lost}. "
                "The checkpoints hold every evaluation (history in state.pt).",
                file=sys.stderr,
                flush=True,
            )

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        self.pending.append((what, fn, (args, kwargs)))
        while self.pending:
            label, call, (call_args, call_kwargs) = self.pending[0]
            try:
                call(*call_args, **call_kwargs)
            except Exception as err:  # unreachable server, 5xx, store errors: keep for later
                print(
                    f"warning: MLflow at {self.target.uri} failed ({type(err).__name__}); "
                    f"{len(self.pending)} log call(s) queued, retried at the next log",
                    file=sys.stderr,
                    flush=True,
                )
                return
            self.pending.pop(0)


def _log_bytes(client, run_id: str, data: bytes, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gan-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path))


def filter_value(text: str) -> str:
    """``text`` quoted for an MLflow filter string. MLflow takes either quote and has no
    escapes, so a name may hold one kind of quote, not both."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise TrackingError(f"name {text!r} holds both ' and \": MLflow cannot search for it; drop one kind of quote")


def _find_run(client, experiment_id: str, run_name: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {filter_value(run_name)}", max_results=1
    )


def finish_run(target: TrackingTarget, status: str, tags: dict[str, Any] | None = None) -> str | None:
    """Driver-side safety net: tag the named run with ``tags``, and end it with ``status``
    if it is still RUNNING (a worker that died, or a trial that Tune stopped, cannot close
    its own run). Returns the run's final status, or None when there is no such run."""
    from mlflow.entities import RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(target.uri)
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment is None:
        return None
    for run in _find_run(client, experiment.experiment_id, target.run_name):
        if tags:  # the reason, also on a run its worker closed itself
            client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        if run.info.status != "RUNNING":
            return run.info.status
        client.set_terminated(run.info.run_id, status)
        return status
    return None


def run_id_of(target: TrackingTarget) -> str | None:
    """The id of the run named ``target.run_name``, or None."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(target.uri)
    experiment = client.get_experiment_by_name(target.experiment)
    found = _find_run(client, experiment.experiment_id, target.run_name) if experiment else []
    return found[0].info.run_id if found else None
