"""Notebook 7 (no status bar) in Chromium: the toolbar item is the way in to the pool."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from .lab import Lab, notebook_json, wait_kernel_idle

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

CELLS = (
    "%load_ext dspool_jupyter",
    "%dspool start --workers 2 --no-wait",
)
TOOLBAR = ".jp-NotebookPanel-toolbar .dspool-toolbar-item"


def run_cell(page: Any, index: int, timeout: float = 60) -> None:
    """Run cell ``index`` through the notebook's own command (no status bar to read)."""
    page.evaluate(
        """i => {
            const panel = window.jupyterapp.shell.currentWidget;
            panel.content.activeCellIndex = i;
            return window.jupyterapp.commands.execute('notebook:run-cell');
        }""",
        index,
    )
    page.wait_for_function(
        """i => {
            const cell = window.jupyterapp.shell.currentWidget.content.widgets[i];
            return cell.model.executionCount !== null;
        }""",
        arg=index,
        timeout=timeout * 1000,
    )


def test_toolbar_item_opens_the_panel_and_marks_a_death(
    notebook7: Lab, page: Any, artifacts: Path
) -> None:
    (notebook7.root / "pool.ipynb").write_text(notebook_json(*CELLS))
    page.goto(f"{notebook7.url}/notebooks/pool.ipynb")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    wait_kernel_idle(page)
    assert page.evaluate("() => window.jupyterapp.name") == "Jupyter Notebook"
    assert page.locator(".jp-StatusBar, .dspool-status-item").count() == 0  # no status bar

    item = page.locator(TOOLBAR)
    item.wait_for(state="visible")
    assert item.inner_text() == "dspool: no pool"
    item.click()
    panel = page.locator("#dspool-panel")
    panel.wait_for(state="visible")
    assert "has no dspool pool" in panel.inner_text()
    assert panel.locator("button.dspool-restart-pool").is_disabled()

    run_cell(page, 0)
    run_cell(page, 1)
    page.wait_for_selector(f'{TOOLBAR}[data-ready="2"][data-target="2"][data-state="healthy"]')
    assert item.inner_text() == "dspool 2/2 · 0 queued"
    page.wait_for_function(
        "() => document.querySelectorAll('#dspool-panel tr.dspool-worker-idle').length === 2"
    )
    assert not panel.locator("button.dspool-restart-pool").is_disabled()
    page.screenshot(path=str(artifacts / "nb7-01-toolbar-item-and-panel.png"))

    # a SIGKILLed worker: the item marks the death, the panel lists how it died
    rows = page.evaluate(
        """() => [...document.querySelectorAll('#dspool-panel tr.dspool-worker-idle')]
            .map(r => Number(r.dataset.pid))"""
    )
    os.kill(rows[0], signal.SIGKILL)
    page.wait_for_selector(f'{TOOLBAR}[data-died="1"]')
    assert "1 died" in item.inner_text()
    dead = panel.locator("tr.dspool-worker-dead", has_text="killed by SIGKILL")
    dead.wait_for(state="visible")
    page.wait_for_selector(f'{TOOLBAR}[data-ready="2"][data-died="1"]')
    # the status widget in the cell lists the same death
    page.wait_for_function(
        """() => {
            const text = document.querySelector('.dspool-status-widget').innerText;
            return /^dspool pool healthy/.test(text) && /killed by SIGKILL/.test(text);
        }"""
    )
    page.screenshot(path=str(artifacts / "nb7-02-after-sigkill.png"))
