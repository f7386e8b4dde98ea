"""The worker side of the pool's provider limits: permits, 429 retries, usage per call.

Every LM request a worker makes asks the kernel's broker (:mod:`dspool_jupyter.limits`)
for a permit first, sleeps until the start time it was given, sends the request, and
reports the provider's usage (or the 429) afterwards. Three ways in:

- **DSPy** (automatic): :func:`install_dspy_hook` wraps DSPy's single-attempt function
  (``dspy.clients.execution._attempt`` and ``_aattempt``: one attempt is one HTTP
  request, whichever engine DSPy picked, lm15 or LiteLLM, after DSPy's response cache),
  so every ``dspy.LM`` request of every module takes a permit. A 429 is retried *inside*
  that attempt, after the pool-wide pause, up to the broker's ``max_tries``; DSPy's own
  retry loop never sees it (set ``num_retries=0`` on the LM so that other errors are
  not retried behind the pool's back either). DSPy's offline ``DummyLM`` takes no permit.
- **Plain programs**: ``with llm.permit("openai/gpt-4o-mini", tokens=900) as p:`` around
  one provider request; ``p.record(prompt_tokens, completion_tokens)`` reports usage
  (unreported, the request counts with ``tokens`` as its prompt). A rate-limit exception
  escaping the block (status 429) pauses the model pool-wide and is re-raised;
  :func:`request` retries for you.
- **The runtime**: :func:`collect_call_usage` around each call gathers that call's
  usage (from the permits whose :data:`~dspool_jupyter.context.current_call` is it) for
  the call's reply, and installs the DSPy hook once dspy is imported. No pool set-up is
  added: an extra set-up per worker delays a replacement's first call, which
  ``tests/test_dspy_programs.py`` (a replacement must serve one of 20 quick calls)
  showed failing 3 times in 10 with it, never without.

The broker's address comes from :data:`~dspool_jupyter.limits.LLM_BROKER_ENV`; without it
(a process outside a pool) permits are free and nothing is reported. One connection per
process, shared by its threads under a lock (the broker never blocks, so the lock is held
for one round trip); a forked child opens its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .context import current_call
from .errors import BudgetExceeded, DspoolError, RateLimitExceeded
from .limits import DEFAULT_MAX_TRIES, LLM_BROKER_ENV
from .usage import Usage

__all__ = [
    "BrokerClient",
    "Permit",
    "broker",
    "collect_call_usage",
    "install_dspy_hook",
    "is_rate_limit",
    "permit",
    "request",
    "retry_after_of",
]

T = TypeVar("T")

_CONNECT_TIMEOUT = 10.0  # seconds


class BrokerClient:
    """One process's connection to the broker; thread-safe, reconnects after a fork."""

    def __init__(self, value: str) -> None:
        address, _, self._token = value.rpartition("#")
        kind, _, where = address.partition(":")
        if kind not in ("unix", "tcp") or not where or not self._token:
            raise DspoolError(f"{LLM_BROKER_ENV}={value!r} is not a broker address")
        self._kind, self._where = kind, where
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._pid = os.getpid()

    def _connect(self) -> None:
        if self._kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = self._where
        else:
            host, _, port = self._where.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = (host, int(port))
        sock.settimeout(_CONNECT_TIMEOUT)
        sock.connect(target)
        sock.settimeout(None)
        reader = sock.makefile("rb")
        sock.sendall(json.dumps({"token": self._token}).encode() + b"\n")
        if not reader.readline():
            sock.close()
            raise OSError("the broker refused this process's token")
        self._sock, self._reader = sock, reader

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply."""
        with self._lock:
            if self._pid != os.getpid():
                self._sock, self._reader, self._pid = None, None, os.getpid()
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._connect()
                    assert self._sock is not None
                    self._sock.sendall(json.dumps(message).encode() + b"\n")
                    line = self._reader.readline()
                    if not line:
                        raise OSError("connection closed")
                    reply: dict[str, Any] = json.loads(line)
                    return reply
                except OSError as exc:
                    if self._sock is not None:
                        self._sock.close()
                    self._sock = self._reader = None
                    if attempt == 2:
                        raise DspoolError(
                            f"the pool's LLM permit broker at {self._kind}:{self._where} is "
                            f"unreachable ({exc}); is the pool closed?"
                        ) from exc
            raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None and self._pid == os.getpid():
                self._reader.close()
                self._sock.close()
            self._sock = self._reader = None

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._sock = self._reader = None
        self._pid = os.getpid()


_clients: dict[str, BrokerClient] = {}
_clients_lock = threading.Lock()


def broker() -> BrokerClient | None:
    """This process's broker client, or None outside a pool."""
    value = os.environ.get(LLM_BROKER_ENV)
    if not value:
        return None
    with _clients_lock:
        client = _clients.get(value)
        if client is None:
            client = _clients[value] = BrokerClient(value)
        return client


