"""ProgramStore: the one source of truth for programs, on diskcache.

Every worker opens the same directory, so a program defined anywhere is visible to
every worker (the seed's fault 1 was programs living in one worker's memory).

Layout of the cache (string keys and values where it is read per call: diskcache
stores those raw, which makes a lookup about three times cheaper than a pickled key):

- ``"program|<id>"`` -> the program's spec, a plain dict stored *by value*: its source
  text (or a cloudpickled callable, or a declarative spec), the entry name, the name,
  the session and metadata. The id is a content hash of namespace, name, kind, payload
  and entry, so a redefined program gets a new id and a cached compiled program can
  never be stale.
- ``"alias|<session>|<name>"`` -> the current id (``<session>`` empty for anonymous).
- ``"old|<session>|<name>"`` -> the ids of superseded versions still kept.

Namespaces: anonymous programs live in ``""`` and are visible to every call; a session's
programs live in ``"session:<name>"`` and are visible only to calls of that session,
which also see the anonymous ones (their own win on a name clash).

Anonymous programs expire ``anonymous_ttl`` seconds after their last definition (default
7 days; ``None`` keeps them); session programs live until deleted or until
``clear_session``. A redefinition keeps the superseded version for ``SUPERSEDED_TTL``
so calls already on their way still run the version they were submitted with;
``delete`` removes the name and every version of it at once, for every worker.

The default location is ``$DSPOOL_STORE``, else ``$XDG_CACHE_HOME/dspool_jupyter/store``,
else ``~/.cache/dspool_jupyter/store``. The path is made absolute (symlinks resolved)
once, when the store is made: a later ``os.chdir`` (a notebook's ``%cd``) changes
nothing, and ``str(store.directory)`` is what new workers open. diskcache (SQLite) makes
concurrent writers from several processes safe; the store pickles as its directory and
reconnects in the process that unpickles it.

Trust rule. Programs and pickles in the store are code that the kernel and the workers
run, so a store that another user could have written to is refused with
:class:`StoreError`, never repaired and then trusted. Before anything is read, the
directory must belong to the current user and not be writable by group or others, and
so must every file and directory inside it (no symbolic links). A directory that is
ours and only *readable* by others is made 0700 (nobody else could have changed it).
Directories the store creates are 0700; SQLite creates its files 0644 whatever the
umask, and values are kept inside the database (never as diskcache's side files, which
would follow the umask), so the store never makes a file that the rule would refuse.

Locks. Opening an existing store only reads (diskcache's own ``Cache.__init__``
rewrites its settings, which needs the write lock and waited up to 60 s for any other
writer): a transaction held by another process never delays ``ProgramStore(...)`` or a
worker's start. Reads never wait for writers (SQLite's WAL mode). A write (``put``,
``delete``, ``clear_session``, ``expire``; also the one-time creation of a new store)
waits at most ``lock_timeout`` seconds (``LOCK_TIMEOUT``, 10 s, by default) for another
writer, then raises :class:`StoreError` naming the lock and, on Linux, the pid holding it.

File descriptors. ``close()`` closes every thread's SQLite connection (diskcache's own
``close`` closes only the calling thread's). A closed store reopens lazily: the next
operation, in any thread, opens a new connection. An operation already running in
another thread finishes on its connection, which is closed when it ends.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pwd
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import cloudpickle
import diskcache
from diskcache.core import DBNAME, METADATA

from .errors import InvalidProgram, ProgramNotFound, StoreError

__all__ = [
    "ANONYMOUS_TTL",
    "LOCK_TIMEOUT",
    "SUPERSEDED_TTL",
    "ProgramSpec",
    "ProgramStore",
    "default_store_path",
]

ANONYMOUS_TTL: float = 7 * 24 * 3600  # seconds an anonymous program lives after definition
SUPERSEDED_TTL: float = 3600  # seconds a redefined program's old version stays runnable
LOCK_TIMEOUT: float = 10.0  # seconds a write waits for another process's write lock
STORE_FORMAT = 1

# CPython 3.11 before 3.11.8 corrupts ast.parse's recursion counter when threads parse
# at once ("AST constructor recursion depth mismatch", gh-106905): parse one at a time.
_PARSE_LOCK = threading.Lock()
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
KINDS = ("source", "pickle", "signature")


@dataclass(frozen=True)
class ProgramSpec:
    """A stored program.

    ``kind`` is 'source' (``payload`` is Python source text, ``entry`` names the callable
    it defines), 'pickle' (``payload`` is a cloudpickled callable) or 'signature' (a
    declarative DSPy spec, a dict, built by :mod:`dspool_jupyter.dspy_programs`).
    """

    id: str
    name: str
    kind: str
    payload: Any
    entry: str | None
    session: str | None
    created: float
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {
            "format": STORE_FORMAT,
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "payload": self.payload,
            "entry": self.entry,
            "session": self.session,
            "created": self.created,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ProgramSpec:
        return cls(
            id=record["id"],
            name=record["name"],
            kind=record["kind"],
            payload=record["payload"],
            entry=record["entry"],
            session=record["session"],
            created=record["created"],
            meta=dict(record.get("meta") or {}),
        )


def default_store_path() -> Path:
    """Where ``store=None`` puts the store (see the module docstring)."""
    explicit = os.environ.get("DSPOOL_STORE")
    if explicit:
        return Path(explicit).expanduser()
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache_home) / "dspool_jupyter" / "store"


def _namespace(session: str | None) -> str:
    return "" if session is None else f"session:{session}"


def _program_key(program_id: str) -> str:
    return f"program|{program_id}"


def _alias_key(session: str | None, name: str) -> str:
    return f"alias|{session or ''}|{name}"


def _old_key(session: str | None, name: str) -> str:
    return f"old|{session or ''}|{name}"


def _check_name(name: str, what: str = "program name") -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidProgram(
            f"{what} {name!r} is not valid: use letters, digits, '_', '.' or '-', "
            "starting with a letter or '_'"
        )


def _prepare_private_dir(path: Path) -> None:
    """Create ``path`` 0700 (and its missing parents), or check that it can be trusted."""
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(
                f"cannot create the program store directory {directory}: {exc}"
            ) from exc
    _check_trusted(path)


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check_trusted(path: Path) -> None:
    """Apply the trust rule (module docstring) to the store directory and its contents."""
    uid = os.getuid()

    def refuse(what: str) -> NoReturn:
        raise StoreError(
            f"refusing the program store at {path}: {what}. Programs in the store are code "
            "that the kernel and its workers run, and another user could have written "
            "to this one. Move it aside or delete it (dspool then makes a fresh, private "
            "store there), or choose another store path."
        )

    try:
        info = os.lstat(path)
    except OSError as exc:
        raise StoreError(f"cannot use the program store directory {path}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"the program store path {path} is not a directory")
    if info.st_uid != uid:
        refuse(f"the directory belongs to {_user(info.st_uid)}, not to you, {_user(uid)}")
    if info.st_mode & 0o022:
        refuse(f"the directory is writable by group or others (mode {_mode(info.st_mode)})")
    try:
        pending = [path]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    inner = entry.stat(follow_symlinks=False)
                    name = os.path.relpath(entry.path, path)
                    if stat.S_ISLNK(inner.st_mode):
                        refuse(f"it contains a symbolic link, {name}")
                    if inner.st_uid != uid:
                        refuse(f"{name} belongs to {_user(inner.st_uid)}, not to you")
                    if inner.st_mode & 0o022:
                        refuse(f"{name} is writable by group or others ({_mode(inner.st_mode)})")
                    if stat.S_ISDIR(inner.st_mode):
                        pending.append(Path(entry.path))
    except OSError as exc:
        raise StoreError(f"cannot check the program store directory {path}: {exc}") from exc
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)  # ours and unchanged by others, but readable by them


def _mode(st_mode: int) -> str:
    return f"0o{stat.S_IMODE(st_mode):o}"


# SQLite's write lock: the WAL write lock (byte 120 of the -shm file) and, outside WAL
# mode, the RESERVED byte of the database file.
_WRITE_LOCK_BYTES = (("-shm", 120), ("", 0x40000001))


def _lock_holders(db_path: str) -> list[int]:
    """Pids holding SQLite's write lock on ``db_path``, read from Linux's /proc/locks."""
    wanted: dict[tuple[str, int], int] = {}
    for suffix, byte in _WRITE_LOCK_BYTES:
        try:
            info = os.stat(db_path + suffix)
        except OSError:
            continue
        device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}"
        wanted[(device, info.st_ino)] = byte
    holders: list[int] = []
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return holders
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[1] == "->" or fields[3] != "WRITE":
            continue  # "->" marks a process waiting for a lock, not holding it
        device, _, inode = fields[5].rpartition(":")
        try:
            lock_byte = wanted.get((device, int(inode)))
            pid, first = int(fields[4]), int(fields[6])
            last = float("inf") if fields[7] == "EOF" else int(fields[7])
        except ValueError:
            continue
        if lock_byte is not None and first <= lock_byte <= last and pid not in holders:
            holders.append(pid)
    return holders


def _describe_pid(pid: int) -> str:
    if pid == os.getpid():
        return f"this process (pid {pid}, another thread or connection)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())
    except OSError:
        return f"pid {pid}"
    if len(command) > 60:
        command = command[:57] + "..."
    return f"pid {pid} ({command})" if command else f"pid {pid}"


# Settings every store is made with. Values stay inside the database (never diskcache's
# side files, created with the umask); default eviction would silently drop programs.
_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "size_limit": 2**40,
    "disk_min_file_size": 2**40,
}
_SCHEMA = {
    "Settings",
    "Cache",
    "Cache_key_raw",
    "Cache_expire_time",
    "Settings_count_insert",
    "Settings_count_delete",
    "Settings_size_insert",
    "Settings_size_update",
    "Settings_size_delete",
}


_forks = 0  # how many forks this process is down its line (a fork's child adds one)


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)

# The per-call reads, straight to diskcache's table (its own get() does more per call).
# Keys and ids are short strings, which diskcache stores raw (raw = 1, mode = 1).
_SELECT_VALUE = (
    "SELECT mode, value FROM Cache WHERE key = ? AND raw = 1"
    " AND (expire_time IS NULL OR expire_time > ?)"
)
_SELECT_EXISTS = (
    "SELECT rowid FROM Cache WHERE key = ? AND raw = 1 AND (expire_time IS NULL OR expire_time > ?)"
)
_MODE_RAW = 1


class _Link:
    """One thread's SQLite connection; ``busy`` counts the store operations using it."""

    __slots__ = ("busy", "con", "dead")

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self.busy = 0
        self.dead = False


