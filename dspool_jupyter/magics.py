"""IPython magics: ``%load_ext dspool_jupyter``, then ``%dspool`` and ``%%dspool``.

The syntax is DESIGN.md's (``%dspool?`` shows all of it); these are the decisions
behind it:

- **Which pool.** One pool per kernel: the magics use the kernel's current pool
  (:func:`dspool_jupyter.pool.current_pool`, the last pool started in this kernel and not
  closed, whether by ``%dspool start`` or by ``Pool(...)`` in code), which is also the
  one the JupyterLab status item shows. ``%dspool start`` while a pool is running says
  so and changes nothing: ``%dspool start --replace`` stops the running pool (whoever
  started it) and starts the new one, ``%dspool stop`` just stops it.
- **Auto-start.** ``program``, ``signature``, ``run``, ``map`` and ``lm`` start a pool with
  the defaults (one worker per CPU, the default store; ``signature`` and ``lm`` also
  preload dspy, so its workers fork with it imported) when there is none, and say so in
  one line; ``status``, ``errors``, ``restart``, ``stop``, ``limit`` and ``usage`` never
  start one, and ``programs`` lists the default store when there is no pool.
- **Limits and usage.** ``%dspool limit MODEL rpm=N tpm=N`` is ``pool.set_rate_limit``
  (``--plain`` its ``plain=True``, ``--off`` removes the limit), ``%dspool limit --budget
  max_cost=D max_tokens=N`` is ``pool.set_budget``, and ``%dspool limit`` alone shows
  the limits snapshot; ``%dspool usage`` prints ``pool.usage().table()``. Each
  ``key=value`` is checked before the pool sees it: an unknown model, an unknown key or
  a value that is not a positive number is a one-line ``UsageError`` naming it.
- **Store.** The default is the pool's default (``$DSPOOL_STORE``, else the per-user
  cache directory), so programs defined in a notebook survive kernel restarts;
  ``--store PATH`` chooses another. Programs are anonymous (visible to every call)
  unless ``--session S`` is given.
- **Inputs.** ``%dspool run NAME key=value ...``: each value is a Python literal
  (``3``, ``'a b'``, ``[1, 2]``, ``{'k': 1}``) and otherwise the text as written
  (``question=Why?`` is the string ``'Why?'``); a value without ``key=`` is a positional
  argument. Quotes and brackets group, so ``q="two words"`` and ``xs=[1, 2]`` are one
  input each. IPython expands ``{expr}`` and ``$name`` in the line first (as text). The
  body of ``%%dspool run NAME`` is either a JSON object (or a Python dict literal) of
  keyword arguments, or one ``key = value`` per line with the same literal rule (blank
  lines and ``#`` comments are skipped); inputs on the magic's line come on top.
- **Results.** ``run`` returns the value, so it shows as the cell's output like any
  expression; ``--out VAR`` stores it in ``VAR`` instead (nothing is shown, as with an
  assignment). What the program printed is shown above it. A program's exception shows
  the worker's traceback (:class:`ProgramError`, the worker named) and fails the cell;
  the kernel and the pool carry on. The pool's own faults (:class:`WorkerCrashed`,
  :class:`CallTimeout`, ...) show as one line. User mistakes are a one-line
  ``UsageError`` that says what to do.
- **Background.** ``run --bg`` returns at once: a :class:`BackgroundCall` handle goes to
  ``--out VAR`` (default ``dspool_bg``), the cell shows a placeholder, and the
  placeholder is replaced in that cell by the value (with what the program printed) or
  the error when it arrives, even if other cells ran in between: it is a display with a
  display id, updated from a helper thread. ``VAR.result()`` waits for the value.
- **Map.** ``%dspool map NAME --over VAR`` makes one call per item of the list ``VAR``
  (each item is the one positional argument, or keyword ``--arg K``, or unpacked with
  ``--unpack``: a dict as keywords, a tuple or list as positionals; ``key=value`` inputs
  are added to every call), all submitted at once, with a progress bar (done, failed,
  cancelled and restored counted apart; elapsed time, rate, time left). It returns (or
  stores in ``--out VAR``) a :class:`~dspool_jupyter.mapping.MapResult`: a list in input
  order in which a failed item holds its exception, with ``.errors`` (index ->
  exception). Failures never stop the other items; the cell lists the first few. The
  map itself is :mod:`dspool_jupyter.mapping` (``Pool.map``); ``--journal J`` makes it
  durable (:mod:`dspool_jupyter.journal`), ``--bg`` returns its handle at once, and
  ``%dspool journals`` lists the store's journals.
- **Interrupt.** The kernel's stop button cancels the cell's calls: the one ``run`` waits
  for, every call of a ``map``, and the ``--bg`` calls started by that same cell (a
  ``--bg`` call of an earlier cell keeps running; ``handle.cancel()`` stops it). A
  cancelled running call gets SIGINT in its worker; the pool and the kernel stay usable.
  The cell then shows a few lines, not the kernel's traceback through this module and
  ``concurrent.futures`` (ipyparallel's short form): which calls were cancelled, where
  they ran, and the pool's state (:func:`cancel_on_interrupt`).
- **Shutdown.** Pools close at interpreter exit (:mod:`dspool_jupyter.pool` registers it),
  so a kernel shutdown or restart stops them cleanly, and every pool process dies with
  its parent anyway, so no worker outlives its kernel.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import concurrent.futures
import html
import json
import logging
import math
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .calls import echo_output
from .errors import (
    DspoolError,
    PoolStartTimeout,
    ProgramError,
    ProgramNotFound,
    UnknownWorker,
    UnpicklableArguments,
)
from .journal import JournalNotFound, check_journal_name, list_journals, open_journal
from .limits import check_model
from .mapping import MapHandle, MapProgress, MapResult
from .pool import CallFuture, Pool, current_pool
from .status import PoolView, limits_of
from .usage import budget_text, cost_text, model_line
from .widget import DEFAULT_INTERVAL, FailuresView, StatusView, build_model, render_text

__all__ = [
    "DEFAULT_BG_NAME",
    "BackgroundCall",
    "DspoolMagics",
    "MapResult",
    "cancel_on_interrupt",
    "parse_cell_inputs",
    "parse_inputs",
    "parse_value",
    "register",
    "split_line",
    "unregister",
]

log = logging.getLogger(__name__)

DEFAULT_BG_NAME = "dspool_bg"  # where --bg puts its handle without --out
START_WAIT = 60.0  # seconds %dspool start waits for every worker to be ready
PROGRESS_INTERVAL = 0.25  # seconds between progress-bar updates of map
SHOWN_MAP_ERRORS = 5  # failed items listed under a map
MAP_CANCEL_WAIT = 5.0  # seconds an interrupted map waits for its cancelled calls to end
SUBCOMMANDS = (
    "start",
    "program",
    "signature",
    "run",
    "map",
    "lm",
    "status",
    "programs",
    "errors",
    "restart",
    "stop",
    "journals",
    "limit",
    "usage",
)
SYNTAX = {
    "start": "%dspool start [--workers N] [--concurrency K] [--store PATH] [--preload mod1,mod2]"
    " [--timeout S] [--dask ADDRESS] [--no-wait] [--replace]",
    "program": "%%dspool program NAME [--session S] [--entry FUNC], source in the cell",
    "signature": "%%dspool signature NAME [--module Predict|ChainOfThought] [--session S],"
    " the signature in the cell",
    "run": "%dspool run NAME [key=value ...] [--session S] [--timeout S] [--bg] [--out VAR]",
    "map": "%dspool map NAME --over VAR [key=value ...] [--arg K | --unpack] [--journal J"
    " [--keep-errors]] [--session S] [--timeout S] [--bg] [--out VAR]",
    "lm": "%dspool lm MODEL [key=value ...]",
    "status": "%dspool status [--interval S] [--text]",
    "programs": "%dspool programs [--session S]",
    "errors": "dspool errors",
    "restart": "%dspool restart [WORKER]",
    "stop": "dspool stop",
    "journals": "%dspool journals [--delete J]",
    "limit": "%dspool limit [MODEL rpm=N tpm=N [--plain] | MODEL --off"
    " | --budget max_cost=D max_tokens=N | --budget --off]",
    "usage": "%dspool usage [--out VAR]",
}
LIMIT_KEYS = ("rpm", "tpm")  # %dspool limit MODEL key=value
BUDGET_KEYS = ("max_cost", "max_tokens")  # %dspool limit --budget key=value
_KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_F = TypeVar("_F", bound=Callable[..., Any])


# ----------------------------------------------------------------------- input parsing


def split_line(line: str) -> list[str]:
    """Split a magic's line on spaces, keeping quoted text and brackets in one token.

    Quotes stay in the token (``q="a b"`` is one token, its value the string ``a b``).
    """
    tokens: list[str] = []
    buf: list[str] = []
    depth = 0
    quote: str | None = None
    i = 0
    while i < len(line):
        ch = line[i]
        if quote is not None:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(line):
                buf.append(line[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            buf.append(ch)
        elif ch in "([{":
            depth += 1
            buf.append(ch)
        elif ch in ")]}":
            depth = max(0, depth - 1)
            buf.append(ch)
        elif ch.isspace() and depth == 0:
            if buf:
                tokens.append("".join(buf))
                buf = []
        else:
            buf.append(ch)
        i += 1
    if quote is not None:
        raise UsageError(f"a quote ({quote}) is not closed in: {line.strip()}")
    if buf:
        tokens.append("".join(buf))
    return tokens


def parse_value(text: str) -> Any:
    """A Python literal if ``text`` is one (``3``, ``'x'``, ``[1, 2]``), else ``text``."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _text(value: str) -> str:
    """An option's value: the text, without the quotes that grouped it."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        unquoted = parse_value(value)
        if isinstance(unquoted, str):
            return unquoted
    return value


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be more than 0 seconds")
    return number


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _identifier(value: str) -> str:
    value = _text(value)
    if not value.isidentifier():
        raise argparse.ArgumentTypeError(f"{value!r} is not a Python variable name")
    return value


def parse_inputs(tokens: Iterable[str]) -> tuple[list[Any], dict[str, Any]]:
    """``key=value`` tokens as keyword arguments, other tokens as positional ones."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for token in tokens:
        match = _KEY_RE.match(token)
        if match is None:
            args.append(parse_value(token))
            continue
        key, value = match.groups()
        if key in kwargs:
            raise UsageError(f"input {key!r} is given twice")
        kwargs[key] = parse_value(value)
    return args, kwargs


