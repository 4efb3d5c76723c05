"""MLflow run tracking behind a small interface; the only module that imports mlflow for runs.

Rank 0 gets an ``MLflowTracker``, every other rank a ``NullTracker``. A run is found
again by its name (a tag), so a resumed or restarted training continues its own MLflow
run instead of starting a new one. The local default is a SQLite store
(``sqlite:///mlflow.db``) with artefacts in ``./mlartifacts``; open it with
``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gan.core.redact import redact_uri
from gan.data.storage import check_outlives_job
from gan.registry.names import filter_value

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_NAME_TAG = "gan.run_name"
LOCATION_TAG = "gan.checkpoints"
STOPPED_TAG = "sweep.stopped_early"
STATUSES = ("FINISHED", "FAILED", "KILLED")
# Without it MLflow 3's UI opens an experiment on GenAI traces instead of its training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SOURCE_COMMIT_ENV = "GAN_SOURCE_COMMIT"
CURVES_FLUSH_S = 15.0  # training curves go out in one batch this often: a call per log step would slow training
SYSTEM_METRICS_INTERVAL_S = 10.0
WORKER_WAIT_S = 600.0
"""How long a (re)started Ray worker waits for an unreachable tracking server before failing."""


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
    source: tuple[tuple[str, str], ...] = ()
    """MLflow's source tags (entry point, commit), taken where the run was started: a
    worker on another node has neither the command line nor the checkout."""

    label: str = ""
    """The name the runs table shows (default: run_name, which stays the run's identity)."""
    location: str = ""
    """Where the run's checkpoints live. With run_name, the run's identity: two users who
    train one config against one server (same name) keep two runs."""

    def child(self, run_name: str, parent_run_id: str, label: str = "") -> TrackingTarget:
        return replace(self, run_name=run_name, parent_run_id=parent_run_id, label=label)


class Tracker:
    """The tracking interface. This base logs nothing: it is what ranks that do not log,
    and runs without tracking, get."""

    run_id = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_curves(self, metrics: dict[str, float], step: int) -> None: ...
    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict[str, Any]) -> None: ...
    def describe(self, text: str) -> None: ...
    def log_image(self, png: bytes, key: str, step: int) -> None: ...
    def log_dict(self, data: dict[str, Any], name: str) -> None: ...
    def log_artifact(self, data: bytes, name: str) -> None: ...
    def backfill(self, history: list[dict[str, float]]) -> None: ...
    def log_generator(self, G_ema_state: dict, config_json: str, name: str) -> None: ...
    def close(self, status: str) -> None: ...

    status = "FINISHED"
    """How the run ends when its ``with`` block ends normally; a block that handled its own
    failure sets FAILED."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        """The one place a run's end is decided: KILLED on Ctrl-C, FAILED on any other
        exception, else ``status``."""
        if kind is None:
            self.close(self.status)
        else:
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


NullTracker = Tracker


def resolve_uri(uri: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the local SQLite store. Relative
    sqlite paths become absolute, so Ray workers (in other folders) find the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix) :]
        instead = 'pass --tracking-uri "sqlite:///$PWD/mlflow.db" (absolute) or http://your-mlflow-server'
        check_outlives_job(path, f"the MLflow store {uri}", instead)
        uri = prefix + os.path.abspath(path)
    return uri


def prepare_experiment(target: TrackingTarget) -> None:
    """On the driver, before any training: reachable, and the experiment exists (a
    local SQLite store keeps its artefacts in ./mlartifacts beside it)."""
    from mlflow.tracking import MlflowClient

    check_reachable(target.uri)
    client = MlflowClient(target.uri)
    try:
        experiment = client.get_experiment_by_name(target.experiment)
        if experiment is None:
            location = None
            if target.uri.startswith("sqlite:///"):
                store = Path(target.uri[len("sqlite:///") :])
                location = (store.parent / DEFAULT_ARTIFACTS).resolve().as_uri()
            client.create_experiment(target.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        elif not any(key in experiment.tags for key in EXPERIMENT_KIND):  # a kind set by hand is kept
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(experiment.experiment_id, key, value)
    except Exception as err:  # the store's own errors vary by backend
        raise TrackingError(
            f"cannot use MLflow tracking at {redact_uri(target.uri)}: {type(err).__name__}: {err}"
        ) from None


def ui_link(target: TrackingTarget, run_id: str | None = None, *, find_run: bool = False) -> str:
    """Where to review a run (or the experiment's runs) in the MLflow UI; ``find_run`` looks
    up the run named ``target.run_name``. MLflow 3's UI opens on GenAI pages unless the link
    asks for the model-training view."""
    from mlflow.tracking import MlflowClient

    try:
        check_reachable(target.uri, PROBE_TIMEOUT_S)  # one short wait, not MLflow's retries
        client = MlflowClient(target.uri)
        experiment = client.get_experiment_by_name(target.experiment)
        if find_run:
            found = _find_run(client, experiment.experiment_id, target)
            run_id = found[0].info.run_id if found else None
    except Exception:  # only a pointer: an unreachable server must not fail a finished run
        return target.uri
    page = f"#/experiments/{experiment.experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    page += "?workflowType=machine_learning"
    if target.uri.startswith(("http://", "https://")):
        return f"{target.uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {target.uri}, then http://127.0.0.1:5000/{page}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI, before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    # MLflow's own TLS settings, as its client uses them: a private CA's bundle, a client
    # certificate, or (never in production) no checks at all.
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1")
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or not insecure
    cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s, verify=verify, cert=cert)
    except requests.RequestException as err:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {redact_uri(uri)}: {type(err).__name__}"
        ) from None
    if response.status_code >= 400:
        raise TrackingError(
            f"the MLflow tracking server at {redact_uri(uri)} answered {response.status_code} to /health"
        )


def wait_until_reachable(uri: str, wait_s: float, poll_s: float = 5.0) -> None:
    """``check_reachable``, retried for up to ``wait_s``: a worker Ray restarts during an
    outage waits for the server, instead of failing again and using up the run's retries."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return check_reachable(uri)
        except TrackingError as err:
            if time.monotonic() >= deadline:
                raise
            if not said:
                print(
                    f"warning: {err}; waiting up to {wait_s:.0f}s for it before training", file=sys.stderr, flush=True
                )
                said = True
        time.sleep(poll_s)


def git_commit() -> str:
    """The checkout's commit; under `ray job submit` the uploaded working dir has no .git,
    so cluster/submit.sh passes the submitting side's commit in $GAN_SOURCE_COMMIT."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        found = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        found = ""
    return found or os.environ.get(SOURCE_COMMIT_ENV) or "unknown"


def source_tags(entry_point: str) -> tuple[tuple[str, str], ...]:
    """MLflow's source tags for a run started by ``entry_point`` here: a Ray job's driver
    records its submission id as well."""
    commit = git_commit()
    tags = {"mlflow.source.name": entry_point, "mlflow.source.type": "LOCAL", "mlflow.source.git.commit": commit}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata", {}).get("job_submission_id")
    if job:
        tags |= {"mlflow.source.type": "JOB", "ray.job_submission_id": job}
    return tuple(tags.items())


# A server that goes away mid-run must not stall training for minutes per call
# (MLflow's defaults retry 7 times with exponential backoff). Users can override these.
# MLflow 3 sends log_batch and proxied artefact uploads (images, models) through the same
# HTTP client, so these bound both; the timeout is per socket wait, so a large upload
# that makes progress is never cut.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
PROBE_TIMEOUT_S = 5.0
"""While the server is away, one /health request this long at most asks whether it is back."""
RETRY_UNANSWERED_S = 60.0
"""How long log calls are only queued after a failure that waited out its timeout: a server
that drops packets would otherwise cost every log call, and so training, that wait."""


class MLflowTracker(Tracker):
    """Logs one run. A call that fails (server unreachable) is queued and retried before
    the next one, so a gap is filled once the server is back; what is still unsent when
    the run closes is reported, never dropped silently (checkpoints keep the history).
    While the server is away, the next log call first asks /health, briefly; after a failure
    that timed out (not refused), only every RETRY_UNANSWERED_S."""

    def __init__(
        self,
        target: TrackingTarget,
        tags: dict[str, Any] | None = None,
        system_metrics: bool = False,
        wait_s: float = 0.0,
    ) -> None:
        """``wait_s``: how long to wait for an unreachable server (a worker); 0 fails at once."""
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if wait_s:
            wait_until_reachable(target.uri, wait_s)
        self.target = target
        self.pending: list[tuple[str, Any, tuple]] = []
        self.away = False
        """A log call failed and the server has not answered since."""
        self.retry_at = 0.0
        """time.monotonic() before which nothing is sent while the server is away."""
        self.refused = ""
        """Why the server refused this run's credentials (401/403): tracking has stopped."""
        self.dropped: list[str] = []
        prepare_experiment(target)
        self.client = MlflowClient(target.uri)
        try:
            experiment_id = self.client.get_experiment_by_name(target.experiment).experiment_id
            found = _find_run(self.client, experiment_id, target)
        except Exception as err:  # the store's own errors vary by backend
            raise TrackingError(
                f"cannot use MLflow tracking at {redact_uri(target.uri)}: {type(err).__name__}: {err}"
            ) from None
        # Evaluations the run already holds: a restarted worker evaluates them again.
        self.logged_steps: set[int] = set()
        if found:
            self.run_id = found[0].info.run_id
            self.logged_params = dict(found[0].data.params)
            if STOPPED_TAG not in found[0].data.tags:  # a trial ASHA stopped stays stopped
                self.client.update_run(self.run_id, status="RUNNING")
            self.logged_steps = {m.step for m in self.client.get_metric_history(self.run_id, "fid")}
        else:
            identity = {RUN_NAME_TAG: target.run_name, **({LOCATION_TAG: target.location} if target.location else {})}
            if target.parent_run_id:
                identity["mlflow.parentRunId"] = target.parent_run_id
            run = self.client.create_run(experiment_id, run_name=target.label or target.run_name, tags=identity)
            self.run_id, self.logged_params = run.info.run_id, {}
        self.steps_before_start = frozenset(self.logged_steps)
        self.curves: list = []
        self.curves_sent_at = time.monotonic()
        self.curves_logged_until = -1
        if found:  # a restarted worker trains past steps the run already has curves for
            history = self.client.get_metric_history(self.run_id, "loss/g")
            self.curves_logged_until = max((m.step for m in history), default=-1)
        source = dict(target.source)
        commit = source.get("mlflow.source.git.commit") or git_commit()
        self.set_tags({"git_commit": commit, **source, **(tags or {})})
        self.monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id, SYSTEM_METRICS_INTERVAL_S, resume_logging=bool(found), tracking_uri=target.uri
            )
            self.monitor.start()

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
        self._flush_curves()
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call(f"metrics at step {step}", self.client.log_batch, self.run_id, metrics=batch)

    def log_curves(self, metrics: dict[str, float], step: int) -> None:
        """Training curves at every logging step, sent in one batch every CURVES_FLUSH_S."""
        from mlflow.entities import Metric

        if step <= self.curves_logged_until:
            return
        now = int(time.time() * 1000)
        self.curves.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self.curves_sent_at >= CURVES_FLUSH_S:
            self._flush_curves()

    def _flush_curves(self) -> None:
        self.curves_sent_at = time.monotonic()
        while self.curves:  # log_batch takes at most 1,000 metrics
            batch, self.curves = self.curves[:1000], self.curves[1000:]
            self._call(f"curves to step {batch[-1].step}", self.client.log_batch, self.run_id, metrics=batch)

    def log_dataset(self, name: str, digest: str, source: str, context: str, profile: dict[str, Any]) -> None:
        """A dataset input (the UI's Datasets column): the data trained on, or the evaluator."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        scheme = source.partition("://")[0] if "://" in source else source.partition(":")[0] or "local"
        dataset = Dataset(name, digest, scheme, json.dumps({"uri": source}), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]
        self._call(f"dataset {name}", self.client.log_inputs, self.run_id, datasets=inputs)

    def describe(self, text: str) -> None:
        self.set_tags({"mlflow.note.content": text})

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
        from gan.registry.models import log_generator

        self._call(f"model {name}", log_generator, self.target.uri, self.run_id, name, G_ema_state, config_json)

    def close(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: choose one of {STATUSES}")
        self.retry_at = 0.0  # one last try (a /health request first) whatever the wait
        self._flush_curves()
        if self.monitor is not None:
            if self.away:  # its thread would wait out the server's timeouts: it ends without us
                threading.Thread(target=self.monitor.finish, daemon=True).start()
            else:
                self.monitor.finish()
        self._call("status", self.client.set_terminated, self.run_id, status)
        if self.pending or self.dropped:
            lost = ", ".join([what for what, _, _ in self.pending] + self.dropped)
            why = f"refused this run's credentials ({self.refused})" if self.refused else "stayed unreachable"
            print(
                f"error: MLflow at {redact_uri(self.target.uri)} {why}; not recorded in run {self.run_id}: {lost}. "
                "The checkpoints hold every evaluation (history in state.pt).",
                file=sys.stderr,
                flush=True,
            )

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.refused:  # retrying cannot help, and a queue that never drains only grows
            self.dropped.append(what)
            return
        self.pending.append((what, fn, (args, kwargs)))
        if self.away:
            if time.monotonic() < self.retry_at:
                return
            asked = time.monotonic()
            try:
                check_reachable(self.target.uri, PROBE_TIMEOUT_S)
            except TrackingError:
                self._wait_if_slow(asked)
                return
        while self.pending:
            label, call, (call_args, call_kwargs) = self.pending[0]
            started = time.monotonic()
            try:
                call(*call_args, **call_kwargs)
            except Exception as err:  # unreachable server, 5xx, store errors: keep for later
                if status := _refusal(err):
                    self._stop(status)
                    return
                if not self.away:
                    print(
                        f"warning: MLflow at {redact_uri(self.target.uri)} failed ({type(err).__name__}); "
                        "training goes on, log calls are queued and sent once it answers again",
                        file=sys.stderr,
                        flush=True,
                    )
                self.away = True
                self._wait_if_slow(started)
                return
            self.pending.pop(0)
        self.away = False

    def _wait_if_slow(self, started: float) -> None:
        """A failure that took a timeout's wait (a server that accepts and never answers,
        or drops packets) is not tried again for a while; a quick one (refused) is, at the
        next log call."""
        if time.monotonic() - started >= PROBE_TIMEOUT_S:
            self.retry_at = time.monotonic() + RETRY_UNANSWERED_S

    def _stop(self, status: str) -> None:
        self.refused = status
        self.dropped += [what for what, _, _ in self.pending]
        self.pending.clear()
        print(
            f"error: MLflow at {redact_uri(self.target.uri)} refused this run's credentials ({status}); tracking stops "
            "for this run, training goes on (the checkpoints hold every evaluation). Check MLFLOW_TRACKING_USERNAME/"
            "MLFLOW_TRACKING_PASSWORD and the run's experiment permissions.",
            file=sys.stderr,
            flush=True,
        )


def _refusal(err: Exception) -> str:
    """'401 ...' or '403 ...' when the server refused the credentials, else ''."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException) and err.get_http_status_code() in (401, 403):
        return f"{err.get_http_status_code()} {err.error_code}"
    return ""


def _log_bytes(client, run_id: str, data: bytes, name: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gan-artifact-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.log_artifact(run_id, str(path))


def _find_run(client, experiment_id: str, target: TrackingTarget) -> list:
    wanted = f"tags.`{RUN_NAME_TAG}` = {filter_value(target.run_name)}"
    if target.location:
        wanted += f" and tags.`{LOCATION_TAG}` = {filter_value(target.location)}"
    return client.search_runs([experiment_id], filter_string=wanted, max_results=1)


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
    for run in _find_run(client, experiment.experiment_id, target):
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
    found = _find_run(client, experiment.experiment_id, target) if experiment else []
    return found[0].info.run_id if found else None
