"""The errors a pool call can end in, and the errors of the store.

Every outcome of a call is either its value or one of these (see DESIGN.md): a program's
own exception arrives as :class:`ProgramError` with the worker's traceback; the pool's
faults each have their own class, built from the facts (program, worker, exit code).
"""

from __future__ import annotations

import signal
from typing import Any

from .protocol import EXIT_OUT_OF_MEMORY

__all__ = [
    "BudgetExceeded",
    "CallCancelled",
    "CallTimeout",
    "DspoolError",
    "InvalidProgram",
    "PoolClosed",
    "PoolStartTimeout",
    "ProgramError",
    "ProgramNotFound",
    "RateLimitExceeded",
    "StoreError",
    "UnknownWorker",
    "UnpicklableArguments",
    "WorkerCrashed",
    "describe_returncode",
    "error_from_reply",
    "unloadable_result",
]


class DspoolError(Exception):
    """Base class of every error raised by dspool_jupyter."""


class ProgramError(DspoolError):
    """Raised when a program raised an exception in its worker.

    The worker survived and serves the next call. ``remote_type``, ``remote_message``
    and ``remote_traceback`` hold the worker's view; ``remote_exception`` is the original
    exception object when it could be sent back (otherwise ``None``).
    """

    def __init__(
        self,
        program: str,
        worker_id: str | None,
        remote_type: str,
        remote_message: str,
        remote_traceback: str,
        remote_exception: BaseException | None = None,
        *,
        phase: str = "run",
    ) -> None:
        self.program = program
        self.worker_id = worker_id
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.remote_exception = remote_exception
        self.phase = phase
        where = f" on worker {worker_id}" if worker_id else ""
        what = {"run": "raised", "load": "failed to load", "result": "returned a bad result"}
        summary = f"{remote_type}: {remote_message}" if remote_message else remote_type
        super().__init__(f"program {program!r} {what.get(phase, phase)}{where}: {summary}")

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the local traceback: the worker's, named."""
        header = f"ProgramError: program {self.program!r} on worker {self.worker_id}"
        return [header, *self.remote_traceback.rstrip("\n").splitlines()]


class WorkerCrashed(DspoolError):
    """Raised when the worker running the call died during it (exit, signal, segfault).

    The pool has already started a replacement; only the calls that worker was running
    are lost. A worker that ran out of its ``worker_memory_limit`` and could not recover
    exits with :data:`~dspool_jupyter.protocol.EXIT_OUT_OF_MEMORY`: the message then
    names the limit and ``out_of_memory`` is True.
    """

    def __init__(
        self,
        program: str,
        worker_id: str,
        pid: int | None,
        returncode: int | None,
        memory_limit: int | None = None,
    ) -> None:
        self.program = program
        self.worker_id = worker_id
        self.pid = pid
        self.returncode = returncode
        self.exit_code = returncode if returncode is not None and returncode >= 0 else None
        self.signal: int | None = -returncode if returncode is not None and returncode < 0 else None
        self.memory_limit = memory_limit
        self.out_of_memory = memory_limit is not None and returncode == EXIT_OUT_OF_MEMORY
        if self.out_of_memory:
            assert memory_limit is not None
            cause = (
                f"it ran out of memory (worker_memory_limit={memory_limit} bytes, "
                f"{memory_limit / (1 << 20):.0f} MiB) and could not recover "
                f"({describe_returncode(returncode)})"
            )
        else:
            cause = describe_returncode(returncode)
        super().__init__(
            f"worker {worker_id} (pid {pid}) died while running program {program!r}: "
            f"{cause}; the pool replaced it"
        )


class CallTimeout(DspoolError, TimeoutError):
    """Raised when a call ran longer than its timeout; its worker was killed and replaced."""

    def __init__(self, program: str, worker_id: str | None, timeout: float) -> None:
        self.program = program
        self.worker_id = worker_id
        self.timeout = timeout
        where = f" on worker {worker_id}" if worker_id else ""
        super().__init__(
            f"program {program!r} ran past its timeout of {timeout:g} s{where}; "
            "the worker was killed and replaced"
        )


class CallCancelled(DspoolError):
    """Raised when a running call was interrupted (kernel interrupt or ``cancel()``)."""

    def __init__(self, program: str, worker_id: str | None) -> None:
        self.program = program
        self.worker_id = worker_id
        super().__init__(f"call of program {program!r} was cancelled")


