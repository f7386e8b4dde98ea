"""Provider limits for the whole pool, against a real loopback OpenAI-compatible server.

Real DSPy programs through real worker processes (two pools sharing one broker), and
plain programs in several OS processes taking permits with ``llm.request``. The server
enforces a sliding-window limit and answers 429 with ``Retry-After`` beyond it; the
figures each test asserts are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from dspool_jupyter import Pool
from dspool_jupyter import llm as worker_llm
from dspool_jupyter.errors import BudgetExceeded, DspoolError, ProgramError, RateLimitExceeded
from dspool_jupyter.limits import LLM_BROKER_ENV, ProviderLimits, check_model
from tests.llm_server import LLMServer

pytestmark = pytest.mark.timeout(90)

Recorder = Callable[[str, object], None]
MODEL = "openai/gpt-4o-mini"  # priced in LiteLLM's local cost map; served on loopback


@pytest.fixture
def limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProviderLimits]:
    broker = ProviderLimits(tmp_path)
    # What the pool will do for its template: workers inherit the broker's address.
    for key, value in broker.env.items():
        monkeypatch.setenv(key, value)
    yield broker
    broker.close()


def dspy_pool(make_pool: Callable[..., Pool], server: LLMServer, workers: int = 2) -> Pool:
    pool = make_pool(workers, preload=["dspy"])
    pool.wait_ready(60)
    # No set-up for the DSPy hook: the worker runtime installs it (llm.collect_call_usage).
    pool.configure_lm(MODEL, api_base=server.url, api_key="x", cache=False, num_retries=0)
    pool.define_signature("qa", "question -> answer")
    return pool


def achieved_rate(ok_times: list[float]) -> float:
    """Answered requests per second between the first and the last one."""
    return (len(ok_times) - 1) / (ok_times[-1] - ok_times[0])


def run_all(pools: list[Pool], n: int, tag: str) -> list[Any]:
    futures: list[Future[Any]] = []
    for i in range(n):
        futures.append(pools[i % len(pools)].submit("qa", question=f"{tag} {i}"))
    return [f.result(60) for f in futures]


def test_one_limit_for_every_worker(
    make_pool: Callable[..., Pool], record_property: Recorder
) -> None:
    # 4 workers could send ~50 requests/s; the server takes 10/s (50 per 5 s window).
    with LLMServer(latency=0.05, limit=(50, 5.0)) as server:
        pool = dspy_pool(make_pool, server, workers=4)
        pool.set_rate_limit(MODEL, rpm=600)
        run_all([pool], 8, "warm-up")  # every worker's first request (connection, engine)
        start = len(server.stats()["ok_times"])
        answers = run_all([pool], 100, "question")
        stats = server.stats()
    assert len(answers) == 100 and all(a.answer.startswith("answer ") for a in answers)
    measured = stats["ok_times"][start:]
    rate = achieved_rate(measured)
    refused = stats["refused"] / stats["requests"]
    record_property("achieved_fraction", round(rate / 10, 3))
    record_property("refused_fraction", round(refused, 3))
    assert refused <= 0.05, f"{refused:.1%} of requests refused"
    assert rate >= 0.8 * 10, f"{rate * 60:.0f} rpm achieved of 600"
    usage = pool.usage()
    assert usage.requests == stats["ok"]
    assert usage.prompt_tokens == stats["prompt_tokens"]
    assert usage.completion_tokens == stats["completion_tokens"]
    assert usage.rate_limited == stats["refused"]
    assert usage.by_model[MODEL].requests == stats["ok"]
    assert usage.cost is not None and usage.cost > 0


def test_without_a_limit_every_call_succeeds(
    make_pool: Callable[..., Pool], record_property: Recorder
) -> None:
    # No limit set: the server refuses beyond 10 requests per second and every 429 is
    # retried (pool-wide pause, then AIMD pacing) until every call has its answer.
    with LLMServer(latency=0.02, limit=(10, 1.0)) as server:
        pool = dspy_pool(make_pool, server)
        answers = run_all([pool], 60, "unlimited")
        stats = server.stats()
    assert [a.answer.startswith("answer ") for a in answers] == [True] * 60
    record_property("refused", stats["refused"])
    assert stats["refused"] > 0  # the server did refuse: the retries were exercised
    usage = pool.usage()
    assert usage.requests == stats["ok"] == 60
    assert usage.rate_limited == stats["refused"]
    assert usage.prompt_tokens == stats["prompt_tokens"]


def test_budget_stops_further_requests_and_keeps_answers(
    make_pool: Callable[..., Pool],
) -> None:
    with LLMServer(latency=0.01) as server:
        pool = dspy_pool(make_pool, server)
        answered = run_all([pool], 4, "before")
        spent = pool.usage().total_tokens
        pool.set_budget(max_tokens=spent)
        sent = server.stats()["requests"]
        started = time.monotonic()
        with pytest.raises(ProgramError, match=r"budget is spent \(\d+ tokens spent of max_tokens"):
            pool.run("qa", question="after the budget")
        assert time.monotonic() - started < 5.0
        assert server.stats()["requests"] == sent  # refused before anything was sent
    assert [a.answer.startswith("answer ") for a in answered] == [True] * 4
    snapshot = pool.limits.snapshot()
    assert snapshot.budget.exhausted and snapshot.budget.spent_tokens == spent


def test_a_limit_on_a_pool_without_an_lm_is_a_clear_error(pool: Pool) -> None:
    with pytest.raises(DspoolError, match="no LM"):
        pool.set_rate_limit(MODEL, rpm=100)
    pool.set_rate_limit(MODEL, rpm=100, plain=True)  # plain programs take permits
    with pytest.raises(ValueError, match="rpm"):
        pool.set_rate_limit(MODEL, rpm=-1, plain=True)


def test_a_limit_that_never_clears_fails_naming_model_and_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request after the first is refused (the window never clears in the test).
    with (
        LLMServer(latency=0.01, limit=(1, 600.0), retry_after=0.2) as server,
        ProviderLimits(tmp_path, max_tries=3) as broker,
    ):
        monkeypatch.setenv(LLM_BROKER_ENV, broker.env[LLM_BROKER_ENV])
        worker_llm.request(MODEL, lambda: post(server.url, "first"))
        with pytest.raises(RateLimitExceeded) as info:
            worker_llm.request(MODEL, lambda: post(server.url, "second"))
        stats = server.stats()
    message = str(info.value)
    assert MODEL in message and "3 times" in message
    assert "Rate limit reached: 1 requests per 600.0 s" in message
    assert stats["refused"] == 3 and stats["ok"] == 1


# ---------------------------------------------------------------- plain permits


class HTTPStatusError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status_code = status
        self.retry_after = retry_after


def post(url: str, text: str) -> dict[str, Any]:
    """One chat request with the standard library, as a plain program would send it."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    request = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            reply: dict[str, Any] = json.load(response)
            return reply
    except urllib.error.HTTPError as exc:
        wait = exc.headers.get("retry-after-ms")
        message = json.load(exc)["error"]["message"]
        seconds = None if wait is None else float(wait) / 1000
        raise HTTPStatusError(exc.code, message, seconds) from None


