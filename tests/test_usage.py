"""The usage ledger: totals, breakdowns, prices, the labels hook, per-call collection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dspool_jupyter import Pool, llm
from dspool_jupyter.context import CallContext, current_call
from dspool_jupyter.limits import LLM_BROKER_ENV, ProviderLimits
from dspool_jupyter.usage import Ledger, Usage, price_of
from tests.llm_server import LLMServer

pytestmark = pytest.mark.timeout(60)

MODEL = "openai/gpt-4o-mini"


@pytest.fixture
def limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProviderLimits]:
    broker = ProviderLimits(tmp_path)
    monkeypatch.setenv(LLM_BROKER_ENV, broker.env[LLM_BROKER_ENV])
    yield broker
    broker.close()


def test_prices_come_from_litellms_local_cost_map() -> None:
    # gpt-4o-mini: $0.15 per million prompt tokens, $0.60 per million completion tokens.
    assert price_of("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)
    assert price_of(MODEL, 0, 1_000_000) == pytest.approx(0.60)
    assert price_of("openai/my-local-model", 100, 100) is None


def test_totals_and_breakdowns() -> None:
    sessions = {1: ("qa", "s1"), 2: ("qa", None), 3: ("summarise", "s1")}
    ledger = Ledger(labels=lambda call_id, program: sessions[call_id or 0])
    ledger.record(MODEL, 1, "ignored", 100, 10, 0.5)
    ledger.record(MODEL, 2, None, 200, 20, 0.25)
    ledger.record("openai/local", 3, None, 50, 5, None)
    ledger.record_refusal(MODEL, 1, None)
    report = ledger.report()
    assert (report.requests, report.prompt_tokens, report.completion_tokens) == (3, 350, 35)
    assert report.cost == pytest.approx(0.75)
    assert report.rate_limited == 1
    assert report.by_program["qa"].requests == 2 and report.by_program["qa"].rate_limited == 1
    assert report.by_program["summarise"].cost is None  # its one request had no price
    assert report.by_session["s1"].prompt_tokens == 150
    assert report.by_session[None].requests == 1
    assert report.by_model["openai/local"].unpriced_requests == 1
    assert "total" in report.table() and "program summarise" in report.table()


def test_a_failing_labels_hook_keeps_the_usage() -> None:
    def broken(call_id: int | None, program: str | None) -> tuple[str | None, str | None]:
        raise RuntimeError("dispatcher forgot the call")

    ledger = Ledger(labels=broken)
    ledger.record(MODEL, 7, "qa", 1, 1, None)
    assert ledger.report().by_program["qa"].requests == 1


def test_default_labels_keep_the_requests_program() -> None:
    ledger = Ledger()
    ledger.record(MODEL, 7, "qa", 1, 2, None)
    report = ledger.report()
    assert report.by_program["qa"].requests == 1 and report.by_session[None].requests == 1


def test_usage_round_trips_as_plain_data() -> None:
    usage = Usage(requests=2, prompt_tokens=5, completion_tokens=7, priced_cost=0.1)
    assert Usage.from_dict(usage.as_dict()) == usage
    assert usage.as_dict()["total_tokens"] == 12


def test_a_calls_usage_is_collected_and_reaches_the_ledger(limits: ProviderLimits) -> None:
    import dspy

    llm.install_dspy_hook()
    with LLMServer(latency=0.0) as server:
        lm = dspy.LM(MODEL, api_base=server.url, api_key="x", cache=False, num_retries=0)
        program = dspy.ChainOfThought("question -> answer")
        token = current_call.set(CallContext(call_id=41, program="qa", worker_id="w0"))
        try:
            with llm.collect_call_usage(41) as usage, dspy.context(lm=lm):
                program(question="one")
                program(question="two")
        finally:
            current_call.reset(token)
        with dspy.context(lm=lm):
            program(question="outside any call")
        stats = server.stats()
    assert usage.requests == 2
    assert usage.cost is not None and usage.cost > 0
    report = limits.usage()
    assert report.by_program["qa"].prompt_tokens == usage.prompt_tokens
    assert report.by_program[None].requests == 1
    assert (report.requests, report.prompt_tokens) == (stats["ok"], stats["prompt_tokens"])
    assert report.cost == pytest.approx(
        price_of(MODEL, report.prompt_tokens, report.completion_tokens)
    )


def test_snapshot_reports_limits_and_achieved_rates(limits: ProviderLimits) -> None:
    limits.set_rate_limit("gpt-4o-mini", rpm=120)
    with llm.permit(MODEL, tokens=10) as permit:
        permit.record(10, 5)
    snapshot = limits.snapshot()
    (model,) = snapshot.models
    assert (model.rpm, model.in_flight, model.achieved_rpm) == (120.0, 0, 1.0)
    assert model.pace_rpm == pytest.approx(120 * 0.97)
    assert snapshot.usage.requests == 1 and snapshot.as_dict()["usage"]["total"]["requests"] == 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_each_call_reports_its_own_usage_on_its_future(
    make_pool: Callable[..., Pool], concurrency: int
) -> None:
    # Real DSPy programs in real workers, against the loopback server: each future's
    # usage is that call's requests only, and together they are the pool's ledger.
    with LLMServer(latency=0.05) as server:
        pool = make_pool(2, concurrency=concurrency, preload=["dspy"])
        pool.wait_ready(60)
        pool.configure_lm(MODEL, api_base=server.url, api_key="x", cache=False, num_retries=0)
        pool.define_signature("qa", "question -> answer")
        pool.define_signature("cot", "question -> answer", module="ChainOfThought")
        pool.define("plain", "def plain(x):\n    return x + 1\n")
        futures = [pool.submit("qa", question=f"question {i} " + "x" * i) for i in range(8)]
        twice = pool.submit("cot", question="first")
        plain = pool.submit("plain", 1)
        for future in [*futures, twice, plain]:
            future.result(60)
        stats = server.stats()
    usages = [f.usage for f in futures]
    assert all(u is not None and u["requests"] == 1 for u in usages), usages
    prompts = [u["prompt_tokens"] for u in usages if u is not None]
    assert prompts == sorted(prompts) and len(set(prompts)) > 1  # longer question, more
    assert twice.usage is not None and twice.usage["requests"] == 1
    assert twice.usage["cost"] is not None and twice.usage["cost"] > 0
    assert plain.usage is None  # no LM request: no usage
    calls = [u for u in [*usages, twice.usage] if u is not None]
    assert sum(u["requests"] for u in calls) == stats["ok"] == 9
    assert sum(u["prompt_tokens"] for u in calls) == stats["prompt_tokens"]
    assert sum(u["completion_tokens"] for u in calls) == stats["completion_tokens"]
    report = pool.usage()
    assert report.requests == 9 and report.prompt_tokens == stats["prompt_tokens"]
    # The ledger knows which program and session made each request.
    assert report.by_program["qa"].requests == 8 and report.by_program["cot"].requests == 1
    assert report.by_session[None].requests == 9
