"""What a map journal costs: per item while a map runs, and to restore a finished map.

    python bench/journal.py                      # 10,000 trivial items, 2 workers, 5 reps
    python bench/journal.py --items 2000 --reps 3

On one warm pool and a fresh store it times, interleaved and repeated:

- ``plain``: ``pool.map("inc", range(N))`` without a journal;
- ``journal``: the same map with a new journal (every outcome written);
- ``restore``: the same map again with that journal (every item restored, none run);

and, apart from the pool, the journal's own work for N items: keying every item
(``item_key``) and writing every outcome, in the batches a fast map writes (whatever
finished since the last write: ``--batch`` items) and one by one (a slow map's worst
case). Medians over the repetitions, [min-max] beside them. The target (issue 14):
journaling adds at most 0.5 ms per item.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dspool_jupyter import Pool
from dspool_jupyter.journal import item_key, open_journal
from dspool_jupyter.store import ProgramStore

INC = "def inc(x):\n    return x + 1\n"


def timed_map(pool: Pool, items: int, journal: str | None) -> tuple[float, int]:
    start = time.perf_counter()
    result = pool.map("inc", range(items), journal=journal)
    elapsed = time.perf_counter() - start
    assert result.ok and result[-1] == items, "the map went wrong"
    return elapsed, len(result.restored)


def journal_work(store: ProgramStore, items: int, batch: int, name: str) -> float:
    """Seconds to key ``items`` items and journal their outcomes in batches of ``batch``."""
    start = time.perf_counter()
    with open_journal(store, name, create=True) as journal:
        keys = [item_key([i], {}) for i in range(items)]
        journal.begin("inc", "pbench", None, keys)
        for first in range(0, items, batch):
            journal.write(
                (f"pbench|{key}", True, first + n + 1)
                for n, key in enumerate(keys[first : first + batch])
            )
    return time.perf_counter() - start


def summary(values: list[float], scale: float) -> str:
    scaled = [v * scale for v in values]
    return f"{statistics.median(scaled):8.3f}  [{min(scaled):.3f}-{max(scaled):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="items per write, fast map")
    args = parser.parse_args()
    n = args.items
    runs: dict[str, list[float]] = {"plain": [], "journal": [], "restore": []}
    work: dict[str, list[float]] = {"batched": [], "one by one": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = ProgramStore(Path(tmp) / "store")
        with Pool(workers=args.workers, store=store) as pool:
            pool.wait_ready(60)
            pool.define("inc", INC)
            timed_map(pool, min(n, 1000), None)  # warm up
            for rep in range(args.reps):
                name = f"bench-{rep}"
                order = ["plain", "journal"] if rep % 2 == 0 else ["journal", "plain"]
                for kind in order:
                    elapsed, restored = timed_map(pool, n, name if kind == "journal" else None)
                    assert restored == 0
                    runs[kind].append(elapsed)
                elapsed, restored = timed_map(pool, n, name)
                assert restored == n, f"restored {restored} of {n}"
                runs["restore"].append(elapsed)
                pool.journal(name).delete()
        for rep in range(args.reps):
            work["batched"].append(journal_work(store, n, args.batch, f"w-{rep}"))
            work["one by one"].append(journal_work(store, n, 1, f"w1-{rep}"))
        store.close()

    per_item = 1000 / n  # seconds for n items -> ms per item
    added = [j - p for j, p in zip(runs["journal"], runs["plain"], strict=True)]
    print(f"{n:,} trivial items, {args.workers} workers, {args.reps} reps (median [min-max])")
    print()
    print(f"{'':34}{'total s':>8}              {'ms per item':>11}")
    rows = [
        ("map, no journal", runs["plain"]),
        ("map, journal (every item written)", runs["journal"]),
        ("  added by the journal", added),
        ("map again, every item restored", runs["restore"]),
        (f"journal work alone, batches of {args.batch}", work["batched"]),
        ("journal work alone, one by one", work["one by one"]),
    ]
    for label, values in rows:
        print(f"{label:34}{summary(values, 1)}  {summary(values, per_item)}")
    verdict = "met" if statistics.median(added) * per_item <= 0.5 else "MISSED"
    print()
    print(f"target: the journal adds <= 0.5 ms per item: {verdict}")


if __name__ == "__main__":
    main()