def parse_cell_inputs(body: str) -> dict[str, Any]:
    """A ``%%dspool run`` body: a JSON object (or dict literal), or ``key = value`` lines."""
    text = body.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            data = parse_value(text)
            if not isinstance(data, dict):
                raise UsageError(
                    f"the cell is not a JSON object ({exc.msg} at line {exc.lineno}); "
                    "write a JSON object or one key = value per line"
                ) from None
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise UsageError("the cell's object must map input names (text) to values")
        return data
    kwargs: dict[str, Any] = {}
    for number, raw in enumerate(body.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(
                f"cell line {number} is not 'key = value': {line!r} "
                "(or write the inputs as one JSON object)"
            )
        if key in kwargs:
            raise UsageError(f"input {key!r} is given twice (cell line {number})")
        kwargs[key] = parse_value(value.strip())
    return kwargs


# ------------------------------------------------------------------- results and handles


class BackgroundCall:
    """The handle of a ``%dspool run --bg`` call (what ``--out VAR`` holds).

    ``result(timeout)`` waits for the value (or raises the call's error), ``done()``,
    ``exception(timeout)`` and ``cancel()`` are the future's; ``future`` is the
    :class:`~dspool_jupyter.pool.CallFuture` itself.
    """

    def __init__(self, program: str, future: CallFuture, cell: object, display: Any) -> None:
        self.program = program
        self.future = future
        self._cell = cell
        self._display = display

    def result(self, timeout: float | None = None) -> Any:
        return self.future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self.future.exception(timeout)

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        return self.future.cancel()

    def __repr__(self) -> str:
        if not self.future.done():
            state = "running"
        elif self.future.cancelled():
            state = "cancelled"
        elif self.future.exception() is not None:
            state = f"failed: {type(self.future.exception()).__name__}"
        else:
            state = "done"
        return f"<BackgroundCall {self.program!r} {state}>"


def _signature_cell(body: str) -> tuple[str, str | None]:
    """A signature cell: the ``inputs -> outputs`` line and the instruction lines."""
    try:
        from .dspy_programs import parse_signature_cell
    except ImportError:  # a dspy_programs without it: the whole body is the signature
        return body.strip(), None
    return parse_signature_cell(body)


def _one_line(exc: BaseException) -> BaseException:
    """Make IPython show ``exc`` as one line (its type and message) without a traceback."""
    line = f"{type(exc).__name__}: {exc}"
    exc.__dict__["_render_traceback_"] = lambda: [line]
    return exc


def _worker_list(ids: Iterable[str]) -> str:
    ordered = sorted(set(ids), key=lambda i: (len(i), i))
    return ", ".join(ordered)


def _pool_line(pool: PoolView | None) -> str:
    if pool is None:
        return ""
    try:
        status = pool.status()
    except Exception:
        return ""
    if status.state == "closed":
        return "The pool is closed."
    return (
        f"The pool carries on: {status.state}, {status.ready_count}/{status.target} workers "
        f"ready, {status.running} in flight, {status.queued} queued."
    )


def cancel_on_interrupt(
    program: str,
    futures: Iterable[concurrent.futures.Future[Any]],
    pool: PoolView | None,
) -> KeyboardInterrupt:
    """Cancel ``futures`` after the stop button and say so in a few lines.

    Returns the ``KeyboardInterrupt`` to raise (``raise ... from None``): IPython shows its
    lines instead of a traceback through the magics and ``concurrent.futures``. They name
    the calls that were cancelled while running (and on which worker), those cancelled
    before they started, those that had already ended, and the pool's state afterwards.
    ``run`` and ``map`` both use it.
    """
    running: list[str] = []
    queued = ended = 0
    for future in futures:
        if future.done():
            ended += 1
            continue
        worker = getattr(future, "worker_id", None)
        if future.cancel() or not future.done():
            if isinstance(worker, str):
                running.append(worker)
            else:
                queued += 1
        else:
            ended += 1
    cancelled = len(running) + queued
    if cancelled == 1 and running:
        first = f"cancelled the call of {program!r} on worker {running[0]} while it ran"
    elif cancelled == 1:
        first = f"cancelled the call of {program!r} before it started (it was queued)"
    else:
        parts = []
        if running:
            parts.append(f"{len(running)} running on {_worker_list(running)}")
        if queued:
            parts.append(f"{queued} queued")
        what = f" ({', '.join(parts)})" if parts else ""
        first = f"cancelled {cancelled} call{'s' if cancelled != 1 else ''} of {program!r}{what}"
        if ended:
            first += f"; {ended} had already ended"
    lines = [f"KeyboardInterrupt: {first}"]
    if running:
        lines.append(
            "The interrupted worker"
            + ("s get" if len(set(running)) > 1 else " gets")
            + " SIGINT and serve"
            + ("" if len(set(running)) > 1 else "s")
            + " the next call."
        )
    pool_line = _pool_line(pool)
    if pool_line:
        lines.append(pool_line)
    interrupt = KeyboardInterrupt(first)
    interrupt.__dict__["_render_traceback_"] = lambda: list(lines)
    return interrupt


def _display(obj: object, **kwargs: Any) -> Any:
    from IPython.display import display

    return display(obj, **kwargs)  # type: ignore[no-untyped-call]


@dataclass
class _Placeholder:
    """What a ``--bg`` cell shows until its call ends."""

    program: str
    handle_name: str

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, **kwargs: Any
    ) -> dict[str, str]:
        text = (
            f"{self.program}: running in the background ({self.handle_name}.result() waits for it)"
        )
        return {"text/plain": text, "text/html": f"<i>{html.escape(text)}</i>"}


