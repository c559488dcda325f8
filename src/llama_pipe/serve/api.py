"""The chat-completions request: validation of an OpenAI-style body into what generation needs.

Every fault is an :class:`ApiError` (an HTTP status and the OpenAI error fields naming the
``param``), raised before any response header is sent, so a streaming request is refused with a
plain 4xx, never a 200 followed by an in-band error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_pipe.config import ServeSettings
from llama_pipe.models.generation import ChatModel, SamplingParams

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


class ApiError(Exception):
    """A request error: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}  # e.g. Retry-After on a 503, Allow on a 405

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number", key)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        raise ApiError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _text(value: str, param: str) -> str:
    """``value`` if it is encodable text: JSON's ``\\ud800`` escapes decode to lone surrogates, which
    no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{param} holds a lone surrogate (U+{ord(value[exc.start]):04X} at {exc.start}): not valid Unicode text", param) from None
    return value


def _content(msg: dict[str, Any], i: int) -> str:
    content = msg.get("content")
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return _text(content, param)
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        strings = [t for t in texts if isinstance(t, str)]
        if len(strings) == len(content):  # every part is a text part with a string text
            return _text("".join(strings), param)
    raise ApiError(400, f"{param} must be a string or a list of text parts", param)


def parse_chat_request(body: Any, model: ChatModel, settings: ServeSettings) -> tuple[list[dict[str, str]], SamplingParams, bool, bool]:
    """Validate a chat-completions body: (messages, sampling params, stream, include_usage)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if name is not None and name != model.model_id:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {model.model_id!r}", "model", "model_not_found")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(raw) > model.context_length:  # every template writes at least one token per message
        raise ApiError(400, f"{len(raw)} messages cannot fit the model's context of {model.context_length} tokens",
                       "messages", "context_length_exceeded")
    messages: list[dict[str, str]] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role; compared, not looked up: a role may be a list
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant, got {m.get('role')!r}", f"messages[{i}].role")
        if role == "system" and i != 0:
            raise ApiError(400, "only the first message may be a system message", f"messages[{i}].role")
        messages.append({"role": role, "content": _content(m, i)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = settings.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"'max_tokens' {max_tokens} exceeds this server's limit of {settings.max_tokens}", "max_tokens")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    for s in stop:
        _text(s, "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_MIN <= seed <= SEED_MAX):
        raise ApiError(400, "'seed' must be an integer from -2**63 to 2**64-1", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", settings.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", settings.top_p, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=tuple(stop),
    )
    return messages, params, stream, include_usage


#: Directory names that say what a directory is, not which run it belongs to (``results/<run>/merged``).
_STAGE_DIRS = ("merged", "train")


def served_model_id(model_dir: str | Path, adapters: Sequence[str | Path] = ()) -> str:
    """The id ``/v1/models`` reports when ``serve.model_id`` is null: the training run's name
    (``train.run``, recorded in an adapter's or full model's ``train_config.json``), else the
    run directory's name for ``results/<run>/merged`` or ``.../train``, else the directory's name.
    So two runs served side by side are told apart (``r16``, ``default``), not both ``merged``."""
    from llama_pipe.core.sidecar import recorded

    found, run = recorded([Path(model_dir), *map(Path, adapters)], "run")
    if found and isinstance(run, str) and run.strip():
        return run.strip()
    path = Path(model_dir).resolve()
    if path.name in _STAGE_DIRS and path.parent.name:
        return path.parent.name
    return path.name
