"""Fixtures: the tiny model loaded for chatting, and a live server on a free port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_pipe.config import ServeSettings
from llama_pipe.models.generation import ChatModel, SamplingParams, load_chat_model


class SlowChatModel(ChatModel):
    """The tiny model, 15 ms per token and no early end of turn, so streaming is observable."""

    def _tokens(self, prompt: list[int], params: SamplingParams, budget: int) -> Iterator[int]:
        for tok in super()._tokens(prompt, params, budget):
            time.sleep(0.015)
            yield tok


@pytest.fixture(scope="session")
def chat_model(tiny_hf_model_dir: Path) -> ChatModel:
    return load_chat_model(tiny_hf_model_dir, device="cpu", model_id="tiny")


def start_server(model: ChatModel, **overrides: object):
    from llama_pipe.serve.serve import ChatServer

    settings = ServeSettings(port=0, max_tokens=64, max_request_bytes=4096, **overrides)  # type: ignore[arg-type]
    server = ChatServer(model, settings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="session")
def server(chat_model: ChatModel):
    srv, thread = start_server(chat_model)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(scope="session")
def slow_server(chat_model: ChatModel):
    slow = SlowChatModel(chat_model.model, chat_model.tokenizer, chat_model.template, "tiny-slow")
    slow.stop_ids = set()
    srv, thread = start_server(slow)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)
