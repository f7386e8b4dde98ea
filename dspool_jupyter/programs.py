"""Turning a stored program spec into the callable a worker runs (child side).

A spec's ``kind`` picks its builder in a small registry: ``"source"`` (Python source run
as a module of its own, its entry looked up by name) and ``"pickle"`` (a cloudpickled
callable) live here; :mod:`dspool_jupyter.dspy_programs` adds ``"signature"`` and the
case of a source program whose entry is a ``dspy.Module`` class. The DSPy builders are
registered lazily (see :func:`builder_for`) so that a worker imports dspy only for a
DSPy program.

Used by the local worker and by the Dask worker tasks alike; imports nothing of the
kernel side.
"""

from __future__ import annotations

import importlib
import linecache
import sys
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from .store import ProgramSpec

__all__ = [
    "Builder",
    "build_program",
    "builder_for",
    "is_dspy_module",
    "register_kind",
    "wrap_entry",
]

Builder = Callable[[ProgramSpec], Callable[..., Any]]
EntryWrapper = Callable[[ProgramSpec, Any], "Callable[..., Any] | None"]

_builders: dict[str, Builder] = {}
_entry_wrappers: list[EntryWrapper] = []
# Kinds whose builder lives in a module imported on first use: kind -> module name.
_lazy_kinds = {"signature": "dspool_jupyter.dspy_programs"}


def register_kind(kind: str, builder: Builder) -> None:
    """Make ``builder`` build every spec of ``kind``."""
    _builders[kind] = builder


def wrap_entry(wrapper: EntryWrapper) -> None:
    """Add a hook that may replace a source program's entry (None leaves it as it is)."""
    _entry_wrappers.append(wrapper)


def builder_for(kind: str) -> Builder | None:
    """The builder of ``kind``, importing the module that registers it if needed."""
    builder = _builders.get(kind)
    if builder is None and kind in _lazy_kinds:
        importlib.import_module(_lazy_kinds[kind])
        builder = _builders.get(kind)
    return builder


def build_program(spec: ProgramSpec) -> Callable[..., Any]:
    """Turn a stored spec into the callable a call runs; raises what building raised."""
    builder = builder_for(spec.kind)
    if builder is None:
        raise TypeError(f"program {spec.name!r} has unknown kind {spec.kind!r}")
    return builder(spec)


def _build_source(spec: ProgramSpec) -> Callable[..., Any]:
    filename = f"<dspool program {spec.name}>"
    module = types.ModuleType(f"dspool_program_{spec.id}")
    module.__file__ = filename
    source = str(spec.payload)
    # Tracebacks show the program's lines, like a local cell's.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    sys.modules[module.__name__] = module
    # Objects of classes the program defines travel back by value.
    cloudpickle.register_pickle_by_value(module)
    exec(compile(source, filename, "exec"), module.__dict__)
    entry = spec.entry or spec.name
    fn = module.__dict__.get(entry)
    if fn is None:
        raise NameError(f"program {spec.name!r} defines no {entry!r} when it runs")
    if not callable(fn):
        raise TypeError(f"entry {entry!r} of program {spec.name!r} is not callable")
    if is_dspy_module(fn):
        # dspy is loaded: the program imported it. Its module registers the wrapper.
        importlib.import_module("dspool_jupyter.dspy_programs")
    for wrapper in _entry_wrappers:
        wrapped = wrapper(spec, fn)
        if wrapped is not None:
            return wrapped
    return fn  # type: ignore[no-any-return]


def _build_pickle(spec: ProgramSpec) -> Callable[..., Any]:
    fn = cloudpickle.loads(spec.payload)
    if not callable(fn):
        raise TypeError(f"program {spec.name!r} is not callable")
    return fn  # type: ignore[no-any-return]


def is_dspy_module(obj: Any) -> bool:
    """True for a ``dspy.Module`` subclass (dspy is loaded then: the program imported it)."""
    module_type = getattr(sys.modules.get("dspy"), "Module", None)
    return isinstance(obj, type) and isinstance(module_type, type) and issubclass(obj, module_type)


register_kind("source", _build_source)
register_kind("pickle", _build_pickle)
