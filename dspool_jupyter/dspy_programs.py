"""DSPy programs in the pool (the ``dspy`` extra): signature programs and one LM for all.

Program kinds, each stored *by value* so that every worker (a replacement, a worker of a
later pool on the same store) builds it from the store alone:

- **Signature programs** (kind ``'signature'``): a declarative spec, a plain dict
  (signature text, module ``Predict`` or ``ChainOfThought``, instructions, demos, module
  config) made by :func:`signature_spec`. ``pool.define_signature("qa", "question ->
  answer", module="ChainOfThought")`` or a ``%%dspool signature qa`` cell whose body is
  the signature line plus optional instruction lines (:func:`parse_signature_cell`).
  Typed fields are allowed (``question: str, k: int -> answers: list[str]``) with the
  types DSPy resolves by itself (builtins, ``typing``); a custom type needs a
  ``%%dspool program`` cell that defines it.
- **Module programs**: a ``%%dspool program`` cell (kind ``'source'``) whose entry is a
  ``dspy.Module`` subclass. Each worker instantiates it once, with no arguments, and
  calls the instance (:func:`build_module_program`, registered with
  :mod:`dspool_jupyter.programs` as an entry wrapper). Any other callable in such a cell
  (a function that uses a module, a module instance) is called as it is.

Inputs are checked before any LM call: a signature program takes its input fields as
keywords (or positionally, in the signature's order) and a missing or unknown field is a
``TypeError`` naming the field and the program; a module program's inputs are bound to
its ``forward`` first. DSPy itself only logs a warning and calls the LM anyway. A signature
program returns the ``dspy.Prediction``, as the same module would in the notebook.

**One LM for every worker.** :func:`configure_lm` (``pool.configure_lm``, ``%dspool lm``)
stores the configuration with the pool as a worker set-up (``Pool.set_worker_setup``):
every ready worker applies it at once and every later worker (a replacement for a dead
one, a restart) applies it before its first call. Model names:

- ``"dummy"``: DSPy's offline ``DummyLM``, what the examples and tests use. Pass
  ``answers={substring: {field: value}}`` (dict form: the first key found in the
  prompt's last message answers, so it is deterministic in every process; ``""``
  matches every prompt) or a list of answers (each worker then replies from its own
  copy of the list, in order: prefer the dict form).
- anything else is ``dspy.LM(model, **kwargs)``, e.g. ``configure_lm("openai/gpt-4o-mini",
  temperature=0)``. It needs a key and network; put the key in the environment before
  the pool starts (``OPENAI_API_KEY``: workers inherit the kernel's environment at start)
  or pass ``api_key=...`` (held in the kernel's memory, never written to the store).
- an LM object (any ``dspy.BaseLM``) is sent to the workers by value (cloudpickle).

``max_history_size`` (default :data:`DEFAULT_MAX_HISTORY`, 0 keeps none) bounds the LM
call history that DSPy keeps in a long-lived worker: per LM, per module and globally
(DSPy's own default is 10,000 entries of each, prompts and responses included).

**Preloading dspy is the user's choice** (``Pool(preload=["dspy"])``, ``%dspool start
--preload dspy``). On the 2-core machine this was built on, ``import dspy`` takes 0.6 to
1.4 s and about 80 MB (a full second of it is jsonschema building the RFC 3987 grammar
when Jupyter's ``rfc3987-syntax`` is installed), while a plain pool has 8 workers ready in
0.2 s. Preloading whenever dspy is importable would make every plain pool several times
slower to start, so the template imports it only when asked; workers forked from that
template have it for free (``bench/dspy_startup.py`` measures this). A pool that was not
asked still runs DSPy programs: each worker imports dspy on first use (the LM set-up or
its first DSPy call), paying the import once per worker, unshared.

litellm must never fetch its model price map from the network: importing this module
sets ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (unless set) before anything imports dspy.
"""

from __future__ import annotations

import ast
import concurrent.futures
import difflib
import inspect
import logging
import os
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from . import programs
from .errors import DspoolError, InvalidProgram
from .store import _PARSE_LOCK, ProgramSpec

if TYPE_CHECKING:
    from .store import ProgramStore