class _Cache(diskcache.Cache):  # type: ignore[misc]
    """diskcache's Cache, opened without the write lock and closable from any thread.

    Mirrors diskcache 5.6's ``Cache.__init__`` minus its writes when the database is
    already set up with our settings, and keeps every thread's connection in
    ``_links`` so that ``close()`` closes them all. ``enter``/``leave`` bracket each
    store operation so that ``close()`` never closes a connection in use.
    """

    def __init__(self, directory: str, timeout: float) -> None:
        self._links: list[_Link] = []
        self._links_lock = threading.Lock()
        self._forks = _forks
        self._lock_timeout = timeout
        if not self._open_existing(directory, timeout):
            super().__init__(directory, timeout=timeout, **_SETTINGS)

    def _open_existing(self, directory: str, timeout: float) -> bool:
        self._directory = directory
        self._timeout = timeout
        self._local = threading.local()
        self._txn_id = None
        if not os.path.exists(os.path.join(directory, DBNAME)):
            return False
        try:
            sql = self._sql
            current = dict(sql("SELECT key, value FROM Settings").fetchall())
            schema = {row[0] for row in sql("SELECT name FROM sqlite_master").fetchall()}
        except sqlite3.OperationalError:  # not set up yet (or not a diskcache database)
            self.close()
            return False
        wanted = {**diskcache.DEFAULT_SETTINGS, **_SETTINGS, **METADATA}
        if not _SCHEMA <= schema or any(
            key not in current or (key not in METADATA and current[key] != value)
            for key, value in wanted.items()
        ):
            self.close()
            return False
        disk = {key[5:]: value for key, value in current.items() if key.startswith("disk_")}
        self._disk = diskcache.Disk(directory, **disk)
        for key, value in current.items():
            setattr(self, key, value)  # what diskcache's reset(key) leaves behind
        ((self._page_size,),) = sql("PRAGMA page_size").fetchall()
        return True

    @property
    def _con(self) -> sqlite3.Connection:
        link = getattr(self._local, "link", None)
        if link is None or link.dead or self._forks != _forks:
            link = self._connect()
        return link.con

    def _connect(self) -> _Link:
        if self._forks != _forks:
            # A forked child must not use (nor lock) its parent's connections.
            self._forks = _forks
            self._links = []
            self._links_lock = threading.Lock()
            self._local = threading.local()
        con = sqlite3.connect(
            os.path.join(self._directory, DBNAME),
            timeout=self._timeout,
            isolation_level=None,
            check_same_thread=False,  # so that close() can close it from any thread
        )
        link = self._local.link = _Link(con)
        try:
            settings = con.execute("SELECT key, value FROM Settings").fetchall()
        except sqlite3.OperationalError:
            settings = []
        for key, value in settings:
            if key.startswith("sqlite_"):
                self.reset(key, value, update=False)  # per-connection pragmas
        # Registered (closable by close()) only now: closing a connection while another
        # thread runs a statement on it crashes the interpreter.
        with self._links_lock:
            self._links.append(link)
        return link

    @property
    def _sql_retry(self) -> Callable[..., sqlite3.Cursor]:
        # diskcache's retries "database is locked" for 60 s: bound it like every write.
        sql = self._sql
        bound = self._lock_timeout

        def execute(statement: str, *args: Any) -> sqlite3.Cursor:
            deadline = time.monotonic() + bound
            while True:
                try:
                    return sql(statement, *args)  # type: ignore[no-any-return]
                except sqlite3.OperationalError as exc:
                    if str(exc) != "database is locked" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.001)

        return execute

    def enter(self) -> _Link:
        """Mark this thread's connection in use, connecting if needed."""
        while True:
            link = getattr(self._local, "link", None)
            if link is None or link.dead or self._forks != _forks:
                link = self._connect()
            link.busy += 1
            if not link.dead:  # read after the increment: close() sees one or the other
                return link
            self.leave(link)

    def leave(self, link: _Link) -> None:
        link.busy -= 1
        if link.dead and not link.busy:
            with self._links_lock:
                link.con.close()

    def close(self) -> None:
        """Close every thread's connection (those in use when their operation ends)."""
        with self._links_lock:
            links, self._links = self._links, []
            for link in links:
                link.dead = True
                if not link.busy:
                    link.con.close()

    def open_connections(self) -> int:
        with self._links_lock:
            return len(self._links)


