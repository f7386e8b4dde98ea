"""Run the example notebooks top to bottom, each in a fresh kernel (what `make run` does).

    python notebooks/run_all.py [NOTEBOOK ...] [--out DIR] [--inplace]

Executed copies go to ``build/notebooks/`` (``--out``); with ``--inplace`` the notebooks
themselves get the new outputs, which is how the outputs ``pytest --nbval`` compares
against are regenerated. Prints one line per notebook and exits 1 if any cell failed
(a cell tagged ``raises-exception`` is expected to fail). Every notebook uses a private
temporary store and stops its pool; the kernel is shut down after each one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).resolve().parent
CELL_TIMEOUT = 300  # seconds one cell may run


def run(path: Path, out: Path) -> tuple[bool, str]:
    """Execute ``path`` into ``out``; (ok, one-line summary)."""
    nb = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    error = ""
    # The kernel talks to us over Unix sockets in a private directory, not TCP: nothing
    # listens on a port, and ipykernel has no "TCP without encryption" warning to print.
    with tempfile.TemporaryDirectory(prefix="dspool-kernel-") as sockets:
        km = KernelManager(kernel_name="python3", transport="ipc", ip=f"{sockets}/kernel")
        client = NotebookClient(
            nb,
            km=km,
            timeout=CELL_TIMEOUT,
            kernel_name="python3",  # the interpreter running this script (jupyter_client)
            resources={"metadata": {"path": str(path.parent)}},  # the kernel's cwd
            record_timing=False,  # no timestamps in the saved cells: stable diffs
        )
        try:
            client.execute()
        except CellExecutionError as exc:
            error = f": {exc.ename}: {exc.evalue}".splitlines()[0][:200]
        finally:
            if km.has_kernel:  # nbclient leaves a kernel it did not start to its owner
                km.shutdown_kernel()
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    cells = sum(cell.cell_type == "code" for cell in nb.cells)
    failed = next(
        (
            i
            for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code"
            and "raises-exception" not in cell.metadata.get("tags", [])
            and any(o.output_type == "error" for o in cell.outputs)
        ),
        None,
    )
    if error or failed is not None:
        where = f" in cell {failed}" if failed is not None else ""
        return False, f"FAILED{where} after {seconds:.1f} s{error}"
    return True, f"ok, {cells} code cells in {seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--out", type=Path, default=Path("build/notebooks"), help="output dir")
    parser.add_argument("--inplace", action="store_true", help="overwrite the notebooks")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    if not paths:
        parser.error(f"no notebooks in {HERE}")
    started = time.perf_counter()
    failures = 0
    width = max(len(p.name) for p in paths)
    for path in paths:
        out = path if args.inplace else args.out / path.name
        ok, summary = run(path, out)
        failures += not ok
        sys.stdout.write(f"{path.name:<{width}}  {summary}\n")
        sys.stdout.flush()
    where = "in place" if args.inplace else f"executed copies in {args.out}/"
    verdict = "all ok" if not failures else f"{failures} FAILED"
    sys.stdout.write(
        f"{len(paths)} notebooks in {time.perf_counter() - started:.1f} s: {verdict} ({where})\n"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
