"""Render a model's own Jinja chat template with bounds: sandboxed, in a time budget, within a size.

A chat template comes with the model folder (``tokenizer_config.json``'s ``chat_template`` or
``chat_template.jinja``; a GGUF file's ``tokenizer.chat_template``): it is code written by whoever
made the folder. Transformers renders it in Jinja's immutable sandbox, which blocks Python's
internals (``''.__class__``) but lets a template loop ``range(99999)`` inside ``range(99999)``,
build a string of 2**40 characters by doubling, or compute ``9**9**9``; rendering then never ends,
or takes all memory.

Here the same environment as ``apply_chat_template`` (trim_blocks, lstrip_blocks, loop controls,
``{% generation %}``, ``tojson``, ``raise_exception``, ``strftime_now``) gets bounds:

* a wall-clock budget per render (:data:`RENDER_SECONDS`): in the main thread a SIGALRM timer
  (:func:`llama_pipe.core.budget.within_budget`, which puts back a timer someone else set)
  interrupts the template wherever it is; in another thread (serve's handlers) every line the
  compiled template executes checks the deadline (a trace function on the template's own frames,
  five times slower, so only there); everywhere every call, operator, filter and piece of output
  checks it too;
* sizes: every value an operator, a call or a filter makes, every ``~`` and every piece of output
  is measured before it grows further; the limit is :data:`MIN_LIMIT` characters or
  :data:`GROWTH` times the conversation's own text, whichever is larger;
* no C-level operation that could run unbounded: ``**`` with a big exponent, ``*`` that would
  repeat past the size limit, an integer argument beyond :data:`MAX_INT_ARG` to a filter or a
  method (``center(10**9)``), a format string with a huge width; ``lipsum`` is not offered;
* a source of at most :data:`MAX_SOURCE` characters.

What breaks a bound raises :class:`TemplateLimit`; the sandbox's own refusal is Jinja's
``SecurityError``. :class:`~llama_pipe.chat_template.model.ModelTemplate` turns both into an
:class:`~llama_pipe.core.errors.InputError` naming the file the template came from.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any

RENDER_SECONDS = 3.0
MAX_SOURCE = 256 * 1024
MIN_LIMIT = 1024 * 1024
GROWTH = 16
MAX_INT_ARG = 100_000
MAX_POW_BITS = 4096
_HUGE_WIDTH = re.compile(r"\d{6,}")


class TemplateLimit(Exception):
    """A chat template went past a bound (time, size, an argument); the message says which."""


class Refused(Exception):
    """The template's own ``raise_exception(message)``: it refuses this conversation."""


class _Budget(threading.local):
    deadline: float | None = None
    limit: int = MIN_LIMIT


_budget = _Budget()


def _tick() -> None:
    deadline = _budget.deadline
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimit(_slow())


def _slow() -> str:
    return f"rendering took longer than {RENDER_SECONDS:g} s (a loop that does not end, or one far too long)"


def _size(obj: Any, limit: int) -> int:
    """Characters plus elements of ``obj`` with nested lists, tuples and dicts expanded (shared
    parts counted each time, as ``str`` would write them); stops counting past ``limit``."""
    total, stack, steps = 0, [obj], 0
    while stack and total <= limit:
        o = stack.pop()
        total += 1
        steps += 1
        if not steps & 0xFFFF:
            _tick()
        if isinstance(o, str):
            total += len(o)
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
    return total


def _check_size(obj: Any, what: str) -> Any:
    limit = _budget.limit
    if _size(obj, limit) > limit:
        raise TemplateLimit(f"{what} would exceed {limit:,} characters")
    return obj


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any], what: str) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT_ARG:
            raise TemplateLimit(f"{what} was given the integer {v!r:.30}, beyond {MAX_INT_ARG:,}")
        if isinstance(v, str) and len(v) > _budget.limit:
            raise TemplateLimit(f"{what} was given a string beyond {_budget.limit:,} characters")


def _check_format(fmt: Any, what: str) -> None:
    if isinstance(fmt, str) and _HUGE_WIDTH.search(fmt):
        raise TemplateLimit(f"{what}: a format string with a width or precision of six digits or more")


def _repeat_ok(seq: Any, n: Any) -> None:
    if isinstance(n, int) and isinstance(seq, (str, list, tuple)):
        if n > 0 and _size(seq, _budget.limit) * n > _budget.limit:
            raise TemplateLimit(f"'*' would make a value beyond {_budget.limit:,} characters")


def _line_tracer(frame: Any, event: str, arg: Any) -> Any:
    _tick()
    return _line_tracer


def _tracer(frame: Any, event: str, arg: Any) -> Any:
    """Trace the compiled template's own frames (file ``<template>``) line by line; nothing else."""
    if frame.f_code.co_filename == "<template>":
        _tick()
        return _line_tracer
    return None


