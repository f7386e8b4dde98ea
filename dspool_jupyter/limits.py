"""Provider limits for the whole pool: the kernel-side permit broker and the budget.

Every LM request of every worker process (each slot, each replacement, a Dask worker on
this machine) asks this broker for a permit before it is sent and reports how it went
afterwards (:mod:`dspool_jupyter.llm` is the worker side). The broker holds the per-model
limits, the pace, the pauses after a 429, the budget and the usage :class:`Ledger`, so
adding workers never overshoots a limit. A Pool composes one :class:`ProviderLimits`.

Decisions:

- **Transport, independent of the pool's worker protocol.** A small threaded server in
  the kernel: a Unix socket in the store's private (0700) directory when one is given and
  its path fits, else TCP on 127.0.0.1. Its address and a random token travel to the
  workers in the environment variable :data:`LLM_BROKER_ENV` (``unix:PATH#TOKEN`` or
  ``tcp:HOST:PORT#TOKEN``); a connection that does not present the token first is
  dropped. Messages are JSON lines, one reply per request, and no request blocks in the
  broker: a permit is a *reservation* of a start time that the worker sleeps until, so
  one connection per worker process serves all its threads.
- **Smooth pacing (GCRA, no burst).** Each model has a next free start time; a permit
  takes it and moves it on by ``1 / pace``. The pace is :data:`PACE_MARGIN` of the
  limit (``rpm``), so a provider counting in any sliding window sees slightly less than
  its limit, never a burst at the start of a minute. ``tpm`` is a second schedule in
  tokens: a request reserves its estimated tokens (the prompt estimate the worker sends
  plus the model's running mean of completion tokens) and the schedule is corrected by
  the difference once the provider reports the real usage.
- **429s, with or without a limit set.** A refusal pauses the model for every worker
  until the provider's ``Retry-After`` (or an exponential back-off when it gives none),
  and lowers the pace multiplicatively (:data:`DECREASE`, at most once per flight: the
  429s of requests whose permits were issued before the last decrease do not decrease
  it again). Each answered
  request raises the pace additively, up to the limit set, or without bound when none is
  set (a model with no limit is unpaced until its first 429). Reservations that a pause
  overtook are moved after it when the worker wakes (``confirm``). The worker retries the
  *request* itself; after :attr:`ProviderLimits.max_tries` refusals in a row it gives
  up with :class:`~dspool_jupyter.errors.RateLimitExceeded` naming the model and the
  limit seen.
- **Budget.** ``set_budget(max_cost=..., max_tokens=...)``: once the ledger's spend
  reaches either, every further permit is refused at once
  (:class:`~dspool_jupyter.errors.BudgetExceeded`). Requests already in flight finish
  and are counted, so the spend can pass the maximum by what was in flight.
- **Unknown model** (``set_rate_limit``): a name that is neither a key of LiteLLM's
  local cost map nor ``provider/model`` with a provider LiteLLM's map names or an
  OpenAI-compatible one (``openai/...`` pointed at any server is fine). ``"dummy"``
  (DSPy's offline DummyLM, which never takes permits) is refused too. A limit on a bare
  name (``gpt-4o-mini``) applies to requests under any provider prefix
  (``openai/gpt-4o-mini``) that have no limit of their own.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .usage import (
    BudgetSnapshot,
    Labels,
    Ledger,
    LimitsSnapshot,
    ModelSnapshot,
    UsageReport,
    known_providers,
    price_of,
    price_table,
)

__all__ = [
    "DECREASE",
    "DEFAULT_MAX_TRIES",
    "LLM_BROKER_ENV",
    "PACE_MARGIN",
    "ProviderLimits",
    "check_model",
]

LLM_BROKER_ENV = "DSPOOL_LLM_BROKER"  # the broker's address and token, for every worker
PACE_MARGIN = 0.97  # fraction of a limit the pace uses: headroom for network jitter
DECREASE = 0.75  # pace multiplier after a 429 (multiplicative decrease)
INCREASE = 0.02  # pace gained per answered request, as a fraction of the pace's scale
MIN_PACE = 1 / 60  # requests per second: the pace never drops below one a minute
DEFAULT_MAX_TRIES = 8  # 429s in a row before a request fails
BACKOFF_BASE = 0.5  # seconds of pause after a 429 without Retry-After, doubled each time
BACKOFF_MAX = 30.0  # seconds
COMPLETION_GUESS = 256  # tokens a request is assumed to produce before any was seen
ACHIEVED_WINDOW = 60.0  # seconds over which achieved rates are measured
_UNIX_PATH_MAX = 100  # bytes; sun_path is 108 on Linux


def check_model(model: object) -> str:
    """The model name, stripped, or a ValueError saying why it is not a known model."""
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"a model name is text such as 'openai/gpt-4o-mini', got {model!r}")
    name = model.strip()
    if name == "dummy":
        raise ValueError("the 'dummy' LM is offline and takes no permits: it needs no limit")
    if name in price_table():
        return name
    provider, slash, rest = name.partition("/")
    if slash and not rest:
        raise ValueError(f"model {name!r} names a provider but no model after the '/'")
    if slash and provider in known_providers():
        return name
    hint = (
        f"provider {provider!r} is not one LiteLLM knows"
        if slash
        else "it is not in LiteLLM's model list; write it as provider/model"
    )
    raise ValueError(f"unknown model {name!r}: {hint} (e.g. 'openai/gpt-4o-mini')")


def _check_limit(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return float(value)


@dataclass
class _Model:
    name: str
    rpm: float | None = None
    tpm: float | None = None
    rate: float | None = None  # AIMD pace, requests per second; None: the limit's (or none)
    scale: float = 1.0  # requests per second the additive increase is a fraction of
    next_start: float = 0.0  # monotonic seconds: the next free start time
    next_token_start: float = 0.0
    paused_until: float = 0.0
    last_decrease: float = -math.inf
    refusals_in_row: int = 0
    mean_completion: float = COMPLETION_GUESS
    in_flight: int = 0
    rate_limited: int = 0
    last_refusal: str = ""
    grants: deque[float] = field(default_factory=deque)  # start times of recent permits
    answered: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)

    def pace(self) -> float | None:
        """Requests per second permits are handed out at, or None (unpaced)."""
        limit = None if self.rpm is None else self.rpm * PACE_MARGIN / 60.0
        if self.rate is None:
            return limit
        return self.rate if limit is None else min(limit, self.rate)

    def token_pace(self) -> float | None:
        return None if self.tpm is None else self.tpm * PACE_MARGIN / 60.0

    def recent_rate(self, now: float) -> float:
        while self.grants and self.grants[0] < now - 5.0:
            self.grants.popleft()
        if not self.grants:
            return MIN_PACE
        return len(self.grants) / max(1.0, now - self.grants[0])


@dataclass
class _Permit:
    model: _Model
    tokens: float  # reserved (estimated) tokens
    start: float
    issued: float  # when it was asked for: a 429 decreases the pace set before then once
    call_id: int | None
    program: str | None


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        broker = self.server.broker
        self.server.connections.add(self.connection)
        try:
            hello = self.rfile.readline()
            try:
                ok = json.loads(hello).get("token") == broker.token
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                return
            self.wfile.write(b'{"ok": true}\n')
            for line in self.rfile:
                try:
                    reply = broker._handle(json.loads(line))
                except Exception as exc:  # a bad message must not take the broker down
                    reply = {"error": "protocol", "message": f"{type(exc).__name__}: {exc}"}
                self.wfile.write(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        finally:
            self.server.connections.discard(self.connection)


class _Server(socketserver.ThreadingMixIn, socketserver.BaseServer):
    daemon_threads = True
    broker: ProviderLimits
    connections: set[socket.socket]


class _UnixServer(_Server, socketserver.UnixStreamServer):
    pass


class _TCPServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True


class ProviderLimits:
    """The pool's one broker of LM permits: limits, pace, pauses, budget and ledger.

    ``directory``: a private directory for the Unix socket (the store's); None or a path
    too long for a socket means TCP on ``host`` (loopback by default; for Dask workers on
    other machines, ``host="0.0.0.0"`` and ``advertise`` = this machine's address as the
    workers reach it: the token is then the only guard). ``labels``: see
    :class:`~dspool_jupyter.usage.Ledger`. :attr:`env` is what a worker's environment
    needs (:data:`LLM_BROKER_ENV`).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        advertise: str | None = None,
        labels: Labels | None = None,
        max_tries: int = DEFAULT_MAX_TRIES,
    ) -> None:
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"max_tries must be a whole number >= 1, got {max_tries!r}")
        self.max_tries = max_tries
        self.ledger = Ledger(labels)
        self.token = secrets.token_hex(16)
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._permits: dict[int, _Permit] = {}
        self._next_permit = 0
        self._max_cost: float | None = None
        self._max_tokens: int | None = None
        self._closed = False
        self._path: Path | None = None
        server: _Server
        path = None
        if directory is not None:
            path = Path(directory) / f"llm-{self.token[:12]}.sock"
            if len(os.fsencode(path)) > _UNIX_PATH_MAX:
                path = None
        if path is not None:
            server = _UnixServer(str(path), _Handler, bind_and_activate=True)
            os.chmod(path, 0o600)
            self._path = path
            self.address = f"unix:{path}"
        else:
            server = _TCPServer((host, 0), _Handler, bind_and_activate=True)
            port = server.server_address[1]
            self.address = f"tcp:{advertise or host}:{port}"
        server.broker = self
        server.connections = set()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.name = "dspool-llm-broker"
        self._thread.start()

    # ------------------------------------------------------------ the facade's API
    @property
    def env(self) -> dict[str, str]:
        """The environment a worker needs to reach this broker."""
        return {LLM_BROKER_ENV: f"{self.address}#{self.token}"}

    @property
    def labels(self) -> Labels:
        return self.ledger.labels

    @labels.setter
    def labels(self, labels: Labels) -> None:
        self.ledger.labels = labels

    def set_rate_limit(
        self, model: str, rpm: float | None = None, tpm: float | None = None
    ) -> None:
        """Limit ``model`` to ``rpm`` requests and ``tpm`` tokens per minute, pool-wide.

        Both None removes the limits set for it. Raises ValueError for an unknown model
        or a limit that is not a positive number.
        """
        name = check_model(model)
        rpm_value = _check_limit("rpm", rpm)
        tpm_value = _check_limit("tpm", tpm)
        with self._lock:
            state = self._model(name)
            if "/" not in name:
                for key, other in self._models.items():
                    unlimited = other.rpm is None and other.tpm is None
                    if key.split("/", 1)[-1] == name and unlimited:
                        self._models[key] = state
            state.rpm, state.tpm = rpm_value, tpm_value
            state.rate = None  # a new limit starts from its own pace
            state.scale = (rpm_value or 60.0) / 60.0

    def set_budget(self, max_cost: float | None = None, max_tokens: int | None = None) -> None:
        """Refuse every LM request once ``max_cost`` dollars or ``max_tokens`` are spent.

        Both None removes the budget. The spend so far counts (see :meth:`usage`).
        """
        cost = _check_limit("max_cost", max_cost)
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0
        ):
            raise ValueError(f"max_tokens must be a positive whole number, got {max_tokens!r}")
        with self._lock:
            self._max_cost, self._max_tokens = cost, max_tokens

    def usage(self) -> UsageReport:
        """Totals and breakdowns (per program, session, model) of every LM request."""
        return self.ledger.report()

    def snapshot(self) -> LimitsSnapshot:
        """Limits, pace, achieved rates, 429s and the budget, as plain data."""
        now = time.monotonic()
        spent_cost, spent_tokens = self.ledger.spent()
        with self._lock:
            unique = {id(m): m for m in self._models.values()}.values()
            models = tuple(self._model_snapshot(m, now) for m in unique)
            budget = BudgetSnapshot(
                max_cost=self._max_cost,
                max_tokens=self._max_tokens,
                spent_cost=spent_cost,
                spent_tokens=spent_tokens,
                exhausted=self._budget_text(spent_cost, spent_tokens) is not None,
            )
        return LimitsSnapshot(models=models, budget=budget, usage=self.ledger.report())

    def close(self) -> None:
        """Stop the broker; workers still connected see their connection close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        for connection in list(self._server.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._thread.join(5)
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def __enter__(self) -> ProviderLimits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ProviderLimits {self.address} models={sorted(self._models)}>"

    # ------------------------------------------------------------------ internals
    def _model(self, name: str) -> _Model:
        state = self._models.get(name)
        if state is None:
            state = _Model(name)
            if "/" in name:
                bare = self._models.get(name.split("/", 1)[1])
                if bare is not None and (bare.rpm is not None or bare.tpm is not None):
                    state = bare  # a limit on the bare name covers every provider prefix
            self._models[name] = state
        return state

    def _model_snapshot(self, m: _Model, now: float) -> ModelSnapshot:
        while m.answered and m.answered[0][0] < now - ACHIEVED_WINDOW:
            m.answered.popleft()
        pace = m.pace()
        return ModelSnapshot(
            model=m.name,
            rpm=m.rpm,
            tpm=m.tpm,
            pace_rpm=None if pace is None else pace * 60.0,
            achieved_rpm=len(m.answered) * 60.0 / ACHIEVED_WINDOW,
            achieved_tpm=sum(t for _, t in m.answered) * 60.0 / ACHIEVED_WINDOW,
            in_flight=m.in_flight,
            rate_limited=m.rate_limited,
            paused_for=max(0.0, m.paused_until - now),
        )

    def _budget_text(self, cost: float, tokens: int) -> str | None:
        if self._max_cost is not None and cost >= self._max_cost:
            return f"${cost:.4f} spent of max_cost=${self._max_cost:.4f}"
        if self._max_tokens is not None and tokens >= self._max_tokens:
            return f"{tokens} tokens spent of max_tokens={self._max_tokens}"
        return None

    def _limit_text(self, m: _Model) -> str:
        own = ", ".join(
            f"{key}={value:g}" for key, value in (("rpm", m.rpm), ("tpm", m.tpm)) if value
        )
        pace = m.pace()
        paced = f", pacing at {pace * 60:.1f} rpm" if pace is not None else ""
        return f"{m.last_refusal or 'HTTP 429'} (pool limit: {own or 'none set'}{paced})"

    def _schedule(self, m: _Model, tokens: float, now: float) -> float:
        """Reserve the next start time for a request of ``tokens``; returns that time."""
        start = max(now, m.next_start, m.paused_until)
        token_pace = m.token_pace()
        if token_pace is not None:
            start = max(start, m.next_token_start)
            m.next_token_start = start + tokens / token_pace
        pace = m.pace()
        m.next_start = start + (1.0 / pace if pace is not None else 0.0)
        return start

    def _handle(self, message: Mapping[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        now = time.monotonic()
        if op == "acquire":
            return self._acquire(message, now)
        with self._lock:
            permit = self._permits.get(int(message.get("permit", -1)))
        if permit is None:
            return {"error": "protocol", "message": f"unknown permit in {op!r}"}
        if op == "confirm":
            return self._confirm(permit, now)
        if op == "done":
            return self._done(int(message["permit"]), permit, message, now)
        if op == "refused":
            return self._refused(int(message["permit"]), permit, message, now)
        if op == "failed":
            return self._failed(int(message["permit"]), permit)
        return {"error": "protocol", "message": f"unknown op {op!r}"}

    def _acquire(self, message: Mapping[str, Any], now: float) -> dict[str, Any]:
        model = str(message["model"])
        spent_cost, spent_tokens = self.ledger.spent()
        with self._lock:
            spent = self._budget_text(spent_cost, spent_tokens)
            if spent is not None:
                return {"error": "budget", "spent": spent}
            m = self._model(model)
            tokens = float(message.get("tokens") or 0) + m.mean_completion
            start = self._schedule(m, tokens, now)
            m.grants.append(start)
            m.in_flight += 1
            self._next_permit += 1
            call_id = message.get("call_id")
            self._permits[self._next_permit] = _Permit(
                m,
                tokens,
                start,
                now,
                None if call_id is None else int(call_id),
                message.get("program"),
            )
            return {"permit": self._next_permit, "delay": start - now, "max_tries": self.max_tries}

    def _confirm(self, permit: _Permit, now: float) -> dict[str, Any]:
        with self._lock:
            m = permit.model
            if permit.start < m.paused_until:
                # A pause began after this start time was reserved: take a new one after it.
                permit.start = self._schedule(m, 0.0, now)
            return {"delay": max(0.0, permit.start - now)}

    def _release(self, key: int, permit: _Permit) -> None:
        self._permits.pop(key, None)
        permit.model.in_flight -= 1

    def _done(
        self, key: int, permit: _Permit, message: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        prompt = int(message.get("prompt_tokens") or 0)
        completion = int(message.get("completion_tokens") or 0)
        cost = message.get("cost")
        if cost is None:
            cost = price_of(permit.model.name, prompt, completion)
        with self._lock:
            self._release(key, permit)
            m = permit.model
            token_pace = m.token_pace()
            if token_pace is not None:
                m.next_token_start += (prompt + completion - permit.tokens) / token_pace
            m.mean_completion += 0.2 * (completion - m.mean_completion)
            m.refusals_in_row = 0
            m.answered.append((now, prompt + completion))
            if m.rate is not None:
                m.rate += INCREASE * m.scale
                limit = None if m.rpm is None else m.rpm * PACE_MARGIN / 60.0
                if limit is not None and m.rate >= limit:
                    m.rate = None
        self.ledger.record(m.name, permit.call_id, permit.program, prompt, completion, cost)
        return {"cost": cost}

    def _refused(
        self, key: int, permit: _Permit, message: Mapping[str, Any], now: float
    ) -> dict[str, Any]:
        retry_after = message.get("retry_after")
        with self._lock:
            self._release(key, permit)
            m = permit.model
            m.rate_limited += 1
            if message.get("message"):
                m.last_refusal = str(message["message"])[:300]
            if isinstance(retry_after, (int, float)) and 0 <= retry_after < math.inf:
                pause = float(retry_after)
            else:
                pause = min(BACKOFF_MAX, BACKOFF_BASE * 2**m.refusals_in_row)
            m.refusals_in_row += 1
            m.paused_until = max(m.paused_until, now + pause)
            if permit.issued >= m.last_decrease:
                current = m.pace() or m.recent_rate(now)
                if m.rate is None and m.rpm is None:
                    m.scale = current
                m.rate = max(MIN_PACE, current * DECREASE)
                m.last_decrease = now
            limit = self._limit_text(m)
        self.ledger.record_refusal(m.name, permit.call_id, permit.program)
        return {"pause": max(0.0, m.paused_until - now), "limit": limit}

    def _failed(self, key: int, permit: _Permit) -> dict[str, Any]:
        with self._lock:
            self._release(key, permit)
            m = permit.model
            token_pace = m.token_pace()
            if token_pace is not None:
                m.next_token_start -= permit.tokens / token_pace
        return {}