class SupportsWorkerSetup(Protocol):
    """What this module needs of a pool (the facade in :mod:`.pool` has it all)."""

    store: ProgramStore
    preload: list[str]

    def set_worker_setup(self, key: str, program: Any, *args: Any, **kwargs: Any) -> None: ...


# Before dspy (and litellm, which it may import) is imported anywhere in this process.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__all__ = [
    "DEFAULT_MAX_HISTORY",
    "DUMMY_MODEL",
    "LM_SETUP_KEY",
    "MODULES",
    "ModuleProgram",
    "SignatureProgram",
    "apply_lm",
    "bind_inputs",
    "build_module_program",
    "build_signature_program",
    "configure_lm",
    "current_lm",
    "define_signature",
    "lm_config",
    "parse_signature_cell",
    "signature_spec",
]

log = logging.getLogger(__name__)

LM_SETUP_KEY = "dspy.lm"  # the pool's worker set-up that carries the LM configuration
DUMMY_MODEL = "dummy"  # the model name that means DSPy's offline DummyLM
DEFAULT_MAX_HISTORY = 100  # LM calls kept per history (per LM, per module, global)
MODULES = ("Predict", "ChainOfThought")
SPEC_FORMAT = 1
PASS_THROUGH = ("config",)  # per-call keywords DSPy modules take besides the inputs
_DUMMY_OPTIONS = ("answers", "follow_examples", "reasoning")
_SECRET_WORDS = ("key", "token", "secret", "password")
_INSTALL_HINT = "DSPy programs need the dspy extra: pip install 'dspool-jupyter[dspy]'"


def _import_dspy() -> Any:
    try:
        import dspy
    except ImportError as exc:
        raise DspoolError(f"{_INSTALL_HINT} ({exc})") from exc
    return dspy


# ----------------------------------------------------------------- signature specs


def _field_names(part: str, where: str) -> list[str]:
    """Names of a comma-separated field list such as ``question: str, k: int``."""
    if not part.strip():
        return []
    try:
        with _PARSE_LOCK:  # see store.py: threads must not parse at once on 3.11 < 3.11.8
            tree = ast.parse(f"def f({part}): pass")
    except SyntaxError as exc:
        raise InvalidProgram(f"{where} {part.strip()!r} is not a list of fields") from exc
    function = tree.body[0]
    assert isinstance(function, ast.FunctionDef)
    args = function.args
    if args.vararg or args.kwarg or args.kwonlyargs or args.defaults or args.posonlyargs:
        raise InvalidProgram(f"{where} {part.strip()!r} is not a list of fields")
    return [arg.arg for arg in args.args]


def _split_signature(signature: str) -> tuple[list[str], list[str]]:
    """Input and output field names of ``signature`` (no dspy needed)."""
    if signature.count("->") != 1:
        raise InvalidProgram(
            f"signature {signature!r} must have exactly one '->', as in 'question -> answer'"
        )
    left, right = signature.split("->")
    inputs = _field_names(left, "inputs")
    outputs = _field_names(right, "outputs")
    if not outputs:
        raise InvalidProgram(f"signature {signature!r} has no output field after '->'")
    both = sorted(set(inputs) & set(outputs))
    if both:
        raise InvalidProgram(f"signature {signature!r}: {both[0]!r} is both an input and an output")
    return inputs, outputs


def _is_signature_line(line: str) -> bool:
    try:
        _split_signature(line)
    except InvalidProgram:
        return False
    return True


def parse_signature_cell(text: str) -> tuple[str, str | None]:
    """Split a ``%%dspool signature`` cell body into ``(signature, instructions)``.

    The signature is the one line of the form ``inputs -> outputs``; every other
    non-blank line (``#`` comments aside) is the instructions, in order. Raises
    :class:`InvalidProgram` when there is no such line, or more than one.
    """
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    found = [line for line in lines if "->" in line and _is_signature_line(line)]
    if not found:
        arrows = [line for line in lines if "->" in line]
        if len(arrows) == 1:
            _split_signature(arrows[0])  # raises the precise reason
        raise InvalidProgram(
            "a signature cell needs one line 'inputs -> outputs', e.g. 'question -> answer'"
        )
    if len(found) > 1:
        raise InvalidProgram(
            f"a signature cell has one signature line; found {len(found)}: "
            + "; ".join(repr(line) for line in found)
        )
    instructions = "\n".join(line for line in lines if line != found[0])
    return found[0], instructions or None


