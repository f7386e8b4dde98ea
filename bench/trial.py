"""One trial of one system, in a fresh process: ``python -m bench.trial SPEC_JSON OUT_PATH``.

The driver (:mod:`bench.run`) starts this module once per measurement so that every
system starts cold, with nothing imported beforehand that a forked worker could inherit,
and so that whatever a system leaves behind can be found and reported. The result (a
JSON object with ``ok``, ``metrics`` and ``notes``) is written to ``OUT_PATH``.

Trial kinds:

``startup``
    Time from just before the pool is constructed until ``workers`` barrier calls have
    completed. Each barrier call imports the preload modules (a no-op where the system
    preloaded them), checks in, and blocks until ``workers`` distinct processes checked
    in, so the clock stops only when every worker has run a task. Then the RSS/USS of
    the idle workers.
``warm``
    A pool of 2, warmed by a barrier and 200 calls, then: per-call overhead (sequential
    trivial calls, p50/p99), a trivial call's wait next to a long call
    (:func:`behind_long`), throughput (``calls`` trivial calls submitted at once), and
    recovery after a SIGKILL (see :func:`recovery`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from bench.systems import SYSTEMS, System, missing_reason

BARRIER_TIMEOUT = 60.0  # seconds a barrier call waits for the other workers
RESULT_TIMEOUT = 90.0  # seconds to wait for any one future
WARMUP_CALLS = 200
SLOW_CALL = 0.5  # seconds; the in-flight calls of the loss phase
SETTLE_TIMEOUT = 60.0  # seconds for a pool to get back to full size after a kill


def _wait_files(directory: Path, count: int, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = list(directory.iterdir())
        if len(files) >= count:
            return sorted(files, key=lambda f: f.stat().st_mtime_ns)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(files)} of {count} calls started in {timeout} s")
        time.sleep(0.001)


def _barrier(system: System, n: int, workdir: Path, modules: list[str]) -> list[int]:
    """Run a barrier on ``n`` workers; returns their pids (raises on any failure)."""
    rdv = Path(tempfile.mkdtemp(prefix="rdv-", dir=workdir))
    futures = system.submit_each("barrier", n, str(rdv), modules, BARRIER_TIMEOUT)
    pids = [int(f.result(timeout=RESULT_TIMEOUT)) for f in futures]
    if len(set(pids)) != n:
        raise RuntimeError(f"barrier ran on {len(set(pids))} distinct workers, not {n}")
    return pids


def memory(pids: list[int]) -> dict[str, Any]:
    """RSS and USS (bytes) of the workers, and everything the trial started, per worker."""
    rss, uss = [], []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        rss.append(info.rss)
        uss.append(info.uss)
    helpers: dict[str, int] = {}
    total_uss = sum(uss)
    for child in psutil.Process().children(recursive=True):
        if child.pid in pids:
            continue
        try:
            helper_uss = child.memory_full_info().uss
            name = " ".join(child.cmdline()[:3])[:80] or child.name()
        except psutil.Error:
            continue
        total_uss += helper_uss
        helpers[f"{child.pid} {name}"] = helper_uss
    return {
        "worker_rss": statistics.median(rss),
        "worker_uss": statistics.median(uss),
        "allin_uss": total_uss / len(pids),
        "helpers": helpers,
    }


def startup(system: System, spec: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    n = spec["workers"]
    modules = spec["preload"]
    inherited = [m for m in modules if m in sys.modules]
    if inherited:
        notes.append(f"preload already imported in the parent: {inherited}")
    t0 = time.perf_counter()
    system.start()
    pids = _barrier(system, n, system.workdir, modules)
    elapsed = time.perf_counter() - t0
    time.sleep(0.2)  # let the workers go idle before measuring them
    return {"startup": elapsed, "pids": pids, "memory": memory(system.worker_pids())}


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def warm(system: System, spec: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    system.start()
    _barrier(system, 2, system.workdir, [])
    for i in range(WARMUP_CALLS):
        system.call("inc", i)
    metrics: dict[str, Any] = {}

    latencies = []
    for i in range(spec["latency_calls"]):
        t = time.perf_counter_ns()
        value = system.call("inc", i)
        latencies.append((time.perf_counter_ns() - t) / 1e9)
        if value != i + 1:
            raise RuntimeError(f"inc({i}) returned {value!r}")
    latencies.sort()
    metrics["p50"] = _percentile(latencies, 0.50)
    metrics["p99"] = _percentile(latencies, 0.99)

    metrics["behind_long"] = behind_long(system)

    calls = spec["calls"]
    t0 = time.perf_counter()
    futures = [system.submit("inc", i) for i in range(calls)]
    submitted = time.perf_counter()
    results = system.gather(futures)
    metrics["throughput"] = time.perf_counter() - t0
    metrics["submit"] = submitted - t0
    if sum(results) != calls * (calls + 1) // 2:
        raise RuntimeError("throughput: wrong results")
    del futures, results

    metrics.update(recovery(system, notes))
    return metrics


LONG_CALL = 0.5  # seconds; the call a trivial call must not wait behind
SHORT_CALL = 0.02  # seconds; the call on the other worker
BEHIND_LONG_SAMPLES = 4


def behind_long(system: System) -> float:
    """Mean wait of a trivial call submitted while one worker runs a long call and the
    other a short one: a pool that hands out calls as workers free up answers within
    ``SHORT_CALL``; one that commits the call to a busy worker's queue may make it wait
    for the long call (head-of-line blocking)."""
    samples = []
    for _ in range(BEHIND_LONG_SAMPLES):
        rdv = Path(tempfile.mkdtemp(prefix="hol-", dir=system.workdir))
        long_call = system.submit("slow", str(rdv / "long_"), LONG_CALL)
        short_call = system.submit("slow", str(rdv / "short_"), SHORT_CALL)
        _wait_files(rdv, 2, 30)
        t = time.perf_counter()
        system.submit("inc", 1).result(timeout=RESULT_TIMEOUT)
        samples.append(time.perf_counter() - t)
        long_call.result(timeout=RESULT_TIMEOUT)
        short_call.result(timeout=RESULT_TIMEOUT)
    return statistics.mean(samples)


def _outcome(future: Any, timeout: float) -> str:
    try:
        future.result(timeout=timeout)
    except Exception as exc:
        return type(exc).__name__
    return "ok"


def recovery(system: System, notes: list[str]) -> dict[str, Any]:
    """Kill a worker twice: once to count lost calls, once to time the recovery.

    Loss: 4 calls of ``SLOW_CALL`` seconds on 2 workers (2 running, 2 queued); one
    running worker is SIGKILLed; ``lost`` counts the 4 calls that ended in an error and
    ``rerun`` the calls started more than once (a system that retries a crashed call
    reports it as not lost). The pool is then brought back as its user would.

    Timing: one long call runs on one worker of an idle pool of 2; that worker is
    SIGKILLed and the call cancelled (so a retry does not hold a worker). ``first_ok``
    is the time from the kill until a trivial call submitted after it succeeds (retrying,
    and recovering as the system's user would, on errors); ``full`` until a 2-worker
    barrier succeeds, i.e. the pool again runs 2 calls at once on 2 live workers.
    """
    workdir = system.workdir
    metrics: dict[str, Any] = {}

    # Loss.
    system.worker_pids()  # lets adapters map pids to their own worker ids
    rdv = Path(tempfile.mkdtemp(prefix="loss-", dir=workdir))
    futures = [system.submit("slow", str(rdv / f"c{i}_"), SLOW_CALL) for i in range(4)]
    started = _wait_files(rdv, 2, 30)
    victim = int(started[0].name.split("_")[1].split("-")[0])
    os.kill(victim, signal.SIGKILL)
    system.after_kill(victim)
    outcomes = [_outcome(f, SETTLE_TIMEOUT) for f in futures]
    starts = [f.name.split("_")[0] for f in rdv.iterdir()]
    metrics["lost"] = sum(o != "ok" for o in outcomes)
    metrics["rerun"] = sum(max(0, starts.count(f"c{i}") - 1) for i in range(4))
    metrics["loss_outcomes"] = outcomes
    _settle(system)

    # Timing.
    pids_before = system.worker_pids()
    rdv = Path(tempfile.mkdtemp(prefix="kill-", dir=workdir))
    long_call = system.submit("slow", str(rdv / "v_"), 30.0)
    victim = int(_wait_files(rdv, 1, 30)[0].name.split("_")[1].split("-")[0])
    t_kill = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    system.after_kill(victim)
    try:
        long_call.cancel()
    except Exception:
        pass
    errors: list[str] = []
    deadline = t_kill + SETTLE_TIMEOUT
    while True:
        try:
            system.submit("inc", 1).result(timeout=max(0.1, deadline - time.perf_counter()))
            break
        except Exception as exc:
            errors.append(type(exc).__name__)
            if time.perf_counter() > deadline:
                raise
            system.recover()
    metrics["first_ok"] = time.perf_counter() - t_kill
    while True:
        try:
            _barrier(system, 2, workdir, [])
            break
        except Exception as exc:
            errors.append(type(exc).__name__)
            if time.perf_counter() > deadline:
                raise
            system.recover()
    metrics["full"] = time.perf_counter() - t_kill
    metrics["kill_errors"] = errors
    metrics["victim_outcome"] = _outcome(long_call, 5)
    if victim not in pids_before:
        notes.append(f"victim {victim} was not among the reported workers {pids_before}")
    return metrics


def _settle(system: System) -> None:
    """Bring the pool back to 2 working workers, recovering as its user would."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        try:
            _barrier(system, 2, system.workdir, [])
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            system.recover()


# Helpers of multiprocessing and loky that exit with the trial process itself.
EXITS_WITH_PARENT = ("resource_tracker import main", "forkserver import main")


def _wait_descendants(timeout: float) -> list[str]:
    """Wait for this process's descendants to exit; describe those still alive."""
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(marker in cmdline for marker in EXITS_WITH_PARENT):
            children.append(child)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    described = []
    for p in alive:
        try:
            described.append(f"{p.pid} {' '.join(p.cmdline()[:4])[:100]}")
        except psutil.Error:
            continue
    return described


KINDS = {"startup": startup, "warm": warm}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    out = Path(argv[2])
    result: dict[str, Any] = {"ok": False, "notes": []}
    notes: list[str] = result["notes"]
    workdir = Path(tempfile.mkdtemp(prefix="dspool-bench-"))
    system: System | None = None
    try:
        reason = missing_reason(spec["system"])
        if reason is not None:
            result.update(missing=True, error=reason)
            return 0
        system = SYSTEMS[spec["system"]](spec["workers"], spec["preload"], workdir)
        result["metrics"] = KINDS[spec["kind"]](system, spec, notes)
        result["ok"] = True
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        if system is not None:
            try:
                system.close()
            except Exception as exc:
                notes.append(f"close failed: {type(exc).__name__}: {exc}")
        lingering = _wait_descendants(10)
        if lingering:
            notes.append(f"still running 10 s after close: {lingering}")
        shutil.rmtree(workdir, ignore_errors=True)
        out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
