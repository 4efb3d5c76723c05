"""Generators as MLflow models: a pyfunc that samples at any batch size, by class and seed.

The logged model carries only the EMA generator's weights and the config, plus this
package's code, so loading it needs torch and numpy, not the training stack. It is logged
as models-from-code (``gan/registry/pyfunc_entry.py``), so it holds no pickle. The project's own
loader (``load_generator``) reads only the weights, never the model's code.
Request (one row per request): n, seed, class (-1 = cycle through classes), truncation
(0 = none). Response: uint8 images, N x H x W (gray) or N x H x W x 3 (RGB).
Served, it samples up to ``ServingLimits.concurrency`` requests at once and refuses, before
sampling, a request whose response would be over ``ServingLimits.max_response_bytes``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from gan.core.sampling import MAX_SEED
from gan.registry.names import filter_value

_log = logging.getLogger(__name__)
GENERATOR_FILE = "generator.pt"
REQUEST_COLUMNS = {"n": 1, "seed": 0, "class": -1, "truncation": 0.0}
MAX_IMAGES_PER_REQUEST = 1024
"""Images one request may ask for over all its rows: a response is built in memory."""
MAX_ROWS_PER_REQUEST = 64
JSON_BYTES_PER_VALUE = 6
"""The most one pixel value takes in a JSON response: "255, " and its share of the brackets."""


class RequestError(MlflowException):
    """A request the served model refuses, or cannot answer: HTTP 400 (or 500) with this
    one line. MLflow's scoring server rewrites a predict error's message to start with the
    whole request (many lines); this message keeps its one line."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        self._line = message
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass


@dataclass(frozen=True, kw_only=True, slots=True)
class ServingLimits:
    """What a served model takes on at once; ``from_env`` reads them when the server loads it."""

    max_response_bytes: int = 32 * 2**20
    """The largest response, as JSON (GAN_SERVE_MAX_RESPONSE_MB, in MiB): a 64-px RGB image is
    up to 72 KiB of it, and the server holds the whole response in memory."""
    concurrency: int = min(4, os.cpu_count() or 1)
    """Requests sampled at once (GAN_SERVE_CONCURRENCY): each samples on one CPU thread, so one
    per core, and at most 4 by default, for each holds its images and activations in memory."""
    wait_s: float = 30.0
    """How long a request beyond ``concurrency`` waits for a turn before a 503: half of MLflow's
    request timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s). The server answers 504 then
    but cannot stop the request's thread, which would go on to sample for a client that has gone."""

    def __post_init__(self) -> None:
        if not self.max_response_bytes > 0:
            raise ValueError("GAN_SERVE_MAX_RESPONSE_MB must be a finite number > 0 (MiB)")
        if not self.concurrency >= 1:
            raise ValueError(f"GAN_SERVE_CONCURRENCY={self.concurrency} must be a whole number >= 1")

    @classmethod
    def from_env(cls) -> ServingLimits:
        from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        limits = {"wait_s": MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get() / 2}
        if "GAN_SERVE_MAX_RESPONSE_MB" in os.environ:
            megabytes = _env_number("GAN_SERVE_MAX_RESPONSE_MB", float)
            limits["max_response_bytes"] = round(megabytes * 2**20) if math.isfinite(megabytes) else 0
        if "GAN_SERVE_CONCURRENCY" in os.environ:
            limits["concurrency"] = _env_number("GAN_SERVE_CONCURRENCY", int)
        return cls(**limits)


def _env_number(name: str, kind: type):
    try:
        return kind(os.environ[name])
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} must be a {'whole ' if kind is int else ''}number") from None


class Turns:
    """At most ``limit`` holders at once; the others wait up to ``wait_s`` for a turn, then get a 503."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit, self.wait_s = limit, wait_s
        self.active = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def turn(self) -> Iterator[int]:
        """Holds a turn; yields how many are held, this one included."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.active < self.limit, timeout=self.wait_s):
                raise RequestError(
                    f"the server is busy: {self.limit} requests are sampling (GAN_SERVE_CONCURRENCY={self.limit}) "
                    f"and this one waited {self.wait_s:g} s for a turn; retry later",
                    TEMPORARILY_UNAVAILABLE,
                )
            self.active += 1
            active = self.active
        try:
            yield active
        finally:
            with self._changed:
                self.active -= 1
                self._changed.notify()


