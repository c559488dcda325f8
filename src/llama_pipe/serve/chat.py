"""``llama-pipe chat MODEL``: multi-turn chat in the terminal, tokens printed as they are generated.

``--prompt "..."`` answers once and exits (only the reply goes to stdout, so it pipes).
``--adapter DIR`` (repeatable) merges peft adapters into the model in memory first, so an
adapter can be tried before ``merge-adapter``. In the interactive loop ``/reset`` starts a new
conversation and ``/exit`` (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from llama_pipe.chat_template.builtin import Message
from llama_pipe.config import ChatSettings, ServeSettings, settings_from_args
from llama_pipe.core.errors import InputError
from llama_pipe.core.settings import add_settings_arguments, describe
from llama_pipe.models.generation import ChatModel, Completion, SamplingParams, load_chat_model
from llama_pipe.serve.api import SEED_MAX, SEED_MIN, served_model_id

log = logging.getLogger(__name__)

# The serve settings the terminal chat reads (the rest - address, port, queue, timeouts, request
# limits, allowed hosts and origins - are the server's, and not chat's flags).
CHAT_USES = ("max_tokens", "device", "temperature", "top_p", "model_id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="Hugging Face model directory (e.g. results/default/merged or results/hf_base)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR", help="peft adapter applied on the fly (repeatable, in order)")
    parser.add_argument("--prompt", default=None, help="answer this one message and exit")
    parser.add_argument("--system", default=None,
                        help="system prompt of this conversation (default: chat.system_prompt, else the one recorded with the model, else the template's)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    add_settings_arguments(parser, ServeSettings, "serve", only=CHAT_USES)
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False, only=("template", "system_prompt"))


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")  # bytes the locale could not decode arrive as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def reply(model: ChatModel, history: list[Message], params: SamplingParams, out: TextIO, system: str | None = None) -> Completion:
    """Stream the assistant's answer to ``history`` into ``out`` and append it to ``history``."""
    res = Completion()
    for piece in model.stream(model.prompt_ids(history, system), params, res):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    history.append({"role": "assistant", "content": res.text})
    return res


def chat_loop(
    model: ChatModel, params: SamplingParams, read: Callable[[str], str], out: TextIO, system: str | None = None
) -> list[Message]:
    """The interactive loop; ``read`` is ``input`` in a terminal. Returns the last conversation."""
    history: list[Message] = []
    turns = 0
    out.write(f"chatting with {model.model_id} ({model.template.name}); /reset starts over, /exit or Ctrl-D quits\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return history
        except UnicodeDecodeError:
            out.write("(that line is not valid UTF-8 text; type it again)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return history
        if text == "/reset":
            history = []
            out.write("(new conversation)\n")
            continue
        history.append({"role": "user", "content": text})
        if len(model.prompt_ids(history, system)) >= model.context_length:
            history.pop()
            out.write(f"(the conversation no longer fits the {model.context_length}-token context; /reset to start over)\n")
            continue
        out.write("assistant> ")
        turns += 1  # with --seed, reply n uses seed + n: reproducible sessions, not one repeated draw
        turn_params = params if params.seed is None else replace(params, seed=(params.seed + turns) % 2**64)
        res = reply(model, history, turn_params, out, system)
        if res.finish_reason == "length":
            out.write("(reply cut at max_tokens)\n")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, ServeSettings, "serve")
    chat = settings_from_args(args, ChatSettings, "chat")
    log.debug("chat settings:\n%s", describe(settings))
    if args.seed is not None and not SEED_MIN <= args.seed <= SEED_MAX:
        raise InputError(f"--seed {args.seed}: must be from -2**63 to 2**64-1")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
        if text is not None and not _is_text(text):
            raise InputError(f"{flag}: not valid UTF-8 text (undecodable bytes in the argument)")
    model_id = settings.model_id or served_model_id(Path(args.model), args.adapter)
    model = load_chat_model(Path(args.model), args.adapter, settings.device, chat.template, model_id, chat.system_prompt)
    params = SamplingParams(max_new_tokens=settings.max_tokens, temperature=settings.temperature, top_p=settings.top_p, seed=args.seed)
    if args.prompt is not None:
        reply(model, [{"role": "user", "content": args.prompt}], params, sys.stdout, args.system)
        return 0
    chat_loop(model, params, input, sys.stdout, args.system)
    return 0