def _check_plain(value: Any, what: str) -> None:
    """Specs are stored by value: only plain data (what JSON could hold, plus tuples)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, what)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidProgram(f"{what}: keys must be text, got {key!r}")
            _check_plain(item, what)
        return
    raise InvalidProgram(f"{what} must be plain data (text, numbers, lists, dicts), got {value!r}")


def _module_name(module: str) -> str:
    for name in MODULES:
        if isinstance(module, str) and module.lower() == name.lower():
            return name
    raise InvalidProgram(f"unknown DSPy module {module!r}; choose one of: {', '.join(MODULES)}")


def signature_spec(
    signature: str,
    module: str = "Predict",
    *,
    instructions: str | None = None,
    demos: Sequence[Mapping[str, Any]] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """The declarative spec of a signature program, checked, as it is stored.

    ``signature`` is ``"inputs -> outputs"`` (or a whole signature cell: instruction lines
    and the signature line). ``demos`` are few-shot examples, dicts of field values.
    ``config`` goes to the module's constructor (e.g. ``temperature``, ``n``). A bad
    signature, an unknown module or field, or a value that is not plain data raises
    :class:`InvalidProgram` here, in the kernel, before anything is stored.
    """
    if not isinstance(signature, str):
        raise InvalidProgram(f"a signature must be text, got {type(signature).__name__}")
    text = signature.strip()
    if "\n" in text:
        text, cell_instructions = parse_signature_cell(text)
        if instructions is None:
            instructions = cell_instructions
        elif cell_instructions:
            raise InvalidProgram("instructions given twice: in the signature text and as an option")
    inputs, outputs = _split_signature(text)
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidProgram(f"instructions must be text, got {type(instructions).__name__}")
    if instructions is not None:
        instructions = instructions.strip() or None
    demo_list = [dict(demo) for demo in demos or ()]
    fields = set(inputs) | set(outputs)
    for demo in demo_list:
        unknown = sorted(set(demo) - fields)
        if unknown:
            raise InvalidProgram(
                f"demo field {unknown[0]!r} is not in the signature ({', '.join(sorted(fields))})"
            )
    _check_plain(demo_list, "demos")
    _check_plain(config, "module options")
    spec = {
        "format": SPEC_FORMAT,
        "signature": text,
        "module": _module_name(module),
        "instructions": instructions,
        "inputs": inputs,
        "outputs": outputs,
        "demos": demo_list,
        "config": dict(config),
    }
    # The types and the module options are checked by the code the workers run.
    dspy = _import_dspy()
    try:
        with _PARSE_LOCK:  # DSPy parses the signature with ast too
            _build_module(dspy, spec)
    except Exception as exc:
        raise InvalidProgram(f"signature {text!r}: {type(exc).__name__}: {exc}") from exc
    return spec


def define_signature(
    pool: SupportsWorkerSetup,
    name: str,
    signature: str,
    *,
    module: str = "Predict",
    session: str | None = None,
    instructions: str | None = None,
    demos: Sequence[Mapping[str, Any]] | None = None,
    **config: Any,
) -> str:
    """Store a signature program as ``name`` in ``pool``'s store; returns its id.

    See :func:`signature_spec` for the arguments. Every worker sees it at once.
    """
    spec = signature_spec(signature, module, instructions=instructions, demos=demos, **config)
    return pool.store.put(name, spec, kind="signature", session=session).id


def _make_signature(dspy: Any, text: str, instructions: str | None) -> Any:
    # custom_types={} stops DSPy from searching the caller's frames for type names: a
    # spec must mean the same in the kernel and in every worker.
    return dspy.Signature(text, instructions, custom_types={})


def _build_module(dspy: Any, spec: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(module, signature)`` for a spec: what the kernel checks and the worker runs."""
    signature = _make_signature(dspy, spec["signature"], spec.get("instructions"))
    module = getattr(dspy, spec["module"])(signature, **spec.get("config", {}))
    demos = spec.get("demos") or []
    if demos:
        for predictor in module.predictors():
            predictor.demos = [dspy.Example(**demo) for demo in demos]
    return module, signature