class ProgramNotFound(DspoolError, KeyError):
    """Raised when no program of that name (or id) is visible to the caller."""

    def __init__(
        self, name: str, session: str | None = None, known: list[str] | None = None
    ) -> None:
        self.name = name
        self.session = session
        scope = f" in session {session!r}" if session else ""
        hint = ""
        if known:
            hint = f"; known: {', '.join(sorted(known)[:10])}" + (" ..." if len(known) > 10 else "")
        elif known is not None:
            hint = "; no programs are defined" + (" in that session" if session else "")
        self.message = f"no program {name!r}{scope}{hint}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class InvalidProgram(DspoolError, ValueError):
    """Raised when a program definition is unusable (syntax error, missing entry, bad name)."""


class UnpicklableArguments(DspoolError, TypeError):
    """Raised when a call's arguments cannot be sent to a worker."""

    def __init__(self, program: str, reason: str) -> None:
        self.program = program
        super().__init__(f"arguments of a call to {program!r} cannot be sent to a worker: {reason}")


class PoolClosed(DspoolError):
    """Raised when a call is made on (or was pending in) a pool that is closed."""

    def __init__(self, detail: str = "the pool is closed") -> None:
        super().__init__(detail)


class PoolStartTimeout(DspoolError, TimeoutError):
    """Raised by ``wait_ready`` when not every worker was ready in time."""

    def __init__(self, ready: int, target: int, timeout: float, last_error: str | None) -> None:
        self.ready = ready
        self.target = target
        msg = f"{ready} of {target} workers ready after {timeout:g} s"
        if last_error:
            msg += f"; last start-up error: {last_error}"
        super().__init__(msg)


class UnknownWorker(DspoolError, KeyError):
    """Raised when a worker id names no live worker of the pool."""

    def __init__(self, worker_id: str, known: str) -> None:
        self.worker_id = worker_id
        self.message = f"no worker {worker_id!r} in this pool; its workers are: {known}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class StoreError(DspoolError):
    """Raised when the program store cannot be used (bad owner, permissions, corrupt)."""


def describe_returncode(returncode: int | None) -> str:
    """'exit code 3', 'killed by SIGKILL', or 'exit status unknown'."""
    if returncode is None:
        return "exit status unknown"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


def error_from_reply(
    program: str,
    session: str | None,
    worker_id: str | None,
    info: dict[str, Any],
    exception_blob: bytes,
) -> DspoolError:
    """The error a worker's error reply stands for (the local and the Dask backend's).

    ``info`` is the worker's ``{"phase", "type", "message", "traceback"}``; the blob is
    the pickled original exception, attached as ``remote_exception`` when it loads here.
    """
    phase = info["phase"]
    if phase == "not_found":
        return ProgramNotFound(program, session)
    if phase == "cancelled":
        return CallCancelled(program, worker_id)
    remote = None
    if exception_blob:
        import cloudpickle  # the kernel side has it; kept out of errors' import time

        try:
            remote = cloudpickle.loads(exception_blob)
        except Exception:
            remote = None
    return ProgramError(
        program,
        worker_id,
        info["type"],
        info["message"],
        info["traceback"],
        remote if isinstance(remote, BaseException) else None,
        phase=phase,
    )


def unloadable_result(program: str, worker_id: str | None, exc: BaseException) -> ProgramError:
    """A result that the worker sent but the kernel cannot unpickle."""
    return ProgramError(
        program,
        worker_id,
        type(exc).__name__,
        f"the result could not be unpickled in the kernel: {exc}",
        "",
        phase="result",
    )


class RateLimitExceeded(DspoolError):
    """Raised when an LM request was still refused (429) after the pool's bounded retries.

    Every try honoured the provider's ``Retry-After``; ``limit`` is what the provider
    said in its last refusal plus the pool's own limit for the model, if any.
    """

    def __init__(self, model: str, tries: int, limit: str) -> None:
        self.model = model
        self.tries = tries
        self.limit = limit
        super().__init__(
            f"LM requests to model {model!r} were refused with 429 (rate limit) {tries} "
            f"times in a row; giving up on this request. Limit seen: {limit}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.model, self.tries, self.limit)


class BudgetExceeded(DspoolError):
    """Raised at once for an LM request made after the pool's budget was spent.

    ``spent`` says what was spent against which maximum; answered calls keep their results.
    """

    def __init__(self, model: str, spent: str) -> None:
        self.model = model
        self.spent = spent
        super().__init__(
            f"the pool's LM budget is spent ({spent}); request to model {model!r} not sent. "
            "Raise it with pool.set_budget(...)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.model, self.spent)