def usage_of(reply: dict[str, Any]) -> tuple[int, int]:
    return reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]


def plain_worker(url: str, n: int, tag: str) -> int:
    """A process of the pool running a plain program: ``n`` requests from 2 threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        reply = worker_llm.request(
            MODEL, lambda: post(url, f"{tag} {i}"), tokens=20, usage=usage_of
        )
        return len(reply["choices"])

    with ThreadPoolExecutor(2) as executor:
        return sum(executor.map(one, range(n)))


def test_plain_processes_share_one_limit(limits: ProviderLimits, record_property: Recorder) -> None:
    # 4 processes x 2 threads could send ~150 requests/s; the limit is 10/s.
    with LLMServer(latency=0.05, limit=(50, 5.0)) as server:
        limits.set_rate_limit(MODEL, rpm=600)
        context = multiprocessing.get_context("spawn")
        with context.Pool(4) as processes:
            processes.starmap(plain_worker, [(server.url, 2, f"warm {p}") for p in range(4)])
            start = len(server.stats()["ok_times"])
            done = processes.starmap(plain_worker, [(server.url, 25, f"p{p}") for p in range(4)])
        stats = server.stats()
    assert done == [25] * 4
    rate = achieved_rate(stats["ok_times"][start:])
    refused = stats["refused"] / stats["requests"]
    record_property("achieved_fraction", round(rate / 10, 3))
    record_property("refused_fraction", round(refused, 3))
    assert refused <= 0.05, f"{refused:.1%} of requests refused"
    assert rate >= 0.8 * 10, f"{rate * 60:.0f} rpm achieved of 600"
    usage = limits.usage()
    assert (usage.requests, usage.prompt_tokens) == (stats["ok"], stats["prompt_tokens"])


def test_tpm_limit_paces_by_tokens(limits: ProviderLimits, record_property: Recorder) -> None:
    # ~35 tokens a request (prompt + answer); tpm=12,000 is 200 tokens/s: ~6 requests/s,
    # whatever the request count, once the mean completion size has been learnt.
    with LLMServer(latency=0.01) as server:
        limits.set_rate_limit(MODEL, tpm=12_000)
        plain_worker(server.url, 10, "warm")
        before = server.stats()
        started = time.monotonic()
        plain_worker(server.url, 30, "tokens")
        elapsed = time.monotonic() - started
        after = server.stats()
    tokens = (after["prompt_tokens"] + after["completion_tokens"]) - (
        before["prompt_tokens"] + before["completion_tokens"]
    )
    rate = tokens / elapsed
    record_property("achieved_tpm", round(rate * 60))
    assert 0.8 * 200 <= rate <= 1.05 * 200, f"{rate * 60:.0f} tokens/min of 12,000"


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("no-such-model-xyz", "not in LiteLLM's model list"),
        ("nosuchprovider/model", "provider 'nosuchprovider' is not one LiteLLM knows"),
        ("openai/", "no model after"),
        ("", "a model name is text"),
        ("dummy", "takes no permits"),
        (None, "a model name is text"),
    ],
)
def test_unknown_model_is_refused(limits: ProviderLimits, model: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        limits.set_rate_limit(model, rpm=10)


def test_known_models() -> None:
    assert check_model("gpt-4o-mini") == "gpt-4o-mini"
    assert check_model(" openai/my-local-model ") == "openai/my-local-model"
    assert check_model("hosted_vllm/llama") == "hosted_vllm/llama"


@pytest.mark.parametrize(
    "kwargs", [{"rpm": 0}, {"rpm": -5}, {"tpm": 0}, {"tpm": -1.5}, {"rpm": True}, {"rpm": "10"}]
)
def test_bad_limits_are_refused(limits: ProviderLimits, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be (a )?positive"):
        limits.set_rate_limit(MODEL, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"max_cost": 0}, {"max_cost": -1.0}, {"max_tokens": 0}, {"max_tokens": 2.5}]
)
def test_bad_budgets_are_refused(limits: ProviderLimits, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be (a )?positive"):
        limits.set_budget(**kwargs)


def test_budget_refusal_in_a_plain_program(limits: ProviderLimits) -> None:
    with LLMServer(latency=0.0) as server:
        worker_llm.request(MODEL, lambda: post(server.url, "one"), usage=usage_of)
        limits.set_budget(max_cost=1e-9)
        with pytest.raises(BudgetExceeded, match=r"\$0\.0000 spent of max_cost"):
            with worker_llm.permit(MODEL):
                pass
        limits.set_budget()
        with worker_llm.permit(MODEL) as permit:
            permit.record(*usage_of(post(server.url, "two")))
    assert permit.cost is not None and permit.cost > 0
    assert limits.usage().requests == 2


def test_broker_refuses_a_connection_without_its_token(limits: ProviderLimits) -> None:
    address = limits.env[LLM_BROKER_ENV].rpartition("#")[0]
    client = worker_llm.BrokerClient(address + "#not-the-token")
    with pytest.raises(Exception, match="unreachable"):
        client.call({"op": "acquire", "model": MODEL})


def test_a_forked_child_opens_its_own_connection(limits: ProviderLimits) -> None:
    with LLMServer(latency=0.0) as server:
        worker_llm.request(MODEL, lambda: post(server.url, "parent"), usage=usage_of)
        pid = os.fork()
        if pid == 0:  # the child: a new connection, or the broker would mix the replies
            try:
                worker_llm.request(MODEL, lambda: post(server.url, "child"), usage=usage_of)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        worker_llm.request(MODEL, lambda: post(server.url, "parent again"), usage=usage_of)
    assert limits.usage().requests == 3


def test_a_429_pauses_the_model_for_every_process(limits: ProviderLimits) -> None:
    # Two connections: what two worker processes hold.
    one, two = (worker_llm.BrokerClient(limits.env[LLM_BROKER_ENV]) for _ in range(2))
    first = one.call({"op": "acquire", "model": MODEL})
    waiting = two.call({"op": "acquire", "model": MODEL})
    assert first["delay"] == 0 and waiting["delay"] == 0  # no limit, no 429 yet: unpaced
    refused = one.call({"op": "refused", "permit": first["permit"], "retry_after": 2.0})
    assert 1.9 <= refused["pause"] <= 2.0
    assert "none set" in refused["limit"]
    # The other process's reservation predates the pause: confirming it moves it after.
    assert 1.9 <= two.call({"op": "confirm", "permit": waiting["permit"]})["delay"] <= 2.0
    later = two.call({"op": "acquire", "model": MODEL})
    assert later["delay"] >= 1.9
    other = two.call({"op": "acquire", "model": "openai/another-model"})
    assert other["delay"] == 0  # the pause is the model's alone
    one.close()
    two.close()


def test_pace_decreases_on_429_and_recovers_additively(limits: ProviderLimits) -> None:
    limits.set_rate_limit(MODEL, rpm=600)
    client = worker_llm.BrokerClient(limits.env[LLM_BROKER_ENV])

    def pace() -> float:
        (model,) = limits.snapshot().models
        assert model.pace_rpm is not None
        return model.pace_rpm

    full = pace()
    assert full == pytest.approx(600 * 0.97)
    permits = [client.call({"op": "acquire", "model": MODEL})["permit"] for _ in range(3)]
    client.call({"op": "refused", "permit": permits[0], "retry_after": 0.0})
    assert pace() == pytest.approx(full * 0.75)
    # Requests sent before that decrease do not decrease it again.
    client.call({"op": "refused", "permit": permits[1], "retry_after": 0.0})
    assert pace() == pytest.approx(full * 0.75)
    client.call({"op": "done", "permit": permits[2], "prompt_tokens": 1, "completion_tokens": 1})
    assert pace() == pytest.approx(full * 0.75 + 0.02 * 600)
    for _ in range(20):
        permit = client.call({"op": "acquire", "model": MODEL})["permit"]
        client.call({"op": "done", "permit": permit, "prompt_tokens": 1, "completion_tokens": 1})
    assert pace() == pytest.approx(full)  # back to the limit's pace, never above it
    client.close()
