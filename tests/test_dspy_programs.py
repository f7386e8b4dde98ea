"""DSPy programs in the pool: signature and module programs, one LM for every worker.

Real pool processes, DSPy's offline DummyLM (dict form: deterministic in every process).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from dspool_jupyter import Pool
from dspool_jupyter import dspy_programs as dp
from dspool_jupyter.errors import InvalidProgram, ProgramError
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

MakePool = Callable[..., Pool]

N_ITEMS = 100
# Fixed-width keys, so no key is a substring of another's prompt.
ANSWERS = {
    f"item-{i:03d}": {"reasoning": f"thought-{i:03d}", "answer": f"answer-{i:03d}"}
    for i in range(N_ITEMS)
}
ANSWERS["capital of France"] = {"reasoning": "It is well known.", "answer": "Paris"}
ANSWERS["how many"] = {"reasoning": "Counted.", "answer": "3"}

# A custom dspy.Module, as a `%%dspool program` cell holds it. BUILT counts instances
# made in this worker: the worker must build the module once and call it many times.
MODULE_CELL = """\
import os
import dspy

BUILT = []


class Shout(dspy.Module):
    def __init__(self):
        super().__init__()
        BUILT.append(1)
        self.answer = dspy.ChainOfThought("question -> answer")

    def forward(self, question):
        result = self.answer(question=question)
        return dspy.Prediction(answer=result.answer.upper(), pid=os.getpid(), built=len(BUILT))
"""

# A plain function that uses dspy is a program too.
FUNCTION_CELL = """\
import dspy

qa = dspy.Predict("question -> answer")


def ask(question):
    return qa(question=question).answer
"""

# What a worker's DSPy state looks like after its calls (to check LM and histories).
INSPECT_CELL = """\
import os
import dspy
from dspy.clients import base_lm


def inspect_lm():
    lm = dspy.settings.lm
    return {
        "pid": os.getpid(),
        "lm": type(lm).__name__ if lm is not None else None,
        "history": len(lm.history) if lm is not None else 0,
        "global_history": len(base_lm.GLOBAL_HISTORY),
        "last_system": lm.history[-1]["messages"][0]["content"] if lm and lm.history else "",
    }
