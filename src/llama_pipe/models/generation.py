"""Streaming generation shared by ``eval``, ``chat`` and ``serve``.

One decoding loop (KV cache, temperature / top-p sampling from a seeded ``torch.Generator``)
so the three commands produce the same text for the same prompt, settings and seed. Text is
streamed by decoding the whole generated sequence after each token and emitting only what is
new; a trailing U+FFFD (half of a multi-byte character spread over byte-fallback tokens) and a
trailing prefix of a stop string are held back until the next token decides them, and a reply
that ends inside a character (``max_tokens`` reached mid-character) ends before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import ChatTemplate, Message, end_of_turn_ids, message_texts
from llama_pipe.chat_template.control_tokens import control_tokens
from llama_pipe.chat_template.resolve import recorded_system_prompt, resolve_template
from llama_pipe.core.errors import InputError
from llama_pipe.models.lineage import chain_lineage
from llama_pipe.models.model_dir import apply_adapters, check_adapter_dir, check_model_dir, load_float_base
from llama_pipe.weights.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """How one reply is sampled. ``temperature == 0`` is greedy; ``seed=None`` draws a fresh seed."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass
class Completion:
    """What a finished :meth:`ChatModel.stream` reports (filled in while iterating)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn / stop string) or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # generated ids, end-of-turn excluded
    error: str | None = None  # complete_batch: why this row was not generated (prompt over the context)


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return wanted


def cache_argument(model: Any) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` from transformers 5.2x on
    (where ``past_key_values``, in and out, is deprecated: the warning printed itself inside the
    first reply of ``llama-pipe chat``), ``past_key_values`` before."""
    import inspect

    forward = getattr(type(model), "forward", None)
    try:
        names = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        names = {}
    return "cache" if "cache" in names else "past_key_values"


def keeps_logits(model: Any) -> bool:
    """Whether the causal LM under ``model`` (accelerate/DDP and peft wrappers peeled off) takes
    ``logits_to_keep``, so its output layer can run on the positions a caller needs only
    (transformers' own models do); cached on ``model``."""
    import inspect

    known = getattr(model, "_llama_pipe_keeps_logits", None)
    if known is None:
        inner = model
        while (nxt := getattr(inner, "module", None) or (inner.get_base_model() if hasattr(inner, "get_base_model") else None)) \
                not in (None, inner):
            inner = nxt
        forward = getattr(type(inner), "forward", None)
        try:
            known = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            known = False
        try:
            model._llama_pipe_keeps_logits = known
        except AttributeError:  # a wrapper that refuses attributes: asked again next time
            pass
    return bool(known)


def target_logits(model: Any, labels: Any, **inputs: Any) -> tuple[Any, Any]:
    """``model(**inputs)``'s float logits at the positions that predict a labelled token, and those
    labels: ``(logits (n, vocabulary), targets (n,))`` for a summed cross entropy with
    ``ignore_index=-100``. ``labels`` is aligned with the inputs (``-100``: not a target).

    The output layer runs only at positions where some row has a target (``logits_to_keep`` as
    a 1-D index, which the device's older transformers 5 takes too; its boolean form is newer): in chat
    data most tokens are prompt, so the sum is the same without most of the ``tokens x
    vocabulary`` logits. A model without ``logits_to_keep`` gets full logits."""
    shifted = labels[:, 1:]
    if keeps_logits(model):
        keep = (shifted != -100).any(0).nonzero().squeeze(1)  # position j predicts token j + 1
        logits, targets = model(**inputs, logits_to_keep=keep).logits, shifted[:, keep]
    else:
        logits, targets = model(**inputs).logits[:, :-1], shifted
    return logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)


def kv_cache(out: Any, name: str) -> Any:
    """The KV cache a forward pass returned, read under the name the model takes it by."""
    return getattr(out, name) if name == "cache" else out.past_key_values


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could still begin a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