def parse_requests(
    model_input, num_classes: int, image_shape: tuple[int, ...] = (), max_response_bytes: float = math.inf
) -> list[tuple[int, int, int | None, float | None]]:
    """(n, seed, class or None, truncation or None) per request row, every limit checked
    before anything is sampled, the response's size (images of ``image_shape`` as JSON)
    included; RequestError names the first bad value."""
    rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
    if not 1 <= len(rows) <= MAX_ROWS_PER_REQUEST:
        raise RequestError(f"a request has 1 to {MAX_ROWS_PER_REQUEST} rows, this one has {len(rows)}")
    parsed, total = [], 0
    for i, row in enumerate(rows):
        request = {**REQUEST_COLUMNS, **{k: v for k, v in row.items() if not pd.isna(v)}}
        n, seed, label = (_integer(request[k], k, i) for k in ("n", "seed", "class"))
        truncation = _number(request["truncation"], "truncation", i)
        total += max(n, 0)
        if not 1 <= n <= MAX_IMAGES_PER_REQUEST or total > MAX_IMAGES_PER_REQUEST:
            raise RequestError(f"row {i}: n={n}: a request gets 1 to {MAX_IMAGES_PER_REQUEST} images in all")
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"row {i}: seed={seed} must be in 0..{MAX_SEED}")
        if label != -1 and not (num_classes and 0 <= label < num_classes):
            known = f"classes 0..{num_classes - 1} or -1 (cycle)" if num_classes else "only -1 (unconditional)"
            raise RequestError(f"row {i}: class {label} is out of range: this generator knows {known}")
        if not 0 <= truncation < math.inf:
            raise RequestError(f"row {i}: truncation={truncation} must be 0 (none) or a number > 0")
        parsed.append((n, seed, None if label < 0 else label, truncation or None))
    image_bytes = math.prod(image_shape) * JSON_BYTES_PER_VALUE
    if total * image_bytes > max_response_bytes:
        shape = "x".join(map(str, image_shape))
        raise RequestError(
            f"{total} images of {shape} are up to {total * image_bytes / 2**20:.0f} MiB of JSON, over this "
            f"server's {max_response_bytes / 2**20:g} MiB (GAN_SERVE_MAX_RESPONSE_MB): ask for at most "
            f"{max_response_bytes // image_bytes} images at this size"
        )
    return parsed


def _integer(value, name: str, row: int) -> int:
    number = _number(value, name, row)
    if not math.isfinite(number) or number != int(number):
        raise RequestError(f"row {row}: {name}={value!r} must be a whole number")
    return int(value)


def _number(value, name: str, row: int) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(f"row {row}: {name}={value!r} must be a number")
    return float(value)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def __init__(self, limits: ServingLimits | None = None) -> None:
        self.use_limits(limits or ServingLimits())

    def use_limits(self, limits: ServingLimits) -> None:
        self.limits, self.turns = limits, Turns(limits.concurrency, limits.wait_s)

    def load_context(self, context) -> None:
        from gan.core.sampling import generator_from_state

        self.use_limits(ServingLimits.from_env())
        state = torch.load(context.artifacts["generator"], weights_only=True, map_location="cpu")
        self.G, self.cfg = generator_from_state(state)

    # A DataFrame hint: MLflow then neither nags for hints nor infers a schema; the
    # signature given at logging is the schema.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from gan.core.sampling import sample

        data = self.cfg.data
        shape = (data.resolution, data.resolution) + ((data.channels,) if data.channels > 1 else ())
        requests = parse_requests(model_input, self.G.num_classes, shape, self.limits.max_response_bytes)
        with self.turns.turn() as at_once:
            _log.info("sampling %d images, %d of %d requests at once",
                      sum(r[0] for r in requests), at_once, self.turns.limit)  # fmt: skip
            try:
                batches = [sample(self.G, n, seed=seed, labels=label, truncation=truncation)[0]
                           for n, seed, label, truncation in requests]  # fmt: skip
            except Exception:  # the traceback goes to the server's log, never to the client
                _log.exception("sampling failed")
                raise RequestError("sampling failed on the server; its log has the details", INTERNAL_ERROR) from None
            return np.concatenate(batches)


def signature(resolution: int, channels: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    # Only n is required; seed, class and truncation default as in REQUEST_COLUMNS.
    inputs = Schema(
        [
            ColSpec("long", "n"),
            ColSpec("long", "seed", required=False),
            ColSpec("long", "class", required=False),
            ColSpec("double", "truncation", required=False),
        ]
    )
    shape = (-1, resolution, resolution) if channels == 1 else (-1, resolution, resolution, 3)
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("uint8"), shape)]))


def use(tracking_uri: str) -> None:
    """MLflow's fluent API (log_model, register_model, load_model, search_logged_models)
    reads a process-wide tracking URI; this module is the only one that sets it."""
    mlflow.set_tracking_uri(tracking_uri)


def log_generator(tracking_uri: str, run_id: str, name: str, G_ema_state: dict, config_json: str) -> str:
    """Log a generator as an MLflow model under ``run_id``; returns its models:/ URI."""
    from mlflow.tracking import MlflowClient

    from gan.core.config import Config

    use(tracking_uri)
    cfg = Config.from_json(config_json)
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory(prefix="gan-model-") as tmp:
        path = os.path.join(tmp, GENERATOR_FILE)
        torch.save({"G_ema": G_ema_state, "config": config_json}, path)
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
                artifacts={"generator": path},
                code_paths=[str(Path(__file__).parents[1])],  # the whole gan package
                signature=signature(cfg.data.resolution, cfg.data.channels),
                input_example=pd.DataFrame([{"n": 2, "seed": 0, "class": -1, "truncation": 0.0}]),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "fsspec", "pillow"],
                # In the MLmodel file, so the registry UI shows what the generator is.
                metadata={"config": cfg.to_dict(), "classes": list(range(cfg.model.num_classes))},
            )
    if status != "FINISHED":  # leaving start_run ended it FINISHED: a running or stopped run keeps its status
        client.update_run(run_id, status=status)
    return info.model_uri