"""


def dspy_pool(make_pool: MakePool, workers: int = 2, **kwargs: object) -> Pool:
    pool = make_pool(workers, preload=["dspy"], **kwargs)
    pool.wait_ready(30)
    pool.configure_lm("dummy", answers=ANSWERS)
    pool.define("inspect_lm", INSPECT_CELL)
    return pool


def worker_ids(pool: Pool) -> set[str]:
    return {w.id for w in pool.status().workers}


def test_predict_and_chain_of_thought_run_on_every_worker(make_pool: MakePool) -> None:
    pool = dspy_pool(make_pool)
    pool.define_signature("qa", "question -> answer")
    pool.define_signature("cot", "question -> answer", module="ChainOfThought")
    qa = [pool.submit("qa", question=f"Tell me about item-{i:03d}.") for i in range(20)]
    cot = [pool.submit("cot", f"What is the capital of France? ({i})") for i in range(20)]
    assert [f.result(20).answer for f in qa] == [f"answer-{i:03d}" for i in range(20)]
    assert {(p.reasoning, p.answer) for p in (f.result() for f in cot)} == {
        ("It is well known.", "Paris")
    }
    assert "reasoning" not in qa[0].result().keys()  # Predict: the signature's fields only
    assert {f.worker_id for f in qa} == {f.worker_id for f in cot} == worker_ids(pool)


def test_signature_cell_with_types_and_instructions(make_pool: MakePool) -> None:
    pool = dspy_pool(make_pool, workers=1)
    signature, instructions = dp.parse_signature_cell(
        "# typed fields and an instructions line\n"
        "Count the things asked about.\n"
        "question: str, hint: str -> answer: int\n"
    )
    assert instructions == "Count the things asked about."
    pool.define_signature("count", signature, instructions=instructions)
    assert pool.run("count", "how many legs?", hint="a tripod").answer == 3  # an int
    seen = pool.run("inspect_lm")
    assert "Count the things asked about." in seen["last_system"]
    assert "`answer` (int)" in seen["last_system"]
    # The whole cell body works as the signature too.
    pool.define_signature("count2", "Count.\nquestion -> answer: int", module="chainofthought")
    assert pool.run("count2", question="how many?").answer == 3


def test_custom_module_runs_on_workers_that_never_saw_it(make_pool: MakePool) -> None:
    pool = dspy_pool(make_pool)
    pool.define("shout", MODULE_CELL, entry="Shout")
    pool.define("ask", FUNCTION_CELL)
    futures = [pool.submit("shout", f"What is the capital of France? {i}") for i in range(20)]
    results = [f.result(20) for f in futures]
    assert {r.answer for r in results} == {"PARIS"}
    assert {r.built for r in results} == {1}  # one instance per worker, called many times
    assert {f.worker_id for f in futures} == worker_ids(pool)
    assert pool.run("ask", "item-042?") == "answer-042"
    # Workers started after the definition (replacements) build it from the store alone.
    old = {r.pid for r in results}
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pool.status().replaced == 2)
    pool.wait_ready(30)
    fresh = [pool.submit("shout", question="capital of France") for _ in range(10)]
    assert {f.result(20).answer for f in fresh} == {"PARIS"}
    assert not {f.result().pid for f in fresh} & old
    # A new pool on the same store has never seen any of it either.
    other = make_pool(1, store=pool.store, preload=["dspy"])
    other.configure_lm("dummy", answers=ANSWERS)
    assert other.run("shout", question="capital of France?").answer == "PARIS"


def test_lm_configuration_reaches_every_worker_and_survives_sigkill(make_pool: MakePool) -> None:
    pool = dspy_pool(make_pool)
    pool.define_signature("qa", "question -> answer")
    assert dp.current_lm(pool) == {
        "model": "dummy",
        "answers": ANSWERS,
        "max_history_size": dp.DEFAULT_MAX_HISTORY,
    }
    futures = [pool.submit("inspect_lm") for _ in range(20)]
    assert {f.result(20)["lm"] for f in futures} == {"DummyLM"}
    assert {f.worker_id for f in futures} == worker_ids(pool)
    victim = pool.status().workers[0]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    wait_for(lambda: pool.status().replaced == 1)
    pool.wait_ready(30)
    replacement = (worker_ids(pool) - {victim.id}).pop()
    futures = [pool.submit("qa", question="capital of France?") for _ in range(20)]
    assert {f.result(20).answer for f in futures} == {"Paris"}
    assert replacement in {f.worker_id for f in futures}
    # A new configuration replaces the old one in every worker, and in later ones.
    pool.configure_lm("dummy", answers={"": {"answer": "again"}}, max_history_size=3)
    futures = [pool.submit("qa", question=f"q{i}") for i in range(20)]
    assert {f.result(20).answer for f in futures} == {"again"}
    assert {f.worker_id for f in futures} == worker_ids(pool)
    # LM history in a long-lived worker is bounded.
    for i in range(10):
        pool.run("qa", question=f"q{i}", session="one-worker")
    seen = pool.run("inspect_lm", session="one-worker")
    assert seen["history"] == 3 and seen["global_history"] == 3


def test_missing_or_unknown_input_fails_before_the_lm(make_pool: MakePool) -> None:
    pool = dspy_pool(make_pool, workers=1)
    pool.define_signature("qa", "question, context -> answer")
    pool.define("shout", MODULE_CELL, entry="Shout")
    with pytest.raises(ProgramError) as info:
        pool.run("qa", question="capital of France?")
    assert info.value.remote_type == "TypeError"
    assert "program 'qa' is missing input field 'context'" in str(info.value)
    with pytest.raises(ProgramError, match="program 'qa' has no input field 'contxt'.*'context'"):
        pool.run("qa", question="capital of France?", contxt="Europe")
    with pytest.raises(ProgramError, match="takes 2 input field.*3 positional"):
        pool.run("qa", "a", "b", "c")
    with pytest.raises(ProgramError, match="program 'shout': missing a required argument"):
        pool.run("shout")
    with pytest.raises(ProgramError, match="'shout' has no input field 'questio'.*'question'"):
        pool.run("shout", questio="capital of France?")
    assert pool.run("inspect_lm")["history"] == 0  # the LM was never called
    assert pool.run("qa", "capital of France?", "Europe").answer == "Paris"
    assert pool.run("inspect_lm")["history"] == 1


def test_map_over_100_examples_returns_results_in_order(make_pool: MakePool) -> None:
    pool = dspy_pool(make_pool)
    pool.define_signature("cot", "question -> answer", module="ChainOfThought")
    examples = [{"question": f"Explain item-{i:03d}."} for i in range(N_ITEMS)]
    futures = [pool.submit("cot", **example) for example in examples]
    results = [f.result(30) for f in futures]
    assert [r.answer for r in results] == [f"answer-{i:03d}" for i in range(N_ITEMS)]
    assert [r.reasoning for r in results] == [f"thought-{i:03d}" for i in range(N_ITEMS)]
    assert {f.worker_id for f in futures} == worker_ids(pool)


def test_without_lm_or_preload_the_error_says_what_to_do(make_pool: MakePool) -> None:
    pool = make_pool(1)  # dspy not preloaded: the worker imports it when it needs it
    pool.define_signature("qa", "question -> answer")
    with pytest.raises(ProgramError, match="needs a language model.*configure_lm"):
        pool.run("qa", question="capital of France?")
    pool.configure_lm("dummy", answers=ANSWERS)
    assert pool.run("qa", question="capital of France?").answer == "Paris"
    # An LM object travels by value.
    from dspy.utils import DummyLM

    pool.configure_lm(DummyLM({"": {"answer": "from an object"}}))
    assert pool.run("qa", question="capital of France?").answer == "from an object"
    shown = dp.current_lm(pool)
    assert shown is not None and shown["model"].startswith("<dspy.utils.dummies.DummyLM")


def test_bad_definitions_fail_in_the_kernel(make_pool: MakePool) -> None:
    pool = make_pool(1)
    cases = {
        "question ->": "no output field",
        "question -> question": "both an input and an output",
        "question: Mystery -> answer": "Unknown name: Mystery",
        "a -> b -> c": "exactly one '->'",
        "no arrow here": "exactly one '->'",
    }
    for signature, message in cases.items():
        with pytest.raises(InvalidProgram, match=message):
            pool.define_signature("bad", signature)
    with pytest.raises(InvalidProgram, match="unknown DSPy module 'ReAct'"):
        pool.define_signature("bad", "question -> answer", module="ReAct")
    with pytest.raises(InvalidProgram, match="demo field 'query'"):
        pool.define_signature("bad", "question -> answer", demos=[{"query": "x"}])
    with pytest.raises(InvalidProgram, match="one signature line; found 2"):
        dp.parse_signature_cell("a -> b\nc -> d\n")
    assert pool.programs() == []
    with pytest.raises(ValueError, match="the dummy LM needs answers"):
        pool.configure_lm("dummy")
    with pytest.raises(ValueError, match="max_history_size"):
        pool.configure_lm("dummy", answers=ANSWERS, max_history_size=-1)
    assert dp.current_lm(pool) is None


def test_demos_and_real_model_configuration_are_stored_by_value() -> None:
    spec = dp.signature_spec(
        "question -> answer", "Predict", demos=[{"question": "1+1?", "answer": "2"}], n=1
    )
    assert spec["demos"] == [{"question": "1+1?", "answer": "2"}]
    assert spec["config"] == {"n": 1}
    program = dp.SignatureProgram("qa", spec)
    assert [d.answer for d in program.module.demos] == ["2"]
    config = dp.lm_config("openai/gpt-4o-mini", temperature=0.0, api_key="sk-test")
    assert config == {
        "model": "openai/gpt-4o-mini",
        "lm": None,
        "kwargs": {"temperature": 0.0, "api_key": "sk-test"},
        "max_history_size": dp.DEFAULT_MAX_HISTORY,
    }
