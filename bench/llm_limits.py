"""One provider limit for the whole pool, against ``dspy.Parallel`` at the same in-flight count.

``python -m bench.llm_limits [--calls 150] [--inflight 8] [--latency 0.1] [--rpm 600]``

A loopback OpenAI-compatible server (``tests/llm_server.py``, a subprocess of its own so
that it never shares a GIL with a client) answers after ``--latency`` seconds and allows
``--rpm`` requests per minute in a sliding window of ``--window`` seconds (429 with
``Retry-After`` beyond it). ``--calls`` distinct questions go through a DSPy signature
program (``question -> answer``, ``Predict``), the same in every system:

- ``dspy.Parallel``: one process, ``--inflight`` threads, DSPy's own retries (its
  default ``num_retries=3``, honouring ``Retry-After``); it has no shared limit.
- ``2 x dspy.Parallel``: two such processes at half the threads each (what several
  notebooks or workers without a shared limit do).
- ``dspool, limit set``: ``Pool(workers=--inflight)`` (one call per worker) whose
  workers share one :class:`~dspool_jupyter.limits.ProviderLimits` with
  ``set_rate_limit(model, rpm=--rpm)``; the LM has ``num_retries=0`` (the pool retries).
- ``dspool, no limit``: the same without ``set_rate_limit`` (pool-wide pauses and AIMD
  only).

Reported per system: achieved rate (answered requests per minute between the first and
the last, and as a fraction of the limit), the fraction of requests refused (429), calls
lost (failed after all retries), and the wall time (which includes starting the pool or
the processes and importing dspy). A sliding window lets a system that sends in bursts
take a whole window's worth at once at the start, so over a short run an unpaced system
can show more than 100 % of the limit; the pool's pacing never bursts. Pools are closed
in ``finally``; the server subprocesses are terminated.

Seen on the 2-core machine this was written on, while other test suites ran
(``--calls 300 --inflight 16``)::

    | system               | achieved rpm | of limit | 429s   | requests | calls lost |
    | dspy.Parallel        |          632 |   105.3% |  32.9% |      447 |          0 |
    | 2 x dspy.Parallel    |          565 |    94.2% |  41.5% |      511 |          1 |
    | dspool, limit set    |          551 |    91.8% |   0.3% |      301 |          0 |
    | dspool, no limit     |          592 |    98.7% |   4.2% |      313 |          0 |
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "llm_server.py"
MODEL = "openai/gpt-4o-mini"


class Server:
    """The loopback server as a subprocess."""

    def __init__(self, latency: float, limit: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--latency", str(latency), "--limit", limit],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline().split()[1])
        self.url = f"http://127.0.0.1:{port}/v1"

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as response:
            stats: dict[str, Any] = json.load(response)
            return stats

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def questions(n: int, tag: str) -> list[str]:
    return [f"{tag} question {i}" for i in range(n)]


def parallel_child(url: str, threads: int, items: list[str], out: str) -> None:
    """One process running ``dspy.Parallel`` (also the body of ``2 x dspy.Parallel``)."""
    import dspy

    lm = dspy.LM(MODEL, api_base=url, api_key="x", cache=False)
    dspy.configure(lm=lm)
    program = dspy.Predict("question -> answer")
    parallel = dspy.Parallel(
        num_threads=threads, max_errors=len(items) + 1, disable_progress_bar=True
    )
    results = parallel([(program, {"question": q}) for q in items])
    ok = sum(1 for r in results if r is not None and getattr(r, "answer", None))
    Path(out).write_text(json.dumps({"ok": ok, "lost": len(items) - ok}))


def run_parallel(url: str, processes: int, inflight: int, items: list[str]) -> dict[str, Any]:
    share = [items[i::processes] for i in range(processes)]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{i}.json") for i in range(processes)]
        code = (
            "import sys, json; from bench.llm_limits import parallel_child as c; "
            "c(*json.loads(sys.argv[1]))"
        )
        children = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    code,
                    json.dumps([url, inflight // processes, share[i], outs[i]]),
                ],
                cwd=ROOT,
            )
            for i in range(processes)
        ]
        for child in children:
            child.wait()
        results = [json.loads(Path(out).read_text()) for out in outs]
    return {"lost": sum(r["lost"] for r in results)}


def run_dspool(url: str, inflight: int, items: list[str], rpm: float | None) -> dict[str, Any]:
    from dspool_jupyter import Pool
    from dspool_jupyter.limits import ProviderLimits

    with tempfile.TemporaryDirectory() as tmp:
        limits = ProviderLimits(tmp)
        os.environ.update(limits.env)  # the pool's template (and every worker) inherits it
        pool = Pool(workers=inflight, store=os.path.join(tmp, "store"), preload=["dspy"])
        try:
            pool.wait_ready(120)
            pool.set_worker_setup("llm", "from dspool_jupyter.llm import install_dspy_hook as llm")
            pool.configure_lm(MODEL, api_base=url, api_key="x", cache=False, num_retries=0)
            pool.define_signature("qa", "question -> answer")
            if rpm is not None:
                limits.set_rate_limit(MODEL, rpm=rpm)
            futures = [pool.submit("qa", question=q) for q in items]
            lost = 0
            for future in futures:
                try:
                    future.result(600)
                except Exception:
                    lost += 1
            return {"lost": lost, "ledger": limits.usage().requests}
        finally:
            pool.close()
            limits.close()
            os.environ.pop(next(iter(limits.env)), None)


def measure(name: str, args: argparse.Namespace, run: Any) -> dict[str, Any]:
    count = max(1, round(args.rpm * args.window / 60))
    server = Server(args.latency, f"{count}/{args.window}")
    try:
        started = time.monotonic()
        outcome = run(server.url)
        wall = time.monotonic() - started
        stats = server.stats()
    finally:
        server.close()
    times = stats["ok_times"]
    rate = (len(times) - 1) / (times[-1] - times[0]) * 60 if len(times) > 1 else 0.0
    return {
        "system": name,
        "rpm": rate,
        "of_limit": rate / args.rpm,
        "refused": stats["refused"] / max(1, stats["requests"]),
        "requests": stats["requests"],
        "lost": outcome["lost"],
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per answer")
    parser.add_argument("--rpm", type=float, default=600, help="the server's limit")
    parser.add_argument("--window", type=float, default=5.0, help="the limit's window, s")
    args = parser.parse_args(argv)
    items = questions(args.calls, "bench")
    systems = [
        ("dspy.Parallel", lambda url: run_parallel(url, 1, args.inflight, items)),
        ("2 x dspy.Parallel", lambda url: run_parallel(url, 2, args.inflight, items)),
        ("dspool, limit set", lambda url: run_dspool(url, args.inflight, items, args.rpm)),
        ("dspool, no limit", lambda url: run_dspool(url, args.inflight, items, None)),
    ]
    print(
        f"{args.calls} calls, {args.inflight} in flight, {args.latency * 1000:.0f} ms latency, "
        f"server limit {args.rpm:g} rpm ({args.window:g} s sliding window)\n"
    )
    header = (
        f"| {'system':<20} | achieved rpm | of limit | 429s   | requests | calls lost | wall s |"
    )
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for name, run in systems:
        row = measure(name, args, run)
        print(
            f"| {row['system']:<20} | {row['rpm']:>12.0f} | {row['of_limit']:>8.1%} "
            f"| {row['refused']:>6.1%} | {row['requests']:>8} | {row['lost']:>10} "
            f"| {row['wall']:>6.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
