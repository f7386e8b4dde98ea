"""A real JupyterLab on 127.0.0.1 and Debian's Chromium, for the browser tests and bench.

``running_lab()`` starts ``jupyter lab`` with private config, runtime, settings and
workspace directories and no token, serving ``root_dir``; every process it starts
(server, kernels, pool workers) carries a marker in its environment, and whatever still
carries it after the server stopped is killed and reported. ``chromium()`` launches
``/usr/bin/chromium`` through Python Playwright (never a downloaded browser).

The lab extension is the in-repo build (``dspool_jupyter/labextension``, made by
``pip install -e .`` or ``cd labextension && jlpm install && jlpm build:prod``) when it
exists, put first on ``JUPYTER_PATH`` so a stale installed copy cannot shadow it;
otherwise the installed one (``share/jupyter/labextensions/dspool-jupyter``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

__all__ = [
    "EXTENSION_NAME",
    "REPO",
    "Lab",
    "chromium",
    "extension_version",
    "installed_extension",
    "lab_env",
    "leftover_processes",
    "measure_death_latency",
    "notebook_json",
    "require",
    "open_notebook",
    "run_cell",
    "running_lab",
    "status_item_data",
    "wait_kernel_idle",
]

REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "dspool-jupyter"
MARKER_ENV = "DSPOOL_BROWSER_TEST"
CHROMIUM = os.environ.get("DSPOOL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_TIMEOUT = 60  # seconds
SERVER_STOP_TIMEOUT = 15  # seconds


def extension_version() -> str:
    data = json.loads((REPO / "labextension" / "package.json").read_text())
    return str(data["version"])


def installed_extension() -> Path | None:
    """Where ``jupyter labextension list`` finds the extension without help, if anywhere."""
    from jupyter_core.paths import jupyter_path

    for base in jupyter_path("labextensions"):
        candidate = Path(base) / EXTENSION_NAME / "package.json"
        if candidate.is_file():
            return candidate.parent
    return None


def lab_env(tmp: Path) -> dict[str, str]:
    """The environment for a private lab under ``tmp`` (also for ``jupyter labextension``)."""
    env = dict(os.environ)
    for var in ("JUPYTER_TOKEN", "JUPYTER_CONFIG_PATH", "JUPYTER_PREFER_ENV_PATH"):
        env.pop(var, None)
    for name in ("config", "runtime", "settings", "workspaces", "data", "cache"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        XDG_CACHE_HOME=str(tmp / "cache"),  # the pool's default program store
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
    )
    # no "get Jupyter news?" prompt over the screenshots
    news = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True, exist_ok=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    built = REPO / "dspool_jupyter" / "labextension"
    if not (built / "package.json").is_file():
        if installed_extension() is None:
            raise RuntimeError(
                "the lab extension is neither installed nor built; build it with "
                "`cd labextension && jlpm install && jlpm build:prod`"
            )
    else:
        share = tmp / "share" / "jupyter"
        (share / "labextensions").mkdir(parents=True, exist_ok=True)
        link = share / "labextensions" / EXTENSION_NAME
        if not link.exists():
            link.symlink_to(built, target_is_directory=True)
        env["JUPYTER_PATH"] = os.pathsep.join(
            p for p in (str(share), env.get("JUPYTER_PATH", "")) if p
        )
    return env


def require(what: str, present: bool) -> None:
    """Skip the test when ``what`` is missing; fail instead under CI (``CI`` set)."""
    if present:
        return
    import pytest

    message = f"browser tests need {what}"
    if os.environ.get("CI", "").lower() in ("", "0", "false"):
        pytest.skip(message)
    pytest.fail(message)


def notebook_json(*sources: str) -> str:
    """An nbformat 4 notebook with one code cell per source, for the python3 kernel."""
    cells: list[dict[str, Any]] = [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": f"cell{i}",
            "metadata": {},
            "outputs": [],
            "source": src,
        }
        for i, src in enumerate(sources)
    ]
    return json.dumps(
        {
            "cells": cells,
            "metadata": {
                "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        },
        indent=1,
    )


def leftover_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``MARKER_ENV=marker``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ and state != b"Z":
            found.append(int(entry))
    return found


@dataclass
class Lab:
    url: str
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path
    marker: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_lab(
    root: Path | None = None, tmp: Path | None = None, app: str = "lab"
) -> Iterator[Lab]:
    """Start ``jupyter lab`` (``app="notebook"``: Notebook 7) serving ``root``.

    Stops it and everything it started after. Kernels talk to the server over IPC
    (Unix sockets in the private runtime directory), not TCP.
    """
    with contextlib.ExitStack() as stack:
        if tmp is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dspool-lab-")))
        root = root or tmp / "root"
        root.mkdir(parents=True, exist_ok=True)
        env = lab_env(tmp)
        marker = uuid.uuid4().hex
        env[MARKER_ENV] = marker
        port = _free_port()
        log = tmp / "jupyter-lab.log"
        name = {"lab": "LabApp", "notebook": "JupyterNotebookApp"}[app]
        cmd = [
            sys.executable,
            "-m",
            {"lab": "jupyterlab", "notebook": "notebook"}[app],
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            "--FileContentsManager.delete_to_trash=False",
            f"--{name}.expose_app_in_browser=True",
            "--KernelManager.transport=ipc",
            f"--KernelManager.ip={tmp / 'runtime' / 'kernel'}",
            f"--ServerApp.root_dir={root}",
        ]
        if app == "lab":
            cmd += [
                "--LabApp.news_url=",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(log, "wb") as out:
            process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/api/status", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"jupyter lab did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield Lab(url=url, root=root, env=env, process=process, log=log, marker=marker)
        finally:
            _stop(process, marker)


def _stop(process: subprocess.Popen[bytes], marker: str) -> None:
    if process.poll() is None:
        process.terminate()  # jupyter server shuts its kernels down on SIGTERM
        try:
            process.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    deadline = time.monotonic() + 5
    left = leftover_processes(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftover_processes(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        raise RuntimeError(f"processes outlived the lab server (killed now): {left}")


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, chromium_sandbox=False
        )
        try:
            yield browser
        finally:
            browser.close()


def open_notebook(page: Page, lab: Lab, path: str, timeout: float = 60) -> None:
    """Open ``path`` in the lab and wait until its kernel is idle."""
    page.goto(f"{lab.url}/lab/tree/{path}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout * 1000)
    wait_kernel_idle(page, timeout)


def wait_kernel_idle(page: Page, timeout: float = 60) -> None:
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session
                && w.sessionContext.session.kernel;
            return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
        }""",
        timeout=timeout * 1000,
    )


