"""The usage ledger: every LM request of the pool, its tokens and cost, and its snapshots.

The kernel-side permit broker (:mod:`dspool_jupyter.limits`) records each answered LM
request here (prompt and completion tokens as the provider reported them, the cost when
the price is known) and each refusal (429). :meth:`Ledger.report` returns a
:class:`UsageReport`: the totals (``requests``, ``prompt_tokens``, ``completion_tokens``,
``cost``) and breakdowns per program, per session and per model.

Decisions:

- **Which program and session.** A request arrives with the call id and program name the
  worker's runtime set (:data:`dspool_jupyter.context.current_call`). The ledger asks its
  ``labels(call_id, program) -> (program, session)`` hook at record time (the call is in
  flight then, so the dispatcher still knows it); the default keeps the request's program
  and an unknown session (``None``). Requests outside any call are under program
  ``None``.
- **Cost.** Prices come from LiteLLM's local cost map (the JSON file shipped inside the
  ``litellm`` package, read directly: importing litellm costs seconds in the kernel):
  ``input_cost_per_token`` and ``output_cost_per_token`` of the model name as given, or
  of the name after its ``provider/`` prefix. A request whose price is unknown adds
  nothing to ``cost`` and counts in ``unpriced_requests``; ``cost`` is ``None`` while no
  request at all was priced. The caller may report its own cost (plain programs).
- Plain data only (dataclasses of numbers and dicts): snapshots travel to the widget and
  the lab panel as they are.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BudgetSnapshot",
    "Labels",
    "Ledger",
    "LimitsSnapshot",
    "ModelSnapshot",
    "Usage",
    "UsageReport",
    "budget_text",
    "cost_text",
    "known_providers",
    "model_line",
    "price_of",
    "price_table",
    "usage_line",
]

Labels = Callable[[int | None, str | None], tuple[str | None, str | None]]
"""``labels(call_id, program) -> (program, session)``: what the dispatcher knows of a call."""


@dataclass
class Usage:
    """Counts of LM requests: answered ones, their tokens and cost, and 429s seen."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    priced_cost: float = 0.0  # dollars, of the requests whose price is known
    unpriced_requests: int = 0
    rate_limited: int = 0  # 429 replies (each was retried or ended its call)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cost(self) -> float | None:
        """Dollars spent on priced requests; None while no answered request had a price."""
        if self.requests and self.unpriced_requests == self.requests:
            return None
        return self.priced_cost

    def add(self, other: Usage) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.priced_cost += other.priced_cost
        self.unpriced_requests += other.unpriced_requests
        self.rate_limited += other.rate_limited

    def record(self, prompt_tokens: int, completion_tokens: int, cost: float | None) -> None:
        """Add one answered request."""
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if cost is None:
            self.unpriced_requests += 1
        else:
            self.priced_cost += cost

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cost": self.cost, "total_tokens": self.total_tokens}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        return cls(
            requests=int(data.get("requests", 0)),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            priced_cost=float(data.get("priced_cost", 0.0)),
            unpriced_requests=int(data.get("unpriced_requests", 0)),
            rate_limited=int(data.get("rate_limited", 0)),
        )

    def copy(self) -> Usage:
        return Usage(**asdict(self))


def cost_text(cost: float | None) -> str:
    """Dollars as text: cents above a dollar, six decimals below (a cheap request costs
    a few millionths of a dollar, which four decimals would show as $0.0000)."""
    if cost is None:
        return "n/a"
    return f"${cost:,.2f}" if cost >= 1 else f"${cost:.6f}"


