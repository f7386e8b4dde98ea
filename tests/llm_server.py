"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benches.

``POST /v1/chat/completions`` answers after a fixed latency in DSPy's chat format: for
each output field the prompt asks for (``[[ ## answer ## ]]``...), a line of text, then
``[[ ## completed ## ]]``, so real DSPy programs parse the reply. Every reply carries
``usage`` (prompt tokens ≈ characters / 4 of the messages, completion tokens likewise of
the answer). An optional sliding-window limit (``limit=(requests, window_seconds)``)
refuses what goes beyond it with 429 and ``Retry-After`` (whole seconds, rounded up, as
HTTP says) plus ``retry-after-ms``; refused requests do not count in the window.
``retry_after`` advertises a fixed wait instead (tests of the bounded retries).
``GET /stats`` returns the counters as JSON; in-process, :meth:`LLMServer.stats`.

In-process::

    with LLMServer(latency=0.2, limit=(20, 2.0)) as server:
        lm = dspy.LM("openai/test", api_base=server.url, api_key="x", cache=False)

As a subprocess: ``python tests/llm_server.py --latency 0.2 --limit 20/2`` prints
``PORT <n>`` on its first line and serves until killed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LLMServer", "ServerStats"]

_FIELD = re.compile(r"\[\[ ## (\w+) ## \]\]")
_RESPOND = "Respond with the corresponding output fields"


class ServerStats(dict[str, Any]):
    """The counters: ``requests`` (all received), ``ok``, ``refused`` (429s),
    ``prompt_tokens``, ``completion_tokens`` (of answered requests), ``max_in_flight``,
    ``ok_times`` (monotonic arrival time of each answered request)."""


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _output_fields(messages: list[dict[str, Any]]) -> list[str]:
    """The output fields DSPy's chat adapter asks for in the last user message."""
    for message in reversed(messages):
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(str(part.get("text", "")) for part in content)
        if message.get("role") == "user" and isinstance(content, str):
            at = content.rfind(_RESPOND)
            if at >= 0:
                return [f for f in _FIELD.findall(content[at:]) if f != "completed"]
            break
    return ["answer"]


def _answer_text(messages: list[dict[str, Any]]) -> str:
    fields = _output_fields(messages)
    last = str(messages[-1].get("content", "")) if messages else ""
    digest = sum(last.encode()) % 100_000
    parts = [f"[[ ## {field} ## ]]\n{field} {digest}" for field in fields]
    return "\n\n".join([*parts, "[[ ## completed ## ]]"])


class LLMServer:
    """The server, started on a free loopback port (or ``port``) in a daemon thread."""

    def __init__(
        self,
        latency: float = 0.05,
        limit: tuple[int, float] | None = None,
        port: int = 0,
        retry_after: float | None = None,
    ) -> None:
        if limit is not None and (limit[0] < 1 or limit[1] <= 0):
            raise ValueError(f"limit must be (requests >= 1, window > 0 s), got {limit!r}")
        self.latency = latency
        self.limit = limit
        self.retry_after = retry_after  # seconds to advertise instead of the window's wait
        self._lock = threading.Lock()
        self._window: deque[float] = deque()
        self._in_flight = 0
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/stats"):
                    self._send(200, server.stats(), {})
                else:
                    self._send(404, {"error": {"message": "not found"}}, {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._send(400, {"error": {"message": "bad JSON"}}, {})
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                code, reply, headers = server._complete(body)
                self._send(code, reply, headers)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="llm-server", daemon=True
        )
        self._thread.start()

    def reset(self) -> None:
        """Zero the counters and empty the limit's window."""
        with self._lock:
            self._window.clear()
            self._stats = ServerStats(
                requests=0,
                ok=0,
                refused=0,
                prompt_tokens=0,
                completion_tokens=0,
                max_in_flight=0,
                ok_times=[],
            )

    def stats(self) -> ServerStats:
        """A copy of the counters."""
        with self._lock:
            copy = ServerStats(self._stats)
            copy["ok_times"] = list(self._stats["ok_times"])
            return copy

    def _admit(self, now: float) -> float | None:
        """None if the request is within the limit (and counted), else seconds to wait."""
        if self.limit is None:
            return None
        count, window = self.limit
        while self._window and self._window[0] <= now - window:
            self._window.popleft()
        if len(self._window) < count:
            self._window.append(now)
            return None
        return self._window[0] + window - now

    def _complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        now = time.monotonic()
        with self._lock:
            stats = self._stats
            stats["requests"] += 1
            wait = self._admit(now)
            if wait is not None:
                stats["refused"] += 1
            else:
                self._in_flight += 1
                stats["max_in_flight"] = max(stats["max_in_flight"], self._in_flight)
        if wait is not None:
            if self.retry_after is not None:
                wait = self.retry_after
            headers = {
                "Retry-After": str(max(1, math.ceil(wait))),
                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
            }
            message = f"Rate limit reached: {self.limit[0]} requests per {self.limit[1]} s"  # type: ignore[index]
            error = {"message": message, "type": "requests", "code": "rate_limit_exceeded"}
            return 429, {"error": error}, headers
        try:
            time.sleep(self.latency)
            messages = body.get("messages") or []
            text = _answer_text(messages)
            prompt = _tokens(json.dumps(messages))
            completion = _tokens(text)
        finally:
            with self._lock:
                self._in_flight -= 1
        with self._lock:
            stats["ok"] += 1
            stats["prompt_tokens"] += prompt
            stats["completion_tokens"] += completion
            stats["ok_times"].append(now)
        reply = {
            "id": f"chatcmpl-{stats['ok']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "test"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        return 200, reply, {}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> LLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument("--limit", help="REQUESTS/WINDOW_SECONDS, e.g. 20/2")
    args = parser.parse_args(argv)
    limit = None
    if args.limit:
        count, window = args.limit.split("/")
        limit = (int(count), float(window))
    server = LLMServer(latency=args.latency, limit=limit, port=args.port)
    sys.stdout.write(f"PORT {server.port}\n")
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
