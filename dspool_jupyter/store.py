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

The directory is created private to its user (0700, parents included when created); a
directory owned by another user is refused. The default location is ``$DSPOOL_STORE``,
else ``$XDG_CACHE_HOME/dspool_jupyter/store``, else ``~/.cache/dspool_jupyter/store``.
diskcache (SQLite) makes concurrent writers from several processes safe; the store
pickles as its directory and reconnects in the process that unpickles it.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import diskcache

from .errors import InvalidProgram, ProgramNotFound, StoreError

__all__ = [
    "ANONYMOUS_TTL",
    "SUPERSEDED_TTL",
    "ProgramSpec",
    "ProgramStore",
    "default_store_path",
]

ANONYMOUS_TTL: float = 7 * 24 * 3600  # seconds an anonymous program lives after definition
SUPERSEDED_TTL: float = 3600  # seconds a redefined program's old version stays runnable
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
    """Create ``path`` 0700 (and its missing parents), or check that we own it."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
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
    try:
        info = path.stat()
    except OSError as exc:
        raise StoreError(f"cannot use the program store directory {path}: {exc}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"the program store path {path} is not a directory")
    if info.st_uid != os.getuid():
        raise StoreError(
            f"the program store directory {path} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}); refusing to load programs from it. Choose another store path."
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        # Ours but readable by others: programs are code we execute, so make it private.
        os.chmod(path, 0o700)


class ProgramStore:
    """Programs by value, shared by every worker through one diskcache directory."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        anonymous_ttl: float | None = ANONYMOUS_TTL,
    ) -> None:
        self.directory = (
            Path(directory).expanduser() if directory is not None else default_store_path()
        )
        self.anonymous_ttl = anonymous_ttl
        _prepare_private_dir(self.directory)
        try:
            # Default eviction would silently drop programs when the cache grows: never.
            self._cache = diskcache.Cache(
                str(self.directory), eviction_policy="none", timeout=60, size_limit=2**40
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the program store at {self.directory}: {exc}") from exc

    # -- pickling: a store travels as its directory and reconnects (to support forking)
    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "anonymous_ttl": self.anonymous_ttl}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], anonymous_ttl=state["anonymous_ttl"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ProgramStore({str(self.directory)!r})"

    def close(self) -> None:
        self._cache.close()

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        """Turn the cache's low-level failures into one clear StoreError."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"program store at {self.directory}: {action} failed: {exc}") from exc

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
        with self._guard(f"looking up {name!r}"):
            if session is not None:
                found = self._cache.get(_alias_key(session, name))
                if found is not None:
                    return str(found)
            found = self._cache.get(_alias_key(None, name))
            if found is not None:
                return str(found)
            if name.startswith("p") and len(name) == 32:
                record = self._cache.get(_program_key(name))
                if record is not None and record["session"] in (None, session):
                    return name
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
        with self._guard(f"checking program {program_id}"):
            return _program_key(program_id) in self._cache

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
    try:
        with _PARSE_LOCK:
            tree = ast.parse(source, filename=f"<program {name}>")
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "?"
        raise InvalidProgram(f"program {name!r} has a syntax error at {where}: {exc.msg}") from exc
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