class ProgramStore:
    """Programs by value, shared by every worker through one diskcache directory.

    ``directory``: the store's path (made absolute now), or None for the default.
    ``anonymous_ttl``: seconds an anonymous program lives (None keeps them).
    ``lock_timeout``: seconds a write waits for another writer before :class:`StoreError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        anonymous_ttl: float | None = ANONYMOUS_TTL,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        path = Path(directory).expanduser() if directory is not None else default_store_path()
        self.directory = path.resolve()
        self.anonymous_ttl = anonymous_ttl
        self.lock_timeout = lock_timeout
        _prepare_private_dir(self.directory)
        try:
            self._cache = _Cache(str(self.directory), lock_timeout)
        except (sqlite3.Error, OSError) as exc:
            raise self._error("opening", exc) from exc

    # -- pickling: a store travels as its directory and reconnects (to support forking)
    def __getstate__(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "anonymous_ttl": self.anonymous_ttl,
            "lock_timeout": self.lock_timeout,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["directory"],
            anonymous_ttl=state["anonymous_ttl"],
            lock_timeout=state.get("lock_timeout", LOCK_TIMEOUT),
        )

    def __repr__(self) -> str:
        return f"ProgramStore({str(self.directory)!r})"

    def close(self) -> None:
        """Release every file descriptor the store holds (every thread's connection).

        Idempotent and safe from any thread. The store stays usable: its next operation
        opens a new connection. An operation running meanwhile in another thread
        finishes normally and its connection is closed as it ends.
        """
        self._cache.close()

    def __enter__(self) -> ProgramStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _error(self, action: str, exc: BaseException) -> StoreError:
        """The StoreError for a failed ``action`` (a held write lock named as such)."""
        if isinstance(exc, diskcache.Timeout) or "database is locked" in str(exc):
            db_path = str(self.directory / DBNAME)
            holders = _lock_holders(db_path)
            who = ", ".join(map(_describe_pid, holders)) if holders else "another process"
            return StoreError(
                f"program store at {self.directory}: {action} failed: the store's write "
                f"lock (SQLite, on {db_path}) is held by {who} and was not released "
                f"within {self.lock_timeout:g} s. Try again when that writer has finished; "
                "a process stopped or stuck while writing holds it until it ends."
            )
        return StoreError(f"program store at {self.directory}: {action} failed: {exc}")

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Run one operation on this thread's connection; failures become StoreError."""
        cache = self._cache
        try:
            link = cache.enter()
        except (sqlite3.Error, OSError) as exc:
            raise self._error(action, exc) from exc
        try:
            yield
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self._error(action, exc) from exc
        finally:
            cache.leave(link)

    # -- defining
    def put(
        self,
        name: str,
        program: str | Callable[..., Any] | dict[str, Any],
        *,
        entry: str | None = None,
        session: str | None = None,
        kind: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> ProgramSpec:
        """Store ``program`` under ``name`` (in ``session``'s namespace) and return its spec.

        ``program`` is source text (``entry`` names the callable it defines and defaults
        to ``name``), a callable (stored cloudpickled, by value), or with
        ``kind="signature"`` a declarative spec dict. Source is checked now: a syntax
        error or a missing entry raises :class:`InvalidProgram`, and nothing is stored.
        """
        _check_name(name)
        if session is not None:
            _check_name(session, "session name")
        if kind is None:
            kind = "source" if isinstance(program, str) else "pickle"
        if kind not in KINDS:
            raise InvalidProgram(f"unknown program kind {kind!r}; expected one of {KINDS}")
        payload: Any
        if kind == "source":
            if not isinstance(program, str):
                raise InvalidProgram(
                    f"program {name!r}: source must be text, got {type(program).__name__}"
                )
            entry = entry or name
            _check_source(name, program, entry)
            payload = program
            digest_payload = program.encode()
        elif kind == "pickle":
            if not callable(program):
                raise InvalidProgram(
                    f"program {name!r} must be source text or a callable, "
                    f"got {type(program).__name__}"
                )
            try:
                payload = cloudpickle.dumps(program)
            except Exception as exc:
                raise InvalidProgram(f"program {name!r} cannot be stored: {exc}") from exc
            entry = entry or getattr(program, "__name__", name)
            digest_payload = payload
        else:
            if not isinstance(program, dict):
                raise InvalidProgram(f"program {name!r}: a signature spec must be a dict")
            payload = dict(program)
            digest_payload = repr(sorted(payload.items())).encode()
        namespace = _namespace(session)
        digest = hashlib.sha256()
        for part in (namespace.encode(), name.encode(), kind.encode(), (entry or "").encode()):
            digest.update(len(part).to_bytes(8, "big") + part)
        digest.update(digest_payload)
        program_id = "p" + digest.hexdigest()[:31]
        spec = ProgramSpec(
            id=program_id,
            name=name,
            kind=kind,
            payload=payload,
            entry=entry,
            session=session,
            created=time.time(),
            meta=dict(meta or {}),
        )
        expire = self.anonymous_ttl if session is None else None
        alias_key, old_key = _alias_key(session, name), _old_key(session, name)
        with self._guard(f"defining {name!r}"), self._cache.transact():
            self._cache.set(_program_key(program_id), spec.to_record(), expire=expire)
            previous = self._cache.get(alias_key)
            old = [i for i in self._cache.get(old_key, []) if _program_key(i) in self._cache]
            if previous is not None and previous != program_id:
                old.append(previous)
                self._cache.touch(_program_key(previous), expire=SUPERSEDED_TTL)
            old = [i for i in old if i != program_id]
            self._cache.set(alias_key, program_id, expire=expire)
            self._cache.set(old_key, old, expire=SUPERSEDED_TTL)
        return spec

    # -- finding
    def resolve(self, name: str, session: str | None = None) -> str:
        """The id that ``name`` means for a call in ``session`` (or anonymous).

        A session call sees its own programs first, then the anonymous ones. An id
        (as returned by ``put``) resolves to itself if it is visible to the caller.
        Raises :class:`ProgramNotFound` otherwise.
        """
        # The per-call hot path: no context manager, no diskcache get().
        cache = self._cache
        try:
            link = cache.enter()
            try:
                now = time.time()
                if session is not None:
                    found = self._read_alias(link, _alias_key(session, name), now)
                    if found is not None:
                        return found
                found = self._read_alias(link, _alias_key(None, name), now)
                if found is not None:
                    return found
                if name.startswith("p") and len(name) == 32:
                    record = cache.get(_program_key(name))
                    if record is not None and record["session"] in (None, session):
                        return name
            finally:
                cache.leave(link)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self._error(f"looking up {name!r}", exc) from exc
        raise ProgramNotFound(name, session, self.names(session))

    def get(self, program_id: str) -> ProgramSpec:
        """The spec stored under ``program_id``; :class:`ProgramNotFound` if gone."""
        with self._guard(f"reading program {program_id}"):
            record = self._cache.get(_program_key(program_id))
        if record is None:
            raise ProgramNotFound(program_id)
        return ProgramSpec.from_record(record)

    def exists(self, program_id: str) -> bool:
        """True while ``program_id`` is stored (cheap: no payload is read)."""
        cache = self._cache
        try:
            link = cache.enter()
            try:
                key = _program_key(program_id)
                return bool(link.con.execute(_SELECT_EXISTS, (key, time.time())).fetchall())
            finally:
                cache.leave(link)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            raise self._error(f"checking program {program_id}", exc) from exc

    def _read_alias(self, link: _Link, key: str, now: float) -> str | None:
        rows = link.con.execute(_SELECT_VALUE, (key, now)).fetchall()
        if not rows:
            return None
        ((mode, value),) = rows
        if mode != _MODE_RAW:  # not written by this module: let diskcache decode it
            value = self._cache.get(key)
        return None if value is None else str(value)

    def lookup(self, name: str, session: str | None = None) -> ProgramSpec:
        """``get(resolve(name, session))``."""
        return self.get(self.resolve(name, session))

    def names(self, session: str | None = None) -> list[str]:
        """Names visible to a call in ``session`` (anonymous ones included), sorted."""
        prefixes = (_alias_key(None, ""), _alias_key(session, ""))
        found: set[str] = set()
        with self._guard("listing programs"):
            for key in self._cache.iterkeys():
                if isinstance(key, str) and key.startswith(prefixes) and key in self._cache:
                    found.add(key.split("|", 2)[2])  # ("in" skips expired keys)
        return sorted(found)

    def programs(self, session: str | None = None) -> list[ProgramSpec]:
        """Specs of the programs visible to ``session`` (its own win on a name clash)."""
        specs = []
        for name in self.names(session):
            try:
                specs.append(self.lookup(name, session))
            except ProgramNotFound:
                continue  # expired or deleted meanwhile
        return specs

    # -- deleting
    def delete(self, name: str, session: str | None = None) -> bool:
        """Delete ``name`` (and all its versions) from ``session``'s namespace.

        Returns False when there was nothing to delete. Takes effect for every worker at
        once: workers check the store before each call.
        """
        alias_key, old_key = _alias_key(session, name), _old_key(session, name)
        with self._guard(f"deleting {name!r}"), self._cache.transact():
            current = self._cache.get(alias_key)
            if current is None:
                return False
            for program_id in (current, *self._cache.get(old_key, [])):
                self._cache.delete(_program_key(program_id))
            self._cache.delete(alias_key)
            self._cache.delete(old_key)
        return True

    def clear_session(self, session: str) -> int:
        """Delete every program of ``session``; returns how many names were removed."""
        prefix = _alias_key(session, "")
        with self._guard(f"clearing session {session!r}"):
            names = [
                key[len(prefix) :]
                for key in self._cache.iterkeys()
                if isinstance(key, str) and key.startswith(prefix)
            ]
        return sum(self.delete(name, session) for name in names)

    def expire(self) -> int:
        """Drop expired programs from disk now (it also happens as the store is used)."""
        with self._guard("expiring programs"):
            return int(self._cache.expire())

    def __len__(self) -> int:
        return len(self.names())


def _check_source(name: str, source: str, entry: str) -> None:
    """Syntax and entry check without running anything in the caller's process."""
    filename = f"<program {name}>"
    try:
        with _PARSE_LOCK:
            tree = ast.parse(source, filename=filename)
            # Compiling (without running) catches what only the compiler sees, as the
            # worker would: 'return' outside a function, nesting too deep to compile.
            compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "?"
        raise InvalidProgram(f"program {name!r} has a syntax error at {where}: {exc.msg}") from exc
    except (RecursionError, MemoryError) as exc:
        # CPython's parser and compiler report deep nesting (e.g. "-" * 200000) this way.
        raise InvalidProgram(
            f"program {name!r} is nested too deeply or is too large for Python to compile "
            f"({type(exc).__name__}{': ' + str(exc) if str(exc) else ''}); "
            "split long expressions into smaller statements"
        ) from None
    except ValueError as exc:  # e.g. null bytes in the source
        raise InvalidProgram(f"program {name!r} cannot be compiled: {exc}") from exc
    if not _defines(tree, entry):
        defined = sorted(_top_level_names(tree))
        hint = f" (it defines: {', '.join(defined)})" if defined else " (it defines nothing)"
        raise InvalidProgram(
            f"program {name!r} does not define its entry {entry!r} at top level{hint}; "
            "name the callable with entry=... (--entry in the magic)"
        )


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _defines(tree: ast.Module, entry: str) -> bool:
    if entry in _top_level_names(tree):
        return True
    # Conditional or dynamic definitions (if/try blocks, globals()) are trusted: the
    # worker reports a clear error if the entry is still missing when it loads.
    return any(
        not isinstance(
            node,
            (
                ast.FunctionDef,
                ast.AsyncFunctionDef,
                ast.ClassDef,
                ast.Assign,
                ast.AnnAssign,
                ast.AugAssign,
                ast.Import,
                ast.ImportFrom,
                ast.Expr,
            ),
        )
        for node in tree.body
    )
