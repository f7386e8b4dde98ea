"""DSPy programs in the pool (the ``dspy`` extra): signature programs and one LM for all.

Not built yet: until it is, both entry points say so clearly instead of failing later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import DspoolError
from .store import ProgramSpec

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["build_signature_program", "configure_lm", "define_signature"]

_NOT_YET = "DSPy programs are not available in this version of dspool_jupyter"


def define_signature(pool: Pool, name: str, signature: str, **options: Any) -> str:
    raise DspoolError(_NOT_YET)


def configure_lm(pool: Pool, model: str, **kwargs: Any) -> None:
    raise DspoolError(_NOT_YET)


def build_signature_program(spec: ProgramSpec) -> Any:
    raise DspoolError(_NOT_YET)