def _guarded(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A filter or test that checks the deadline, its arguments (beyond the value) and its result.
    ``wraps`` keeps Jinja's ``jinja_pass_arg`` marker, so context-taking filters still get it."""

    skip = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0  # the context, eval context or environment

    @wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        values = args[skip:]
        if name == "format" and values:
            _check_format(values[0], "the format filter")
        _check_args(tuple(values[1:]), kwargs, f"the {name} filter")
        if name in ("join", "sum", "string", "tojson", "pprint") and values:
            _check_size(values[0], f"the {name} filter's input")
        return _check_size(fn(*args, **kwargs), f"the {name} filter's result")

    return guarded


def _raise_exception(message: Any) -> None:
    raise Refused(str(message))


def _strftime_now(fmt: Any) -> str:
    return datetime.now().strftime(str(fmt))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _SafeDict:
    """``dict(...)`` in a template: builds a plain dict; offers nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag): the body as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class SafeNamespace(Namespace):
        """``namespace(...)``: no attribute that starts with an underscore."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's own signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a chat template may not set the namespace attribute {name!r}")

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})
        concat = staticmethod(_concat)  # {% set %} blocks and macro bodies

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _tick()
            if operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 \
                        and abs(left).bit_length() * right > MAX_POW_BITS:
                    raise TemplateLimit(f"'**' would make an integer of more than {MAX_POW_BITS} bits")
            elif operator == "*":
                _repeat_ok(left, right)
                _repeat_ok(right, left)
            elif operator == "+" and isinstance(left, (str, list, tuple)):
                if _size(left, _budget.limit) + _size(right, _budget.limit) > _budget.limit:
                    raise TemplateLimit(f"'+' would make a value beyond {_budget.limit:,} characters")
            elif operator == "%" and isinstance(left, str):
                _check_format(left, "'%' formatting")
                _check_args(right if isinstance(right, tuple) else (right,), {}, "'%' formatting")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805, B902
            _tick()
            _check_args(args, kwargs, f"the call of {getattr(__obj, '__name__', type(__obj).__name__)}")
            return _check_size(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def getattr(self, obj: Any, attribute: str) -> Any:
            _tick()
            if attribute in ("format", "format_map"):
                _check_format(obj, "str.format")
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _tick()
            return super().getitem(obj, argument)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded(fn, name) for name, fn in env.filters.items()}
    env.globals.pop("lipsum", None)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = SafeNamespace
    env.finalize = lambda value: _check_size(value, "a value written out")
    return env


def _concat(pieces: Any) -> str:
    return _check_size("".join(_check_size(list(pieces), "a {% set %} block or macro")), "a {% set %} block or macro")


def _str_join(seq: Any) -> str:
    """Jinja's ``~`` (``str_join``), measuring what it joins first."""
    items = list(seq)
    _check_size(items, "'~'")
    return _check_size("".join(map(str, items)), "'~'")


def compile_template(source: str) -> Any:
    """The compiled template (cached per source). Raises :class:`TemplateLimit` for a source over
    :data:`MAX_SOURCE` characters; Jinja's ``TemplateSyntaxError`` (and ``RecursionError``) as they come."""
    if len(source) > MAX_SOURCE:
        raise TemplateLimit(f"the template has {len(source):,} characters; more than {MAX_SOURCE:,} is not a chat template")
    return _compile(source)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    with _bounded(MIN_LIMIT):  # Jinja folds constant expressions while compiling: the same bounds
        template = _environment().from_string(source)
    template.root_render_func.__globals__["str_join"] = _str_join
    return template


class _bounded:
    """The budget (deadline, size limit) and, with ``trace``, the line tracer, for the current thread."""

    def __init__(self, limit: int, trace: bool = False) -> None:
        self.limit = limit
        self.trace = trace

    def __enter__(self) -> None:
        self.saved = (_budget.deadline, _budget.limit, sys.gettrace())
        _budget.deadline = time.monotonic() + RENDER_SECONDS
        _budget.limit = self.limit
        if self.trace:
            sys.settrace(_tracer)

    def __exit__(self, *exc: object) -> None:
        _budget.deadline, _budget.limit, trace = self.saved
        if self.trace:
            sys.settrace(trace)


def render(source: str, input_chars: int, **context: Any) -> str:
    """``source`` rendered with ``context`` within the bounds (the size limit scales with
    ``input_chars``, the conversation's own text). Raises :class:`TemplateLimit`, :class:`Refused`
    (``raise_exception``), Jinja's ``SecurityError`` and other ``TemplateError``, or what the template's
    operations raise (``TypeError``, ``RecursionError``, ``MemoryError``, ...)."""
    from llama_pipe.core.budget import TooSlow, _can_alarm, within_budget

    template = compile_template(source)
    limit = max(MIN_LIMIT, GROWTH * input_chars)

    def generate() -> str:
        pieces: list[str] = []
        written = 0
        for piece in template.generate(**context):
            written += len(piece)
            if written > limit:
                raise TemplateLimit(f"the rendered text would exceed {limit:,} characters")
            pieces.append(piece)
            _tick()
        return "".join(pieces)

    alarm = _can_alarm()
    with _bounded(limit, trace=not alarm):
        if not alarm:
            return generate()
        try:
            return within_budget(RENDER_SECONDS + 0.05, generate)
        except TooSlow:
            raise TemplateLimit(_slow()) from None
