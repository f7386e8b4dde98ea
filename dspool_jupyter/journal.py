"""Journals: where a map's finished items live, in the store, beyond the kernel's life.

A journal is what makes ``Pool.map(..., journal="NAME")`` durable: every item's outcome
is written as it finishes, and running the same map again (after a kernel death, a
restart, a closed pool, in another process) takes the journaled outcomes instead of
running those items again. See :mod:`dspool_jupyter.mapping` for the map itself.

Decisions:

- **Where.** ``<store directory>/journals/<NAME>/``, one diskcache ``Cache`` per journal,
  private to the user (0700) like the store. Not the store's own cache: a map writes
  thousands of entries and program lookups (one per call, in every worker) must never
  wait behind them. One cache per journal makes listing, sizing and deleting a journal
  a directory operation, and two maps with different journals never contend.
- **Keys.** An entry is keyed by the program's content id (what
  ``store.resolve(name, session)`` returns: a hash of its source, entry and namespace)
  and a hash of the item's call (:func:`item_key`: the positional and keyword arguments
  that item's call gets, common inputs included). Redefine the program and every item
  runs again; change one item and only that item runs again. :func:`item_key` encodes
  None, bools, numbers, text, bytes, tuples, lists, dicts and sets canonically (a dict or
  a set hashes the same whatever its order, in any process); any other object by its
  pickled form (cloudpickle for what pickle refuses). An object whose pickle is not
  stable (one that holds a set, say) only costs a rerun, never a wrong result.
- **Batches.** Entries are written in batches, one diskcache key per batch
  (``b<seq>``: a cloudpickled list of entries), by the map's own thread: whatever
  finished since the last write goes in the next one, so a slow map writes each item
  as it finishes and a fast one writes a few hundred per SQLite transaction. A later
  batch wins over an earlier one for the same key. Reading a journal reads every batch
  once (10,000 entries restore in a few milliseconds; ``bench/journal.py``).
- **Meta.** ``meta`` holds the program name the journal belongs to (a journal used with
  another program name is a :class:`JournalMismatch`), the session, and the program id
  and item keys of the last map that used it, so ``progress()`` and ``results()`` can
  answer in that map's order at any time, from any process.
- **Errors.** A failed item's exception is kept as plain facts (its type, message and,
  for :class:`ProgramError`, the worker's traceback) and rebuilt on reading: a
  ``ProgramError`` as itself, anything else as :class:`JournaledError` naming the
  original type. Cancelled items are never journaled: they did not run.
- **Durability.** SQLite in WAL mode commits survive the death of the writing process
  (SIGKILL included); what can be lost is the last batch not yet committed, which
  holds only items that finished in the last moment (they run again).
- **Sharing.** Two maps may write one journal at once (two kernels, say): every outcome
  is kept, and ``progress()``/``results()`` follow the map that started last. Deleting a
  journal while its map runs loses that map's later writes (its results in memory are
  unaffected). Equal items of one map share one entry.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import sqlite3
import stat
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import diskcache

from .errors import DspoolError, ProgramError, StoreError
from .store import ProgramStore

__all__ = [
    "JOURNALS_DIR",
    "PENDING",
    "Entry",
    "Journal",
    "JournalInfo",
    "JournalMismatch",
    "JournalNotFound",
    "JournalProgress",
    "JournaledError",
    "UnjournalableItem",
    "check_journal_name",
    "item_key",
    "journal_names",
    "list_journals",
    "open_journal",
]

log = logging.getLogger(__name__)

JOURNALS_DIR = "journals"  # under the store's directory
JOURNAL_FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
_META = "meta"
_SEQ = "seq"


class _Pending:
    """The value of an item with no journaled outcome yet (see ``Journal.results``)."""

    _instance: _Pending | None = None

    def __new__(cls) -> _Pending:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<pending>"

    def __reduce__(self) -> str:
        return "PENDING"


PENDING = _Pending()


class JournalNotFound(DspoolError, KeyError):
    """Raised when no journal of that name is in the store."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        listed = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
        self.message = f"no journal {name!r} in the store" + (
            f"; journals: {listed}" if known else "; there are no journals"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class JournalMismatch(DspoolError, ValueError):
    """Raised when a journal that belongs to one program is used for a map of another."""

    def __init__(self, name: str, journal_program: str, program: str) -> None:
        self.name = name
        self.journal_program = journal_program
        self.program = program
        super().__init__(
            f"journal {name!r} holds results of program {journal_program!r}, not "
            f"{program!r}: use another journal name for {program!r} (or delete this one "
            f"with pool.journal({name!r}).delete())"
        )


class UnjournalableItem(DspoolError, TypeError):
    """Set on one item of a journaled map whose inputs cannot be hashed or pickled.

    Only that item fails; the rest of the map runs.
    """

    def __init__(self, index: int, item: Any, reason: str) -> None:
        self.index = index
        super().__init__(
            f"item {index} ({type(item).__name__}) cannot be journaled: its inputs must "
            f"pickle to be keyed in the journal ({reason})"
        )


class JournaledError(DspoolError):
    """An item's failure read back from a journal, when its original type is not rebuilt.

    ``remote_type`` names the original exception class, ``message`` is its text.
    """

    def __init__(self, remote_type: str, message: str) -> None:
        self.remote_type = remote_type
        self.message = message
        super().__init__(f"{remote_type}: {message} (from the journal)")


@dataclass(frozen=True)
class Entry:
    """One journaled outcome: ``ok`` with its ``value``, or failed with ``error``."""

    ok: bool
    value: Any = None
    error: BaseException | None = None
    time: float = 0.0


@dataclass(frozen=True)
class JournalProgress:
    """How far the last map that used a journal got: items ``done``, ``failed``, ``total``."""

    done: int
    failed: int
    total: int

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed


@dataclass(frozen=True)
class JournalInfo:
    """A journal as ``Pool.journals()`` lists it; times are seconds since the epoch."""

    name: str
    program: str | None
    session: str | None
    done: int
    failed: int
    total: int
    created: float
    updated: float
    size_bytes: int

    @property
    def age(self) -> float:
        """Seconds since the journal was last written."""
        return max(0.0, time.time() - self.updated)


def check_journal_name(name: object) -> str:
    """``name`` if it can name a journal (a directory name), else a clear ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"journal name {name!r} is not valid: use 1 to 100 letters, digits, '_', '.' "
            "or '-', not starting with '.' or '-'"
        )
    return name


# ------------------------------------------------------------------------ item keys


def item_key(args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """A stable hex key for one call's inputs (the same in every process and run).

    Raises ``TypeError`` or ``ValueError`` (with the reason) when an input can neither
    be encoded nor pickled.
    """
    out = io.BytesIO()
    _encode((tuple(args), kwargs), out)
    return hashlib.blake2b(out.getvalue(), digest_size=16).hexdigest()


def _encode(obj: Any, out: io.BytesIO) -> None:
    kind = type(obj)
    if obj is None:
        out.write(b"N")
    elif kind is bool:
        out.write(b"T" if obj else b"F")
    elif kind is int:
        text = b"%d" % obj
        out.write(b"i%d:" % len(text) + text)
    elif kind is float:
        out.write(b"f" + struct.pack("<d", obj))
    elif kind is str:
        data = obj.encode("utf-8", "surrogatepass")
        out.write(b"s%d:" % len(data))
        out.write(data)
    elif kind is bytes:
        out.write(b"b%d:" % len(obj))
        out.write(obj)
    elif kind is tuple or kind is list:
        out.write(b"(" if kind is tuple else b"[")
        out.write(b"%d:" % len(obj))
        for value in obj:
            _encode(value, out)
    elif kind is dict:
        parts = []
        for key, value in obj.items():
            part = io.BytesIO()
            _encode(key, part)
            _encode(value, part)
            parts.append(part.getvalue())
        _write_sorted(b"{", parts, out)
    elif kind is set or kind is frozenset:
        parts = []
        for value in obj:
            part = io.BytesIO()
            _encode(value, part)
            parts.append(part.getvalue())
        _write_sorted(b"<" if kind is set else b">", parts, out)
    else:
        try:
            data = pickle.dumps(obj, protocol=4)
        except Exception:
            try:
                data = cloudpickle.dumps(obj, protocol=4)
            except Exception as exc:
                raise TypeError(f"{type(exc).__name__}: {exc}") from exc
        out.write(b"p%d:" % len(data))
        out.write(data)


def _write_sorted(tag: bytes, parts: list[bytes], out: io.BytesIO) -> None:
    parts.sort()
    out.write(tag + b"%d:" % len(parts))
    for part in parts:
        out.write(b"%d:" % len(part))
        out.write(part)


# -------------------------------------------------------------------- error records


def _error_record(error: BaseException) -> tuple[Any, ...]:
    if isinstance(error, ProgramError):
        return (
            "program",
            error.program,
            error.worker_id,
            error.remote_type,
            error.remote_message,
            error.remote_traceback,
            error.phase,
        )
    if isinstance(error, JournaledError):
        return ("other", error.remote_type, error.message)
    return ("other", type(error).__name__, str(error))


def _error_from_record(record: tuple[Any, ...]) -> BaseException:
    if record[0] == "program":
        _, program, worker_id, remote_type, message, traceback, phase = record
        return ProgramError(program, worker_id, remote_type, message, traceback, phase=phase)
    return JournaledError(record[1], record[2])


# --------------------------------------------------------------------------- journal


def _journals_dir(store: ProgramStore) -> Path:
    return Path(store.directory) / JOURNALS_DIR


def _private_dir(path: Path) -> None:
    """Create ``path`` and its parent (the journals directory), both 0700."""
    try:
        for directory in (path.parent, path):
            directory.mkdir(mode=0o700, exist_ok=True)
            if stat.S_IMODE(directory.stat().st_mode) & 0o077:
                os.chmod(directory, 0o700)
    except OSError as exc:
        raise StoreError(f"cannot create the journal directory {path}: {exc}") from exc


class Journal:
    """One journal: read its progress and results, write a map's outcomes, delete it.

    Get one with ``pool.journal(NAME)`` (an existing journal) or :func:`open_journal`.
    Safe to read while a map (in this process or another) writes it.
    """

    def __init__(self, store: ProgramStore, name: str, *, create: bool = False) -> None:
        self.name = check_journal_name(name)
        self.directory = _journals_dir(store) / name
        if not create and not (self.directory / "cache.db").exists():
            raise JournalNotFound(name, journal_names(store))
        _private_dir(self.directory)
        with self._guard("opening"):
            self._cache = diskcache.Cache(
                str(self.directory), eviction_policy="none", timeout=60, size_limit=2**40
            )

    def __repr__(self) -> str:
        progress = self.progress()
        return (
            f"<Journal {self.name!r} of {self.program!r}: {progress.done} done, "
            f"{progress.failed} failed, {progress.total} items>"
        )

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._cache.close()

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"journal {self.name!r} at {self.directory}: {action} failed: {exc}"
            ) from exc

    # -- what it holds
    @property
    def meta(self) -> dict[str, Any]:
        """The journal's program, session, created/updated times and its last map's keys."""
        with self._guard("reading"):
            meta = self._cache.get(_META)
        return dict(meta) if isinstance(meta, dict) else {}

    @property
    def program(self) -> str | None:
        """The name of the program whose results the journal holds."""
        return self.meta.get("program")

    def entries(self) -> dict[str, Entry]:
        """Every journaled outcome by key (``<program id>|<item key>``); the latest wins."""
        found: dict[str, Entry] = {}
        with self._guard("reading"):
            last = int(self._cache.get(_SEQ, 0))
            for seq in range(1, last + 1):
                blob = self._cache.get(_batch_key(seq))
                if blob is None:
                    continue
                try:
                    batch = pickle.loads(blob)
                except Exception as exc:
                    log.warning("dspool journal %r: batch %d unreadable (%s)", self.name, seq, exc)
                    continue
                for key, ok, payload, when in batch:
                    if ok:
                        found[key] = Entry(True, value=payload, time=when)
                    else:
                        found[key] = Entry(False, error=_error_from_record(payload), time=when)
        return found

    def progress(self) -> JournalProgress:
        """Items done, failed and in all, for the last map that used the journal."""
        meta = self.meta
        keys = meta.get("keys") or []
        entries = self.entries()
        prefix = f"{meta.get('program_id')}|"
        done = failed = 0
        for key in keys:
            entry = entries.get(prefix + key) if key is not None else None
            if entry is None:
                continue
            if entry.ok:
                done += 1
            else:
                failed += 1
        return JournalProgress(done, failed, len(keys))

    def results(self) -> Any:
        """The last map's results so far, in its input order (a MapResult).

        A finished item holds its value, a failed one its exception (also in
        ``.errors``), one without an outcome yet :data:`PENDING` (its index in
        ``.pending``).
        """
        from .mapping import MapResult

        meta = self.meta
        entries = self.entries()
        prefix = f"{meta.get('program_id')}|"
        values: list[Any] = []
        errors: dict[int, BaseException] = {}
        pending: list[int] = []
        for index, key in enumerate(meta.get("keys") or []):
            entry = entries.get(prefix + key) if key is not None else None
            if entry is None:
                values.append(PENDING)
                pending.append(index)
            elif entry.ok:
                values.append(entry.value)
            else:
                assert entry.error is not None
                values.append(entry.error)
                errors[index] = entry.error
        result = MapResult(values, errors)
        result.pending = pending
        return result

    def info(self) -> JournalInfo:
        meta = self.meta
        progress = self.progress()
        size, newest = _disk_usage(self.directory)
        return JournalInfo(
            name=self.name,
            program=meta.get("program"),
            session=meta.get("session"),
            done=progress.done,
            failed=progress.failed,
            total=progress.total,
            created=float(meta.get("created", newest)),
            updated=newest,
            size_bytes=size,
        )

    def delete(self) -> None:
        """Remove the journal and everything in it."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- writing (the map's thread)
    def begin(
        self, program: str, program_id: str, session: str | None, keys: Sequence[str | None]
    ) -> None:
        """Claim the journal for a map of ``program``; :class:`JournalMismatch` if another's.

        ``keys`` are the map's item keys in input order (None for an item that has none).
        """
        with self._guard("writing"), self._cache.transact():
            meta = self._cache.get(_META)
            now = time.time()
            if isinstance(meta, dict):
                if meta.get("program") != program:
                    raise JournalMismatch(self.name, str(meta.get("program")), program)
                created = meta.get("created", now)
            else:
                created = now
            self._cache.set(
                _META,
                {
                    "format": JOURNAL_FORMAT,
                    "program": program,
                    "program_id": program_id,
                    "session": session,
                    "keys": list(keys),
                    "created": created,
                    "updated": now,
                },
            )

    def check_program(self, program: str) -> None:
        """:class:`JournalMismatch` unless the journal is new or belongs to ``program``."""
        owner = self.meta.get("program")
        if owner is not None and owner != program:
            raise JournalMismatch(self.name, owner, program)

    def write(self, outcomes: Iterable[tuple[str, bool, Any]]) -> int:
        """Append ``(key, ok, value or exception)`` outcomes as one batch; returns how many.

        An outcome whose value cannot be pickled is left out (that item runs again next
        time) and logged.
        """
        now = time.time()
        batch = [
            (key, ok, value if ok else _error_record(value), now) for key, ok, value in outcomes
        ]
        if not batch:
            return 0
        try:
            blob = cloudpickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            batch = [entry for entry in batch if _picklable(entry, self.name)]
            blob = cloudpickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        with self._guard("writing"), self._cache.transact():
            seq = self._cache.incr(_SEQ)
            self._cache.set(_batch_key(seq), blob)
        return len(batch)


def _picklable(entry: tuple[Any, ...], name: str) -> bool:
    try:
        cloudpickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        log.warning(
            "dspool journal %r: a result (%s) cannot be pickled, not journaled: %s",
            name,
            type(entry[2]).__name__,
            exc,
        )
        return False
    return True


def _batch_key(seq: int) -> str:
    return f"b{seq:012d}"


def _disk_usage(directory: Path) -> tuple[int, float]:
    """Bytes under ``directory`` and the newest modification time in it."""
    size = 0
    newest = 0.0
    for root, _dirs, files in os.walk(directory):
        for file in files:
            try:
                info = os.stat(os.path.join(root, file))
            except OSError:
                continue
            size += info.st_size
            newest = max(newest, info.st_mtime)
    return size, newest or time.time()


def open_journal(store: ProgramStore, name: str, *, create: bool = False) -> Journal:
    """The journal ``name`` of ``store`` (created when ``create``, else it must exist)."""
    return Journal(store, name, create=create)


def journal_names(store: ProgramStore) -> list[str]:
    """The names of ``store``'s journals, sorted."""
    root = _journals_dir(store)
    try:
        return sorted(p.name for p in root.iterdir() if (p / "cache.db").exists())
    except FileNotFoundError:
        return []


def list_journals(store: ProgramStore) -> list[JournalInfo]:
    """Every journal of ``store`` with its progress, age and size, by name."""
    infos = []
    for name in journal_names(store):
        try:
            with Journal(store, name) as journal:
                infos.append(journal.info())
        except JournalNotFound:
            continue  # deleted meanwhile
    return infos