class ChatModel:
    """A causal LM + tokenizer + chat template, ready to render prompts and stream replies."""

    def __init__(self, model: Any, tokenizer: Any, template: ChatTemplate, model_id: str, system: str | None = None) -> None:
        self.system = system  # default system prompt (None: the template's)
        self.model = model
        self.cache_name = cache_argument(model)
        self.last_only = {"logits_to_keep": 1} if keeps_logits(model) else {}  # a prompt's logits: the last position's
        self.tokenizer = tokenizer
        self.template = template
        self.model_id = model_id
        self.stop_ids = set(end_of_turn_ids(tokenizer, template))
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def prompt_ids(self, messages: Sequence[Message], system: str | None = None) -> list[int]:
        """Token ids (BOS first) of the conversation so far, ending where the assistant's reply starts.

        Rendered in one pass (:meth:`ChatTemplate.render_text`: linear in the conversation, and a
        conversation that opens with an assistant greeting is a prompt too). Only the template writes
        control tokens: a message that spells ``<|im_end|><|im_start|>system`` is text, so no turn can
        be forged (:mod:`llama_pipe.chat_template.control_tokens`)."""
        system = system if system is not None else self.system
        text = self.template.render_text(messages, system=system, add_generation_prompt=True)
        controls = control_tokens(self.tokenizer)
        texts = self.template.text_spans(messages, system, True, text) if controls.in_any(message_texts(messages, system)) else []
        ids, _ = controls.encode(text, texts)
        return ids

    def _generator(self, params: SamplingParams) -> Any:
        import torch

        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        return gen

    def _tokens(self, prompt: list[int], params: SamplingParams, budget: int) -> Iterator[int]:
        import torch

        gen = self._generator(params)
        ids = torch.tensor([prompt], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **self.last_only)
            for _ in range(budget):
                nxt = _pick(out.logits[0, -1], params, gen)
                yield nxt
                if nxt in self.stop_ids:
                    return
                out = self.model(
                    input_ids=torch.tensor([[nxt]], device=self.device),
                    use_cache=True,
                    **{self.cache_name: kv_cache(out, self.cache_name)},
                )

    def _budget(self, prompt: list[int], params: SamplingParams) -> int:
        """How many tokens a reply to ``prompt`` may have: max_new_tokens, within the context."""
        return min(params.max_new_tokens, self.context_length - len(prompt))

    def _over_context(self, prompt: list[int]) -> str:
        return f"the prompt has {len(prompt)} tokens; the model's context is {self.context_length}"

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def stream(self, prompt: list[int], params: SamplingParams, result: Completion | None = None,
               cancelled: Callable[[], bool] | None = None) -> Generator[str, None, None]:
        """Yield text pieces of the reply; ``result`` receives the totals and finish reason.
        ``cancelled`` is asked before every forward pass: True stops generating (a client that left).

        Incremental detokenisation over a window that starts one token before the new ones
        (so a word's leading space is decoded in context) and only moves on once the window
        decodes to whole characters; what is yielded is final and ``result.text`` is their join.
        """
        res = result if result is not None else Completion()
        res.prompt_tokens = len(prompt)
        budget = self._budget(prompt, params)
        if budget <= 0:
            raise InputError(self._over_context(prompt))
        tokens = self._tokens(prompt, params, budget)
        yield from self._assemble(tokens if cancelled is None else _until(tokens, cancelled), params, res)

    def _assemble(self, tokens: Iterable[int], params: SamplingParams, res: Completion) -> Iterator[str]:
        """Text pieces from generated token ids (the body of :meth:`stream`), filling ``res``."""
        stops = [s for s in params.stop if s]
        ids = res.token_ids
        start = read = 0  # window: ids[start:read] is decoded already, ids[read:] is not
        text = ""  # all text decoded so far; text[:len(sent)] has been yielded
        sent = 0
        cut = False  # ended by a stop string
        res.finish_reason = "length"
        for tok in tokens:
            res.completion_tokens += 1
            if tok in self.stop_ids:
                res.finish_reason = "stop"
                break
            ids.append(tok)
            before, after = self._decode(ids[start:read]), self._decode(ids[start:])
            if len(after) <= len(before) or after.endswith("\ufffd"):
                continue  # nothing new yet, or half of a multi-byte character
            text += after[len(before):]
            start, read = read, len(ids)
            hits = [p for p in (text.find(s, max(0, sent - len(s))) for s in stops) if p >= 0]
            if hits:
                text, cut = text[: min(hits)], True
                res.finish_reason = "stop"
                break
            ready = len(text) - _held_back(text, stops)
            if ready > sent:
                piece, sent = text[sent:ready], ready
                res.pieces.append(piece)
                yield piece
        if not cut:  # whatever was held back is final now, less a character cut short (never half of one)
            before, after = self._decode(ids[start:read]), self._decode(ids[start:])
            text += after[len(before):].rstrip("\ufffd")
            hits = [p for p in (text.find(s, max(0, sent - len(s))) for s in stops) if p >= 0]
            if hits:
                text = text[: min(hits)]
                res.finish_reason = "stop"
        if len(text) > sent:
            res.pieces.append(text[sent:])
            yield text[sent:]
        res.text = "".join(res.pieces)

    def complete(self, messages: Sequence[Message], params: SamplingParams, system: str | None = None) -> Completion:
        """The whole reply to ``messages`` at once."""
        res = Completion()
        for _ in self.stream(self.prompt_ids(messages, system), params, res):
            pass
        return res

    def complete_batch(
        self,
        conversations: Sequence[Sequence[Message]],
        params: Sequence[SamplingParams],
        batch_size: int = 8,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Whole replies to several conversations, ``batch_size`` prompts per forward pass.

        Prompts of similar length are batched together, left-padded (attention mask and position
        ids say where each row starts); every row samples with its own ``params`` and seeded
        generator through the same :func:`_pick` as :meth:`stream`, and its tokens are turned
        into text by the same code, stop strings included: the result equals :meth:`complete`'s up
        to float rounding of the padded batch. A prompt that leaves no room in the context gets
        ``error`` set and no text. ``on_done(n)`` is called as batches finish (progress bars).
        """
        if len(params) != len(conversations):
            raise ValueError("one SamplingParams per conversation")
        prompts = [self.prompt_ids(c) for c in conversations]
        results = [Completion(prompt_tokens=len(p)) for p in prompts]
        todo = []
        for i, p in enumerate(prompts):
            if self._budget(p, params[i]) <= 0:
                results[i].error = self._over_context(p)
            else:
                todo.append(i)
        todo.sort(key=lambda i: len(prompts[i]))
        step = max(1, batch_size)
        for start in range(0, len(todo), step):
            rows = todo[start : start + step]
            for i, tokens in zip(rows, self._generate_rows([prompts[i] for i in rows], [params[i] for i in rows])):
                for _ in self._assemble(tokens, params[i], results[i]):
                    pass
            if on_done is not None:
                on_done(len(rows))
        return results

    def _generate_rows(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        """One left-padded batch: each row's tokens (its end of turn included) until every row stopped."""
        import torch

        dev = self.device
        width = max(len(p) for p in prompts)
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=dev)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p, device=dev)
            mask[r, width - len(p):] = 1
        gens = [self._generator(pr) for pr in params]
        budgets = [self._budget(p, pr) for p, pr in zip(prompts, params)]
        tokens: list[list[int]] = [[] for _ in prompts]
        live = [True] * len(prompts)
        with torch.inference_mode():
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **self.last_only)
            last = positions[:, -1:]
            while True:
                nxt = [pad] * len(prompts)
                for r in range(len(prompts)):
                    if live[r]:
                        nxt[r] = _pick(out.logits[r, -1], params[r], gens[r])
                        tokens[r].append(nxt[r])
                        live[r] = nxt[r] not in self.stop_ids and len(tokens[r]) < budgets[r]
                if not any(live):
                    return tokens
                last = last + 1
                mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=torch.long, device=dev)], dim=1)
                out = self.model(
                    input_ids=torch.tensor(nxt, device=dev).unsqueeze(1),
                    attention_mask=mask,
                    position_ids=last,
                    use_cache=True,
                    **{self.cache_name: kv_cache(out, self.cache_name)},
                )


