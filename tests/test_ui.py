"""Reviewing a sweep in the MLflow UI, as a reviewer does: a real `mlflow server`
(PostgreSQL, artefacts in the S3 server on 127.0.0.1), a small sweep and a promotion, then
Debian's Chromium, headless, driven by Playwright. Checks what the rendered pages show."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from services import ROOT

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXPERIMENT, MODEL = "review", "digits-review"
TIMEOUT_MS = 90_000  # pages render slowly on a loaded 2-core machine
# Set GAN_UI_SCREENSHOTS to keep the screenshots (the README's come from there).
SHOTS = os.environ.get("GAN_UI_SCREENSHOTS")


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def reviewed(mlflow_server_module, tmp_path_factory):
    """A 2-trial sweep tracked on the server, its best generator promoted to champion."""
    from mlflow.tracking import MlflowClient

    url, _ = mlflow_server_module
    storage = tmp_path_factory.mktemp("sweeps")
    out = cli("pipelines/tune.py", "--trials", "2", "--rounds", "2", "--kimg-per-round", "0.5",
              "--set", "eval.num_samples=200", "--set", "eval.kid_subset_size=50", "--storage", str(storage),
              "--set", "train.log_every_steps=2",  # rounds of 8 steps: curves need a log step more often
              "--tracking-uri", url, "--experiment", EXPERIMENT, "--model-name", MODEL)  # fmt: skip
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.kind") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cli("pipelines/promote.py", "--sweep", parent.data.tags["gan.run_name"], "--experiment", EXPERIMENT,
        "--model-name", MODEL, "--seeds", "2", "--num-samples", "200", "--tracking-uri", url)  # fmt: skip
    review = re.search(r"review: (\S+)", out).group(1)  # the link tune.py prints
    return url, experiment.experiment_id, parent, children, review


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Chromium with a fresh profile; Playwright stops it (and its driver) on exit."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: this test needs Debian's chromium (tests/run.sh installs it)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, viewport={"width": 1500, "height": 950},
            args=["--no-sandbox", "--disable-background-networking"],
        )  # fmt: skip
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser, tmp_path):
    page = browser.new_page()
    page.shots = Path(SHOTS) if SHOTS else tmp_path  # type: ignore[attr-defined]
    page.shots.mkdir(parents=True, exist_ok=True)
    yield page
    page.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(page.shots / f"{name}.png"))


def open_page(page, url: str, ready: str) -> None:
    """Go to ``url``, wait for the text ``ready``, and close the assistant panel MLflow
    opens beside new pages (it covers a third of the screenshot)."""
    page.goto(url)
    page.get_by_text(ready, exact=True).first.wait_for()
    close = page.get_by_role("button", name="Close")
    if close.count() == 1 and close.is_visible():
        close.click()


def chart(page, metric: str):
    """The run page's chart card of ``metric``, found through the chart search box (a
    card is titled by the name's last part: ``loss/g`` is ``g`` in the section ``loss``)."""
    page.get_by_placeholder("Search metric charts").fill(metric)
    title = metric.rsplit("/", 1)[-1]
    cards = page.locator("[data-testid=experiment-view-compare-runs-card]")
    card = cards.filter(has=page.locator(f'h4[title="{metric}"], h4[title="{title}"]')).first
    card.wait_for()
    card.scroll_into_view_if_needed()  # charts render when they come into view
    return card


def plotted_points(card) -> list[int]:
    """Points per trace of a card's chart, as Plotly holds them in the page."""
    plot = card.locator(".js-plotly-plot")
    plot.wait_for()
    card.page.wait_for_function("d => d.data && d.data.length > 0", arg=plot.element_handle())
    return plot.evaluate("d => d.data.map(t => (t.x || []).length)")


def run_url(url: str, run, tab: str = "") -> str:
    return f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}{tab}?workflowType=machine_learning"


