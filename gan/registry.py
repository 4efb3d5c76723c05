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
import torch

GENERATOR_FILE = "generator.pt"
REQUEST_COLUMNS = {"n": 1, "seed": 0, "class": -1, "truncation": 0.0}


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from gan.sampling import generator_from_state

        state = torch.load(context.artifacts["generator"], weights_only=True, map_location="cpu")
        self.G, self.cfg = generator_from_state(state)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        from gan.sampling import sample

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        batches = []
        for row in rows:
            request = {**REQUEST_COLUMNS, **{k: v for k, v in row.items() if v is not None}}
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

    inputs = Schema(
        [ColSpec("long", "n"), ColSpec("long", "seed"), ColSpec("long", "class"), ColSpec("double", "truncation")]
    )
    shape = (-1, resolution, resolution) if channels == 1 else (-1, resolution, resolution, 3)
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("uint8"), shape)]))


def log_generator(run_id: str, name: str, G_ema_state: dict, config_json: str) -> str:
    """Log a generator as an MLflow model under ``run_id``; returns its models:/ URI."""
    import pandas as pd

    from gan.config import Config

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
            )
    return info.model_uri
