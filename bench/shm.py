"""Large arguments and results, side by side (issue 17).

```
python -m bench.shm                      # every system, 50 calls per scenario
python -m bench.shm --calls 20 --systems dspool,dspool-socket,ppe
```

Each system runs in a fresh process (``python -m bench.shm --trial SYSTEM``) with 2
workers, warmed by one call. Scenarios (medians in ms, per call):

- ``arg8/seq``   an 8 MB float64 array passed to ``--calls`` calls, one at a time
  (round trip: submit, the worker sums it, the float comes back);
- ``arg8/par``   the same, all calls at once: wall time / calls;
- ``arg200/seq`` a 200 MB array, ``--calls200`` calls one at a time;
- ``res8/seq``   an 8 MB array as the result (``np.ones``), one call at a time;
- ``trivial``    2,000 trivial calls one at a time (the per-call overhead).

Systems: ``dspool`` (shared memory, the default threshold of 1 MiB), ``dspool-socket``
(``shared_memory_threshold=None``), ``ppe`` (``ProcessPoolExecutor``, fork), ``loky``
(``get_reusable_executor``), ``joblib`` (``Parallel(n_jobs=2, max_nbytes="1M")``: its
automatic memmapping). One not installed is reported missing, never dropped. dspool also
reports ``placed`` (bytes copied into segments over its whole trial) and, with
``--placed-calls``, the same 8 MB array sent to that many calls (1,000 by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

SYSTEMS = ("dspool", "dspool-socket", "ppe", "loky", "joblib")
MB = 1_000_000


def total(x: Any) -> float:
    return float(x.sum())


def make(n: int) -> Any:
    import numpy as np

    return np.ones(n)


def noop() -> None:
    return None


SOURCES = {
    "total": "def total(x):\n    return float(x.sum())\n",
    "make": "def make(n):\n    import numpy as np\n    return np.ones(n)\n",
    "noop": "def noop():\n    return None\n",
}


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _seq(call: Callable[[], Any], n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t)
    return _median_ms(samples)


def trial(system: str, calls: int, calls200: int, placed_calls: int) -> dict[str, Any]:
    import numpy as np

    a8 = np.random.default_rng(0).random(MB)  # 8 MB
    a200 = np.random.default_rng(1).random(25 * MB)  # 200 MB
    out: dict[str, Any] = {}
    close: Callable[[], None]
    if system.startswith("dspool"):
        from dspool_jupyter import Pool

        store = tempfile.mkdtemp(prefix="bench-shm-")
        threshold = None if system == "dspool-socket" else 1 << 20
        pool = Pool(workers=2, store=store, shared_memory_threshold=threshold)
        pool.wait_ready(120)
        for name, source in SOURCES.items():
            pool.define(name, source)

        def run(name: str, *args: Any) -> Any:
            return pool.run(name, *args)

        def many(name: str, arg: Any, n: int) -> list[Any]:
            return [f.result() for f in [pool.submit(name, arg) for _ in range(n)]]

        close = pool.close
    elif system == "joblib":
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=2, max_nbytes="1M")
        parallel.__enter__()
        fns = {"total": total, "make": make, "noop": noop}

        def run(name: str, *args: Any) -> Any:
            return parallel([delayed(fns[name])(*args)])[0]

        def many(name: str, arg: Any, n: int) -> list[Any]:
            return list(parallel(delayed(fns[name])(arg) for _ in range(n)))

        def close() -> None:
            parallel.__exit__(None, None, None)

    else:
        if system == "ppe":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            executor: Any = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
        else:
            from loky import get_reusable_executor

            executor = get_reusable_executor(2)
        fns = {"total": total, "make": make, "noop": noop}

        def run(name: str, *args: Any) -> Any:
            return executor.submit(fns[name], *args).result()

        def many(name: str, arg: Any, n: int) -> list[Any]:
            return [f.result() for f in [executor.submit(fns[name], arg) for _ in range(n)]]

        def close() -> None:
            executor.shutdown()

    try:
        for _ in range(4):
            run("noop")
        assert run("total", a8) == total(a8)
        out["arg8/seq"] = _seq(lambda: run("total", a8), calls)
        t = time.perf_counter()
        assert len(many("total", a8, calls)) == calls
        out["arg8/par"] = (time.perf_counter() - t) / calls * 1000
        run("total", a200)
        out["arg200/seq"] = _seq(lambda: run("total", a200), calls200)
        assert float(run("make", MB).sum()) == MB
        out["res8/seq"] = _seq(lambda: run("make", MB), calls)
        out["trivial"] = _seq(lambda: run("noop"), 2000)
        if system == "dspool":
            before = pool.status().bytes_placed
            b8 = a8.copy()
            t = time.perf_counter()
            many("total", b8, placed_calls)
            out[f"arg8/x{placed_calls} wall s"] = time.perf_counter() - t
            out[f"arg8/x{placed_calls} placed MB"] = (pool.status().bytes_placed - before) / MB
            status = pool.status()
            out["sent MB"] = status.bytes_sent / MB
            out["shared MB"] = status.bytes_shared / MB
            out["placed MB"] = status.bytes_placed / MB
    finally:
        close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shm")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--calls200", type=int, default=50)
    parser.add_argument("--placed-calls", type=int, default=1000)
    parser.add_argument("--trial")
    args = parser.parse_args(argv)
    if args.trial:
        result = trial(args.trial, args.calls, args.calls200, args.placed_calls)
        print(json.dumps(result))
        return 0
    results: dict[str, dict[str, Any] | str] = {}
    for system in args.systems.split(","):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.shm",
                "--trial",
                system,
                "--calls",
                str(args.calls),
                "--calls200",
                str(args.calls200),
                "--placed-calls",
                str(args.placed_calls),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[system] = "missing" if "ModuleNotFoundError" in last else f"failed: {last}"
        else:
            results[system] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{system}: {results[system]}", file=sys.stderr)
    _report(results)
    return 0


def _report(results: dict[str, dict[str, Any] | str]) -> None:
    scenarios = ["arg8/seq", "arg8/par", "arg200/seq", "res8/seq", "trivial"]
    base = results.get("dspool")
    print("| system | " + " | ".join(f"{s} ms" for s in scenarios) + " |")
    print("|---" * (len(scenarios) + 1) + "|")
    for system, result in results.items():
        if isinstance(result, str):
            print(f"| {system} | " + " | ".join(result for _ in scenarios) + " |")
            continue
        cells = []
        for s in scenarios:
            value = result[s]
            cell = f"{value:.2f}"
            if isinstance(base, dict) and system != "dspool":
                cell += f" (×{value / base[s]:.1f})"
            cells.append(cell)
        print(f"| {system} | " + " | ".join(cells) + " |")
    if isinstance(base, dict):
        extra = {k: round(v, 2) for k, v in base.items() if k not in scenarios}
        print(f"\ndspool transfer: {extra}")
    print("\n(×ratio = system ÷ dspool; above 1 means dspool is faster)")


if __name__ == "__main__":
    raise SystemExit(main())