def _after_fork_in_child() -> None:
    global _clients_lock, _collect_lock
    _clients_lock = threading.Lock()
    _collect_lock = threading.Lock()
    for client in _clients.values():
        client._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------- per-call usage

_collectors: dict[int, Usage] = {}
_collect_lock = threading.Lock()


@contextmanager
def collect_call_usage(call_id: int) -> Iterator[Usage]:
    """Gather the usage of call ``call_id``'s LM requests while the block runs.

    The runtime wraps each call in it (with :data:`current_call` set to that call) and
    puts the :class:`~dspool_jupyter.usage.Usage` in the call's reply. It also installs
    the DSPy hook when dspy is imported in this process (a program that imports dspy
    only during its first call has that call's requests unhooked: preload dspy, or set
    the LM with ``configure_lm``, which imports it in a set-up).
    """
    if "dspy" in sys.modules:
        install_dspy_hook()  # idempotent; cheap once installed
    usage = Usage()
    with _collect_lock:
        _collectors[call_id] = usage
    try:
        yield usage
    finally:
        with _collect_lock:
            _collectors.pop(call_id, None)


def _collect(call_id: int | None, prompt: int, completion: int, cost: float | None) -> None:
    if call_id is None:
        return
    with _collect_lock:
        usage = _collectors.get(call_id)
        if usage is not None:
            usage.record(prompt, completion, cost)


def _collect_refusal(call_id: int | None) -> None:
    if call_id is None:
        return
    with _collect_lock:
        usage = _collectors.get(call_id)
        if usage is not None:
            usage.rate_limited += 1


# --------------------------------------------------------------------- permits


def is_rate_limit(exc: BaseException) -> bool:
    """Whether ``exc`` is a provider's 429 (LiteLLM, lm15, openai, httpx and the like)."""
    for name in ("status_code", "status", "http_status"):
        if getattr(exc, name, None) == 429:
            return True
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) == 429:
        return True
    return type(exc).__name__ in ("RateLimitError", "LMRateLimitError")


