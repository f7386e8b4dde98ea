"""DSPy worker start-up and memory: ``python -m bench.dspy_startup [--workers 8] [--reps 3]``.

What it measures (medians over ``--reps``; every pool is new, so its template imports
dspy afresh: "cold" means a new process, not an empty page cache, and one untimed
``import dspy`` runs first so that every repetition sees the same page cache):

- ``plain pool``: ``Pool(workers=N)`` (nothing preloaded) until ``wait_ready``.
- ``dspy pool, cold``: ``Pool(workers=N, preload=["dspy"])`` until ``wait_ready``, and
  until ``configure_lm("dummy", ...)`` has been applied in every worker (the workers
  can run DSPy programs from then on).
- ``dspy pool, warm template``: every worker of a ready DSPy pool SIGKILLed at once,
  until N replacements (forked from the warm template) said hello.
- ``N fresh interpreters``: N ``python -c "import dspy"`` started at once, until all
  exited (what a pool without a warm template pays), and with ``--sequential`` one
  after another (the seed's pool).
- Memory per worker after one DSPy call each: RSS, USS (pages only that process holds)
  and PSS, against one fresh interpreter that imported dspy and made the same call.

``--hide MODULE`` makes ``MODULE`` unimportable in every process measured (a stub that
raises ImportError, first on ``PYTHONPATH``), to show what an optional dependency costs:
``--hide rfc3987_syntax`` is ``import dspy`` in an environment without JupyterLab's
``jsonschema[format-nongpl]`` (jsonschema builds that package's grammar at import, about
a second on a 2-core machine).

Needs the ``dspy`` and ``bench`` extras (psutil). Leaves no process behind: every pool is
closed in ``finally`` and the interpreters are waited for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/dspy_startup.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from dspool_jupyter import Pool
from dspool_jupyter.events import Event, WorkerReady

ANSWERS = {"": {"answer": "42"}}  # the offline DummyLM answers every prompt with 42
IMPORT = "import os; os.environ.setdefault('LITELLM_LOCAL_MODEL_COST_MAP', 'True'); import dspy"
FRESH_MEMORY = f"""{IMPORT}
import json, psutil
from dspy.utils import DummyLM
dspy.configure(lm=DummyLM({ANSWERS!r}))
dspy.Predict("question -> answer")(question="q")
m = psutil.Process().memory_full_info()
print(json.dumps({{"rss": m.rss, "uss": m.uss, "pss": m.pss}}))
"""
MB = 1 << 20
MEMORY_KEYS = ("rss", "uss", "pss")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return env


def plain_pool(workers: int, store: str) -> dict[str, float]:
    start = time.perf_counter()
    with Pool(workers=workers, store=store) as pool:
        pool.wait_ready(120)
        return {"ready": time.perf_counter() - start}


def dspy_pool(workers: int, store: str, memory: bool) -> dict[str, Any]:
    start = time.perf_counter()
    with Pool(workers=workers, store=store, preload=["dspy"]) as pool:
        pool.wait_ready(120)
        ready = time.perf_counter() - start
        pool.configure_lm("dummy", answers=ANSWERS)
        lm_ready = time.perf_counter() - start
        pool.define_signature("qa", "question -> answer")
        _call_every_worker(pool, workers)
        result: dict[str, Any] = {"ready": ready, "ready_with_lm": lm_ready}
        if memory:
            result["memory"] = _worker_memory(pool)
        result["warm"] = _replace_all(pool, workers)
        _call_every_worker(pool, workers)  # the replacements have the LM
        return result


def _call_every_worker(pool: Pool, workers: int) -> None:
    """One DSPy call on each worker (one session per worker, all submitted at once)."""
    for attempt in range(20):
        futures = [
            pool.submit("qa", question=f"q{i}", session=f"bench-{attempt}-{i}")
            for i in range(workers)
        ]
        if {f.result(60).answer for f in futures} != {"42"}:
            raise RuntimeError("a worker gave a wrong answer")
        if len({f.worker_id for f in futures}) == workers:
            return
    raise RuntimeError("could not reach every worker with a call")


def _worker_memory(pool: Pool) -> list[dict[str, int]]:
    found = []
    for worker in pool.status().workers:
        if worker.pid is None:
            continue
        info = psutil.Process(worker.pid).memory_full_info()
        found.append({"rss": info.rss, "uss": info.uss, "pss": info.pss})
    return found


def _replace_all(pool: Pool, workers: int) -> float:
    """SIGKILL every worker at once; seconds until as many replacements said hello."""
    pids = [w.pid for w in pool.status().workers if w.pid is not None]
    hellos: list[float] = []
    done = threading.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, WorkerReady) and event.pid not in pids:
            hellos.append(time.perf_counter())
            if len(hellos) >= workers:
                done.set()

    unsubscribe = pool.subscribe(on_event)
    try:
        start = time.perf_counter()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        if not done.wait(120):
            raise RuntimeError("the replacements did not all start")
        elapsed = max(hellos[:workers]) - start
    finally:
        unsubscribe()
    pool.wait_ready(60)
    return elapsed


def fresh_interpreters(workers: int, sequential: bool) -> float:
    """Seconds for ``workers`` new interpreters that each import dspy, to all finish."""
    command = [sys.executable, "-c", IMPORT]
    start = time.perf_counter()
    if sequential:
        for _ in range(workers):
            subprocess.run(command, check=True, env=_env())
    else:
        procs = [subprocess.Popen(command, env=_env()) for _ in range(workers)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"an interpreter failed: exit codes {codes}")
    return time.perf_counter() - start


def fresh_memory() -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", FRESH_MEMORY], check=True, env=_env(), capture_output=True
    )
    return dict(json.loads(out.stdout))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    return f"{median(values):7.3f} s  [{min(values):.3f}-{max(values):.3f}]"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dspy_startup", description=__doc__)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sequential", action="store_true", help="also time N imports in a row")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument(
        "--hide", action="append", default=[], help="make this module unimportable (stub)"
    )
    args = parser.parse_args(argv)
    n = args.workers
    say: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: E731

    runs: dict[str, list[float]] = {
        k: [] for k in ("plain", "cold", "cold_lm", "warm", "fresh", "sequential", "one")
    }
    memory: list[dict[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="dspool-bench-") as tmp:
        if args.hide:
            stubs = Path(tmp, "hidden")
            stubs.mkdir()
            for name in args.hide:
                (stubs / f"{name}.py").write_text(f"raise ImportError('{name} hidden by bench')\n")
            path = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = str(stubs) + (os.pathsep + path if path else "")
        subprocess.run([sys.executable, "-c", IMPORT], check=True, env=_env())  # page cache
        for rep in range(args.reps):
            store = os.path.join(tmp, f"store{rep}")
            runs["plain"].append(plain_pool(n, store)["ready"])
            result = dspy_pool(n, store, memory=rep == 0)
            runs["cold"].append(result["ready"])
            runs["cold_lm"].append(result["ready_with_lm"])
            runs["warm"].append(result["warm"])
            memory = result.get("memory", memory)
            runs["fresh"].append(fresh_interpreters(n, sequential=False))
            runs["one"].append(fresh_interpreters(1, sequential=False))
            if args.sequential:
                runs["sequential"].append(fresh_interpreters(n, sequential=True))
            say(f"rep {rep + 1}/{args.reps} done")
        fresh_mem = fresh_memory()

    cpus = os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    say(f"\n{n} workers, {args.reps} repetitions, {cpus} CPUs, load average {load}")
    hidden = f", hidden: {', '.join(args.hide)}" if args.hide else ""
    say(f"python {sys.version.split()[0]}, dspy {_version('dspy')}{hidden}\n")
    say(f"{'plain pool, ready':44s}{spread(runs['plain'])}")
    say(f"{'dspy pool, cold: ready':44s}{spread(runs['cold'])}")
    say(f"{'dspy pool, cold: ready + LM in every worker':44s}{spread(runs['cold_lm'])}")
    say(f"{'dspy pool, warm template: all replaced':44s}{spread(runs['warm'])}")
    say(f"{'1 fresh interpreter: import dspy':44s}{spread(runs['one'])}")
    say(f"{f'{n} fresh interpreters at once: import dspy':44s}{spread(runs['fresh'])}")
    if runs["sequential"]:
        say(f"{f'{n} fresh interpreters in a row':44s}{spread(runs['sequential'])}")
    fresh = median(runs["fresh"])
    say(
        f"\nspeed-up over {n} fresh interpreters: cold {fresh / median(runs['cold_lm']):.1f}x "
        f"(ready + LM), warm template {fresh / median(runs['warm']):.0f}x"
    )
    if memory:
        say(f"\nmemory per worker after one DSPy call (MiB, median of {len(memory)} workers):")
        say(f"{'':28s}{'RSS':>8s}{'USS':>8s}{'PSS':>8s}")
        for label, rows in (("pool worker (forked)", memory), ("fresh interpreter", [fresh_mem])):
            cells = "".join(
                f"{median([r[k] for r in rows]) / MB:8.1f}" for k in ("rss", "uss", "pss")
            )
            say(f"{label:28s}{cells}")
    if args.json:
        raw = {
            "workers": n,
            "hidden": args.hide,
            "runs": runs,
            "memory": memory,
            "fresh_memory": fresh_mem,
        }
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


if __name__ == "__main__":
    sys.exit(main())
