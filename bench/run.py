"""The benchmark driver: ``python -m bench`` (or ``python bench/run.py``); ``--help``.

Runs every scenario for dspool and each peer, interleaved (for each repetition, every
system in turn, the order rotated per repetition), each trial in a fresh process
(:mod:`bench.trial`), then prints medians with min/max and the ratio to dspool, and
writes ``bench/RESULTS.md`` after a full run. See ``bench/README.md`` for what each
number means.

After every trial, any process that trial started and left behind is found (by an
environment marker every descendant inherits), killed, and reported as a leak.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import REPO, Results, environment, render
from bench.systems import SYSTEMS, missing_reason

MARK = "DSPOOL_BENCH_RUN"  # environment marker inherited by every process a trial starts
LEAK_GRACE = 5.0  # seconds a trial's processes get to exit after the trial itself did
RESULTS_FILE = REPO / "bench" / "RESULTS.md"
SLOW_STARTERS = ("ipyparallel", "dask")  # fewer repetitions; --quick: largest N only


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side benchmarks of dspool and its peers.",
        epilog="Examples: python -m bench --quick | python -m bench --only dspool --quick"
        " | python -m bench  (full run, writes bench/RESULTS.md)",
    )
    parser.add_argument(
        "--only", action="append", default=[], help="comma-separated systems to run"
    )
    parser.add_argument("--skip", action="append", default=[], help="systems to leave out")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 repetition, fewer calls, and start-up at the largest N only for the"
        " slow-starting peers (ipyparallel, dask)",
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument(
        "--slow-reps",
        type=int,
        default=1,
        help="repetitions for the slow peers, ipyparallel and dask (default 1: they are"
        " 10-50x off and take most of the run's time)",
    )
    parser.add_argument(
        "--scenarios", default="startup,warm", help="startup (and memory), warm (the rest)"
    )
    parser.add_argument("--workers", default="1,2,4,8", help="pool sizes for start-up")
    parser.add_argument(
        "--preload",
        help="start-up preload variants (default none,numpy, and dspy when it is installed"
        " and not --quick)",
    )
    parser.add_argument(
        "--dspy-workers",
        default="1,8",
        help="pool sizes for the dspy preload (its import takes seconds in every worker"
        " of the peers; default 1,8)",
    )
    parser.add_argument("--calls", type=int, help="throughput calls (default 20000, quick 2000)")
    parser.add_argument(
        "--latency-calls", type=int, help="per-call overhead samples (default 2000, quick 500)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per trial")
    parser.add_argument("--results", type=Path, help="write the report here too")
    parser.add_argument("--no-results", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a source tree of dspool_jupyter (e.g. a git worktree of an earlier commit):"
        " adds the system dspool-baseline, run from there, beside dspool",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show trial notes")
    args = parser.parse_args(argv)

    default = [n for n in SYSTEMS if n != "dspool-baseline" or args.baseline]
    names = [n for part in args.only for n in part.split(",") if n] or default
    if args.baseline and "dspool-baseline" not in names:
        names.append("dspool-baseline")
    if "dspool-baseline" in names and not args.baseline:
        parser.error("dspool-baseline needs --baseline DIR")
    skip = {n for part in args.skip for n in part.split(",") if n}
    unknown = [n for n in [*names, *skip] if n not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
    args.systems = [n for n in SYSTEMS if n in names and n not in skip]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if set(args.scenarios) - {"startup", "warm"}:
        parser.error("--scenarios takes startup and/or warm")
    args.workers = sorted({int(n) for n in args.workers.split(",")})
    args.dspy_workers = sorted({int(n) for n in args.dspy_workers.split(",")})
    if args.preload is None:
        args.preload = "none,numpy" + (",dspy" if _has("dspy") and not args.quick else "")
    args.preloads = [p for p in args.preload.split(",") if p]
    args.reps = args.reps or (1 if args.quick else 3)
    args.slow_reps = min(args.slow_reps, args.reps)
    args.calls = args.calls or (2000 if args.quick else 20000)
    args.latency_calls = args.latency_calls or (500 if args.quick else 2000)
    return args


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _marked(run_id: str) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK) == run_id:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sweep(run_id: str) -> list[str]:
    """Kill what a finished trial left behind; describe each leaked process."""
    import psutil

    deadline = time.monotonic() + LEAK_GRACE
    left = _marked(run_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _marked(run_id)
    leaked = []
    for proc in left:
        try:
            leaked.append(f"{proc.pid} {' '.join(proc.cmdline()[:4])[:100]}")
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(left, timeout=5)
    return leaked


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex
        self.tmp = Path(tempfile.mkdtemp(prefix="dspool-bench-driver-"))
        self.env = dict(os.environ)
        self.env[MARK] = self.run_id
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        # Keep the peers' state out of the user's home and off shared ports.
        self.env["IPYTHONDIR"] = str(self.tmp / "ipython")
        self.env["DASK_TEMPORARY_DIRECTORY"] = str(self.tmp / "dask")
        self.env.pop("PYTHONSTARTUP", None)
        self.results = Results()
        self.count = 0

    def trial(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one trial in a fresh process; never leaves a process behind."""
        out = self.tmp / f"trial-{self.count}.json"
        err = self.tmp / f"trial-{self.count}.err"
        self.count += 1
        cwd, env = REPO, self.env
        if spec["system"] == "dspool-baseline":
            # The baseline's own tree first: its dspool_jupyter (and its bench.trial).
            cwd = self.args.baseline.resolve()
            env = dict(env, PYTHONPATH=os.pathsep.join((str(cwd), env["PYTHONPATH"])))
            spec = dict(spec, system="dspool")
        with open(err, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.trial", json.dumps(spec), str(out)],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=self.args.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            finally:
                leaked = sweep(self.run_id)
        result: dict[str, Any]
        if timed_out:
            result = {"ok": False, "error": f"timed out after {self.args.timeout:g} s (killed)"}
        elif out.exists():
            result = json.loads(out.read_text())
        else:
            tail = err.read_text(errors="replace").strip().splitlines()[-3:]
            result = {"ok": False, "error": f"trial exited {proc.returncode}: {' | '.join(tail)}"}
        if leaked:
            result.setdefault("notes", [])
            result["notes"].append(f"leaked processes (killed): {leaked}")
        return result

    def record(self, spec: dict[str, Any], result: dict[str, Any], label: str, wall: float) -> None:
        system = spec["system"]
        r = self.results
        for note in result.get("notes", []):
            r.notes.append(f"{system} {label}: {note}")
        if result.get("missing"):
            r.missing[system] = result["error"]
            print(f"  {label}: {result['error']}", flush=True)
            return
        if not result.get("ok"):
            r.fail(system, f"{label}: {result.get('error')}")
            if self.args.verbose and result.get("traceback"):
                print(result["traceback"], flush=True)
            print(f"  {label}: FAILED {result.get('error')}", flush=True)
            return
        m = result["metrics"]
        if spec["kind"] == "startup":
            preload = spec["preload_label"]
            r.add(system, f"startup/{preload}/{spec['workers']}", m["startup"])
            for k in ("rss", "uss", "allin"):
                key = "worker_" + k if k != "allin" else "allin_uss"
                r.add(system, f"mem/{preload}/{spec['workers']}/{k}", m["memory"][key])
            shown = f"{m['startup']:.3f} s"
        else:
            keys = ("p50", "p99", "behind_long", "throughput", "submit", "first_ok", "full")
            for key in (*keys, "lost", "rerun"):
                r.add(system, key, m[key])
            shown = (
                f"p50 {m['p50'] * 1e6:.0f} µs, p99 {m['p99'] * 1e6:.0f} µs,"
                f" behind long {m['behind_long'] * 1e3:.0f} ms,"
                f" {self.args.calls / m['throughput']:,.0f} calls/s,"
                f" recovery {m['first_ok'] * 1e3:.0f}/{m['full'] * 1e3:.0f} ms,"
                f" lost {m['lost']} ({', '.join(m['loss_outcomes'])})"
            )
        print(f"  {shown}  (trial {wall:.1f} s)", flush=True)
        if self.args.verbose:
            for note in result.get("notes", []):
                print(f"    note: {note}", flush=True)

    def plan(self) -> list[dict[str, Any]]:
        a = self.args
        specs = []
        quick_sizes = {max(a.workers), max(a.dspy_workers)}
        for rep in range(a.reps):
            order = a.systems[rep % len(a.systems) :] + a.systems[: rep % len(a.systems)]
            if rep >= a.slow_reps:
                order = [s for s in order if s not in SLOW_STARTERS]
            if "startup" in a.scenarios:
                for preload in a.preloads:
                    sizes = a.dspy_workers if preload == "dspy" else a.workers
                    for n in sizes:
                        for system in order:
                            if a.quick and system in SLOW_STARTERS and n not in quick_sizes:
                                continue
                            specs.append(
                                {
                                    "kind": "startup",
                                    "system": system,
                                    "workers": n,
                                    "preload": [] if preload == "none" else preload.split("+"),
                                    "preload_label": preload,
                                    "rep": rep,
                                }
                            )
            if "warm" in a.scenarios:
                for system in order:
                    specs.append(
                        {
                            "kind": "warm",
                            "system": system,
                            "workers": 2,
                            "preload": [],
                            "calls": a.calls,
                            "latency_calls": a.latency_calls,
                            "rep": rep,
                        }
                    )
        return specs

    def run(self) -> None:
        for name in self.args.systems:
            reason = missing_reason(name)
            if reason is not None:
                self.results.missing[name] = reason
        runnable = [s for s in self.args.systems if s not in self.results.missing]
        for name, reason in self.results.missing.items():
            print(f"{name}: {reason}", flush=True)
        for preload in self.args.preloads:
            for module in preload.split("+"):
                if preload != "none" and not _has(module):
                    self.results.notes.append(f"preload {module!r} is not installed")
        specs = [s for s in self.plan() if s["system"] in runnable]
        for i, spec in enumerate(specs, 1):
            if spec["kind"] == "startup":
                label = f"startup N={spec['workers']} preload={spec['preload_label']}"
            else:
                label = "warm pool of 2"
            print(
                f"[{i}/{len(specs)}] rep {spec['rep'] + 1} {spec['system']} {label}",
                flush=True,
            )
            t = time.monotonic()
            result = self.trial(spec)
            self.record(spec, result, label, time.monotonic() - t)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not _has("psutil"):
        print("bench needs psutil: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    driver = Driver(args)
    load_before = os.getloadavg()
    # Versions as of the start: the tree may change while a long run goes on.
    facts = environment({name: SYSTEMS[name].distribution for name in args.systems})
    started = time.monotonic()
    when = datetime.now(timezone.utc)
    try:
        driver.run()
    finally:
        leaked = sweep(driver.run_id)
        if leaked:
            driver.results.notes.append(f"leaked processes at the end (killed): {leaked}")
        shutil.rmtree(driver.tmp, ignore_errors=True)
    config = {
        "systems": args.systems,
        "workers": args.workers,
        "preloads": args.preloads,
        "dspy_workers": args.dspy_workers,
        "scenarios": args.scenarios,
        "calls": args.calls,
        "latency_calls": args.latency_calls,
    }
    replacement = {name: SYSTEMS[name].replacement for name in args.systems}
    body = render(driver.results, args.systems, config, replacement)
    elapsed = time.monotonic() - started
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    slow_selected = [s for s in SLOW_STARTERS if s in args.systems]
    slow = f" ({', '.join(slow_selected)}: {args.slow_reps})" if slow_selected else ""
    load_after = os.getloadavg()
    facts += [
        (
            "load average (1/5/15 min)",
            f"{'/'.join(f'{x:.1f}' for x in load_before)} before,"
            f" {'/'.join(f'{x:.1f}' for x in load_after)} after (the machine is shared)",
        ),
        ("date", when.strftime("%Y-%m-%d %H:%M UTC")),
        ("command", f"`{command.strip()}` ({elapsed:.0f} s)"),
        (
            "settings",
            f"{args.reps} repetition(s){slow};"
            f" latency {args.latency_calls:,} calls;"
            f" throughput {args.calls:,} calls",
        ),
    ]
    header = "\n".join(f"- {k}: {v}" for k, v in facts)
    cells = (
        "Cells: median [min–max] over the repetitions, ×ratio = system ÷ dspool"
        " (every metric is lower-is-better, so ×2.00 means dspool is twice as good)."
    )
    report = f"# dspool benchmark results\n\n{header}\n\n{cells}\n{body}"
    print()
    print(report)
    full = not args.quick and set(args.systems) - {"dspool-baseline"} == set(SYSTEMS) - {
        "dspool-baseline"
    }
    targets = [args.results] if args.results else []
    if full and not args.no_results:
        targets.append(RESULTS_FILE)
    for path in targets:
        path.write_text(
            report + "\nGenerated by `python -m bench`; see bench/README.md for the definitions.\n"
        )
        print(f"wrote {path}")
    return 1 if driver.results.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