# ------------------------------------------------------------------ worker side


def bind_inputs(
    program: str, fields: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Map a call's arguments onto the input ``fields``; ``TypeError`` naming the field.

    Positional values fill the fields in order; keywords name them.
    """
    listing = ", ".join(fields) or "none"
    if len(args) > len(fields):
        raise TypeError(
            f"program {program!r} takes {len(fields)} input field(s) ({listing}) "
            f"but {len(args)} positional values were given"
        )
    inputs = dict(zip(fields, args, strict=False))
    unknown = []
    for key, value in kwargs.items():
        if key in inputs:
            raise TypeError(f"program {program!r} got two values for input field {key!r}")
        if key not in fields:
            unknown.append(key)
        inputs[key] = value
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, 1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        names = ", ".join(repr(k) for k in unknown)
        raise TypeError(
            f"program {program!r} has no input field {names} (its inputs: {listing}){hint}"
        )
    missing = [f for f in fields if f not in inputs]
    if missing:
        names = ", ".join(repr(f) for f in missing)
        plural = "s" if len(missing) > 1 else ""
        raise TypeError(
            f"program {program!r} is missing input field{plural} {names} (its inputs: {listing})"
        )
    return inputs


_history_limit = DEFAULT_MAX_HISTORY  # set by apply_lm, read after each call


def _trim_histories(dspy: Any, module: Any) -> None:
    """Keep the newest ``_history_limit`` LM calls in every history this call grew.

    DSPy >= 3.4 bounds them itself once ``max_history_size`` is configured; this keeps
    the bound with older versions and with an LM the program brought along.
    """
    limit = _history_limit
    histories: list[Any] = [getattr(dspy.settings, "lm", None), module]
    try:
        histories.extend(module.predictors())
        histories.extend(p.lm for p in module.predictors() if getattr(p, "lm", None) is not None)
    except Exception:
        pass
    base_lm = sys.modules.get("dspy.clients.base_lm")
    lists = [getattr(owner, "history", None) for owner in histories]
    lists.append(getattr(base_lm, "GLOBAL_HISTORY", None))
    for history in lists:
        if isinstance(history, list) and len(history) > limit:
            del history[: len(history) - limit]


def _require_lm(dspy: Any, program: str) -> None:
    if getattr(dspy.settings, "lm", None) is None:
        raise RuntimeError(
            f"program {program!r} needs a language model and none is configured in this "
            "worker: call pool.configure_lm(...) or %dspool lm MODEL (e.g. 'dummy' offline)"
        )


class SignatureProgram:
    """What a worker runs for a signature spec: the DSPy module, built once."""

    def __init__(self, name: str, spec: Mapping[str, Any]) -> None:
        if spec.get("format") != SPEC_FORMAT:
            raise DspoolError(
                f"program {name!r} was stored by a dspool_jupyter whose signature format "
                f"({spec.get('format')!r}) this one does not read; define it again"
            )
        self._dspy = _import_dspy()
        self.name = name
        self.spec = dict(spec)
        self.module, self.signature = _build_module(self._dspy, spec)
        self.inputs = tuple(self.signature.input_fields)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        extra = {k: kwargs.pop(k) for k in PASS_THROUGH if k in kwargs and k not in self.inputs}
        inputs = bind_inputs(self.name, self.inputs, args, kwargs)
        _require_lm(self._dspy, self.name)
        try:
            return self.module(**inputs, **extra)
        finally:
            _trim_histories(self._dspy, self.module)

    def __repr__(self) -> str:
        spec = self.spec
        return f"<SignatureProgram {self.name!r}: {spec['module']}({spec['signature']!r})>"


class ModuleProgram:
    """What a worker runs for a ``dspy.Module`` class entry: one instance, called."""

    def __init__(self, name: str, module: Any) -> None:
        self._dspy = _import_dspy()
        self.name = name
        self.module = module
        self._signature: inspect.Signature | None = None
        forward = getattr(type(module), "forward", None)  # the class's: dspy warns otherwise
        if forward is not None:
            try:
                parameters = list(inspect.signature(forward).parameters.values())[1:]
            except (TypeError, ValueError):
                pass
            else:
                self._signature = inspect.Signature(parameters)

    def _check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._signature is None:
            return
        parameters = self._signature.parameters
        inputs = ", ".join(parameters) or "none"
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            unknown = [key for key in kwargs if key not in parameters]
            if unknown:
                close = difflib.get_close_matches(unknown[0], list(parameters), 1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                names = ", ".join(repr(k) for k in unknown)
                raise TypeError(
                    f"program {self.name!r} has no input field {names} (its inputs: {inputs}){hint}"
                )
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"program {self.name!r}: {exc} (its inputs: {inputs})") from None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check(args, kwargs)
        try:
            return self.module(*args, **kwargs)
        finally:
            _trim_histories(self._dspy, self.module)

    def __repr__(self) -> str:
        return f"<ModuleProgram {self.name!r}: {type(self.module).__name__}>"


def build_signature_program(spec: ProgramSpec) -> SignatureProgram:
    """Build the callable for a stored signature spec (in the worker)."""
    if not isinstance(spec.payload, dict):
        raise DspoolError(f"program {spec.name!r}: its signature spec is not a dict")
    return SignatureProgram(spec.name, spec.payload)


def build_module_program(spec: ProgramSpec, cls: type) -> ModuleProgram:
    """Instantiate a ``dspy.Module`` subclass entry once (no arguments) for the worker."""
    try:
        module = cls()
    except TypeError as exc:
        raise TypeError(
            f"program {spec.name!r}: the worker builds {cls.__name__} once with no "
            f"arguments, and that failed ({exc}); give __init__'s parameters defaults"
        ) from exc
    return ModuleProgram(spec.name, module)


# ------------------------------------------------------------------------ the LM


def lm_config(model: Any, **kwargs: Any) -> dict[str, Any]:
    """Check an LM configuration and return it as the workers receive it.

    ``model`` is :data:`DUMMY_MODEL` (``answers=`` required), a model name for
    ``dspy.LM`` or an LM object; ``max_history_size`` bounds the histories.
    """
    history = kwargs.pop("max_history_size", DEFAULT_MAX_HISTORY)
    if not isinstance(history, int) or isinstance(history, bool) or history < 0:
        raise ValueError(f"max_history_size must be a whole number >= 0, got {history!r}")
    if not isinstance(model, str):
        if kwargs:
            raise ValueError("options go to the LM object's constructor, not to configure_lm")
        if not callable(getattr(model, "forward", None)) and not callable(model):
            raise TypeError(f"configure_lm needs a model name or an LM object, got {model!r}")
        return {"model": None, "lm": model, "kwargs": {}, "max_history_size": history}
    model = model.strip()
    if not model:
        raise ValueError("configure_lm needs a model name, e.g. 'dummy' or 'openai/gpt-4o-mini'")
    if model == DUMMY_MODEL:
        unknown = sorted(set(kwargs) - set(_DUMMY_OPTIONS))
        if unknown:
            raise ValueError(
                f"the dummy LM takes {', '.join(_DUMMY_OPTIONS)}; not {', '.join(unknown)}"
            )
        answers = kwargs.get("answers")
        if isinstance(answers, dict):
            bad = [k for k, v in answers.items() if not isinstance(k, str) or not _is_fields(v)]
        elif isinstance(answers, (list, tuple)):
            bad = [v for v in answers if not _is_fields(v)]
            kwargs["answers"] = list(answers)
        else:
            raise ValueError(
                "the dummy LM needs answers: a dict {text in the prompt: {field: value}}, "
                "e.g. answers={'': {'answer': '42'}} ('' matches every prompt)"
            )
        if bad:
            raise ValueError(
                f"dummy answers must map text to {{field: value}} dicts; bad entry: {bad[0]!r}"
            )
    return {"model": model, "lm": None, "kwargs": dict(kwargs), "max_history_size": history}


def _is_fields(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def _build_lm(dspy: Any, config: Mapping[str, Any]) -> Any:
    if config.get("lm") is not None:
        return config["lm"]
    if config["model"] == DUMMY_MODEL:
        from dspy.utils import DummyLM

        return DummyLM(**config["kwargs"])
    return dspy.LM(config["model"], **config["kwargs"])


def apply_lm(config: dict[str, Any]) -> None:
    """The worker set-up: build the LM, make it DSPy's default, bound the histories.

    Safe from any thread and when applied again: see :func:`_configure`.
    """
    global _history_limit
    dspy = _import_dspy()
    lm = _build_lm(dspy, config)
    limit = int(config.get("max_history_size", DEFAULT_MAX_HISTORY))
    if limit == 0:
        _configure(dspy, {"lm": lm, "disable_history": True})
    else:
        _configure(dspy, {"lm": lm, "disable_history": False, "max_history_size": limit})
    base_lm: Any = sys.modules.get("dspy.clients.base_lm")
    if base_lm is not None and hasattr(base_lm, "MAX_HISTORY_SIZE"):
        base_lm.MAX_HISTORY_SIZE = max(1, limit)  # the global history's bound
    _history_limit = limit


_owner_lock = threading.Lock()
_owner: list[concurrent.futures.ThreadPoolExecutor] = []


def _configure(dspy: Any, settings: dict[str, Any]) -> None:
    """``dspy.configure(**settings)`` from whichever thread a worker set-up runs on.

    DSPy lets only the thread that first called ``dspy.configure`` call it again. A
    worker of concurrency 1 runs set-ups on its main thread, which configures DSPy
    itself (as a program on that thread may too). A worker of concurrency > 1 runs them
    on any of its call threads, so they are handed to one long-lived thread of this
    module, always the same. If another thread owns the configuration anyway (a
    program called ``dspy.configure`` on a call thread), the defaults are written where
    ``dspy.configure`` writes them, under DSPy's settings lock. Calls on every thread
    then see the LM (DSPy's global defaults); ``dspy.context`` overrides still win.
    """

    def configure() -> None:
        try:
            dspy.configure(**settings)
        except RuntimeError:
            holder = sys.modules["dspy.dsp.utils.settings"]
            with dspy.settings.lock:
                holder.main_thread_config.update(settings)

    if threading.current_thread() is threading.main_thread():
        configure()
        return
    with _owner_lock:
        if not _owner:
            _owner.append(
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dspool-dspy-config")
            )
        owner = _owner[0]
    owner.submit(configure).result()


_pool_lms: weakref.WeakKeyDictionary[SupportsWorkerSetup, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def configure_lm(pool: SupportsWorkerSetup, model: Any, **kwargs: Any) -> None:
    """Make ``model`` DSPy's LM in every worker of ``pool``, now and in later workers.

    Blocks until every ready worker applied it; a failure in a worker raises
    :class:`ProgramError`. See :func:`lm_config` for the arguments.
    """
    config = lm_config(model, **kwargs)
    if "dspy" not in pool.preload:
        log.info(
            "dspool: this pool does not preload dspy, so each worker imports it itself "
            "(about 1 s each); start the pool with preload=['dspy'] for fast DSPy workers"
        )
    pool.set_worker_setup(LM_SETUP_KEY, apply_lm, config)
    _pool_lms[pool] = config


def current_lm(pool: SupportsWorkerSetup) -> dict[str, Any] | None:
    """The LM configuration ``pool``'s workers use (secrets masked), or None."""
    config = _pool_lms.get(pool)
    if config is None:
        return None
    shown = {
        key: "***" if any(word in key.lower() for word in _SECRET_WORDS) else value
        for key, value in config["kwargs"].items()
    }
    model = config["model"] if config["lm"] is None else repr(config["lm"])
    return {"model": model, **shown, "max_history_size": config["max_history_size"]}


def _module_entry(spec: ProgramSpec, entry: Any) -> ModuleProgram | None:
    """A source program whose entry is a ``dspy.Module`` class runs one instance of it."""
    if isinstance(entry, type) and programs.is_dspy_module(entry):
        return build_module_program(spec, entry)
    return None


programs.register_kind("signature", build_signature_program)
programs.wrap_entry(_module_entry)