def test_the_printed_link_opens_on_the_sweep_and_its_trials(reviewed, page):
    url, _, parent, children, review = reviewed
    assert review.startswith(url) and "workflowType=machine_learning" in review
    open_page(page, review.split("/runs/")[0] + "/runs?workflowType=machine_learning", parent.info.run_name)
    body = page.inner_text("body")
    assert "Run Name" in body and "Token Usage" not in body  # the runs table, not the GenAI overview
    parent_row = page.locator("[role=row]", has_text=parent.info.run_name).first
    parent_row.locator("button[data-component-id*=runnamecellrenderer]").click()  # show its child runs
    for child in children:
        assert child.info.run_name.startswith("trial ")
        page.get_by_text(child.info.run_name, exact=True).wait_for()
    shot(page, "experiment-runs")
    # Each trial's status as its run page states it, with the sweep as its parent.
    for child in children:
        open_page(page, run_url(url, child), "Status")
        about = page.inner_text("body")
        assert {"FINISHED": "Finished", "KILLED": "Killed", "FAILED": "Failed"}[child.info.status] in about
        assert parent.info.run_name in about


def test_a_run_page_shows_its_data_description_and_source(reviewed, page):
    url, _, _, children, _ = reviewed
    child = children[0]
    open_page(page, run_url(url, child), "Description")
    description = child.data.tags["mlflow.note.content"]
    page.get_by_text(description[:60]).wait_for()
    shot(page, "run-overview")
    body = page.inner_text("body")
    digest = child.data.tags["dataset_fingerprint"][:32]
    assert f"mnist5k ({digest})" in body and "Training" in body  # the dataset input
    assert "tune.py" in body and child.data.tags["mlflow.source.git.commit"][:7] in body  # the source
    # The second input, the evaluator, behind the "+1" beside the dataset (metric rows have
    # "+1" chips too, for the run's second model).
    page.locator(':text-is("+1"):right-of(:text("mnist5k"))').first.click()
    page.get_by_text(re.compile(r"evaluator:digits")).first.wait_for()


def test_fid_has_a_point_per_evaluation_and_the_losses_many(reviewed, page):
    from mlflow.tracking import MlflowClient

    url, _, _, children, _ = reviewed
    child = max(children, key=lambda r: r.data.metrics.get("images_seen", 0))
    evaluations = len(MlflowClient(url).get_metric_history(child.info.run_id, "fid"))
    open_page(page, run_url(url, child, "/model-metrics"), "Model metrics")
    fid = plotted_points(chart(page, "fid"))
    shot(page, "fid-chart")
    assert evaluations >= 2 and set(fid) == {evaluations}, (fid, evaluations)
    losses = plotted_points(chart(page, "loss/g"))
    assert min(losses) >= 3 * evaluations, (losses, evaluations)


def test_the_sample_grids_step_through_training(reviewed, page):
    url, _, _, children, _ = reviewed
    child = max(children, key=lambda r: r.data.metrics.get("images_seen", 0))
    open_page(page, run_url(url, child, "/model-metrics"), "Model metrics")
    card = chart(page, "samples")  # the image card: one grid per evaluation, a slider over steps
    card.get_by_role("slider").wait_for()
    shot(page, "sample-grids")
    open_page(page, run_url(url, child, "/artifacts"), "images")  # and as files
    page.get_by_text("images", exact=True).first.click()
    page.get_by_text(re.compile(r"^samples\+step\+\d+.*\.png$")).first.click()
    preview = page.locator("img[src^=blob]").first
    preview.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())


def test_the_registered_model_shows_the_champion_and_its_evidence(reviewed, page):
    url, *_ = reviewed
    open_page(page, f"{url}/#/models/{MODEL}?workflowType=machine_learning", MODEL)
    page.get_by_text("champion").first.wait_for()
    shot(page, "registered-model")
    open_page(page, f"{url}/#/models/{MODEL}/versions/1?workflowType=machine_learning", "promotion.decision")
    body = page.inner_text("body")
    for evidence in ("promoted", "promotion.fid", "promotion.copy_share", "dataset_fingerprint", "evaluator_sha256"):
        assert evidence in body, evidence
    assert "champion" in body
    shot(page, "model-version")
