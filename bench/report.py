"""Turn trial results into tables: medians with min/max and the ratio to dspool.

Every metric is "lower is better" (seconds, bytes, lost calls), so the ratio
``peer ÷ dspool`` reads the same way everywhere: above 1 means dspool is ahead.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["NAMES", "Results", "environment", "name", "render"]

REPO = Path(__file__).resolve().parent.parent
BASELINE = "dspool"
# What the tables call each system: its real name (the keys are command-line names).
NAMES = {
    "ppe-fork": "ProcessPoolExecutor (fork)",
    "ppe-forkserver": "ProcessPoolExecutor (forkserver)",
}


def name(system: str) -> str:
    """The name a reader knows ``system`` by (``ppe-fork`` is ProcessPoolExecutor)."""
    return NAMES.get(system, system)


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms" if value < 0.1 else f"{value * 1e3:.0f} ms"
    return f"{value:.2f} s"


def _scaled(values: Iterable[float], unit: str) -> list[str]:
    """Format values in the unit of the first one (so a range reads at a glance)."""
    values = list(values)
    head = values[0]
    if unit == "s":
        if head < 1e-3:
            factor, suffix, digits = 1e6, " µs", 0
        elif head < 1:
            factor, suffix, digits = 1e3, " ms", 1 if head < 0.1 else 0
        else:
            factor, suffix, digits = 1, " s", 2
    elif unit == "MiB":
        factor, suffix, digits = 1 / (1 << 20), " MiB", 1
    else:
        factor, suffix, digits = 1, "", 1 if any(v != int(v) for v in values) else 0
    out = [f"{v * factor:.{digits}f}" for v in values]
    out[0] += suffix
    return out


class Results:
    """All trials of a run: ``(system, metric key) -> list of values``."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], list[float]] = {}
        self.failures: dict[str, list[str]] = {}
        self.missing: dict[str, str] = {}
        self.notes: list[str] = []

    def add(self, system: str, key: str, value: float) -> None:
        self.values.setdefault((system, key), []).append(float(value))

    def fail(self, system: str, message: str) -> None:
        self.failures.setdefault(system, []).append(message)

    def get(self, system: str, key: str) -> list[float]:
        return self.values.get((system, key), [])

    def median(self, system: str, key: str) -> float | None:
        values = self.get(system, key)
        return statistics.median(values) if values else None

    def cell(self, system: str, key: str, unit: str, ratio: bool = True) -> str:
        values = self.get(system, key)
        if not values:
            if system in self.missing:
                return "missing"
            return "failed" if system in self.failures else "–"
        med = statistics.median(values)
        text = _scaled([med, min(values), max(values)], unit)
        cell = text[0] if len(values) == 1 else f"{text[0]} [{text[1]}–{text[2]}]"
        base = self.median(BASELINE, key)
        if ratio and system != BASELINE and base:
            cell += f" ×{med / base:.2f}"
        return cell


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(
    results: Results,
    systems: list[str],
    config: dict[str, Any],
    replacement: dict[str, str],
) -> str:
    """The report as Markdown (it reads as plain text in a terminal too)."""
    out: list[str] = []
    workers: list[int] = config["workers"]
    preloads: list[str] = config["preloads"]
    ran = [s for s in systems if s not in results.missing]

    def row_for(system: str, cells: list[str]) -> list[str]:
        return [f"**{system}**" if system == BASELINE else name(system), *cells]

    def rows(make: Callable[[str], list[str]], include_missing: bool = True) -> list[list[str]]:
        return [row_for(s, make(s)) for s in systems if include_missing or s not in results.missing]

    if "startup" in config["scenarios"]:
        for preload in preloads:
            out += [
                "",
                f"### Start-up, preload: {preload} — until N workers have each run a task",
                "",
            ]
            sizes = config["dspy_workers"] if preload == "dspy" else workers
            header = ["system", *[f"N={n}" for n in sizes]]

            def startup(s: str, p: str = preload, sizes: list[int] = sizes) -> list[str]:
                return [results.cell(s, f"startup/{p}/{n}", "s") for n in sizes]

            out += _table(header, rows(startup))
            lo, hi = min(sizes), max(sizes)
            scaling = []
            for s in ran:
                a, b = (
                    results.median(s, f"startup/{preload}/{lo}"),
                    results.median(s, f"startup/{preload}/{hi}"),
                )
                if a and b:
                    scaling.append(f"{name(s)} {b / a:.2f}")
            if scaling and lo != hi:
                out += ["", f"N={hi} ÷ N={lo}: " + ", ".join(scaling)]

    if "warm" in config["scenarios"]:
        out += ["", "### Per-call overhead — sequential trivial calls, warm pool of 2", ""]
        out += _table(
            ["system", "p50", "p99", "next to a long call"],
            rows(
                lambda s: [
                    results.cell(s, "p50", "s"),
                    results.cell(s, "p99", "s"),
                    results.cell(s, "behind_long", "s"),
                ]
            ),
        )
        out += [
            "",
            "next to a long call: mean wait of a trivial call submitted while one worker"
            " runs a 0.5 s call and the other a 20 ms call (≈ 20 ms when calls go to the"
            " first free worker; up to 0.5 s when a call is committed to a busy worker).",
        ]
        calls = config["calls"]
        out += ["", f"### Throughput — {calls:,} trivial calls submitted at once, 2 workers", ""]

        def throughput(s: str) -> list[str]:
            med = results.median(s, "throughput")
            rate = f"{calls / med:,.0f}" if med else "–"
            return [results.cell(s, "throughput", "s"), rate, results.cell(s, "submit", "s")]

        out += _table(["system", "wall time", "calls/s", "of which submitting"], rows(throughput))
        out += [
            "",
            "### Recovery — one worker of a pool of 2 SIGKILLed",
            "",
            "first ok: kill → a new trivial call succeeds; full size: kill → a 2-worker"
            " barrier succeeds; lost: of 4 in-flight calls (2 running, 2 queued);"
            " rerun: crashed calls the system ran again.",
            "",
        ]
        out += _table(
            ["system", "first ok", "full size", "lost of 4", "rerun", "dead worker replaced"],
            rows(
                lambda s: [
                    results.cell(s, "first_ok", "s"),
                    results.cell(s, "full", "s"),
                    results.cell(s, "lost", "", ratio=False),
                    results.cell(s, "rerun", "", ratio=False),
                    replacement.get(s, ""),
                ]
            ),
        )

    if "startup" in config["scenarios"]:
        n = 2 if 2 in workers else min(workers)
        out += [
            "",
            f"### Memory per idle worker — pool of {n}, after start-up",
            "",
            "all-in: USS of every process the pool started (workers, template, nannies,"
            " controller, forkserver…) ÷ workers; the driver process itself is not counted.",
            "",
        ]
        mem_preloads = [p for p in preloads if p != "dspy" or n in config["dspy_workers"]]
        header = ["system"]
        for preload in mem_preloads:
            header += [f"RSS ({preload})", f"USS ({preload})", f"all-in USS ({preload})"]

        def mem(s: str) -> list[str]:
            cells = []
            for p in mem_preloads:
                for k in ("rss", "uss", "allin"):
                    cells.append(results.cell(s, f"mem/{p}/{n}/{k}", "MiB"))
            return cells

        out += _table(header, rows(mem))

    out += ["", "### Targets (issue 7)", ""]
    out += [f"- {line}" for line in targets(results, config)]

    problems = []
    for system, reason in results.missing.items():
        problems.append(f"{name(system)}: {reason}")
    for system, messages in results.failures.items():
        for message in messages:
            problems.append(f"{name(system)}: {message}")
    if problems or results.notes:
        out += ["", "### Missing, failed and noticed", ""]
        out += [f"- {p}" for p in problems + results.notes]
    return "\n".join(out) + "\n"


