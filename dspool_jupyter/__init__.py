"""dspool_jupyter: a self-healing pool of worker processes for notebook programs.

``from dspool_jupyter import Pool, ProgramStore``. The names are imported lazily so
that worker processes (``python -m dspool_jupyter.worker``) never import the kernel side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Pool", "ProgramStore", "__version__"]
try:  # generated from labextension/package.json at build time (git-ignored)
    from ._version import __version__  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # a source tree that was never built or installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from .pool import Pool
    from .store import ProgramStore


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the prebuilt lab extension is (for ``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "dspool-jupyter"}]


def __getattr__(name: str) -> Any:
    if name == "Pool":
        from .pool import Pool

        return Pool
    if name == "ProgramStore":
        from .store import ProgramStore

        return ProgramStore
    raise AttributeError(f"module 'dspool_jupyter' has no attribute {name!r}")