def retry_after_of(exc: BaseException) -> float | None:
    """Seconds the provider asked to wait (``retry_after``, ``retry-after-ms``,
    ``Retry-After`` in seconds), or None."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        seconds = headers.get("retry-after")
        if seconds is not None:
            return max(0.0, float(seconds))
    except (TypeError, ValueError, AttributeError):
        return None
    return None


class Permit:
    """One LM request's permit (see :func:`permit`)."""

    def __init__(self, client: BrokerClient | None, model: str, tokens: int | None) -> None:
        self.model = model
        self.tokens = tokens
        self.max_tries = DEFAULT_MAX_TRIES
        self._client = client
        self._id: int | None = None
        self._usage: tuple[int, int, float | None] | None = None
        context = current_call.get()
        self._call_id = None if context is None else context.call_id
        self._program = None if context is None else context.program
        self.cost: float | None = None

    def record(self, prompt_tokens: int, completion_tokens: int, cost: float | None = None) -> None:
        """The provider's usage for this request (and its cost, if you know it better)."""
        self._usage = (int(prompt_tokens), int(completion_tokens), cost)

    def _acquire(self) -> float:
        """Ask for a permit: seconds to wait before sending (BudgetExceeded if spent)."""
        if self._client is None:
            return 0.0
        reply = self._client.call(
            {
                "op": "acquire",
                "model": self.model,
                "tokens": self.tokens,
                "call_id": self._call_id,
                "program": self._program,
            }
        )
        if reply.get("error") == "budget":
            raise BudgetExceeded(self.model, str(reply.get("spent")))
        if "error" in reply:
            raise DspoolError(f"the LLM permit broker refused: {reply}")
        self._id = int(reply["permit"])
        self.max_tries = int(reply.get("max_tries", DEFAULT_MAX_TRIES))
        return float(reply["delay"])

    def _confirm(self) -> float:
        assert self._client is not None
        return float(self._client.call({"op": "confirm", "permit": self._id})["delay"])

    def wait(self) -> None:
        """Acquire and sleep until this request may start."""
        delay = self._acquire()
        while delay > 0:
            time.sleep(delay)
            delay = self._confirm()

    async def await_(self) -> None:
        """:meth:`wait` for the event loop (the broker round trips are sub-millisecond)."""
        delay = self._acquire()
        while delay > 0:
            await asyncio.sleep(delay)
            delay = self._confirm()

    def done(self) -> None:
        """The request was answered: report its usage."""
        prompt, completion, cost = self._usage or (self.tokens or 0, 0, None)
        if self._client is not None and self._id is not None:
            reply = self._client.call(
                {
                    "op": "done",
                    "permit": self._id,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "cost": cost,
                }
            )
            cost = reply.get("cost", cost)
        self.cost = cost
        _collect(self._call_id, prompt, completion, cost)

    def refused(self, exc: BaseException) -> str:
        """The provider answered 429: pause the model pool-wide; returns the limit seen."""
        _collect_refusal(self._call_id)
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "HTTP 429"
        if self._client is None or self._id is None:
            return message
        reply = self._client.call(
            {
                "op": "refused",
                "permit": self._id,
                "retry_after": retry_after_of(exc),
                "message": message,
            }
        )
        return str(reply.get("limit", message))

    def failed(self) -> None:
        """The request failed otherwise: give the reservation back."""
        if self._client is not None and self._id is not None:
            self._client.call({"op": "failed", "permit": self._id})


@contextmanager
def permit(model: str, tokens: int | None = None) -> Iterator[Permit]:
    """Take a pool-wide permit for one request to ``model`` around the block.

    ``tokens``: your estimate of the prompt's tokens (for ``tpm`` limits). Waits for the
    pace and any pause; raises :class:`~dspool_jupyter.errors.BudgetExceeded` at once
    when the budget is spent. Call ``.record(prompt_tokens, completion_tokens)`` inside
    the block. A 429 escaping the block pauses ``model`` for every worker and is
    re-raised (retry with :func:`request`).
    """
    handle = Permit(broker(), model, tokens)
    handle.wait()
    try:
        yield handle
    except BaseException as exc:
        if isinstance(exc, Exception) and is_rate_limit(exc):
            handle.refused(exc)
        else:
            handle.failed()
        raise
    handle.done()


def request(
    model: str,
    send: Callable[[], T],
    *,
    tokens: int | None = None,
    usage: Callable[[T], tuple[int, int]] | None = None,
) -> T:
    """``send()`` under a permit, retried after each 429 (pool-wide pause) up to the
    broker's ``max_tries``; ``usage(result) -> (prompt_tokens, completion_tokens)``."""
    return _guarded(model, tokens, send, usage)


