"""Sampling and the served model's request checks, in-process (the served path runs in
tests/test_registry.py against `mlflow models serve`)."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from gan.core.config import preset
from gan.core.models import build_models
from gan.core.sampling import latents, sample
from gan.registry.models import (
    MAX_IMAGES_PER_REQUEST,
    GeneratorModel,
    RequestError,
    ServingLimits,
    parse_requests,
)


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


def test_a_response_over_the_byte_limit_is_refused_before_sampling():
    """1,024 RGB images at 64 px are up to 72 MiB of JSON: refused in one line that says how
    many fit, before the generator runs."""
    cfg = preset("dcgan-64")
    G, _ = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    model = GeneratorModel(ServingLimits(max_response_bytes=32 * 2**20))
    model.G, model.cfg = G.eval().requires_grad_(False), cfg
    calls = []
    G.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(RequestError) as refused:
        model.predict(None, pd.DataFrame([{"n": 1000}, {"n": 24, "seed": 1}]))
    assert refused.value.get_http_status_code() == 400 and not calls
    assert refused.value.message == (
        "1024 images of 64x64x3 are up to 72 MiB of JSON, over this server's 32 MiB (GAN_SERVE_MAX_RESPONSE_MB): "
        "ask for at most 455 images at this size"
    )
    assert len(parse_requests(pd.DataFrame([{"n": 455}]), 0, (64, 64, 3), 32 * 2**20)) == 1  # what it says fits
    with pytest.raises(RequestError, match="456 images of 64x64x3"):
        parse_requests(pd.DataFrame([{"n": 455}, {"n": 1}]), 0, (64, 64, 3), 32 * 2**20)


def test_serving_limits_come_from_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", raising=False)
    assert ServingLimits.from_env() == ServingLimits(wait_s=30.0)  # half MLflow's 60 s
    for name, value in {"GAN_SERVE_MAX_RESPONSE_MB": "0.5", "GAN_SERVE_CONCURRENCY": "3",
                        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": "10"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert ServingLimits.from_env() == ServingLimits(max_response_bytes=2**19, concurrency=3, wait_s=5.0)
    for env, message in [
        ({"GAN_SERVE_CONCURRENCY": "two"}, "GAN_SERVE_CONCURRENCY='two' must be a whole number"),
        ({"GAN_SERVE_CONCURRENCY": "0"}, "GAN_SERVE_CONCURRENCY=0 must be a whole number >= 1"),
        ({"GAN_SERVE_MAX_RESPONSE_MB": "32MB"}, "GAN_SERVE_MAX_RESPONSE_MB='32MB' must be a number"),
        ({"GAN_SERVE_MAX_RESPONSE_MB": "nan"}, "GAN_SERVE_MAX_RESPONSE_MB must be a finite number > 0"),
    ]:
        with monkeypatch.context() as bad:
            for name, value in env.items():
                bad.setenv(name, value)
            with pytest.raises(ValueError) as refused:
                ServingLimits.from_env()
        assert str(refused.value).startswith(message)


def test_requests_sample_at_once_up_to_the_limit_and_a_request_beyond_it_gets_503(generator_model):
    """Two requests inside the generator at the same time, each on one CPU thread; a third
    waits for a turn and, none coming, gets a 503. Each gets the images it gets alone."""
    model, G = generator_model, generator_model.G
    model.use_limits(ServingLimits(concurrency=2, wait_s=0.5))
    requests = {seed: pd.DataFrame([{"n": 8, "seed": seed}]) for seed in (1, 2)}
    alone = {seed: model.predict(None, rows) for seed, rows in requests.items()}
    inside, threads_inside, release = threading.Condition(), [], threading.Event()

    def wait_inside(*_):  # holds each request inside the generator until the test lets go
        with inside:
            threads_inside.append(torch.get_num_threads())
            inside.notify_all()
        release.wait(timeout=60)

    hook = G.register_forward_pre_hook(wait_inside)
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = {seed: pool.submit(model.predict, None, rows) for seed, rows in requests.items()}
            try:
                with inside:
                    assert inside.wait_for(lambda: len(threads_inside) == 2, timeout=60), "one request at a time"
                with pytest.raises(RequestError) as busy:
                    model.predict(None, pd.DataFrame([{"n": 1}]))
            finally:
                release.set()
            for seed, answer in answers.items():
                np.testing.assert_array_equal(answer.result(timeout=60), alone[seed])
    finally:
        release.set()
        hook.remove()
    assert threads_inside == [1, 1] and torch.get_num_threads() == threads
    assert busy.value.get_http_status_code() == 503
    assert busy.value.message == (
        "the server is busy: 2 requests are sampling (GAN_SERVE_CONCURRENCY=2) and this one waited 0.5 s for a "
        "turn; retry later"
    )