@dataclass(frozen=True)
class UsageReport:
    """What ``pool.usage()`` returns: the totals and the breakdowns (copies)."""

    total: Usage
    by_program: dict[str | None, Usage] = field(default_factory=dict)
    by_session: dict[str | None, Usage] = field(default_factory=dict)
    by_model: dict[str, Usage] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.total.requests

    @property
    def prompt_tokens(self) -> int:
        return self.total.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.total.completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.total.total_tokens

    @property
    def cost(self) -> float | None:
        return self.total.cost

    @property
    def rate_limited(self) -> int:
        return self.total.rate_limited

    def as_dict(self) -> dict[str, Any]:
        def table(rows: Mapping[Any, Usage]) -> dict[str, Any]:
            return {str(key): value.as_dict() for key, value in rows.items()}

        return {
            "total": self.total.as_dict(),
            "by_program": table(self.by_program),
            "by_session": table(self.by_session),
            "by_model": table(self.by_model),
        }

    def table(self) -> str:
        """A plain-text table: totals, then one line per model, program and session."""
        lines = [
            f"{'':<28} {'requests':>9} {'prompt':>10} {'completion':>11} {'cost':>10} {'429s':>6}"
        ]

        def line(label: str, usage: Usage) -> None:
            lines.append(
                f"{label[:28]:<28} {usage.requests:>9} {usage.prompt_tokens:>10} "
                f"{usage.completion_tokens:>11} {cost_text(usage.cost):>10} "
                f"{usage.rate_limited:>6}"
            )

        line("total", self.total)
        for title, rows in (
            ("model", self.by_model),
            ("program", self.by_program),
            ("session", self.by_session),
        ):
            for key, usage in sorted(rows.items(), key=lambda kv: str(kv[0])):
                line(f"{title} {key if key is not None else '-'}", usage)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.table())


@dataclass(frozen=True)
class ModelSnapshot:
    """One model as the broker sees it (rates in requests or tokens per minute)."""

    model: str
    rpm: float | None  # the limit set, or None
    tpm: float | None
    pace_rpm: float | None  # the pace permits are handed out at now (AIMD), None = unpaced
    achieved_rpm: float  # answered requests over the last minute
    achieved_tpm: float
    in_flight: int
    rate_limited: int  # 429s seen
    paused_for: float  # seconds left in a pause after a 429 (0 when not paused)


@dataclass(frozen=True)
class BudgetSnapshot:
    max_cost: float | None
    max_tokens: int | None
    spent_cost: float
    spent_tokens: int
    exhausted: bool


@dataclass(frozen=True)
class LimitsSnapshot:
    """The broker's state for the widget and the lab panel (plain data)."""

    models: tuple[ModelSnapshot, ...]
    budget: BudgetSnapshot
    usage: UsageReport

    def as_dict(self) -> dict[str, Any]:
        return {
            "models": [asdict(m) for m in self.models],
            "budget": asdict(self.budget),
            "usage": self.usage.as_dict(),
        }

    def lines(self) -> list[str]:
        """What the status widget shows: one line per model, the usage, the budget.

        Empty when nothing is limited, budgeted or spent, so a pool without an LM shows
        nothing of it.
        """
        lines = [model_line(m) for m in self.models]
        total = self.usage.total
        if total.requests or total.rate_limited:
            lines.append(usage_line(total))
        budget = budget_text(self.budget)
        if budget:
            lines.append(budget)
        return lines


def _number(value: float) -> str:
    return f"{value:,.10g}"


def model_line(model: ModelSnapshot) -> str:
    """One model: ``openai/gpt-4o-mini: 57/60 rpm, 9,000/10,000 tpm, 3 in flight, 0 429s``.

    Achieved rates are over the last minute, against the limit set (or "no limit").
    """
    if model.rpm:
        parts = [f"{model.achieved_rpm:.0f}/{_number(model.rpm)} rpm"]
    else:
        parts = [f"{model.achieved_rpm:.0f} rpm (no limit)"]
    if model.tpm:
        parts.append(f"{model.achieved_tpm:,.0f}/{_number(model.tpm)} tpm")
    parts.append(f"{model.in_flight} in flight")
    parts.append(f"{model.rate_limited} 429s")
    if model.paused_for > 0:
        parts.append(f"paused {model.paused_for:.1f} s")
    return f"{model.model}: {', '.join(parts)}"


def usage_line(total: Usage) -> str:
    """``LM usage: 12 requests, 3,400 tokens (3,000 prompt), $0.001200, 0 429s``."""
    return (
        f"LM usage: {total.requests:,} requests, {total.total_tokens:,} tokens "
        f"({total.prompt_tokens:,} prompt), {cost_text(total.cost)}, {total.rate_limited} 429s"
    )