def targets(results: Results, config: dict[str, Any]) -> list[str]:
    """The issue's targets, each PASS / FAIL / n/a with the numbers behind it."""
    lines = []
    peers = [s for s in config["systems"] if s != BASELINE and s not in results.missing]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    heavies = [p for p in ("numpy", "dspy") if p in config["preloads"]]
    for heavy in heavies if "startup" in config["scenarios"] else []:
        one = results.median(BASELINE, f"startup/{heavy}/1")
        eight = results.median(BASELINE, f"startup/{heavy}/8")
        if one and eight:
            lines.append(
                f"{verdict(eight <= 1.3 * one)} 8 workers with {heavy} ready in ≤ 1.3× the time"
                f" of 1: {_seconds(eight)} vs {_seconds(one)} (×{eight / one:.2f})"
            )
            peer_eight = {
                p: m for p in peers if (m := results.median(p, f"startup/{heavy}/8")) is not None
            }
            slower = [p for p, m in peer_eight.items() if m <= eight]
            if peer_eight:
                best = min(peer_eight, key=peer_eight.__getitem__)
                lines.append(
                    f"{verdict(not slower)} 8 workers with {heavy} faster than every peer:"
                    f" {_seconds(eight)} vs best peer {name(best)} {_seconds(peer_eight[best])}"
                )
            else:
                lines.append("n/a 8 workers faster than every peer (no peer ran)")
        else:
            lines.append(f"n/a start-up targets with {heavy} (need N=1 and N=8)")
    ppes = [p for p in ("ppe-fork", "ppe-forkserver") if p in peers]
    if "warm" in config["scenarios"]:
        mine = results.median(BASELINE, "p99")
        for ppe in ppes:
            theirs = results.median(ppe, "p99")
            if mine and theirs:
                lines.append(
                    f"{verdict(mine <= theirs)} trivial-call p99 no worse than {name(ppe)}:"
                    f" {_seconds(mine)} vs {_seconds(theirs)}"
                )
        mine = results.median(BASELINE, "throughput")
        for ppe in ppes:
            theirs = results.median(ppe, "throughput")
            if mine and theirs:
                lines.append(
                    f"{verdict(mine <= theirs)} throughput at least {name(ppe)}'s:"
                    f" {config['calls'] / mine:,.0f} vs {config['calls'] / theirs:,.0f} calls/s"
                )
        full = results.get(BASELINE, "full")
        lost = results.get(BASELINE, "lost")
        if full and lost:
            ok = statistics.median(full) < 0.5 and statistics.median(lost) == 1
            lines.append(
                f"{verdict(ok)} recovery to full size < 0.5 s with only the crashed call lost:"
                f" {_seconds(statistics.median(full))} (max {_seconds(max(full))}),"
                f" lost {statistics.median(lost):g} of 4"
            )
    if not lines:
        lines.append("n/a (dspool did not run)")
    return lines


def _version(distribution: str | None) -> str:
    if distribution is None:
        return "stdlib"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _dspool_version() -> str:
    try:
        version = importlib.metadata.version("dspool-jupyter")
    except importlib.metadata.PackageNotFoundError:
        init = REPO / "dspool_jupyter" / "__init__.py"
        found = re.search(r'__version__ = "([^"]+)"', init.read_text()) if init.exists() else None
        version = found.group(1) if found else "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "dspool_jupyter"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "no commit yet"
    return f"{version} ({commit})"


def environment(distributions: dict[str, str | None]) -> list[tuple[str, str]]:
    """Machine and version facts for the report header."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / (1 << 30):.1f} GiB"
    except ImportError:
        memory = "unknown"
    facts = [
        ("machine", f"{cpu}, {os.cpu_count()} logical CPUs, {memory} RAM"),
        ("os", platform.platform()),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("dspool_jupyter", _dspool_version()),
    ]
    seen = set()
    for name, dist in distributions.items():
        if name == BASELINE or dist is None or dist in seen:
            continue
        seen.add(dist)
        facts.append((dist or name, _version(dist)))
    for extra in ("dask", "numpy", "psutil", "dspy"):
        facts.append((extra, _version(extra)))
    return facts
