"""Which call the current thread or task of a worker is running.

The worker's runtime sets :data:`current_call` around each call (per thread for plain
functions, per task for ``async def`` entries), so code running inside a program (the
LM request hooks, the provider permits) can say which call it belongs to. It is None
outside a call and in the kernel. Imports nothing: both sides may use it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["CallContext", "current_call"]


@dataclass(frozen=True)
class CallContext:
    """The call a worker runs: its pool-wide id, program name and the worker's id."""

    call_id: int
    program: str
    worker_id: str


current_call: ContextVar[CallContext | None] = ContextVar("dspool_current_call", default=None)