def budget_text(budget: BudgetSnapshot) -> str:
    """``budget: $0.012000 of $5.00 spent`` (and tokens), or '' when no budget is set."""
    parts = []
    if budget.max_cost is not None:
        parts.append(f"{cost_text(budget.spent_cost)} of {cost_text(budget.max_cost)}")
    if budget.max_tokens is not None:
        parts.append(f"{budget.spent_tokens:,} of {budget.max_tokens:,} tokens")
    if not parts:
        return ""
    text = f"budget: {' and '.join(parts)} spent"
    return text + " (exhausted: LM requests fail at once)" if budget.exhausted else text


# ------------------------------------------------------------------------- prices

_prices: dict[str, Any] | None = None
_prices_lock = threading.Lock()
# OpenAI-compatible gateways: any model name is valid behind them.
_OPEN_PROVIDERS = frozenset(
    {"openai", "custom_openai", "hosted_vllm", "ollama", "ollama_chat", "lm_studio"}
    | {"litellm_proxy", "openrouter", "together_ai", "azure", "text-completion-openai"}
)


def price_table() -> dict[str, Any]:
    """LiteLLM's local cost map (empty when litellm is not installed)."""
    global _prices
    with _prices_lock:
        if _prices is None:
            spec = importlib.util.find_spec("litellm")
            table: dict[str, Any] = {}
            if spec is not None and spec.origin is not None:
                path = Path(spec.origin).parent / "model_prices_and_context_window_backup.json"
                try:
                    table = json.loads(path.read_text())
                except (OSError, ValueError):
                    table = {}
            table.pop("sample_spec", None)
            _prices = table
        return _prices


def known_providers() -> frozenset[str]:
    """Provider prefixes LiteLLM's cost map names, plus the OpenAI-compatible ones."""
    providers = set(_OPEN_PROVIDERS)
    for key, entry in price_table().items():
        if isinstance(entry, dict) and isinstance(entry.get("litellm_provider"), str):
            providers.add(entry["litellm_provider"])
        if "/" in key:
            providers.add(key.split("/", 1)[0])
    return frozenset(providers)


def _entry(model: str) -> dict[str, Any] | None:
    table = price_table()
    for name in (model, model.split("/", 1)[1] if "/" in model else None):
        entry = table.get(name) if name else None
        if isinstance(entry, dict) and "input_cost_per_token" in entry:
            return entry
    return None


def price_of(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """Dollars for one request from LiteLLM's local cost map, or None if not priced."""
    entry = _entry(model)
    if entry is None:
        return None
    try:
        return prompt_tokens * float(entry["input_cost_per_token"]) + completion_tokens * float(
            entry.get("output_cost_per_token", 0.0)
        )
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------- ledger


def _default_labels(call_id: int | None, program: str | None) -> tuple[str | None, str | None]:
    return program, None


class Ledger:
    """Thread-safe totals of the pool's LM requests, by program, session and model."""

    def __init__(self, labels: Labels | None = None) -> None:
        self._lock = threading.Lock()
        self.labels: Labels = labels or _default_labels
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._total = Usage()
            self._by_program: dict[str | None, Usage] = {}
            self._by_session: dict[str | None, Usage] = {}
            self._by_model: dict[str, Usage] = {}

    def _rows(self, model: str, call_id: int | None, program: str | None) -> list[Usage]:
        try:
            program, session = self.labels(call_id, program)
        except Exception:
            session = None  # a failing hook must not lose the request's usage
        return [
            self._total,
            self._by_program.setdefault(program, Usage()),
            self._by_session.setdefault(session, Usage()),
            self._by_model.setdefault(model, Usage()),
        ]

    def record(
        self,
        model: str,
        call_id: int | None,
        program: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cost: float | None,
    ) -> None:
        """One answered request."""
        with self._lock:
            for row in self._rows(model, call_id, program):
                row.record(prompt_tokens, completion_tokens, cost)

    def record_refusal(self, model: str, call_id: int | None, program: str | None) -> None:
        """One 429."""
        with self._lock:
            for row in self._rows(model, call_id, program):
                row.rate_limited += 1

    def spent(self) -> tuple[float, int]:
        """``(dollars, tokens)`` spent so far."""
        with self._lock:
            return self._total.priced_cost, self._total.total_tokens

    def report(self) -> UsageReport:
        with self._lock:
            return UsageReport(
                total=self._total.copy(),
                by_program={k: v.copy() for k, v in self._by_program.items()},
                by_session={k: v.copy() for k, v in self._by_session.items()},
                by_model={k: v.copy() for k, v in self._by_model.items()},
            )