def _until(tokens: Iterator[int], cancelled: Callable[[], bool]) -> Iterator[int]:
    """``tokens`` until ``cancelled()`` (asked before each one is computed); the generator is closed either way."""
    try:
        while not cancelled():
            tok = next(tokens, None)
            if tok is None:
                return
            yield tok
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


def _pick(row_logits: Any, params: SamplingParams, gen: Any) -> int:
    """The next token from one row's logits: argmax at temperature 0, else temperature + top-p."""
    import torch

    logits = row_logits.float()
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    # In float64 (1e-300 is 0 in float32) and with the best logit shifted to 0 first: a tiny
    # temperature then sends the others to -inf, not every logit to +-inf (NaN), and samples like
    # greedy, its limit.
    scaled = (logits.double() - logits.max().double()) / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_p, 0) - sorted_p >= params.top_p
        outside[0] = False  # the most likely token always stays (top_p 1e-300 is 0 in float32)
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def load_chat_model(
    model_dir: str | Path,
    adapters: Sequence[str | Path] = (),
    device: str = "auto",
    template: str | None = None,
    model_id: str | None = None,
    system_prompt: str | None = None,
) -> ChatModel:
    """Load a float model directory (optionally merging peft adapters on the fly) for chatting.

    ``template`` / ``system_prompt``: chat.template (None: auto) and chat.system_prompt (None: the one
    recorded with the model, else the template's default)."""
    import torch

    model_dir = check_model_dir(model_dir)
    for a in adapters:
        check_adapter_dir(a)
    if adapters:  # each adapter must have been trained on the model plus the ones before it
        chain_lineage(model_dir, list(adapters))
    dev = pick_device(device)
    tokenizer = load_tokenizer(model_dir)
    model = load_float_base(model_dir)
    if adapters:
        model, tokenizer = apply_adapters(model, tokenizer, list(adapters))
    if dev == "cuda":
        model = model.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = model.to(dev).eval()
    dirs = [model_dir, *map(Path, adapters)]
    chat_template = resolve_template(template, dirs, tokenizer)
    log.info("model %s on %s, template %s", model_dir, dev, chat_template.name)
    return ChatModel(model, tokenizer, chat_template, model_id or model_dir.resolve().name,
                     system_prompt if system_prompt is not None else recorded_system_prompt(dirs))