@dataclass
class _Progress:
    """The progress bar of a map (a display updated in place)."""

    label: str
    progress: MapProgress
    note: str = ""

    def text(self) -> str:
        return self.progress.text(self.label) + (f" ({self.note})" if self.note else "")

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, **kwargs: Any
    ) -> dict[str, str]:
        text = self.text()
        p = self.progress
        colour = "#c62828" if p.failed or p.cancelled else "inherit"
        return {
            "text/plain": text,
            "text/html": f'<progress value="{p.ended}" max="{max(p.total, 1)}" '
            f'style="width:20em"></progress> <span style="color:{colour}">'
            f"{html.escape(text)}</span>",
        }


class _OutputThread:
    """One lazily started helper thread that renders finished ``--bg`` calls.

    Future callbacks run on the pool's dispatcher thread, which must not format values
    or talk to the frontend: they only queue a job here.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def post(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="dspool-magics-output", daemon=True
                )
                self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("dspool: showing a background result failed")

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._jobs.put(None)
            thread.join(timeout)


_outputs = _OutputThread()
atexit.register(_outputs.stop)


class _State:
    """What the magics keep across ``%reload_ext``: the pool they started, its view."""

    started: Pool | None = None
    view: StatusView | None = None


_state = _State()


def _outcome_bundle(shell: Any, program: str, future: CallFuture) -> dict[str, Any]:
    """The mime bundle that replaces a ``--bg`` placeholder: output, then value or error."""
    printed = (future.stdout or "") + (future.stderr or "")
    if future.cancelled():
        data: dict[str, Any] = {"text/plain": f"{program}: cancelled"}
        is_error = True
    elif (error := future.exception()) is not None:
        if isinstance(error, ProgramError):
            text = "\n".join(error._render_traceback_())
        else:
            text = f"{type(error).__name__}: {error}"
        data = {"text/plain": text}
        is_error = True
    else:
        value = future.result()
        is_error = False
        if value is None:
            data = {"text/plain": "" if printed else f"{program}: done (returned None)"}
        else:
            formatted, _metadata = shell.display_formatter.format(value)
            data = dict(formatted)
    plain = data.get("text/plain", "")
    data["text/plain"] = printed + plain if plain or not printed else printed
    style = ' style="color:#c62828"' if is_error else ""
    printed_html = f"<pre>{html.escape(printed)}</pre>" if printed else ""
    if "text/html" in data:
        data["text/html"] = printed_html + str(data["text/html"])
    else:
        data["text/html"] = printed_html + f"<pre{style}>{html.escape(plain)}</pre>"
    return data


# ------------------------------------------------------------------------------ magics


def _arg(*args: Any, **kwargs: Any) -> Any:
    """``@argument(...)`` of IPython's magic_arguments (typed for mypy)."""
    return argument(*args, **kwargs)  # type: ignore[no-untyped-call]


_session = _arg("--session", metavar="S", type=_text, help="the session (default: none)")
_timeout = _arg(
    "--timeout", metavar="S", type=_positive, help="seconds the call may run on its worker"
)
_out = _arg("--out", metavar="VAR", type=_identifier, help="store the result in VAR")
_inputs = _arg(
    "inputs", nargs="*", metavar="key=value", help="inputs, each a Python literal or text"
)


