"""Measure how fast a worker's death shows in the lab's status item, and the bundle size.

Starts a private JupyterLab on 127.0.0.1 and Debian's Chromium, opens a notebook, starts
``Pool(workers=N)`` in it, opens the dspool panel, then SIGKILLs workers from outside
and times (on this machine's one clock) from the kill to the status item showing it:
``idle`` kills an idle worker; ``busy`` kills a worker in the middle of a 30 s call.

    .venv/bin/python tests/browser/measure_latency.py --samples 10 [--json out.json]

Prints one line per sample and a summary (median, p90, max in seconds), plus the size
of the built extension (``dspool_jupyter/labextension/static``, raw and gzipped).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.browser.lab import (
    REPO,
    chromium,
    measure_death_latency,
    notebook_json,
    open_notebook,
    run_cell,
    running_lab,
)

CELLS = (
    "from dspool_jupyter.comm import register_comm_target\nregister_comm_target()",
    "from dspool_jupyter import Pool\npool = Pool(workers={workers})\npool.wait_ready(60)",
    'pool.define("sleepy", "import time\\ndef sleepy(s):\\n    time.sleep(s)\\n")',
    'fut = pool.submit("sleepy", 30)',
)


def bundle_size() -> dict[str, int]:
    static = REPO / "dspool_jupyter" / "labextension" / "static"
    files = [p for p in static.iterdir() if p.suffix == ".js"]
    raw = sum(p.stat().st_size for p in files)
    gz = sum(len(gzip.compress(p.read_bytes(), 9)) for p in files)
    return {"js_files": len(files), "raw_bytes": raw, "gzip_bytes": gz}


def summarise(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {
        "n": len(values),
        "median_s": statistics.median(values),
        "p90_s": p90,
        "max_s": max(values),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10, help="kills per mode")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="idle,busy", help="comma-separated: idle,busy")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"bundle": bundle_size(), "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="dspool-latency-") as tmp:
        with running_lab(tmp=Path(tmp)) as lab, chromium() as browser:
            (lab.root / "latency.ipynb").write_text(
                notebook_json(*(c.format(workers=args.workers) for c in CELLS))
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            open_notebook(page, lab, "latency.ipynb")
            run_cell(page, 0)
            run_cell(page, 1)
            run_cell(page, 2)
            page.wait_for_selector(
                f'.dspool-status-item[data-ready="{args.workers}"]', state="visible"
            )
            page.click(".dspool-status-item")
            page.wait_for_selector("#dspool-panel tr.dspool-worker")
            for mode in args.modes.split(","):
                samples = []
                for i in range(args.samples):
                    if mode == "busy":
                        run_cell(page, 3)
                        page.wait_for_selector("#dspool-panel tr.dspool-worker-busy")
                    else:
                        page.wait_for_function(
                            "n => document.querySelectorAll("
                            "'#dspool-panel tr.dspool-worker-idle').length === n",
                            arg=args.workers,
                        )
                    seconds = measure_death_latency(page, mode)
                    samples.append(seconds)
                    print(f"{mode} kill {i + 1}: shown after {seconds * 1000:.1f} ms")  # noqa: T201
                results[mode] = summarise(samples) | {"samples_s": samples}
            page.close()
    for mode in args.modes.split(","):
        s = results[mode]
        print(  # noqa: T201
            f"{mode}: n={s['n']} median {s['median_s'] * 1000:.1f} ms, "
            f"p90 {s['p90_s'] * 1000:.1f} ms, max {s['max_s'] * 1000:.1f} ms"
        )
    b = results["bundle"]
    print(  # noqa: T201
        f"bundle: {b['js_files']} js files, {b['raw_bytes'] / 1024:.1f} KiB, "
        f"{b['gzip_bytes'] / 1024:.1f} KiB gzipped"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
