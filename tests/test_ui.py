"""A real browser on the pages a user opens after a run: Playwright drives Chromium (Debian's package; `python -m
infra prereqs` installs it) against `make ui`'s MLflow server and the Prefect server the tests' tiny lifecycle
reported to, both on 127.0.0.1.

LMFORGE_SCREENSHOTS=<folder> keeps the screenshots there (`make screenshots` writes docs/ui/ with them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_http

from lmforge.config import STAGES

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# flags from the machine's notes: no sandbox as root, and no calls home that a closed network refuses
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def mlflow_ui(lifecycle_project, lifecycle_run, tmp_path_factory):
    """`make ui`'s command on the project's store: (the runs address it printed, the registry's, the process)."""
    port, log = free_port(), tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli.ui", "--root", str(lifecycle_project), "--port",
                                 str(port), "--experiment", "lmforge"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        printed = dict(line.split(":", 1) for line in log.read_text().splitlines()[:2])
        yield printed["lmforge runs"].strip(), printed["lmforge registry"].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    from infra.prereqs import chromium

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium(install=False)), args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1500, "height": 900})
        tab.set_default_timeout(60_000)  # the first render of a React app on a busy 2-core machine
        yield tab
        browser.close()


def shot(tab, name: str) -> None:
    if folder := os.environ.get("LMFORGE_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(folder) / name))


def _close_assistant(tab) -> None:
    """MLflow 3.17 opens an assistant panel beside every page; closed, the runs table has the width."""
    close = tab.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_the_experiment_opens_on_its_runs_with_the_stage_runs_and_the_model(page, mlflow_ui, lifecycle_run):
    runs, _ = mlflow_ui
    page.goto(runs)
    page.get_by_role("link", name="lifecycle").first.wait_for()
    _close_assistant(page)
    body = page.inner_text("body")
    assert "Runs" in body and "Traces\n0" not in body and "Token Usage" not in body  # not the GenAI overview
    # the first flow run: its stage runs, one per stage it ran, under it
    page.locator("button[data-component-id*='runnamecellrenderer']").last.click()
    for stage in (r["stage"] for r in lifecycle_run):
        page.get_by_role("link", name=stage, exact=True).first.wait_for()
    assert page.get_by_text("mix corpus").count()  # the Dataset column: what the stages read
    shot(page, "mlflow-runs.png")


def test_the_registry_shows_the_champion(page, mlflow_ui):
    _, registry = mlflow_ui
    page.goto(registry)
    page.get_by_text("champion").first.wait_for()
    assert page.get_by_text("candidate").count()
    shot(page, "mlflow-registry.png")


def test_the_prefect_flow_run_shows_its_task_runs_and_the_report(page, prefect_server, lifecycle_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        first = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC, limit=1)[0]
    page.goto(f"{prefect_server}/runs/flow-run/{first.id}")
    page.get_by_text(first.name).first.wait_for()
    page.get_by_text("Task Runs", exact=True).first.click()
    for stage in STAGES[:3]:
        page.get_by_text(stage, exact=True).first.wait_for()
    shot(page, "prefect-flow-run.png")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("lifecycle-report").first.wait_for()