def _subcommand(name: str, *decorators: Any) -> Callable[[_F], _F]:
    """``@magic_arguments`` with the given ``@argument`` decorators, typed for mypy."""

    def apply(func: _F) -> _F:
        wrapped: Any = func
        for decorator in reversed(decorators):
            wrapped = decorator(wrapped)
        return cast(_F, magic_arguments(name)(wrapped))  # type: ignore[no-untyped-call]

    return apply


@magics_class
class DspoolMagics(Magics):
    """The ``%dspool`` / ``%%dspool`` magics (see the module docstring)."""

    def __init__(self, shell: Any = None) -> None:
        super().__init__(shell)
        self._cell: object = object()  # changes at every cell: which calls a cell made
        self._bg_calls: list[BackgroundCall] = []

    # -- plumbing
    @line_cell_magic
    def dspool(self, line: str, cell: str | None = None) -> Any:
        tokens = split_line(line)
        if not tokens:
            raise UsageError(
                f"%dspool needs a subcommand: {', '.join(SUBCOMMANDS)} (%dspool? for help)"
            )
        sub, rest = tokens[0], tokens[1:]
        if sub not in SUBCOMMANDS:
            raise UsageError(
                f"unknown subcommand {sub!r}; use one of: {', '.join(SUBCOMMANDS)} "
                "(%dspool? for help)"
            )
        handler = getattr(self, f"handle_{sub}")
        if "-h" in rest or "--help" in rest:
            sys.stdout.write(handler.__doc__ or SYNTAX[sub])
            return None
        try:
            args = handler.parser.parse_intermixed_args(rest)
        except UsageError as exc:
            message = str(exc).replace(", key=value", "")  # inputs are never required
            raise UsageError(f"%dspool {sub}: {message}; usage: {SYNTAX[sub]}") from None
        if cell is not None and sub not in ("program", "signature", "run") and cell.strip():
            raise UsageError(f"%%dspool {sub} takes no cell body; usage: {SYNTAX[sub]}")
        return handler(args, cell)

    @property
    def user_ns(self) -> dict[str, Any]:
        assert self.shell is not None
        return cast(dict[str, Any], self.shell.user_ns)

    def _in_kernel(self) -> bool:
        return getattr(self.shell, "kernel", None) is not None

    def _pool(self, preload: tuple[str, ...] = ()) -> Pool:
        """The current pool; started with the defaults (and ``preload``) when there is none."""
        pool = current_pool()
        if pool is None:
            pool = self._start_pool({"preload": list(preload)} if preload else {})
            with_preload = f", preloading {', '.join(preload)}" if preload else ""
            sys.stdout.write(
                f"dspool: no pool was running, started one with the defaults{with_preload} "
                "(%dspool start to choose, %dspool status to watch it)\n"
            )
        return pool

    def _start_pool(self, options: dict[str, Any]) -> Pool:
        try:
            pool = Pool(**options)
        except (ValueError, DspoolError) as exc:
            raise UsageError(f"cannot start the pool: {exc}") from None
        _state.started = pool
        return pool

    def _status_view(self, pool: Pool) -> StatusView:
        view = _state.view
        if view is None or view.pool is not pool:
            view = _state.view = StatusView(pool)
        return view

    def _resolve(self, pool: Pool, name: str, session: str | None) -> None:
        try:
            pool.store.resolve(name, session)
        except ProgramNotFound as exc:
            raise UsageError(f"{exc}; define it with %%dspool program {name}") from None

    def _wait(self, future: CallFuture, pool: Pool) -> Any:
        """Wait for one call like a normal cell: interruptible, errors shown natively.

        It waits in ``future.exception()`` (the future's own condition), not in
        ``concurrent.futures.wait``: an interrupt landing inside ``wait`` can leave the
        future's internal lock held, and the cancel that follows would then block.
        """
        try:
            future.exception()
        except concurrent.futures.CancelledError:
            pass  # future.result() below says so
        except KeyboardInterrupt:
            raise cancel_on_interrupt(future.program, [future], pool) from None
        echo_output(future)
        try:
            return future.result()
        except ProgramError:
            raise
        except ProgramNotFound as exc:
            raise UsageError(f"{exc}; define it with %%dspool program {exc.name}") from None
        except UnpicklableArguments as exc:
            raise UsageError(str(exc)) from None
        except DspoolError as exc:
            raise _one_line(exc) from None
        except concurrent.futures.CancelledError:
            raise _one_line(DspoolError(f"the call of {future.program!r} was cancelled")) from None

    def pre_run_cell(self, info: Any = None) -> None:
        self._cell = object()

    def post_run_cell(self, result: Any = None) -> None:
        if isinstance(getattr(result, "error_in_exec", None), KeyboardInterrupt):
            for call in self._bg_calls:
                if call._cell is self._cell and not call.done():
                    call.cancel()
        self._bg_calls = [c for c in self._bg_calls if not c.done()]

    # -- subcommands
    @_subcommand(
        "dspool start",
        _arg("--workers", metavar="N", type=_count, help="worker processes (default: CPUs)"),
        _arg(
            "--concurrency",
            metavar="K",
            type=_count,
            help="calls each worker runs at once (default 1)",
        ),
        _arg("--store", metavar="PATH", type=_text, help="program store directory"),
        _arg("--preload", metavar="MODS", type=_text, help="modules to import once, a,b"),
        _arg("--timeout", metavar="S", type=_positive, help="default per-call timeout (seconds)"),
        _arg(
            "--dask",
            metavar="ADDRESS",
            type=_text,
            help="run on the Dask cluster at ADDRESS (tcp://host:8786); 'local': a LocalCluster",
        ),
        _arg("--no-wait", action="store_true", help="return before the workers are ready"),
        _arg("--replace", action="store_true", help="stop the running pool and start this one"),
    )
    def handle_start(self, args: argparse.Namespace, cell: str | None) -> None:
        """Start the kernel's pool and show it.

        While a pool is running it says so and changes nothing: --replace stops that
        pool first (its pending calls fail with PoolClosed), %dspool stop just stops it.
        Waits until every worker is ready (the status widget shows the progress, and
        what a --preload import is doing) unless --no-wait; calls made before then queue.
        --dask ADDRESS runs the same pool on the workers of a Dask cluster (the dask
        extra; --workers is then how many to wait for, by default all of them); programs
        still live in this kernel's store.

        --concurrency K lets each worker run K calls at once (threads, or its event loop
        for async def programs): for programs that mostly wait on an LM or the network.

        Example: %dspool start --workers 4 --preload numpy,dspy --timeout 120
        Example: %dspool start --workers 2 --concurrency 16 --preload dspy
        Example: %dspool start --dask tcp://scheduler:8786
        """
        options: dict[str, Any] = {"workers": args.workers, "call_timeout": args.timeout}
        if args.concurrency is not None:
            options["concurrency"] = args.concurrency
        if args.dask:
            options["backend"] = "dask"
            if args.dask != "local":
                options["address"] = args.dask
        if args.store is not None:
            options["store"] = Path(args.store).expanduser()
        if args.preload:
            options["preload"] = [m.strip() for m in args.preload.split(",") if m.strip()]
        previous = current_pool()
        if previous is not None and not args.replace:
            status = previous.status()
            raise UsageError(
                f"a pool is running ({status.state}, {status.ready_count}/{status.target} "
                "workers ready); %dspool start --replace stops it and starts the new one, "
                "%dspool stop just stops it"
            )
        if previous is not None:
            previous.close()
            sys.stdout.write("dspool: stopped the running pool\n")
        pool = self._start_pool(options)
        self._status_view(pool).show()
        if args.no_wait:
            return
        try:
            pool.wait_ready(START_WAIT)
        except PoolStartTimeout as exc:
            sys.stderr.write(f"dspool: {exc}; the pool keeps trying\n")

    @_subcommand(
        "%dspool program",
        _arg("name", metavar="NAME", type=_text, help="the program's name"),
        _session,
        _arg("--entry", metavar="FUNC", type=_text, help="the callable (default: NAME)"),
    )
    def handle_program(self, args: argparse.Namespace, cell: str | None) -> None:
        """Define program NAME from the cell's Python source; every worker sees it at once.

        The source must define a callable named NAME at top level (or --entry FUNC).

        Example:
            %%dspool program square
            def square(x):
                return x * x
        """
        if cell is None:
            raise UsageError(
                "program needs its source in a cell: %%dspool program NAME, then the code"
            )
        if not cell.strip():
            raise UsageError(f"the cell is empty: write the source of {args.name!r} below")
        pool = self._pool()
        try:
            pool.define(args.name, cell, entry=args.entry, session=args.session)
        except DspoolError as exc:  # InvalidProgram, StoreError
            raise UsageError(str(exc)) from None
        where = f" in session {args.session!r}" if args.session else ""
        sys.stdout.write(f"defined program {args.name!r}{where}\n")

    @_subcommand(
        "%dspool signature",
        _arg("name", metavar="NAME", type=_text, help="the program's name"),
        _arg("--module", metavar="M", type=_text, default="Predict", help="Predict|ChainOfThought"),
        _session,
    )
    def handle_signature(self, args: argparse.Namespace, cell: str | None) -> None:
        """Define DSPy program NAME from the signature in the cell (the dspy extra).

        Example:
            %%dspool signature qa --module ChainOfThought
            question -> answer
        """
        if cell is None or not cell.strip():
            raise UsageError(
                "signature needs a cell: %%dspool signature NAME, then e.g. question -> answer"
            )
        pool = self._pool(preload=("dspy",))  # DSPy workers: fork them with dspy imported
        try:
            signature, instructions = _signature_cell(cell)
            options = {"instructions": instructions} if instructions else {}
            pool.define_signature(
                args.name, signature, module=args.module, session=args.session, **options
            )
        except ProgramError:
            raise
        except (DspoolError, ValueError, TypeError, ImportError) as exc:
            raise UsageError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
        where = f" in session {args.session!r}" if args.session else ""
        sys.stdout.write(f"defined program {args.name!r}{where}\n")

    @_subcommand(
        "dspool run",
        _arg("name", metavar="NAME", type=_text, help="the program to run"),
        _inputs,
        _session,
        _timeout,
        _arg("--bg", action="store_true", help="return at once; the result shows later"),
        _out,
    )
    def handle_run(self, args: argparse.Namespace, cell: str | None) -> Any:
        """Run program NAME once and show its value (or store it with --out VAR).

        Inputs are key=value (Python literals, else text); as a cell, the body holds
        them: a JSON object, or one key = value per line. --bg returns at once with a
        handle in VAR (default dspool_bg); the result replaces the cell's placeholder.

        Examples:
            %dspool run square x=7
            %dspool run qa question="What is 2+2?" --bg --out job
            %%dspool run qa
            question = What is the capital of France?
        """
        call_args, kwargs = parse_inputs(args.inputs)
        if cell is not None:
            for key, value in parse_cell_inputs(cell).items():
                if key in kwargs:
                    raise UsageError(f"input {key!r} is given on the line and in the cell")
                kwargs[key] = value
        pool = self._pool()
        self._resolve(pool, args.name, args.session)
        if args.bg:
            return self._run_bg(pool, args, call_args, kwargs)
        future = pool.submit(
            args.name, *call_args, session=args.session, timeout=args.timeout, **kwargs
        )
        value = self._wait(future, pool)
        if args.out is not None:
            self.user_ns[args.out] = value
            return None
        return value

    def _run_bg(
        self, pool: Pool, args: argparse.Namespace, call_args: list[Any], kwargs: dict[str, Any]
    ) -> None:
        name = args.out or DEFAULT_BG_NAME
        display = _display(_Placeholder(args.name, name), display_id=True)
        future = pool.submit(
            args.name, *call_args, session=args.session, timeout=args.timeout, **kwargs
        )
        call = BackgroundCall(args.name, future, self._cell, display)
        self.user_ns[name] = call
        self._bg_calls.append(call)
        shell = self.shell

        def show() -> None:
            bundle = _outcome_bundle(shell, call.program, future)
            if display is not None:
                display.update(bundle, raw=True)

        future.add_done_callback(lambda _future: _outputs.post(show))

    @_subcommand(
        "dspool map",
        _arg("name", metavar="NAME", type=_text, help="the program to run"),
        _inputs,
        _arg("--over", metavar="VAR", type=_identifier, required=True, help="a list"),
        _arg("--arg", metavar="K", type=_identifier, help="pass each item as keyword K"),
        _arg("--unpack", action="store_true", help="dict items as keywords, tuples as args"),
        _arg(
            "--journal",
            metavar="J",
            type=_text,
            help="write each outcome to journal J in the store; a rerun resumes from it",
        ),
        _arg(
            "--keep-errors",
            action="store_true",
            help="with --journal: keep journaled failures instead of running them again",
        ),
        _session,
        _timeout,
        _arg("--bg", action="store_true", help="return at once with a handle in --out VAR"),
        _out,
    )
    def handle_map(self, args: argparse.Namespace, cell: str | None) -> MapResult | None:
        """Run NAME once per item of the list VAR, in parallel, with a progress bar.

        Returns the results in input order (a failed item holds its exception; see
        .errors); key=value inputs go to every call. Failures do not stop the others.
        --journal J writes every outcome to the store as it ends: running the same map
        again (after a kernel restart or death, too) restores those and runs only the
        rest (failed items run again unless --keep-errors). --bg returns at once with a
        handle in VAR (default dspool_bg): VAR.progress, VAR.result(), VAR.cancel().

        Example: %dspool map square --over numbers --out squares
        Example: %dspool map qa --over questions --arg question --journal eval-1
        """
        if args.arg and args.unpack:
            raise UsageError("use either --arg K or --unpack, not both")
        if args.keep_errors and not args.journal:
            raise UsageError("--keep-errors keeps journaled failures: use it with --journal J")
        if args.journal is not None:
            try:
                check_journal_name(args.journal)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if args.over not in self.user_ns:
            raise UsageError(f"no variable {args.over!r} in the notebook; --over takes a list")
        source = self.user_ns[args.over]
        if isinstance(source, (str, bytes, dict)):
            raise UsageError(
                f"{args.over!r} is a {type(source).__name__}; --over takes a list of items"
            )
        try:
            items = list(source)
        except TypeError:
            raise UsageError(
                f"{args.over!r} ({type(source).__name__}) is not a list of items"
            ) from None
        call_args, common = parse_inputs(args.inputs)
        pool = self._pool()
        self._resolve(pool, args.name, args.session)
        try:
            handle = MapHandle(
                pool,
                args.name,
                items,
                arg=args.arg,
                unpack=args.unpack,
                session=args.session,
                timeout=args.timeout,
                journal=args.journal,
                keep_errors=args.keep_errors,
                common_args=call_args,
                common_kwargs=common,
            )
        except (ValueError, TypeError, DspoolError) as exc:
            raise UsageError(str(exc)) from None
        view = _Progress(f"map {args.name}", handle.progress)
        shown = _display(view, display_id=True) if self._in_kernel() else None
        if args.bg:
            self._map_bg(handle, view, shown, args.out or DEFAULT_BG_NAME)
            return None
        try:
            handle.start()
            while not handle.wait(PROGRESS_INTERVAL):
                _show_progress(shown, view, handle)
        except KeyboardInterrupt:
            handle.cancel()
            handle.wait(MAP_CANCEL_WAIT)
            view.note = "interrupted: the remaining calls were cancelled"
            _show_progress(shown, view, handle)
            if args.out is not None and handle.done():
                self.user_ns[args.out] = handle.result()
            raise
        _show_progress(shown, view, handle)
        result = handle.result()
        summary = _map_summary(result, len(items), args.journal)
        if summary:
            sys.stdout.write(summary)
        if args.out is not None:
            self.user_ns[args.out] = result
            return None
        return result

    def _map_bg(self, handle: MapHandle, view: _Progress, shown: Any, name: str) -> None:
        self.user_ns[name] = handle
        view.note = f"{name}.result() waits for the results"

        def follow() -> None:
            while not handle.wait(PROGRESS_INTERVAL):
                _show_progress(shown, view, handle)
            view.note = f"{name}.result() has the results"
            _show_progress(shown, view, handle)

        handle.start()
        threading.Thread(target=follow, name="dspool-map-progress", daemon=True).start()

    @_subcommand(
        "dspool lm",
        _arg("model", metavar="MODEL", type=_text, help="the LM, e.g. openai/gpt-4o-mini"),
        _inputs,
    )
    def handle_lm(self, args: argparse.Namespace, cell: str | None) -> None:
        """Configure one DSPy LM in every worker, later ones included (the dspy extra).

        Example: %dspool lm openai/gpt-4o-mini temperature=0.2 max_tokens=500
        """
        call_args, kwargs = parse_inputs(args.inputs)
        if call_args:
            raise UsageError(f"lm takes key=value settings after MODEL, not {call_args[0]!r}")
        pool = self._pool(preload=("dspy",))
        try:
            pool.configure_lm(args.model, **kwargs)
        except ProgramError:
            raise
        except (DspoolError, ValueError, TypeError, ImportError) as exc:
            raise UsageError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
        sys.stdout.write(f"every worker uses LM {args.model!r}\n")

    @_subcommand(
        "dspool status",
        _arg(
            "--interval",
            metavar="S",
            type=_positive,
            help=f"seconds between refreshes (default {DEFAULT_INTERVAL})",
        ),
        _arg("--text", action="store_true", help="print a text table instead"),
    )
    def handle_status(self, args: argparse.Namespace, cell: str | None) -> None:
        """Show the pool as it is now, then live: workers, their state, recent failed calls.

        The words: calls (every call that ended) = done + failed + cancelled; in flight
        (running now) out of the ready workers' slots; queued (waiting for a slot).
        --text prints the table once, as of this moment.
        """
        pool = current_pool()
        if pool is None:
            sys.stdout.write("dspool: no pool is running (%dspool start starts one)\n")
            return
        if args.text:
            view = _state.view
            if view is not None and view.pool is pool:
                model = view.refresh()
            else:
                model = build_model(pool.status(), limits=limits_of(pool))
            sys.stdout.write(render_text(model) + "\n")
            return
        view = self._status_view(pool)
        if args.interval is not None:
            view.interval = args.interval
        view.show()

    @_subcommand("dspool programs", _session)
    def handle_programs(self, args: argparse.Namespace, cell: str | None) -> None:
        """List the programs a call (in --session S) can run."""
        pool = current_pool()
        try:
            if pool is not None:
                names = pool.programs(args.session)
            else:
                from .store import ProgramStore

                store = ProgramStore(None)
                try:
                    names = store.names(args.session)
                finally:
                    store.close()
        except DspoolError as exc:
            raise UsageError(str(exc)) from None
        if not names:
            sys.stdout.write("no programs (define one with %%dspool program NAME)\n")
        else:
            sys.stdout.write("\n".join(names) + "\n")

    @_subcommand("dspool errors")
    def handle_errors(self, args: argparse.Namespace, cell: str | None) -> None:
        """Show the pool's recent failed calls with their tracebacks."""
        pool = current_pool()
        if pool is None:
            sys.stdout.write("dspool: no pool is running\n")
            return
        failures = tuple(reversed(pool.status().recent_failures))
        if not failures:
            sys.stdout.write("no failed calls\n")
            return
        _display(FailuresView(failures))

    @_subcommand(
        "dspool restart",
        _arg("worker", metavar="WORKER", nargs="?", type=_text, help="e.g. w2"),
    )
    def handle_restart(self, args: argparse.Namespace, cell: str | None) -> None:
        """Restart one worker (its running call fails), or the whole pool without WORKER."""
        pool = current_pool()
        if pool is None:
            raise UsageError("no pool is running; start one with %dspool start")
        try:
            if args.worker is None:
                pool.restart()
                sys.stdout.write("restarting every worker\n")
            else:
                pool.restart_worker(args.worker)
                sys.stdout.write(f"restarting worker {args.worker}\n")
        except UnknownWorker as exc:
            raise UsageError(str(exc)) from None

    @_subcommand("dspool stop")
    def handle_stop(self, args: argparse.Namespace, cell: str | None) -> None:
        """Stop the pool: every worker exits; pending calls fail with PoolClosed."""
        pool = current_pool()
        if pool is None:
            sys.stdout.write("dspool: no pool is running\n")
            return
        pool.close()
        sys.stdout.write("dspool: pool stopped\n")

    @_subcommand(
        "%dspool limit",
        _arg("model", metavar="MODEL", nargs="?", type=_text, help="e.g. openai/gpt-4o-mini"),
        _arg(
            "settings",
            nargs="*",
            metavar="key=value",
            help="rpm=N tpm=N, or for --budget max_cost=D max_tokens=N",
        ),
        _arg("--budget", action="store_true", help="set the pool's budget instead"),
        _arg("--off", action="store_true", help="remove the limit (or the budget)"),
        _arg(
            "--plain",
            action="store_true",
            help="allow a limit on a pool with no LM (plain programs take permits)",
        ),
    )
    def handle_limit(self, args: argparse.Namespace, cell: str | None) -> None:
        """One rate limit per model for the whole pool, or the pool's budget.

        Every LM request of every worker (each slot, each replacement) takes a permit from
        the kernel, so adding workers never goes past the limit; a 429 pauses the model
        for every worker and the request is retried. rpm is requests per minute, tpm
        tokens per minute; give one or both. MODEL is a name LiteLLM knows, or
        provider/model. The pool needs an LM (%dspool lm) unless --plain says the
        programs take permits themselves (dspool_jupyter.llm.permit). --off removes the
        model's limit. --budget sets what the pool may spend (max_cost in dollars,
        max_tokens in tokens): once spent, further LM requests fail at once. Without
        arguments it shows the limits, the achieved rates and the budget.

        Example: %dspool limit openai/gpt-4o-mini rpm=500 tpm=200000
        Example: %dspool limit --budget max_cost=5
        """
        pool = current_pool()
        if pool is None:
            raise UsageError(
                "no pool is running: start one (and configure its LM with %dspool lm) first"
            )
        if args.budget:
            if args.model is not None:
                args.settings.insert(0, args.model)
            self._set_budget(pool, args.settings, args.off)
            return
        if args.model is None:
            if args.off or args.settings:
                raise UsageError(f"%dspool limit needs MODEL; usage: {SYNTAX['limit']}")
            sys.stdout.write(limits_text(pool) + "\n")
            return
        if _KEY_RE.match(args.model):
            raise UsageError(
                f"%dspool limit needs MODEL before {args.model!r}, e.g. "
                f"%dspool limit openai/gpt-4o-mini {args.model}"
            )
        try:
            check_model(args.model)
        except ValueError as exc:
            raise UsageError(f"%dspool limit: {exc}") from None
        values = _settings(args.settings, LIMIT_KEYS, f"%dspool limit {args.model}")
        if args.off and values:
            raise UsageError("%dspool limit MODEL --off takes no rpm=/tpm=")
        if not args.off and not values:
            raise UsageError(
                f"give rpm=N and/or tpm=N for {args.model!r} (or --off to remove its limit)"
            )
        try:
            pool.set_rate_limit(
                args.model,
                rpm=values.get("rpm"),
                tpm=values.get("tpm"),
                plain=args.plain or args.off,  # removing a limit needs no LM
            )
        except (ValueError, DspoolError) as exc:
            raise UsageError(f"cannot limit {args.model!r}: {exc}") from None
        if args.off:
            sys.stdout.write(f"dspool: no limit on {args.model!r}\n")
            return
        what = ", ".join(
            f"{_number(values[key])} {unit}"
            for key, unit in (("rpm", "requests/min"), ("tpm", "tokens/min"))
            if key in values
        )
        sys.stdout.write(f"dspool: {args.model!r} limited to {what} across every worker\n")

    def _set_budget(self, pool: Pool, settings: list[str], off: bool) -> None:
        values = _settings(settings, BUDGET_KEYS, "%dspool limit --budget")
        if off and values:
            raise UsageError("%dspool limit --budget --off takes no max_cost=/max_tokens=")
        if not off and not values:
            raise UsageError("give max_cost=DOLLARS and/or max_tokens=N (or --off)")
        try:
            pool.set_budget(max_cost=values.get("max_cost"), max_tokens=values.get("max_tokens"))
        except (ValueError, DspoolError) as exc:
            raise UsageError(f"cannot set the budget: {exc}") from None
        if off:
            sys.stdout.write("dspool: no budget\n")
            return
        parts = []
        if "max_cost" in values:
            parts.append(cost_text(float(values["max_cost"])))
        if "max_tokens" in values:
            parts.append(f"{_number(values['max_tokens'])} tokens")
        sys.stdout.write(
            f"dspool: budget {' or '.join(parts)}; once spent, LM requests fail at once\n"
        )

    @_subcommand(
        "dspool usage",
        _arg("--out", metavar="VAR", type=_identifier, help="store the UsageReport in VAR"),
    )
    def handle_usage(self, args: argparse.Namespace, cell: str | None) -> None:
        """Show the pool's LM requests, tokens, cost and 429s: the totals, then per model,
        program and session (pool.usage()); the budget's spend when one is set.

        Example: %dspool usage --out spent
        """
        pool = current_pool()
        if pool is None:
            sys.stdout.write("dspool: no pool is running\n")
            return
        report = pool.usage()
        if args.out:
            self.user_ns[args.out] = report
        lines = [report.table()]
        if not report.requests and not report.rate_limited:
            lines.append("(no LM request yet)")
        budget = budget_text(pool.limits.snapshot().budget)
        if budget:
            lines.append(budget)
        sys.stdout.write("\n".join(lines) + "\n")

    @_subcommand(
        "dspool journals",
        _arg("--delete", metavar="J", type=_text, help="delete journal J and its results"),
    )
    def handle_journals(self, args: argparse.Namespace, cell: str | None) -> None:
        """List the map journals in the store (progress, age, size), or --delete J.

        A journal is written by %dspool map ... --journal J; pool.journal("J") reads it.

        Example: %dspool journals --delete eval-1
        """
        from .store import ProgramStore

        pool = current_pool()
        store = pool.store if pool is not None else ProgramStore(None)
        try:
            if args.delete is not None:
                open_journal(store, args.delete).delete()
                sys.stdout.write(f"deleted journal {args.delete!r}\n")
                return
            infos = list_journals(store)
        except (JournalNotFound, ValueError) as exc:
            raise UsageError(str(exc)) from None
        except DspoolError as exc:
            raise UsageError(str(exc)) from None
        finally:
            if pool is None:
                store.close()
        if not infos:
            sys.stdout.write("no journals (%dspool map NAME --over VAR --journal J makes one)\n")
            return
        rows = [("journal", "program", "done", "failed", "items", "age", "size")]
        for info in infos:
            rows.append(
                (
                    info.name,
                    info.program or "?",
                    str(info.done),
                    str(info.failed),
                    str(info.total),
                    _age(info.age),
                    _size(info.size_bytes),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(text.ljust(w) for text, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        sys.stdout.write("\n".join(lines) + "\n")


def _show_progress(shown: Any, view: _Progress, handle: MapHandle) -> None:
    view.progress = handle.progress
    if shown is not None:
        shown.update(view)


def _map_summary(result: MapResult, total: int, journal: str | None) -> str:
    """What a finished map prints under its bar: restored items, failures, cancellations."""
    lines = []
    if journal is not None:
        lines.append(
            f"journal {journal!r}: {len(result.restored)} restored, "
            f"{total - len(result.restored)} run"
        )
    failed = result.failed
    if failed:
        lines.append(f"{len(failed)} of {total} calls failed:")
        for index in failed[:SHOWN_MAP_ERRORS]:
            error = result.errors[index]
            lines.append(f"  [{index}] {type(error).__name__}: {error}")
        if len(failed) > SHOWN_MAP_ERRORS:
            lines.append(f"  ... ({len(failed) - SHOWN_MAP_ERRORS} more in .errors)")
    if result.cancelled:
        lines.append(f"{len(result.cancelled)} of {total} calls were cancelled")
    return "".join(line + "\n" for line in lines)


def _number(value: float) -> str:
    return f"{value:,.10g}"


def _settings(tokens: list[str], keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """``key=value`` tokens of ``limit``: each key one of ``keys``, each value a literal."""
    values: dict[str, Any] = {}
    allowed = " and ".join(f"{k}=N" for k in keys)
    for token in tokens:
        match = _KEY_RE.match(token)
        if match is None:
            raise UsageError(f"{where}: {token!r} is not key=value; it takes {allowed}")
        key, text = match.groups()
        if key not in keys:
            raise UsageError(f"{where}: unknown setting {key!r}; it takes {allowed}")
        if key in values:
            raise UsageError(f"{where}: {key} is given twice")
        value = parse_value(text)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise UsageError(f"{where}: {key} must be a positive number, got {text!r}")
        if key == "max_tokens" and not isinstance(value, int):
            raise UsageError(f"{where}: max_tokens must be a whole number, got {text!r}")
        values[key] = value
    return values


def limits_text(pool: Pool) -> str:
    """What ``%dspool limit`` without arguments shows: each model's limit and rates."""
    snapshot = pool.limits.snapshot()
    lines = [model_line(m) for m in snapshot.models]
    if not lines:
        lines.append("no rate limit set (%dspool limit MODEL rpm=N tpm=N sets one)")
    budget = budget_text(snapshot.budget)
    lines.append(budget or "no budget (%dspool limit --budget max_cost=D sets one)")
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


_OVERVIEW = """Run programs on the kernel's pool of worker processes.

    %dspool start [--workers N] [--store PATH] [--preload mod1,mod2] [--timeout S]
                  [--dask ADDRESS] [--replace]
    %%dspool program NAME [--session S] [--entry FUNC]     (cell: Python source)
    %%dspool signature NAME [--module Predict|ChainOfThought] [--session S]
    %dspool run NAME [key=value ...] [--session S] [--timeout S] [--bg] [--out VAR]
    %%dspool run NAME [--session S] [--bg]        (cell: JSON object or key = value lines)
    %dspool map NAME --over VAR [key=value ...] [--arg K | --unpack] [--journal J]
                [--bg] [--out VAR]
    %dspool lm MODEL [key=value ...]
    %dspool status | programs | errors | restart [WORKER] | stop | journals

Commands that need a pool start one with the defaults when there is none. Values are
Python literals, else text. `%dspool SUBCOMMAND --help` shows one subcommand's help.

Examples:

    %load_ext dspool_jupyter
    %dspool start --workers 4

    %%dspool program square
    def square(x):
        return x * x

    %dspool run square x=7
    %dspool run square x=7 --bg --out job     # job.result() later
    numbers = list(range(100))
    %dspool map square --over numbers --out squares
    %dspool map square --over numbers --journal squares-1   # rerun resumes
"""


def _help() -> str:
    parts = [_OVERVIEW]
    for sub in SUBCOMMANDS:
        doc = getattr(DspoolMagics, f"handle_{sub}").__doc__ or ""
        parts.append(doc.replace("::\n\n  ", "", 1).rstrip() + "\n")
    return "\n".join(parts)


DspoolMagics.dspool.__doc__ = _help()


# ------------------------------------------------------------------------ registration

_registered: dict[int, DspoolMagics] = {}


def register(ipython: Any) -> DspoolMagics:
    """Register the magics and their cell hooks with ``ipython`` (idempotent)."""
    magics = _registered.get(id(ipython))
    if magics is not None:
        return magics
    magics = DspoolMagics(ipython)
    ipython.register_magics(magics)
    ipython.events.register("pre_run_cell", magics.pre_run_cell)
    ipython.events.register("post_run_cell", magics.post_run_cell)
    _registered[id(ipython)] = magics
    return magics


def unregister(ipython: Any) -> None:
    """Remove the magics and hooks from ``ipython``; the pool keeps running."""
    magics = _registered.pop(id(ipython), None)
    if magics is None:
        return
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("dspool", None)
    ipython.magics_manager.registry.pop(type(magics).__name__, None)
    for event, callback in (
        ("pre_run_cell", magics.pre_run_cell),
        ("post_run_cell", magics.post_run_cell),
    ):
        try:
            ipython.events.unregister(event, callback)
        except ValueError:
            pass