def run_cell(page: Page, index: int, timeout: float = 60) -> str:
    """Run code cell ``index`` of the current notebook with Shift+Enter; return its output."""
    cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(index)
    page.evaluate(
        """i => {
            const nb = window.jupyterapp.shell.currentWidget.content;
            nb.widgets[i].model.executionCount = null;
        }""",
        index,
    )
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")
    prompt = cell.locator(".jp-InputArea-prompt")
    page.wait_for_function(
        "el => /\\[\\d+\\]/.test(el.textContent)",
        arg=prompt.element_handle(),
        timeout=timeout * 1000,
    )
    return str(cell.locator(".jp-OutputArea").inner_text())


def status_item_data(page: Page) -> dict[str, Any]:
    """The status item's ``data-*`` attributes ({} while it is not shown)."""
    result = page.evaluate(
        """() => {
            const el = document.querySelector('.dspool-status-item');
            return el && el.offsetParent !== null ? {...el.dataset} : {};
        }"""
    )
    return dict(result)


def watch_status_item(page: Page) -> None:
    """Record every change of the status item as ``window.__dspoolSeen`` (time in ms)."""
    page.evaluate(
        """() => {
            window.__dspoolSeen = [];
            const el = document.querySelector('.dspool-status-item');
            const record = () => window.__dspoolSeen.push({t: Date.now(), ...el.dataset});
            new MutationObserver(record).observe(el, {attributes: true});
        }"""
    )


def worker_pids(page: Page, state: str = "idle") -> dict[str, int]:
    """Worker id to pid of the workers in ``state``, from the side panel (must be open)."""
    rows = page.evaluate(
        """state => [...document.querySelectorAll('#dspool-panel tr.dspool-worker-' + state)]
            .map(r => [r.dataset.workerId, r.dataset.pid])""",
        state,
    )
    return {wid: int(pid) for wid, pid in rows if pid}


def measure_death_latency(page: Page, state: str = "idle", timeout: float = 10) -> float:
    """SIGKILL one worker in ``state``; seconds until the status item showed the death.

    The item shows it when a snapshot arrives with ``replaced`` or ``failed`` up, or
    fewer workers ready than the target. Then waits until the pool is full again.
    Page and test share this machine's clock.
    """
    before = status_item_data(page)
    target = int(before["target"])
    replaced = int(before["replaced"])
    failed = int(before["failed"])
    pids = worker_pids(page, state)
    if not pids:
        raise RuntimeError(f"no {state} worker to kill")
    _worker_id, pid = sorted(pids.items())[0]
    watch_status_item(page)
    t0 = time.time() * 1000
    os.kill(pid, signal.SIGKILL)
    seen = page.wait_for_function(
        """([t0, replaced, failed]) => (window.__dspoolSeen || []).find(
            r => r.t >= t0 && (Number(r.replaced) > replaced || Number(r.failed) > failed
                               || Number(r.ready) < Number(r.target)))""",
        arg=[t0, replaced, failed],
        timeout=timeout * 1000,
    ).json_value()
    shown = (float(seen["t"]) - t0) / 1000
    page.wait_for_function(
        """([target, replaced]) => {
            const el = document.querySelector('.dspool-status-item');
            return el && Number(el.dataset.ready) === target
                && Number(el.dataset.replaced) > replaced;
        }""",
        arg=[target, replaced],
        timeout=timeout * 1000,
    )
    return shown