def _guarded(
    model: str,
    tokens: int | None,
    send: Callable[[], T],
    usage: Callable[[T], tuple[int, int]] | None,
    retry: Callable[[BaseException], bool] = lambda exc: True,
) -> T:
    client = broker()
    tries = 0
    while True:
        handle = Permit(client, model, tokens)
        handle.wait()
        try:
            result = send()
        except Exception as exc:
            if not is_rate_limit(exc):
                handle.failed()
                raise
            limit = handle.refused(exc)
            if not retry(exc):
                raise
            tries += 1
            if tries >= handle.max_tries:
                raise RateLimitExceeded(model, tries, limit) from exc
            continue
        except BaseException:
            handle.failed()
            raise
        if usage is not None:
            handle.record(*usage(result))
        handle.done()
        return result


async def _aguarded(
    model: str,
    tokens: int | None,
    send: Callable[[], Awaitable[T]],
    usage: Callable[[T], tuple[int, int]] | None,
    retry: Callable[[BaseException], bool] = lambda exc: True,
) -> T:
    client = broker()
    tries = 0
    while True:
        handle = Permit(client, model, tokens)
        await handle.await_()
        try:
            result = await send()
        except Exception as exc:
            if not is_rate_limit(exc):
                handle.failed()
                raise
            limit = handle.refused(exc)
            if not retry(exc):
                raise
            tries += 1
            if tries >= handle.max_tries:
                raise RateLimitExceeded(model, tries, limit) from exc
            continue
        except BaseException:
            handle.failed()
            raise
        if usage is not None:
            handle.record(*usage(result))
        handle.done()
        return result


# ------------------------------------------------------------------------- DSPy


def _estimate_tokens(call: Any) -> int:
    """A rough prompt size (characters / 4): the broker corrects it from the usage."""
    for name in ("messages", "prompt", "request"):
        value = getattr(call, name, None)
        if value:
            return max(1, len(str(value)) // 4)
    return 1


def _dspy_usage(state: Any, results: list[Any]) -> tuple[int, int]:
    result = getattr(state, "result", None) or (results[-1] if results else None)
    data = getattr(result, "usage", None) or {}
    return int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0)


def install_dspy_hook() -> bool:
    """Make every DSPy LM request in this process take a permit (idempotent).

    Returns False when DSPy is not installed. Call it in each worker (the pool's LM
    set-up does) before DSPy programs run.
    """
    try:
        from dspy.clients import execution
        from dspy.utils.dummies import DummyLM
    except ImportError:
        return False
    if getattr(execution._attempt, "_dspool_hook", False):
        return True
    attempt = execution._attempt
    aattempt = execution._aattempt

    def retryable(state: Any) -> Callable[[BaseException], bool]:
        return lambda exc: not state.completed and not state.emitted

    def hooked(
        lm: Any, call: Any, backend: Any, request: Any, provider: Any, state: Any, results: Any
    ) -> Any:
        if isinstance(lm, DummyLM) or broker() is None:
            return attempt(lm, call, backend, request, provider, state, results)
        return _guarded(
            str(lm.model),
            _estimate_tokens(call),
            lambda: attempt(lm, call, backend, request, provider, state, results),
            lambda _: _dspy_usage(state, results),
            retryable(state),
        )

    async def ahooked(
        lm: Any, call: Any, backend: Any, request: Any, provider: Any, state: Any, results: Any
    ) -> Any:
        if isinstance(lm, DummyLM) or broker() is None:
            return await aattempt(lm, call, backend, request, provider, state, results)
        return await _aguarded(
            str(lm.model),
            _estimate_tokens(call),
            lambda: aattempt(lm, call, backend, request, provider, state, results),
            lambda _: _dspy_usage(state, results),
            retryable(state),
        )

    hooked._dspool_hook = True  # type: ignore[attr-defined]
    ahooked._dspool_hook = True  # type: ignore[attr-defined]
    execution._attempt = hooked
    execution._aattempt = ahooked
    return True
