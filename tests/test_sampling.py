"""Sampling and the served model's request checks, in-process (the served path runs in
tests/test_registry.py against `mlflow models serve`)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from gan.core.models import build_models
from gan.core.sampling import latents, sample
from gan.registry.models import MAX_IMAGES_PER_REQUEST, GeneratorModel, RequestError


@pytest.fixture
def generator_model(tiny_cfg):
    G, _ = build_models(tiny_cfg.model, tiny_cfg.data.resolution, tiny_cfg.data.channels)
    model = GeneratorModel()
    model.G, model.cfg = G.eval().requires_grad_(False), tiny_cfg
    return model


@pytest.mark.parametrize("truncation", [1e-12, 0.04, 0.5, 2.0])
def test_truncated_latents_stay_within_the_bound_for_any_truncation(truncation):
    z = latents(1024, 128, seed=3, truncation=truncation)  # a redraw loop never ends for 1e-12
    assert z.shape == (1024, 128) and z.abs().max() <= truncation
    assert torch.equal(z, latents(1024, 128, seed=3, truncation=truncation))  # same seed, same z
    if truncation == 2.0:  # the truncated normal's spread, not a uniform one
        phi = math.exp(-2) / math.sqrt(2 * math.pi)
        expected = math.sqrt(1 - 2 * 2.0 * phi / math.erf(2 / math.sqrt(2)))
        assert abs(z.std().item() - expected) < 0.01


def test_concurrent_sampling_gives_each_caller_its_own_images_and_keeps_the_thread_count(generator_model):
    """A model server samples in several threads at once; torch's thread count is process-wide."""
    G = generator_model.G
    expected = {seed: sample(G, 8, seed=seed)[0] for seed in range(4)}
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with ThreadPoolExecutor(16) as pool:  # fresh threads, each copying the setting at its first call
            results = list(pool.map(lambda seed: (seed, sample(G, 8, seed=seed)[0]), [s % 4 for s in range(64)]))
        with ThreadPoolExecutor(1) as pool:  # a thread started afterwards gets the process's setting
            assert pool.submit(torch.get_num_threads).result() == 3
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    for seed, images in results:
        np.testing.assert_array_equal(images, expected[seed])


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"n": 10**8}], f"a request gets 1 to {MAX_IMAGES_PER_REQUEST} images in all"),
        ([{"n": 600}, {"n": 600}], "row 1: n=600: a request gets 1 to"),
        ([{"n": 0}], "n=0"),
        ([{"n": 1}] * 1000, "a request has 1 to 64 rows, this one has 1000"),
        ([{"n": 2.5}], "n=2.5 must be a whole number"),
        ([{"n": 2, "seed": -1}], "seed=-1 must be in 0.."),
        ([{"n": 2, "class": 99}], "class 99 is out of range"),
        ([{"n": 2, "truncation": -1.0}], "truncation=-1.0 must be 0 (none) or a number > 0"),
        ([{"n": 2, "truncation": math.inf}], "truncation=inf"),
    ],
)
def test_the_served_model_refuses_bad_requests_with_one_line(generator_model, rows, message):
    with pytest.raises(RequestError) as refused:
        generator_model.predict(None, pd.DataFrame(rows))
    error = refused.value
    assert error.get_http_status_code() == 400 and message in error.message
    error.message = "Failed to predict data '...'\nError: ..."  # what MLflow's scoring server does
    assert "\n" not in error.serialize_as_json() and message in error.serialize_as_json()


def test_the_served_model_answers_within_the_limits(generator_model):
    rows = [{"n": MAX_IMAGES_PER_REQUEST - 1, "truncation": 1e-9}, {"n": 1, "seed": 2**40, "class": 3}]
    images = generator_model.predict(None, pd.DataFrame(rows))
    assert images.shape == (MAX_IMAGES_PER_REQUEST, 28, 28) and images.dtype == np.uint8
