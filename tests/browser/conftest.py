"""Fixtures for the browser tests: one JupyterLab server and one Chromium per module.

They need Python Playwright, Debian's Chromium and the built lab extension. Without
them the tests are skipped on a developer's machine and fail under CI (``CI`` set), so
a CI that lost a step cannot pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .lab import CHROMIUM, REPO, Lab, chromium, installed_extension, require, running_lab

ARTIFACTS = REPO / "test-artifacts"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: needs JupyterLab, Playwright and Chromium")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    built = (REPO / "dspool_jupyter" / "labextension" / "package.json").is_file()
    require(
        "the built lab extension (`pip install -e .`, or "
        "`cd labextension && jlpm install && jlpm build:prod`)",
        built or installed_extension() is not None,
    )
    with running_lab(tmp=tmp_path_factory.mktemp("lab")) as server:
        yield server


@pytest.fixture(scope="module")
def notebook7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A Notebook 7 server (``jupyter notebook``) with the built extension."""
    require("Notebook 7 (`pip install 'notebook>=7'`)", bool(importlib.util.find_spec("notebook")))
    with running_lab(tmp=tmp_path_factory.mktemp("nb7"), app="notebook") as server:
        yield server


# module scope: Playwright's sync API keeps an asyncio loop running in this thread while
# it is open, which would break asyncio.run() in the test modules that come after
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require(
        "Python Playwright (`pip install playwright`)", bool(importlib.util.find_spec("playwright"))
    )
    require(f"Chromium at {CHROMIUM} (`apt-get install -y chromium`)", os.access(CHROMIUM, os.X_OK))
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser: object, request: pytest.FixtureRequest) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"))
        context.close()
    dspool_errors = [e for e in errors if "dspool" in e.lower()]
    assert not dspool_errors, dspool_errors


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