def describe(cfg) -> str:
    kind = f"class-conditional ({cfg.model.num_classes} classes)" if cfg.model.num_classes else "unconditional"
    colour = "gray" if cfg.data.channels == 1 else "RGB"
    return (
        f"{cfg.model.family} GAN generator (EMA weights), {kind}, {cfg.data.resolution}x{cfg.data.resolution} "
        f"{colour}, trained on {cfg.data.uri}. Request rows: n, seed, class (-1 cycles classes), "
        "truncation (0 = none); returns uint8 images."
    )


def logged_model_uri(tracking_uri: str, run, name: str) -> str | None:
    """The models:/ URI of the model called ``name`` that ``run`` logged, or None."""
    use(tracking_uri)
    found = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = {filter_value(name)}",
        output_format="list",
    )
    return found[0].model_uri if found else None


def register(tracking_uri: str, model_uri: str, name: str, cfg, tags: dict[str, str], description: str = ""):
    """Register ``model_uri`` as a new version of ``name`` with its evidence as tags;
    returns the ModelVersion. Existing versions and aliases are never touched."""
    from mlflow.tracking import MlflowClient

    use(tracking_uri)
    class_tags = {"classes": ",".join(map(str, range(cfg.model.num_classes)))} if cfg.model.num_classes else {}
    version = mlflow.register_model(model_uri, name, tags={**class_tags, **{k: str(v) for k, v in tags.items()}})
    client = MlflowClient(tracking_uri)
    client.update_model_version(name, version.version, description=description or describe(cfg))
    return client.get_model_version(name, version.version)


class RegistryError(ValueError):
    """A model name, alias, version or run that cannot be used; the message says which."""


CHAMPION, PREVIOUS, ROLLING_BACK = "champion", "previous", "rolling-back"


def load_generator(model_uri: str, tracking_uri: str | None = None):
    """(G, cfg) of a logged or registered generator model, with clear errors.

    Reads two files through this project's code: the MLmodel file (YAML) and the weights
    (``torch.load(weights_only=True)``). Nothing from the store is unpickled or imported, so
    a tampered model cannot run code where it is promoted or sampled; ``mlflow.pyfunc.load_model``
    would run the model's own code (its bundled ``gan`` package, or an unpickled object)."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from gan.core.sampling import generator_from_state

    if tracking_uri:
        use(tracking_uri)
    # A per-file progress bar for a 2-file download buries the one line that matters.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    weights = f"artifacts/{GENERATOR_FILE}"
    try:
        repo = get_artifact_repository(model_uri)
        with tempfile.TemporaryDirectory(prefix="gan-model-") as tmp:
            flavor = Model.load(repo.download_artifacts("MLmodel", tmp)).flavors.get("python_function", {})
            if flavor.get("artifacts", {}).get("generator", {}).get("path") != weights:
                raise RegistryError(f"{model_uri} is not a generator logged by this project")
            state = torch.load(repo.download_artifacts(weights, tmp), weights_only=True, map_location="cpu")
    except MlflowException as err:
        raise RegistryError(f"{model_uri}: {err.message.splitlines()[0]}") from None
    except OSError as err:  # artefacts listed in the registry but gone from storage
        raise RegistryError(f"{model_uri}: the model's artefacts cannot be read from storage ({err})") from None
    except pickle.UnpicklingError as err:  # weights_only refused something that is not plain tensors
        raise RegistryError(f"{model_uri}: {weights} is not plain weights ({str(err).splitlines()[0]})") from None
    try:
        return generator_from_state(state)
    except (KeyError, TypeError, RuntimeError) as err:
        raise RegistryError(f"{model_uri}: {weights} does not hold this project's generator ({err})") from None


def version_by_alias(client, name: str, alias: str):
    """The version behind ``name@alias``, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "alias" in err.message.lower():
            return None
        raise


def latest_version_of_run(client, name: str, run_id: str):
    """The newest version of ``name`` registered from ``run_id``, or None."""
    if not model_exists(client, name):
        return None
    found = client.search_model_versions(f"name = {filter_value(name)} and run_id = '{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def champion_of(client, name: str):
    """The version behind ``name@champion``, or None (no such model, or no champion yet)."""
    return version_by_alias(client, name, CHAMPION) if model_exists(client, name) else None


def model_exists(client, name: str) -> bool:
    return bool(client.search_registered_models(f"name = {filter_value(name)}"))


def check_model_exists(client, name: str) -> None:
    if not model_exists(client, name):
        known = ", ".join(m.name for m in client.search_registered_models(max_results=20)) or "none"
        raise RegistryError(f"no registered model {name!r} (registered: {known})")


def set_aliases(client, name: str, version: str, reason: str) -> str | None:
    """Make ``version`` the champion; the old champion becomes ``previous``. Returns the
    old champion's version (None when there was none)."""
    old = version_by_alias(client, name, CHAMPION)
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion.became_champion", reason)
    return None if old is None else old.version
