"""A generator served by `mlflow models serve`: concurrent requests, the response-size limit.

The model is an untrained resnet-64 (64-px RGB, slow to sample on a CPU, so two requests
sent together are sampling at the same time), logged to a SQLite tracking store."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from services import served

from gan.core.config import preset
from gan.core.models import build_models

pytestmark = pytest.mark.integration
CONCURRENCY = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, server log): the model served with GAN_SERVE_CONCURRENCY=2, an 8 MiB response
    limit, and the model's INFO lines in the log (through uvicorn's log config)."""
    from mlflow.tracking import MlflowClient

    from gan.registry.models import log_generator

    tmp = tmp_path_factory.mktemp("serving")
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("serving", artifact_location=(tmp / "artifacts").as_uri())
    cfg = preset("resnet-64")
    torch.manual_seed(0)
    G, _ = build_models(cfg.model, cfg.data.resolution, cfg.data.channels)
    run_id = client.create_run(experiment).info.run_id
    model_uri = log_generator(tracking_uri, run_id, "generator", G.state_dict(), cfg.to_json())
    log_config = tmp / "logging.json"
    log_config.write_text(json.dumps({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "loggers": {name: {"level": "INFO", "handlers": ["stderr"]} for name in ("gan", "uvicorn")},
    }))  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GAN_SERVE_CONCURRENCY", str(CONCURRENCY))
        env.setenv("GAN_SERVE_MAX_RESPONSE_MB", "8")
        env.setenv("UVICORN_LOG_CONFIG", str(log_config))
        env.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with served(tracking_uri, model_uri, tmp / "serve.log") as base:
            yield base, tmp / "serve.log"
    assert "Traceback" not in (tmp / "serve.log").read_text()


def ask(base: str, rows: list[dict]) -> requests.Response:
    return requests.post(f"{base}/invocations", json={"dataframe_records": rows}, timeout=300)


def test_two_requests_sent_together_sample_at_the_same_time(server):
    """The second request starts sampling while the first still is: the served model logs
    how many requests it is sampling as each one starts."""
    base, log = server
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda seed: ask(base, [{"n": 32, "seed": seed}]), (1, 2)))
    assert [a.status_code for a in answers] == [200, 200], answers[0].text[:500]
    started = [line for line in log.read_text().splitlines() if "sampling 32 images" in line]
    assert len(started) == 2, "no line for each request in the server's log:\n" + log.read_text()[-2000:]
    assert any(line.endswith(f"2 of {CONCURRENCY} requests at once") for line in started), started


def test_identical_requests_get_identical_images_alone_or_together(server):
    """Seeds decide the images: four requests at once (two of each), beyond the limit of two,
    each get what the same request gets alone."""
    base, _ = server
    rows = {seed: [{"n": 16, "seed": seed, "class": -1, "truncation": 0.7 * seed}] for seed in (0, 1)}
    alone = {seed: ask(base, r).json()["predictions"] for seed, r in rows.items()}
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda seed: (seed, ask(base, rows[seed])), (0, 1, 0, 1)))
    for seed, answer in together:
        assert answer.status_code == 200, answer.text[:500]
        assert answer.json()["predictions"] == alone[seed]
    assert np.asarray(alone[0], dtype=np.uint8).shape == (16, 64, 64, 3) and alone[0] != alone[1]


def test_a_response_over_the_servers_limit_is_refused_in_one_line(server):
    base, _ = server
    answer = ask(base, [{"n": 1024}])
    assert answer.status_code == 400
    assert answer.json()["message"] == (
        "1024 images of 64x64x3 are up to 72 MiB of JSON, over this server's 8 MiB (GAN_SERVE_MAX_RESPONSE_MB): "
        "ask for at most 113 images at this size"
    )
    assert ask(base, [{"n": 1}]).status_code == 200  # still serving
