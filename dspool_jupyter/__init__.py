"""dspool_jupyter: a self-healing pool of worker processes for notebook programs.

``from dspool_jupyter import Pool, ProgramStore``. The names are imported lazily so
that worker processes (``python -m dspool_jupyter.worker``) never import the kernel side.
In a notebook, ``%load_ext dspool_jupyter`` registers the ``%dspool`` magics
(:mod:`dspool_jupyter.magics`) and the JupyterLab status item's comm target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Pool",
    "ProgramStore",
    "__version__",
    "load_ipython_extension",
    "unload_ipython_extension",
]
try:  # generated from labextension/package.json at build time (git-ignored)
    from ._version import __version__  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # a source tree that was never built or installed
    __version__ = "0.0.0+unknown"

if TYPE_CHECKING:
    from .pool import Pool
    from .store import ProgramStore


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dspool_jupyter``: the ``%dspool`` magics and the lab status item's comm."""
    from .magics import register

    register(ipython)
    try:
        from .comm import register_comm_target
    except ImportError:  # the lab status item is optional
        return
    register_comm_target(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext dspool_jupyter``: remove the magics and the comm (pools keep running)."""
    from .magics import unregister

    unregister(ipython)
    try:
        from .comm import unregister_comm_target
    except ImportError:
        return
    unregister_comm_target()


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
