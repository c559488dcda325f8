"""``llama-pipe distill``: the training split brought closer to the base's own distribution.

Fine-tuning on replies written by someone else pulls a model away from what it knew; training on
replies in the base's own words pulls it less (self-distillation fine-tuning, SDFT: Yang et al.,
ACL 2024). This stage sits between ``gather`` and ``train`` and does two things (``distill.mode``):

* **rewrite**: each assistant turn is shown to the base, through its own chat template, as the
  conversation so far plus the original reply as a reference answer, and the base writes the reply
  in its own words (greedy, batched). A rewrite that loses a required fact of the original (a
  ``keep_terms`` string, a number, a code block, a URL, a name), brings in a name of its own (the
  base's name), or is empty, cut off at its token limit, degenerate (looping) or leaks the
  instruction, is not used: the turn keeps its original reply and the reason is counted.
* **replay**: the base's own answers (greedy) to prompts - the bundled everyday questions and the
  first human turns of the training records - are added as extra one-exchange conversations,
  ``replay_ratio`` of the training records (at most ``max_replays``).

Every input record is accounted for (:class:`~llama_pipe.core.stage_writer.StageWriter`): it is written
with a ``distill`` field (``rewritten``, ``partial`` - some turns rewritten -, ``original:<reason>``)
and, per assistant turn, ``distill_turns``; a rewritten turn keeps its original reply under
``original``, a turn whose rewrite was refused keeps that rewrite under ``refused`` (training reads
only ``value``); a malformed record is rejected. Replay conversations are extra lines
(``distill: replay``). The stats file counts every turn's and record's outcome, the replays, the
tokens generated and the seconds.

Generation is resumable per reply: each finished batch is appended to a progress file beside the
output (``OUT.partial.jsonl``), keyed by a hash of the base (its files' names, sizes and times),
the exact prompt text and the token limit; a run that was killed continues where it stopped, and a
changed base, template, setting or record simply finds no matching key. The progress file is removed
when the outputs are committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llama_pipe.chat_template.builtin import MODEL, ChatTemplate, Message, to_messages
from llama_pipe.chat_template.resolve import recorded_system_prompt, resolve_template
from llama_pipe.config import ChatSettings, DistillSettings, settings_from_args
from llama_pipe.core.atomic import check_output_files
from llama_pipe.core.errors import InputError
from llama_pipe.core.records import InvalidLine, Record, dumps, partial_path, read_records, rejects_path, stats_path
from llama_pipe.core.settings import add_settings_arguments, to_dict
from llama_pipe.core.stage_writer import StageWriter
from llama_pipe.data.common import add_output_arguments, conversation_problem, log_settings
from llama_pipe.data.distill_checks import fold, names, replay_problem, rewrite_problem
from llama_pipe.models.generation import ChatModel, Completion, SamplingParams, pick_device
from llama_pipe.models.model_dir import check_model_dir, load_float_base

log = logging.getLogger(__name__)

BUNDLED_PROMPTS = "replay_prompts.jsonl"

#: Changes whenever the rewrite prompt or the generation settings' meaning change (invalidates progress).
PROMPT_VERSION = 1

REWRITE_INSTRUCTION = (
    '{message}\n\nHere is a reference answer:\n"""\n{reference}\n"""\n'
    "Answer my message in your own words, keeping every name, number and code of the reference answer."
)


def bundled_prompts() -> Path:
    """The bundled replay prompts inside the installed package."""
    path = Path(str(resources.files("llama_pipe") / "assets" / BUNDLED_PROMPTS))
    if not path.is_file():  # a broken install, not a user error
        raise FileNotFoundError(f"{path}: the bundled replay prompts are missing; reinstall llama-pipe")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="HF_DIR", help="the base model directory (whose own words the replies become)")
    add_output_arguments(parser, "distilled training JSONL (records, then the replay conversations)")
    parser.add_argument("--progress", metavar="FILE", help="resumable progress (default: OUT with .partial.jsonl; removed when done)")
    parser.add_argument("input", metavar="IN", help="training JSONL written by `llama-pipe gather`")
    add_settings_arguments(parser, DistillSettings, "distill")
    add_settings_arguments(parser, ChatSettings, "chat", config_flag=False, only=("template", "system_prompt"))


# ----------------------------------------------------------------------------- base and mode


def base_fingerprint(base: Path) -> str:
    """A hash of the base directory: the small files' contents, the weights' names, sizes and
    modification times (hashing gigabytes of weights on every run would cost more than it saves)."""
    h = hashlib.sha256()
    for f in sorted(p for p in base.iterdir() if p.is_file() and not p.name.startswith(".")):
        st = f.stat()
        h.update(f.name.encode() + b"\0")
        if st.st_size <= 8 << 20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def count_parameters(base: Path) -> int:
    """Parameters of the base from its safetensors headers (nothing loaded)."""
    total = 0
    for f in sorted(base.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                total += math.prod(info.get("shape", []))
    return total


def resolve_mode(settings: DistillSettings, tokenizer: Any, template_name: str, base: Path, device: str) -> tuple[str, str]:
    """(mode, why): ``auto`` made concrete."""
    if settings.mode != "auto":
        return settings.mode, "distill.mode"
    own = template_name == MODEL and bool(getattr(tokenizer, "chat_template", None))
    if not own:
        return "off", (f"auto: the base's chat template is the built-in {template_name!r}, not one of its own "
                       "(not a chat model: its own words are not replies worth keeping)")
    if device == "cpu":
        params = count_parameters(base)
        if params > settings.max_cpu_params:
            return "off", f"auto: {params / 1e9:.1f}B parameters on CPU (over distill.max_cpu_params)"
    return "both", "auto: a chat base (it ships its own chat template)"


# ----------------------------------------------------------------------------- plan


@dataclass
class Job:
    """One reply to generate."""

    key: str
    messages: list[Message]
    prompt: str
    max_new_tokens: int
    result: Completion | None = None


@dataclass
class Turn:
    """One assistant turn of a record: its outcome, and its job when it is rewritten."""

    index: int  # position in conversations
    outcome: str = ""
    job: Job | None = None


@dataclass
class Plan:
    records: list[tuple[Record, list[Turn]]] = field(default_factory=list)
    replays: list[tuple[str, str, Job]] = field(default_factory=list)  # (source, prompt, job)
    jobs: dict[str, Job] = field(default_factory=dict)

    def job(self, chat: ChatModel, messages: list[Message], budget: int, base_fp: str) -> Job:
        prompt, _ = chat.template.render(messages, system=chat.system, add_generation_prompt=True)
        key = hashlib.sha256(json.dumps([PROMPT_VERSION, base_fp, prompt, budget]).encode()).hexdigest()[:32]
        if key not in self.jobs:
            self.jobs[key] = Job(key, messages, prompt, budget)
        return self.jobs[key]


def _lang_ok(record: Record, languages: list[str]) -> bool:
    lang = record.get("lang")
    if not languages or not isinstance(lang, str) or not lang:
        return True  # no language detected (filter-lang did not run): not refused for it
    return any(lang == want or lang.startswith(want + "-") for want in languages)


_LATER_CHUNK = re.compile(r"_[1-9][0-9]*$")
#: A message addressed to the assistant itself (its identity, its abilities): not replayed from the user's data.
_TO_ASSISTANT = re.compile(r"\b(?:you|your|yours|yourself|u|ur)\b", re.IGNORECASE)


def _pick_score(seed: int, *parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps([seed, *parts]).encode(), digest_size=8).digest(), "big")


def rewrite_messages(record: Record, index: int) -> list[Message]:
    """The conversation up to assistant turn ``index``, its last user message carrying the original
    reply as the reference."""
    msgs = to_messages({**record, "conversations": record["conversations"][: index + 1]})
    original = msgs.pop()["content"]
    last = msgs[-1]
    msgs[-1] = {"role": "user", "content": REWRITE_INSTRUCTION.format(message=last["content"], reference=original)}
    return msgs


def plan_rewrites(plan: Plan, chat: ChatModel, settings: DistillSettings, rewrite: bool, base_fp: str) -> None:
    """Each assistant turn's outcome, or its job: eligible turns within max_rewrites."""
    candidates: list[tuple[int, Record, Turn]] = []
    texts: list[str] = []
    for record, turns in plan.records:
        conv = record["conversations"]
        for turn in turns:
            if not rewrite:
                turn.outcome = "original:off"
            elif not _lang_ok(record, settings.languages):
                turn.outcome = "original:language"
            elif turn.index == 0 or conv[turn.index - 1]["from"] != "human" or not conv[turn.index]["value"].strip():
                turn.outcome = "original:no_question"
            else:
                candidates.append((_pick_score(settings.seed, record["id"], turn.index), record, turn))
                texts.append(conv[turn.index]["value"])
    lengths = chat.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    fits = []
    for (score, record, turn), ids in zip(candidates, lengths):
        if len(ids) > settings.max_new_tokens:
            turn.outcome = "original:too_long"
        elif len(ids) < settings.min_tokens:
            turn.outcome = "original:too_short"
        else:
            fits.append((score, record, turn, len(ids)))
    fits.sort(key=lambda c: c[0])
    limit = settings.max_rewrites or len(fits)
    for n, (_, record, turn, length) in enumerate(fits):
        if n >= limit:
            turn.outcome = "original:budget"
            continue
        budget = min(settings.max_new_tokens, length * 3 // 2 + 32)
        turn.job = plan.job(chat, rewrite_messages(record, turn.index), budget, base_fp)


def read_prompts(path: str | Path | None) -> list[tuple[str, str]]:
    """``(id, prompt)`` of a replay prompts JSONL (``prompt``, or MT-bench's first ``turns``)."""
    where_file = bundled_prompts() if path is None else Path(path)
    out: list[tuple[str, str]] = []
    for where, row in read_records(where_file):
        text = row.get("prompt") if isinstance(row, dict) else None
        if text is None and isinstance(row, dict) and isinstance(row.get("turns"), list) and row["turns"]:
            text = row["turns"][0]
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: expected {{\"id\", \"prompt\": \"a non-empty string\"}}")
        pid = row.get("id", row.get("question_id", len(out)))
        out.append((str(pid), text.strip()))
    if not out:
        raise InputError(f"{where_file}: no replay prompts")
    return out


def plan_replays(plan: Plan, chat: ChatModel, settings: DistillSettings, prompts: list[tuple[str, str]], base_fp: str) -> int:
    """The replay prompts and their jobs (``prompts``: :func:`read_prompts`'s); returns how many were asked for."""
    n_records = len(plan.records)
    want = round(settings.replay_ratio * n_records)
    if settings.max_replays:
        want = min(want, settings.max_replays)
    if want <= 0:
        return 0
    pool: dict[str, str] = {}  # folded prompt -> source
    texts: dict[str, str] = {}
    for pid, text in prompts:
        pool.setdefault(fold(text), f"bundled:{pid}" if settings.replay_prompts is None else f"prompts:{pid}")
        texts.setdefault(fold(text), text)
    if settings.replay_user_turns:
        terms = [fold(t) for t in settings.keep_terms if t.strip()]
        for record, _ in plan.records:
            conv = record["conversations"]
            if len(conv) < 2 or conv[0]["from"] != "human" or not _lang_ok(record, settings.languages):
                continue
            if _LATER_CHUNK.search(record["id"]):
                continue  # split's chunk k >= 1: its first turn follows an earlier one ("Why is that?")
            reply = conv[1]["value"]
            if _TO_ASSISTANT.search(conv[0]["value"]) or any(t in fold(reply) for t in terms) or names(reply):
                # a question to the assistant ("Who built you?") or a reply that carries a name (the
                # assistant's identity, a fact): the base's answer would contradict what training teaches
                continue
            text = conv[0]["value"].strip()
            if text:
                pool.setdefault(fold(text), f"user:{record['id']}")
                texts.setdefault(fold(text), text)
    chosen = sorted(pool, key=lambda k: _pick_score(settings.seed, "replay", k))[:want]
    for k in chosen:
        messages = [{"role": "user", "content": texts[k]}]
        plan.replays.append((pool[k], texts[k], plan.job(chat, messages, settings.max_new_tokens, base_fp)))
    return want


# ----------------------------------------------------------------------------- generation


def read_progress(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Finished replies by key, and how many lines were unreadable (a line cut by a kill)."""
    done: dict[str, dict[str, Any]] = {}
    bad = 0
    if not path.is_file():
        return done, 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                done[str(row["key"])] = row
            except (ValueError, KeyError, TypeError):
                bad += 1
    return done, bad


def generate(chat: ChatModel, jobs: Sequence[Job], batch_size: int, progress: Path,
             on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fill every job's ``result``: from the progress file when its key is there, else generated
    (greedy) in batches of like token limit and prompt length, each batch appended to the progress file."""
    done, bad = read_progress(progress)
    counts = Counter(resumed=0, generated=0, prompt_tokens=0, completion_tokens=0, unreadable_progress_lines=bad)
    todo = []
    for job in jobs:
        row = done.get(job.key)
        if row is not None:
            job.result = Completion(text=str(row.get("text", "")), finish_reason=row.get("finish_reason"),
                                    prompt_tokens=int(row.get("prompt_tokens", 0)),
                                    completion_tokens=int(row.get("completion_tokens", 0)), error=row.get("error"))
            counts["resumed"] += 1
        else:
            todo.append(job)
    counts["stale_progress_lines"] = len(set(done) - {j.key for j in jobs})
    # Rows of one batch run until the longest is done: batch replies of like token limits, then prompts of like length.
    todo.sort(key=lambda j: (j.max_new_tokens, len(j.prompt)))
    progress.parent.mkdir(parents=True, exist_ok=True)
    with open(progress, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            params = [SamplingParams(max_new_tokens=j.max_new_tokens, temperature=0.0, top_p=1.0, seed=0) for j in batch]
            results = chat.complete_batch([j.messages for j in batch], params, batch_size)
            for job, res in zip(batch, results):
                job.result = res
                fh.write(dumps({"key": job.key, "text": res.text, "finish_reason": res.finish_reason,
                                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                                "error": res.error}) + "\n")
            fh.flush()
            counts["generated"] += len(batch)
            if on_batch is not None:
                on_batch(len(batch))
    for job in jobs:
        assert job.result is not None
        counts["prompt_tokens"] += job.result.prompt_tokens
        counts["completion_tokens"] += job.result.completion_tokens
    return dict[str, Any](counts)


# ----------------------------------------------------------------------------- the stage


def load_base(base: Path, device: str, tokenizer: Any, template: ChatTemplate, chat_settings: ChatSettings) -> ChatModel:
    """The base as a :class:`ChatModel` with the template and system prompt training uses."""
    import torch

    model = load_float_base(base)
    if device == "cuda":
        model = model.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    model = model.to(device).eval()
    system = chat_settings.system_prompt if chat_settings.system_prompt is not None else recorded_system_prompt([base])
    return ChatModel(model, tokenizer, template, base.resolve().name, system)


def base_names(template: ChatTemplate, keep_terms: Iterable[str]) -> set[str]:
    """The names in the base's default system prompt (e.g. SmolLM2's "You are ... named SmolLM,
    trained by Hugging Face"), less those of ``keep_terms``: how the base would name itself."""
    probe = "zzqx"
    text, _ = template.render([{"role": "user", "content": probe}], system=None)
    own = names(text.replace(probe, " "), new_only=True)
    kept = set().union(*(names(" x " + t, new_only=True) for t in keep_terms)) if keep_terms else set()
    return {n for n in own if not any(n.casefold() == k.casefold() for k in kept)}


def _outcome(job: Job, record: Record, index: int, settings: DistillSettings, foreign: set[str]) -> str:
    res = job.result
    assert res is not None
    if res.error is not None:
        return "original:context"
    conv = record["conversations"]
    # the user's messages (and the system prompt), not earlier replies: a rewrite that repeats an
    # earlier reply's names instead of answering ("You too!" -> "I am Vicuna, ...") is refused
    context = "\n".join([record.get("system") or ""] + [t["value"] for t in conv[:index] if t["from"] == "human"])
    why = rewrite_problem(res.text, conv[index]["value"], context, res.finish_reason, settings, foreign)
    return f"original:{why}" if why else "rewritten"


def _record_outcome(outcomes: list[str]) -> str:
    rewritten = sum(o == "rewritten" for o in outcomes)
    if outcomes and rewritten == len(outcomes):
        return "rewritten"
    if rewritten:
        return "partial"
    return outcomes[0] if outcomes else "original:no_reply"


def _replay_id(n: int, taken: set[str]) -> str:
    rid = f"distill-replay-{n:04d}"
    while rid in taken:
        rid += "x"
    return rid


def write_outputs(w: StageWriter, plan: Plan, rejects: list[tuple[Any, str, str]], n_in: int, settings: DistillSettings,
                  foreign: set[str], taken: set[str]) -> None:
    """Every record (its turns' outcomes applied), the replays and the rejects, into the open writer
    ``w``, and their counts into its ``extra``."""
    w.count_in(n_in)
    for obj, reason, detail in rejects:
        w.reject(obj, reason, detail)
    turn_counts: Counter[str] = Counter()
    record_counts: Counter[str] = Counter()
    identical = 0
    for record, turns in plan.records:
        conv = [dict(t) for t in record["conversations"]]
        outcomes = []
        for turn in turns:
            if turn.job is not None:
                turn.outcome = _outcome(turn.job, record, turn.index, settings, foreign)
            if not turn.outcome:
                turn.outcome = "original:off"
            if turn.outcome == "rewritten":
                assert turn.job is not None and turn.job.result is not None
                new = turn.job.result.text.strip()
                identical += new == conv[turn.index]["value"].strip()
                conv[turn.index] = {**conv[turn.index], "value": new, "original": conv[turn.index]["value"]}
            elif turn.job is not None and turn.job.result is not None and turn.job.result.error is None:
                conv[turn.index] = {**conv[turn.index], "refused": turn.job.result.text}  # for inspection; training reads "value"
            outcomes.append(turn.outcome)
        turn_counts.update(outcomes)
        outcome = _record_outcome(outcomes)
        record_counts[outcome] += 1
        w.keep({**record, "conversations": conv, "distill": outcome, "distill_turns": outcomes})
    dropped: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    n = 0
    for source, prompt, job in plan.replays:
        assert job.result is not None
        problem = "context" if job.result.error is not None else replay_problem(job.result.text, job.result.finish_reason, foreign)
        if problem:
            dropped[problem] += 1
            continue
        rid = _replay_id(n, taken)
        n += 1
        w.keep({"id": rid, "conversations": [{"from": "human", "value": prompt},
                                             {"from": "gpt", "value": job.result.text.strip()}],
                "distill": "replay", "replay_source": source}, counts=False)
        sources[source.split(":", 1)[0]] += 1
    w.extra.update(turns=dict(sorted(turn_counts.items())), turns_rewritten_identical=identical,
                   records=dict(sorted(record_counts.items())),
                   replay={"asked": len(plan.replays), "written": n, "dropped": dict(sorted(dropped.items())),
                           "sources": dict(sorted(sources.items()))})


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, DistillSettings, "distill")
    chat_settings = settings_from_args(args, ChatSettings, "chat")
    out, base = Path(args.output), Path(args.base)
    progress = Path(args.progress) if args.progress else partial_path(out)
    log_settings("distill", settings, input=args.input, base=base, output=out, progress=progress)
    t0 = time.time()
    # No output may be an input or another output (checked again when the writer opens them): found
    # now, not after minutes of generation.
    reads = [Path(args.input), *([Path(args.config)] if getattr(args, "config", None) else []),
             *([Path(settings.replay_prompts)] if settings.replay_prompts else [])]
    check_output_files([("-o", out), ("--rejects", Path(args.rejects) if args.rejects else rejects_path(out)),
                        ("--stats", Path(args.stats) if args.stats else stats_path(out)), ("--progress", progress)],
                       [*reads, base])
    # Read and check every record first (nothing is loaded for a file that cannot be read).
    plan = Plan()
    rejects: list[tuple[Any, str, str]] = []
    seen: set[str] = set()
    n_in = 0
    for where, obj in read_records(args.input):
        n_in += 1
        if isinstance(obj, InvalidLine):
            rejects.append((obj, obj.reason, f"{where}: {obj.error}"))
            continue
        problem = conversation_problem(obj)
        if problem:
            rejects.append((obj, "malformed_record", f"{where}: {problem}"))
            continue
        if obj["id"] in seen:
            rejects.append((obj, "duplicate_id", f"{where}: id {obj['id']!r} seen before"))
            continue
        seen.add(obj["id"])
        plan.records.append((obj, [Turn(i) for i, t in enumerate(obj["conversations"]) if t["from"] == "gpt"]))
    mode: str = settings.mode
    why = "distill.mode"
    template_name: str | None = None
    counts: dict[str, Any] = {}
    asked = 0
    foreign: set[str] = set()
    if mode != "off":
        check_model_dir(base, "base model")
        device = pick_device(settings.device)
        from llama_pipe.weights.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(base)
        template = resolve_template(chat_settings.template, [base], tokenizer)
        template_name = template.name
        mode, why = resolve_mode(settings, tokenizer, template_name, base, device)
        log.info("distill: mode %s (%s)", mode, why)
    prompts = read_prompts(settings.replay_prompts) if mode in ("replay", "both") else []
    if mode != "off":
        chat = load_base(base, device, tokenizer, template, chat_settings)
        base_fp = base_fingerprint(base)
        foreign = base_names(chat.template, settings.keep_terms)
        plan_rewrites(plan, chat, settings, mode in ("rewrite", "both"), base_fp)
        if mode in ("replay", "both"):
            asked = plan_replays(plan, chat, settings, prompts, base_fp)
        jobs = list(plan.jobs.values())
        log.info("distill: %d replies to generate (%d rewrites, %d replays; base names refused in them: %s)", len(jobs),
                 sum(t.job is not None for _, ts in plan.records for t in ts), len(plan.replays), ", ".join(sorted(foreign)) or "none")
        t_gen = time.time()
        from tqdm import tqdm

        with tqdm(total=len(jobs), desc="distill", unit="reply", disable=None) as bar:
            counts = generate(chat, jobs, settings.batch_size, progress, bar.update)
        counts["seconds"] = round(time.time() - t_gen, 2)
    with StageWriter("distill", out, args.rejects, args.stats, inputs=reads) as w:
        write_outputs(w, plan, rejects, n_in, settings, foreign, seen)
        w.extra.update(mode=settings.mode, resolved_mode=mode, why=why, base=str(base), template=template_name,
                       generation=counts, seconds=round(time.time() - t0, 2), settings=to_dict(settings))
        w.extra["replay"]["asked"] = asked
    progress.unlink(missing_ok=True)
    turns = w.extra["turns"]
    fell_back = {k.split(":", 1)[1]: v for k, v in turns.items() if k.startswith("original:")}
    print(f"distill ({mode}): records in={w.n_in} out={w.n_out} rejected={sum(w.rejected.values())}; assistant turns "
          f"rewritten={turns.get('rewritten', 0)} original={sum(fell_back.values())} "
          f"({', '.join(f'{k}={v}' for k, v in sorted(fell_back.items())) or 'none'}); replay {w.extra['replay']['written']}/{asked} "
          f"added; {counts.get('generated', 0)} replies generated, {counts.get('resumed', 0)} resumed in {time.time() - t0:.0f} s -> {out}")
    return 0
