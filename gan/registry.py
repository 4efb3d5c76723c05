"""Generators as MLflow models: a pyfunc that samples at any batch size, by class and seed.

The logged model carries only the EMA generator's weights and the config, plus this
package's code, so loading it needs torch and numpy, not the training stack.
Request (one row per request): n, seed, class (-1 = cycle through classes), truncation
(0 = none). Response: uint8 images, N x H x W (gray) or N x H x W x 3 (RGB).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from gan.tracking import filter_value

GENERATOR_FILE = "generator.pt"
REQUEST_COLUMNS = {"n": 1, "seed": 0, "class": -1, "truncation": 0.0}


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from gan.sampling import generator_from_state

        state = torch.load(context.artifacts["generator"], weights_only=True, map_location="cpu")
        self.G, self.cfg = generator_from_state(state)

    # A DataFrame hint: MLflow then neither nags for hints nor infers a schema; the
    # signature given at logging is the schema.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from gan.sampling import sample

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        batches = []
        for row in rows:
            request = {**REQUEST_COLUMNS, **{k: v for k, v in row.items() if not pd.isna(v)}}
            label = int(request["class"])
            truncation = float(request["truncation"]) or None
            images, _ = sample(
                self.G, int(request["n"]), seed=int(request["seed"]), labels=None if label < 0 else label,
                truncation=truncation,
            )  # fmt: skip
            batches.append(images)
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
    from gan.config import Config

    use(tracking_uri)
    cfg = Config.from_json(config_json)
    with tempfile.TemporaryDirectory(prefix="gan-model-") as tmp:
        path = os.path.join(tmp, GENERATOR_FILE)
        torch.save({"G_ema": G_ema_state, "config": config_json}, path)
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=GeneratorModel(),
                artifacts={"generator": path},
                code_paths=[str(Path(__file__).parent)],
                signature=signature(cfg.data.resolution, cfg.data.channels),
                input_example=pd.DataFrame([{"n": 2, "seed": 0, "class": -1, "truncation": 0.0}]),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "fsspec", "pillow"],
                # In the MLmodel file, so the registry UI shows what the generator is.
                metadata={"config": cfg.to_dict(), "classes": list(range(cfg.model.num_classes))},
            )
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


CHAMPION, PREVIOUS = "champion", "previous"


def load_generator(model_uri: str, tracking_uri: str | None = None):
    """(G, cfg) of a logged or registered generator model, with clear errors."""
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        use(tracking_uri)
    # A per-file progress bar for a 2-file model buries the one line that matters.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise RegistryError(f"{model_uri}: {err.message.splitlines()[0]}") from None
    except OSError as err:  # artefacts listed in the registry but gone from storage
        raise RegistryError(f"{model_uri}: the model's artefacts cannot be read from storage ({err})") from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, GeneratorModel):
        raise RegistryError(f"{model_uri} is not a generator logged by this project")
    return python_model.G, python_model.cfg


def version_by_alias(client, name: str, alias: str):
    """The version behind ``name@alias``, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "alias" in err.message.lower():
            return None
        raise


def versions_of_run(client, name: str, run_id: str) -> list:
    return client.search_model_versions(f"name = {filter_value(name)} and run_id = '{run_id}'")


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
