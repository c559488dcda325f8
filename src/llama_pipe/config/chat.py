"""``chat``: what every stage that renders a conversation must agree on.

One section, read by convert (the template a model without one is given), split (chunks are
measured in the rendering training uses, up to ``max_seq_len``), train, merge-adapter, eval and
serve/chat. Before it existed the template was repeated in six sections and the chunk length was
not tied to the training length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llama_pipe.config.section import section
from llama_pipe.core.settings import opt

#: The chat templates of llama_pipe.chat_template.builtin (a test checks the two lists agree).
TemplateName = Literal["vicuna_v1.1", "llama-2", "chatml", "llama-3"]
#: A built-in, or the model's own Jinja ('model'), or 'auto' (see ChatSettings.template).
TemplateChoice = Literal["auto", "model", "vicuna_v1.1", "llama-2", "chatml", "llama-3"]


@section("chat", "chat template, system prompt and sequence length, shared by every stage that renders conversations")
@dataclass
class ChatSettings:
    """How conversations are rendered into tokens, the same in every stage."""

    template: TemplateChoice = opt(
        "auto",
        "chat template: auto = the one recorded with the model by llama-pipe (a trained or merged model), else the "
        "model's own Jinja (tokenizer.chat_template) when it is not a built-in's, else the built-in it is, else "
        "vicuna_v1.1; model = the model's own (an error if it has none); or a built-in by name. convert gives a "
        "model that ships none this one (vicuna_v1.1 for auto). The loss mask covers each assistant reply and its "
        "end-of-turn marker in this rendering",
    )
    system_prompt: str | None = opt(
        None, "system prompt of every conversation that has none of its own; null uses the template's default (a "
        "model's own template may insert one, e.g. SmolLM2's 'You are a helpful AI assistant named SmolLM...')"
    )
    max_seq_len: int = opt(
        512, "longest training row in tokens; split cuts conversations into chunks of at most this many "
        "(split.max_length may make them shorter)", minimum=16,
    )
