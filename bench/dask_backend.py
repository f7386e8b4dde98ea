"""Per-call overhead through the Dask backend, next to the local backend and plain Dask.

    python bench/dask_backend.py                      # starts its own loopback cluster
    python bench/dask_backend.py --address tcp://127.0.0.1:8786 --calls 1000 --rounds 5

One call in flight at a time (latency, not throughput), a trivial program, warm pools.
Systems, measured in the same run and interleaved round by round (the order rotates):

- ``local``: ``Pool(workers=2).run("noop", i)`` (the default backend);
- ``dask-pool``: ``Pool(backend="dask", address=...).run("noop", i)`` on the cluster;
- ``client.submit``: ``client.submit(operator.add, i, 1, pure=False).result()``, a plain
  synchronous ``distributed.Client`` on the same cluster: Dask's own floor;
- ``client.submit pinned``: the same with ``workers=[address], allow_other_workers=False``,
  which is how the Dask backend places every call.

Without ``--address`` it starts ``dask scheduler`` and two ``dask worker --nanny
--nthreads 1`` processes on 127.0.0.1 (random ports, their own process groups) and kills
them at the end, whatever happens. Prints a markdown table of p50/p99/mean in ms.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NOOP = "def noop(x):\n    return x\n"
START_TIMEOUT = 60.0  # seconds for the cluster to come up


@contextmanager
def loopback_cluster(workdir: Path, workers: int = 2) -> Iterator[str]:
    """A scheduler and ``workers`` nanny workers on 127.0.0.1; yields the address."""
    scheduler_file = workdir / "scheduler.json"
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], log: str) -> None:
        with open(workdir / log, "wb") as out:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dask", *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    try:
        start(
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(scheduler_file),
            ],
            "scheduler.log",
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if time.monotonic() > deadline or processes[0].poll() is not None:
                raise RuntimeError("the dask scheduler did not start; see " + str(workdir))
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        for number in range(workers):
            start(
                [
                    "worker",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--nanny",
                    "--no-dashboard",
                    "--local-directory",
                    str(workdir / f"worker-{number}"),
                ],
                f"worker-{number}.log",
            )
        from distributed import Client

        with Client(address, timeout=START_TIMEOUT) as client:
            client.wait_for_workers(workers, timeout=START_TIMEOUT)
        yield address
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def sample(call: Callable[[int], Any], calls: int) -> list[float]:
    """Seconds per call, ``calls`` sequential calls."""
    out = []
    for i in range(calls):
        started = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - started)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", help="an existing scheduler (default: start one)")
    parser.add_argument("--calls", type=int, default=500, help="samples per system per round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls per system")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    args = parser.parse_args(argv)

    from distributed import Client

    from dspool_jupyter import Pool

    with tempfile.TemporaryDirectory(prefix="dspool-bench-dask-") as tmp:
        workdir = Path(tmp)
        cluster = loopback_cluster(workdir) if args.address is None else _given(str(args.address))
        with cluster as address:
            local = Pool(workers=2, store=workdir / "store-local")
            dask_pool = Pool(backend="dask", address=address, store=workdir / "store-dask")
            client = Client(address, timeout=30, set_as_default=False)
            try:
                local.wait_ready(60)
                dask_pool.wait_ready(60)
                local.define("noop", NOOP)
                dask_pool.define("noop", NOOP)
                pinned_to = next(iter(client.scheduler_info(n_workers=-1)["workers"]))
                systems: dict[str, Callable[[int], Any]] = {
                    "local": lambda i: local.run("noop", i),
                    "dask-pool": lambda i: dask_pool.run("noop", i),
                    "client.submit": lambda i: client.submit(
                        operator.add, i, 1, pure=False
                    ).result(),
                    "client.submit pinned": lambda i: client.submit(
                        operator.add,
                        i,
                        1,
                        pure=False,
                        workers=[pinned_to],
                        allow_other_workers=False,
                    ).result(),
                }
                for call in systems.values():
                    sample(call, args.warmup)
                samples: dict[str, list[float]] = {name: [] for name in systems}
                names = list(systems)
                for round_number in range(args.rounds):
                    order = names[round_number % len(names) :] + names[: round_number % len(names)]
                    for name in order:
                        samples[name].extend(sample(systems[name], args.calls))
            finally:
                client.close()
                dask_pool.close()
                local.close()

    report(samples, args)
    if args.json:
        Path(args.json).write_text(json.dumps(samples))
    return 0


@contextmanager
def _given(address: str) -> Iterator[str]:
    yield address


def report(samples: dict[str, list[float]], args: argparse.Namespace) -> None:
    import distributed

    from dspool_jupyter import __version__

    floor = statistics.median(samples["client.submit"])
    load = os.getloadavg()
    print(
        f"python {platform.python_version()}, distributed {distributed.__version__}, "
        f"dspool_jupyter {__version__}, {os.cpu_count()} CPUs, "
        f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    )
    where = args.address or "own loopback scheduler + 2 nanny workers (1 thread each)"
    print(
        f"{args.rounds} interleaved rounds x {args.calls} sequential calls per system "
        f"(after {args.warmup} warm-up calls); cluster: {where}"
    )
    print()
    print("| system | p50 | p99 | mean | p50 / client.submit p50 |")
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        ms = [v * 1e3 for v in values]
        print(
            f"| {name} | {percentile(ms, 50):.2f} ms | {percentile(ms, 99):.2f} ms | "
            f"{statistics.fmean(ms):.2f} ms | x{statistics.median(values) / floor:.2f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
