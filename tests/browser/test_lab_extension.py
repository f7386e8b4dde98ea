"""The lab extension in a real JupyterLab and Chromium: status item, panel, restarts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .lab import (
    EXTENSION_NAME,
    Lab,
    extension_version,
    installed_extension,
    measure_death_latency,
    notebook_json,
    open_notebook,
    require,
    run_cell,
    status_item_data,
    wait_kernel_idle,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

POOL_CELLS = (
    "from dspool_jupyter.comm import register_comm_target\nregister_comm_target()",
    "from dspool_jupyter import Pool\npool = Pool(workers=2)",
    "from dspool_jupyter.errors import WorkerCrashed\n"
    'pool.define("crash", "import os\\ndef crash():\\n    os._exit(3)\\n")\n'
    "try:\n"
    '    pool.run("crash")\n'
    "except WorkerCrashed as exc:\n"
    '    print("crashed:", exc)',
    'from dspool_jupyter import Pool\npool = Pool(workers=2, preload=["slow_start"])',
    "from dspool_jupyter.widget import StatusView\nStatusView(pool)",
    # a limit for plain programs, a budget, and one LM request under a permit
    'pool.set_rate_limit("openai/gpt-4o-mini", rpm=60, tpm=10_000, plain=True)\n'
    "pool.set_budget(max_tokens=1000)\n"
    'pool.define("ask", "from dspool_jupyter.llm import permit\\ndef ask():\\n'
    "    with permit('openai/gpt-4o-mini') as p:\\n        p.record(12, 5)\\n\")\n"
    'pool.run("ask")',
)
SLOW_START = "import time\n\ntime.sleep(2.0)  # a heavy preload: the pool is 'starting' meanwhile\n"

ITEM = ".dspool-status-item"
READY_2 = f'{ITEM}[data-ready="2"][data-target="2"]'


def item_hidden(page: Any) -> None:
    page.wait_for_function(
        f"""() => {{
            const el = document.querySelector('{ITEM}');
            return !el || el.offsetParent === null;
        }}"""
    )


def test_labextension_listed() -> None:
    """What a user sees after ``pip install``: the extension enabled and OK."""
    require("the package installed with its lab extension", installed_extension() is not None)
    env = {k: v for k, v in os.environ.items() if k != "JUPYTER_PATH"}
    out = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text = out.stdout + out.stderr
    line = next((x for x in text.splitlines() if EXTENSION_NAME in x), "")
    assert f"{EXTENSION_NAME} v{extension_version()}" in line, text
    assert "enabled" in line and "OK" in line, text


def test_status_item_panel_and_restarts(lab: Lab, page: Any, artifacts: Path) -> None:
    (lab.root / "pool.ipynb").write_text(notebook_json(*POOL_CELLS))
    (lab.root / "other.ipynb").write_text(notebook_json("1 + 1"))
    (lab.root / "slow_start.py").write_text(SLOW_START)
    open_notebook(page, lab, "pool.ipynb")
    assert status_item_data(page) == {}  # no pool, no item

    assert "True" in run_cell(page, 0)
    run_cell(page, 1)
    run_cell(page, 4)  # the status widget, live from here on
    page.wait_for_selector(READY_2, state="visible")
    item = page.locator(ITEM)
    assert item.inner_text() == "dspool 2/2 · 0/2 in flight · 0 queued · 0 failed"
    assert item.get_attribute("data-state") == "healthy"
    assert "dspool-state-healthy" in (item.get_attribute("class") or "")
    page.screenshot(path=str(artifacts / "01-status-item-ready.png"))

    # a program that kills its worker: the failed count rises and the worker is replaced
    assert "crashed:" in run_cell(page, 2)
    page.wait_for_selector(f'{READY_2}[data-failed="1"][data-replaced="1"][data-died="1"]')
    assert item.inner_text() == "dspool 2/2 · 0/2 in flight · 0 queued · 1 failed · 1 died"
    page.screenshot(path=str(artifacts / "02-status-item-after-crash.png"))

    # the status widget in the notebook: the same words, the dead worker listed
    view = page.locator(".dspool-status-widget")
    view.wait_for(state="visible")
    page.wait_for_function(
        "() => /1 died just now/.test(document.querySelector('.dspool-status-widget').innerText)"
    )
    headline = view.locator(".dspool-headline").inner_text()
    assert "2/2 workers ready, 0/2 slots in flight, 0 queued" in headline, headline
    assert "1 failed" in headline and "1 replaced" in headline, headline
    assert "exit code 3" in view.inner_text()
    view.screenshot(path=str(artifacts / "02b-status-widget-after-crash.png"))

    # the panel, opened from the item
    item.click()
    panel = page.locator("#dspool-panel")
    panel.wait_for(state="visible")
    rows = panel.locator("tr.dspool-worker:not(.dspool-worker-departed)")
    page.wait_for_function(
        "() => document.querySelectorAll('#dspool-panel tr.dspool-worker-idle').length === 2"
    )
    assert panel.locator(".dspool-progress-label").inner_text() == "All 2 workers ready"
    failure = panel.locator(".dspool-failure").first
    # a crash has no traceback: its line says how the worker died, with nothing to open
    assert "WorkerCrashed: the worker exited with code 3" in failure.inner_text()
    assert failure.locator(".dspool-traceback").count() == 0
    assert "no traceback" not in panel.inner_text()
    page.screenshot(path=str(artifacts / "03-panel.png"))

    # the provider limits, the LM usage and the budget, as the status widget says them
    assert panel.locator(".dspool-limits").count() == 0  # nothing set: nothing shown
    run_cell(page, 5)
    limits = panel.locator(".dspool-limits")
    limits.wait_for(state="visible")
    page.wait_for_function(
        "() => document.querySelectorAll('#dspool-panel .dspool-limit-line').length === 3"
    )
    lines = limits.locator(".dspool-limit-line").all_inner_texts()
    assert lines[0] == "openai/gpt-4o-mini: 1/60 rpm, 17/10,000 tpm, 0 in flight, 0 429s"
    assert lines[1].startswith("LM usage: 1 requests, 17 tokens (12 prompt), $"), lines
    assert lines[2] == "budget: 17 of 1,000 tokens spent"
    # the same words in the widget (it snapshots the limits once a second: wait for it)
    page.wait_for_function(
        """lines => {
            const el = document.querySelector('.dspool-status-widget .dspool-limits');
            return !!el && el.innerText.split('\\n').filter(x => x).join('\\n')
                === lines.join('\\n');
        }""",
        arg=lines,
        timeout=10_000,
    )
    page.screenshot(path=str(artifacts / "03b-panel-limits.png"))

    # restart a worker from the panel
    first = rows.first
    worker_id = first.get_attribute("data-worker-id")
    pid = int(first.get_attribute("data-pid") or 0)
    first.locator("button.dspool-restart-worker").click()
    page.wait_for_function(
        """wid => {
            const rows = [...document.querySelectorAll(
                '#dspool-panel tr.dspool-worker:not(.dspool-worker-departed)')];
            return rows.length === 2 && rows.every(r => r.dataset.workerId !== wid)
                && rows.every(r => r.classList.contains('dspool-worker-idle'));
        }""",
        arg=worker_id,
    )
    assert f"Worker {worker_id} restarted." in panel.locator(".dspool-message").inner_text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    page.screenshot(path=str(artifacts / "04-panel-after-worker-restart.png"))

    # a worker's death shows in the item well within a second
    latency = measure_death_latency(page)
    print(f"death to status item: {latency:.3f} s")  # noqa: T201
    assert latency < 1.0
    # ...marked in the item and listed in the panel for as long as the widget lists it
    page.wait_for_selector(f"{ITEM}:not([data-died='0'])")
    assert re.search(r" · \d died$", item.inner_text()), item.inner_text()
    dead = panel.locator("tr.dspool-worker-dead", has_text="killed by SIGKILL")
    dead.wait_for(state="visible")
    page.screenshot(path=str(artifacts / "04b-panel-after-sigkill.png"))
    page.wait_for_selector(f"{ITEM}[data-died='0']", timeout=25_000)
    assert not item.inner_text().endswith("died")
    page.wait_for_function(
        "() => !document.querySelector('#dspool-panel tr.dspool-worker-dead')", timeout=10_000
    )

    # it follows the active notebook...
    page.evaluate(
        "() => window.jupyterapp.commands.execute('docmanager:open', {path: 'other.ipynb'})"
    )
    wait_kernel_idle(page)
    item_hidden(page)
    assert "has no dspool pool" in panel.inner_text()
    page.evaluate(
        "() => window.jupyterapp.commands.execute('docmanager:open', {path: 'pool.ipynb'})"
    )
    page.wait_for_selector(READY_2, state="visible")

    # ...and the kernel's restarts
    page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()"
    )
    item_hidden(page)
    wait_kernel_idle(page)
    run_cell(page, 0)
    run_cell(page, 3)  # a pool whose start takes a while: start-up progress shows
    page.wait_for_selector(f'{ITEM}[data-state="starting"][data-ready="0"]', state="visible")
    assert "dspool-state-starting" in (item.get_attribute("class") or "")
    label = panel.locator(".dspool-progress-label").inner_text()
    assert label.startswith("Starting: 0 of 2 workers ready"), label
    # what it is doing: the template imports the preload (filled from its start and ready)
    assert re.search(r"importing slow_start in the template \(\d+ s so far\)", label), label
    page.screenshot(path=str(artifacts / "05-after-kernel-restart-starting.png"))
    page.wait_for_selector(f'{READY_2}[data-state="healthy"][data-failed="0"]', state="visible")
    page.screenshot(path=str(artifacts / "06-after-kernel-restart-ready.png"))

    # a reloaded page finds the kernel's comm again (comm_info), with no cell run
    page.reload()
    page.wait_for_selector(READY_2, state="visible", timeout=60_000)
