"""LLM-bound throughput: dspool with many calls per worker beside dspy.Parallel.

A loopback OpenAI-compatible chat server (``tests/llm_server.py``, its own process, fixed
latency) answers N distinct questions sent through a DSPy signature program
(``question -> answer``, ``dspy.Predict``) by each system, at the same number of
requests in flight T:

- ``dspy.Parallel(num_threads=T)`` in one process (what DSPy users have);
- ``ThreadPoolExecutor(T)`` calling the program;
- dspool ``Pool(workers=2, concurrency=T/2)``;
- dspool ``Pool(workers=2)`` (concurrency 1: two in flight), for reference.

Each system runs in a fresh process, interleaved over the repetitions. Reported: calls/s,
% of the ideal (in flight ÷ latency), per-call latency p50/p99 (from the moment the call
was handed out), and the CPU the measuring process used per wall second (for dspool that
is the kernel's share: the work is in the workers).

    python -m bench.llm_throughput                      # 200 ms and 1 s, T=16 and 32
    python -m bench.llm_throughput --latency 0.2 --inflight 16 --calls 200 --reps 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("dspy.Parallel", "ThreadPoolExecutor", "dspool", "dspool-concurrency-1")


def start_server(latency: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return proc, f"http://127.0.0.1:{int(line[1])}/v1"


def questions(n: int) -> list[str]:
    return [f"What is {i} plus {i + 1}? (question {i})" for i in range(n)]


def lm_kwargs(url: str) -> dict[str, Any]:
    return {"api_base": url, "api_key": "x", "cache": False, "num_retries": 0}


def run_threads(
    system: str, url: str, items: list[str], inflight: int
) -> tuple[list[float], float, float]:
    import dspy

    lm = dspy.LM("openai/bench", **lm_kwargs(url))
    dspy.configure(lm=lm)
    program = dspy.Predict("question -> answer")
    program(question="warm-up")
    times: list[float] = []
    begun, cpu0 = time.monotonic(), time.process_time()

    def one(question: str) -> str:
        start = time.monotonic()
        answer = program(question=question).answer
        times.append(time.monotonic() - start)
        return str(answer)

    if system == "dspy.Parallel":

        class One(dspy.Module):  # type: ignore[misc]
            def forward(self, question: str) -> Any:
                return one(question)

        module = One()
        parallel = dspy.Parallel(num_threads=inflight, disable_progress_bar=True)
        parallel([(module, {"question": q}) for q in items])
    else:
        with ThreadPoolExecutor(inflight) as executor:
            for future in as_completed([executor.submit(one, q) for q in items]):
                future.result()
    return times, time.monotonic() - begun, time.process_time() - cpu0


def run_dspool(
    url: str, items: list[str], inflight: int, concurrency: int
) -> tuple[list[float], float, float]:
    from dspool_jupyter import Pool

    with Pool(workers=2, concurrency=concurrency, store=tempfile.mkdtemp(), preload=["dspy"]) as p:
        p.wait_ready(60)
        p.configure_lm("openai/bench", **lm_kwargs(url))
        p.define_signature("qa", "question -> answer")
        # Warm every worker and slot, as the one-process peers are warm after their
        # warm-up call (LiteLLM imports its client lazily, per process, on first use).
        warm = [p.submit("qa", question=f"warm-up {i}") for i in range(2 * concurrency)]
        for future in warm:
            future.result()
        times: list[float] = []
        started: dict[Future[Any], float] = {}
        pending = list(reversed(items))
        window = min(inflight, 2 * concurrency)
        live: set[Future[Any]] = set()

        begun, cpu0 = time.monotonic(), time.process_time()

        def top_up() -> None:
            while pending and len(live) < window:
                future = p.submit("qa", question=pending.pop())
                started[future] = time.monotonic()
                live.add(future)

        top_up()
        while live:
            done = next(as_completed(live))
            done.result()
            times.append(time.monotonic() - started.pop(done))
            live.discard(done)
            top_up()
        return times, time.monotonic() - begun, time.process_time() - cpu0


def trial(system: str, latency: float, calls: int, inflight: int) -> dict[str, Any]:
    server, url = start_server(latency)
    try:
        items = questions(calls)
        runners: dict[str, Callable[[], tuple[list[float], float, float]]] = {
            "dspy.Parallel": lambda: run_threads("dspy.Parallel", url, items, inflight),
            "ThreadPoolExecutor": lambda: run_threads("ThreadPoolExecutor", url, items, inflight),
            "dspool": lambda: run_dspool(url, items, inflight, max(1, inflight // 2)),
            "dspool-concurrency-1": lambda: run_dspool(url, items, inflight, 1),
        }
        # Start-up (imports, the pool, one warm-up call) is not part of the run.
        times, wall, cpu = runners[system]()
        in_flight = inflight if system != "dspool-concurrency-1" else 2
        ordered = sorted(times)
        return {
            "calls_per_s": calls / wall,
            "ideal_pct": 100 * (calls / wall) / (in_flight / latency),
            "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "cpu_per_s": cpu / wall,
            "in_flight": in_flight,
        }
    finally:
        server.kill()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--latency", default="0.2,1.0", help="server latencies, seconds")
    parser.add_argument("--inflight", default="16,32", help="requests in flight T")
    parser.add_argument("--calls", type=int, default=0, help="questions (default: 12 × T)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        spec = json.loads(args.trial)
        print(json.dumps(trial(spec["system"], spec["latency"], spec["calls"], spec["inflight"])))
        return 0
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONPATH=str(REPO))
    systems = [s for s in args.systems.split(",") if s]
    rows: dict[tuple[float, int, str], list[dict[str, Any]]] = {}
    for latency in [float(x) for x in args.latency.split(",")]:
        for inflight in [int(x) for x in args.inflight.split(",")]:
            calls = args.calls or 12 * inflight
            for rep in range(args.reps):
                order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
                for system in order:
                    spec = {
                        "system": system,
                        "latency": latency,
                        "calls": calls,
                        "inflight": inflight,
                    }
                    out = subprocess.run(
                        [sys.executable, "-m", "bench.llm_throughput", "--trial", json.dumps(spec)],
                        capture_output=True,
                        text=True,
                        cwd=REPO,
                        env=env,
                        timeout=900,
                    )
                    if out.returncode != 0:
                        print(f"{system}: FAILED {out.stderr.strip().splitlines()[-1:]}")
                        continue
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.setdefault((latency, inflight, system), []).append(result)
                    print(
                        f"latency {latency:g} s, T={inflight}, {system}: "
                        f"{result['calls_per_s']:.1f} calls/s",
                        flush=True,
                    )
    print()
    print(
        f"LLM-bound throughput, {os.cpu_count()} CPUs, medians of {args.reps} (fresh process each)"
    )
    print()
    print(
        "| latency | T | system | in flight | calls/s | % of ideal | × dspy.Parallel"
        " | p50 | p99 | CPU/s in caller |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (latency, inflight, system), results in rows.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        base = rows.get((latency, inflight, "dspy.Parallel"))
        ratio = (
            med["calls_per_s"] / statistics.median(r["calls_per_s"] for r in base) if base else 0
        )
        print(
            f"| {latency:g} s | {inflight} | {system} | {med['in_flight']:.0f} "
            f"| {med['calls_per_s']:.1f} | {med['ideal_pct']:.0f} % | ×{ratio:.2f} "
            f"| {med['p50'] * 1e3:.0f} ms | {med['p99'] * 1e3:.0f} ms | {med['cpu_per_s']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
