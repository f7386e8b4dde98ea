"""The loopback OpenAI-compatible server the limit tests and the benches use."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.llm_server import LLMServer

pytestmark = pytest.mark.timeout(60)


def chat(url: str, content: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": "test", "messages": [{"role": "user", "content": content}]}
    request = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), dict(exc.headers)


def test_replies_carry_usage_and_the_counters_add_up() -> None:
    with LLMServer(latency=0.0) as server:
        replies = [chat(server.url, f"question {i}") for i in range(3)]
        stats = server.stats()
    assert [code for code, _, _ in replies] == [200] * 3
    prompt = sum(reply["usage"]["prompt_tokens"] for _, reply, _ in replies)
    completion = sum(reply["usage"]["completion_tokens"] for _, reply, _ in replies)
    assert (stats["requests"], stats["ok"], stats["refused"]) == (3, 3, 0)
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (prompt, completion)


def test_beyond_the_window_it_answers_429_with_retry_after() -> None:
    with LLMServer(latency=0.0, limit=(2, 30.0)) as server:
        codes = [chat(server.url, "q")[0] for _ in range(2)]
        code, reply, headers = chat(server.url, "q")
        stats = server.stats()
    assert codes == [200, 200] and code == 429
    assert reply["error"]["code"] == "rate_limit_exceeded"
    assert 29 <= int(headers["Retry-After"]) <= 30
    assert 29_000 <= int(headers["retry-after-ms"]) <= 30_000
    assert (stats["requests"], stats["ok"], stats["refused"]) == (3, 2, 1)


def test_latency_is_applied() -> None:
    import time

    with LLMServer(latency=0.2) as server:
        started = time.monotonic()
        chat(server.url, "q")
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.0


def test_dspy_parses_its_answers() -> None:
    import dspy

    with LLMServer(latency=0.0) as server:
        lm = dspy.LM("openai/test", api_base=server.url, api_key="x", cache=False, num_retries=0)
        with dspy.context(lm=lm):
            result = dspy.ChainOfThought("question, context -> answer, confidence")(
                question="why?", context="none"
            )
            stats = server.stats()
    assert result.answer.startswith("answer ") and result.confidence.startswith("confidence ")
    assert result.reasoning.startswith("reasoning ")
    assert stats["ok"] == 1


def test_runs_as_a_subprocess() -> None:
    script = Path(__file__).with_name("llm_server.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--latency", "0", "--limit", "1/60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/v1"
        assert [chat(url, "q")[0], chat(url, "q")[0]] == [200, 429]
        with urllib.request.urlopen(url + "/stats", timeout=10) as response:
            stats = json.load(response)
        assert (stats["ok"], stats["refused"]) == (1, 1)
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
