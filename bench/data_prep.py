"""Benchmark: llama-pipe's data stages against FastChat's own ``fastchat/data`` scripts, same input.

    .venv/bin/python bench/data_prep.py [--seeds 30] [--max-length 1024] [--work /tmp/llama-pipe-bench]

Input: the bundled sample generator run with ``--seeds`` different seeds (well-formed records only,
ids made unique; FastChat's scripts crash on malformed records) plus the real samples in
``../shared/data`` when present, written once as a JSON list both pipelines read.

Stages, each a separate command as a user runs them (interpreter start-up included):

| llama-pipe | FastChat |
| --- | --- |
| merge | merge.py |
| clean | clean_sharegpt.py |
| filter-lang --keep [] --skip ko | optional_clean.py --skip-lang ko |
| filter-lang ... --detector cld2 (when pycld2 is installed) | (the same) |
| split --max-length L | split_long_conversation.py --max-length L |
| gather (val_fraction 0.1) | split_train_test.py --ratio 0.9 |

FastChat runs from a separate venv (default ``/tmp/fschat-venv``), created when absent:
``fschat`` with ``--no-deps`` plus what its data scripts import (markdownify, beautifulsoup4, tqdm,
transformers, sentencepiece, protobuf, numpy, polyglot, pycld2, pyicu; pyicu needs the ``libicu-dev``
and ``pkg-config`` Debian packages). Both sides get the same tokenizer (a 2000-piece sentencepiece
model trained on the sample; FastChat loads it with ``use_fast=False`` as its script does).

Besides speed, the script checks output quality on both sides: HTML tags left outside code, code
blocks without a language, the sample's code snippets recovered byte-exact, plain-text turns
altered, and split chunks longer than the limit when rendered the way the trainer renders them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CLD2 = "filter-lang (detector: cld2)"
FSCHAT_PKGS = ["markdownify", "beautifulsoup4", "tqdm", "transformers", "sentencepiece", "protobuf", "numpy",
               "polyglot", "six", "pycld2", "pyicu"]


def sh(cmd: list[str], **kw: Any) -> tuple[float, float, float]:
    """Run a command, fail loudly; (wall seconds, CPU seconds of it and its worker processes, peak RSS
    in MB of the largest of those processes). Measured by GNU time around the command, a small
    process: the rusage of a child forked from this one would count this process's memory."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", tf.name, *cmd], capture_output=True, text=True, **kw)
        dt = time.perf_counter() - t
        if res.returncode != 0:
            sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
        user, system, rss_kb = tf.read().split()[-3:]
    return dt, float(user) + float(system), float(rss_kb) / 1024


def ensure_fschat(venv: Path) -> Path:
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import fastchat.data.clean_sharegpt, polyglot.detect, pycld2, transformers, numpy"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} (fschat --no-deps + its data scripts' imports) ...", flush=True)
    sh(["python3", "-m", "venv", str(venv)])
    sh([str(py), "-m", "pip", "install", "-q", "--no-deps", "fschat"])
    sh([str(py), "-m", "pip", "install", "-q", *FSCHAT_PKGS])
    sh(probe)
    return py


def load_make_sample() -> Any:
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "data" / "sample" / "make_sample.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_input(work: Path, seeds: int) -> tuple[Path, int]:
    from llama_pipe.data.common import conversation_problem

    ms = load_make_sample()
    records: list[dict[str, Any]] = []
    for seed in range(seeds):
        for rec in ms.build(seed + 1):
            if conversation_problem(rec) is None:
                records.append({**rec, "id": f"{rec['id']}-s{seed}"})
    if SHARED.is_dir():
        for name in ("fastchat_dummy_conversation.json", "gitcloner_dummy_en.json", "gitcloner_dummy_cn.json", "gitcloner_test.json"):
            records += json.loads((SHARED / name).read_text(encoding="utf-8"))
    path = work / "input.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path, len(records)


def build_tokenizer(work: Path) -> Path:
    from llama_pipe.chat_template.builtin import get_template
    from llama_pipe.weights.tokenizer import hf_tokenizer_from_sentencepiece, train_sentencepiece

    out = work / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sample = json.loads((REPO / "data" / "sample" / "sharegpt_sample.json").read_text(encoding="utf-8"))
    texts = [t["value"] for r in sample if isinstance(r, dict) and isinstance(r.get("conversations"), list)
             for t in r["conversations"] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    model = train_sentencepiece(texts, out / "tokenizer.model", vocab_size=2000, seed=0)
    tok = hf_tokenizer_from_sentencepiece(model, chat_template=get_template("vicuna_v1.1").chat_template)
    tok.save_pretrained(out)
    return out


def count(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    return len(json.loads(text)) if path.suffix == ".json" else sum(1 for line in text.splitlines() if line.strip())


def load(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]


def run_llama_pipe(inp: Path, work: Path, tok: Path, max_length: int, cld2: bool = True) -> dict[str, tuple[int, tuple[float, float, float]]]:
    d = work / "llama_pipe"
    lp = [sys.executable, "-m", "llama_pipe.cli"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t: dict[str, tuple[int, tuple[float, float, float]]] = {}
    t["merge"] = (count(inp), sh([*lp, "merge", str(inp), "-o", str(d / "merged.jsonl")], env=env))
    t["clean"] = (count(d / "merged.jsonl"), sh([*lp, "clean", str(d / "merged.jsonl"), "-o", str(d / "clean.jsonl")], env=env))
    t["filter-lang"] = (count(d / "clean.jsonl"), sh([*lp, "filter-lang", str(d / "clean.jsonl"), "-o", str(d / "lang.jsonl"),
                                                       "--keep", "[]", "--skip", "ko"], env=env))
    if cld2 and importlib.util.find_spec("pycld2") is not None:  # the optional compiled detector, same input
        t[CLD2] = (count(d / "clean.jsonl"), sh([*lp, "filter-lang", str(d / "clean.jsonl"), "-o", str(d / "lang_cld2.jsonl"),
                                                 "--keep", "[]", "--skip", "ko", "--detector", "cld2"], env=env))
    t["split"] = (count(d / "lang.jsonl"), sh([*lp, "split", str(d / "lang.jsonl"), "-o", str(d / "split.jsonl"),
                                               "--tokenizer", str(tok), "--max-length", str(max_length)], env=env))
    t["train/val"] = (count(d / "split.jsonl"), sh([*lp, "gather", str(d / "split.jsonl"), "--train", str(d / "train.jsonl"),
                                                    "--val", str(d / "val.jsonl"), "--val-fraction", "0.1"], env=env))
    return t


def run_fastchat(py: Path, inp: Path, work: Path, tok: Path, max_length: int) -> dict[str, tuple[int, tuple[float, float, float]]]:
    d = work / "fastchat"
    d.mkdir(parents=True, exist_ok=True)
    fc = [str(py), "-m"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t: dict[str, tuple[int, tuple[float, float, float]]] = {}
    t["merge"] = (count(inp), sh([*fc, "fastchat.data.merge", "--in-file", str(inp), "--out-file", str(d / "merged.json")], env=env))
    t["clean"] = (count(d / "merged.json"), sh([*fc, "fastchat.data.clean_sharegpt", "--in-file", str(d / "merged.json"),
                                                 "--out-file", str(d / "clean.json")], env=env))
    t["filter-lang"] = (count(d / "clean.json"), sh([*fc, "fastchat.data.optional_clean", "--in-file", str(d / "clean.json"),
                                                      "--out-file", str(d / "lang.json"), "--skip-lang", "ko"], env=env))
    t["split"] = (count(d / "lang.json"), sh([*fc, "fastchat.data.split_long_conversation", "--in-file", str(d / "lang.json"),
                                              "--out-file", str(d / "split.json"), "--model-name-or-path", str(tok),
                                              "--max-length", str(max_length)], env=env))
    t["train/val"] = (count(d / "split.json"), sh([*fc, "fastchat.data.split_train_test", "--in-file", str(d / "split.json"),
                                                   "--ratio", "0.9"], env=env))
    return t


def quality(work: Path, tok_dir: Path, max_length: int, inp: Path) -> dict[str, dict[str, Any]]:
    """Output checks on both sides (see the module docstring)."""
    from llama_pipe.chat_template.builtin import get_template, to_messages
    from llama_pipe.data.markdown import code_regions, fence_languages, html_tags_outside_code
    from llama_pipe.weights.tokenizer import load_tokenizer

    snippets = {code for _, code in load_make_sample().CODE}
    plain = {}
    src = load(inp)
    ids = [r["id"] for r in src]
    dup = {i for i in ids if ids.count(i) > 1} if len(ids) < 20000 else set()
    for r in src:
        if r["id"] not in dup and not any("<div" in t["value"] for t in r["conversations"]):
            for i, t in enumerate(r["conversations"]):
                plain[(r["id"], i)] = t["value"].strip()
    tok = load_tokenizer(tok_dir)
    tmpl = get_template("vicuna_v1.1")
    out: dict[str, dict[str, Any]] = {}
    for side, clean, split in (("llama-pipe", "clean.jsonl", "split.jsonl"), ("FastChat", "clean.json", "split.json")):
        recs = load(work / side.lower().replace("-", "_") / clean)
        tags = nolang = exact = blocks = changed = plain_n = 0
        for r in recs:
            for i, t in enumerate(r["conversations"]):
                v = t["value"]
                tags += bool(html_tags_outside_code(v))
                langs = fence_languages(v)
                blocks += len(langs)
                nolang += sum(1 for x in langs if not x)
                for s, e in code_regions(v):
                    m = re.match(r"(`{3,})[^\n]*\n(.*)\n?\1$", v[s:e], re.S)
                    if m and (m.group(2) in snippets or m.group(2) + "\n" in snippets):
                        exact += 1
                if (r["id"], i) in plain:
                    plain_n += 1
                    changed += v != plain[(r["id"], i)]
        chunks = load(work / side.lower().replace("-", "_") / split)
        texts = [tmpl.render(to_messages({"conversations": c["conversations"]}))[0] for c in chunks if c["conversations"]]
        over = sum(len(ids) > max_length for ids in tok(texts, add_special_tokens=True)["input_ids"])
        rate_limited = sum(1 for r in recs for t in r["conversations"] if t["value"].lstrip("!").startswith("Too many requests in 1 hour"))
        out[side] = {"kept after clean": len(recs), "rate-limit replies kept": rate_limited,
                     "turns with HTML tags outside code": tags,
                     "code blocks without a language": f"{nolang} / {blocks}", "sample code blocks byte-exact": exact,
                     "plain-text turns altered": f"{changed} / {plain_n}",
                     f"split chunks > {max_length} tokens (trainer rendering)": f"{over} / {len(chunks)}",
                     "empty split chunks": sum(1 for c in chunks if not c["conversations"])}
    return out


Best = dict[str, tuple[int, float, float, float]]


def best(runs: list[dict[str, tuple[int, tuple[float, float, float]]]]) -> Best:
    """Per stage: conversations in, the smallest wall time, the smallest CPU time and the largest
    peak RSS (MB, the biggest single process of the stage) over runs."""
    return {k: (runs[0][k][0], min(r[k][1][0] for r in runs), min(r[k][1][1] for r in runs), max(r[k][1][2] for r in runs))
            for k in runs[0]}


def table(lp: Best, fc: Best, n: int) -> list[str]:
    rows = ["| stage | conv in (ours / FastChat) | llama-pipe wall s | FastChat wall s | wall speed-up "
            "| llama-pipe CPU s | FastChat CPU s | CPU speed-up | llama-pipe peak RSS MB | FastChat peak RSS MB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for stage in lp:
        (ln, lw, lc, lm), (fn, fw, fcpu, fm) = lp[stage], fc["filter-lang" if stage == CLD2 else stage]
        rows.append(f"| {stage} | {ln} / {fn} | {lw:.2f} | {fw:.2f} | {fw / lw:.1f}x | {lc:.2f} | {fcpu:.2f} | "
                    f"{fcpu / lc:.1f}x | {lm:,.0f} | {fm:,.0f} |")
    fw, fcpu, fm = sum(v[1] for v in fc.values()), sum(v[2] for v in fc.values()), max(v[3] for v in fc.values())
    variants = [("**end to end** (default: langdetect)", [k for k in lp if k != CLD2])]
    if CLD2 in lp:
        variants.append(("**end to end, detector: cld2**", [k for k in lp if k != "filter-lang"]))
    for label, keys in variants:
        lw, lc, lm = sum(lp[k][1] for k in keys), sum(lp[k][2] for k in keys), max(lp[k][3] for k in keys)
        rows.append(f"| {label} | {n} | {lw:.2f} | {fw:.2f} | **{fw / lw:.1f}x** | {lc:.2f} | {fcpu:.2f} | "
                    f"**{fcpu / lc:.1f}x** | {lm:,.0f} | {fm:,.0f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=30, help="sample generator seeds (about 91 conversations each)")
    ap.add_argument("--input", type=Path, help="a prepared input instead (a JSON list, e.g. make_sample.py --corpus N OUT)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2, help="runs per pipeline (alternating); the best time counts")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama-pipe-bench"))
    ap.add_argument("--fschat-venv", type=Path, default=Path("/tmp/fschat-venv"))
    ap.add_argument("--sides", default="llama-pipe,FastChat", help="which pipelines to run (comma-separated)")
    ap.add_argument("--no-cld2", action="store_true", help="skip the filter-lang run with detector cld2")
    ap.add_argument("--skip-quality", action="store_true", help="skip the output checks (they load every output)")
    ap.add_argument("--json", type=Path, help="write the raw timings here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sides = args.sides.split(",")
    py = ensure_fschat(args.fschat_venv) if "FastChat" in sides else Path(sys.executable)
    if args.input:
        inp, n = args.input, count(args.input)
    else:
        inp, n = build_input(args.work, args.seeds)
    tok = build_tokenizer(args.work)
    print(f"input: {inp}, {n} conversations, {inp.stat().st_size / 1e6:.1f} MB; {os.cpu_count()} cores", flush=True)
    lp_runs: list[Any] = []
    fc_runs: list[Any] = []
    loads = []
    for _ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        if "llama-pipe" in sides:
            lp_runs.append(run_llama_pipe(inp, args.work, tok, args.max_length, cld2=not args.no_cld2))
            print("llama-pipe:", json.dumps(lp_runs[-1]), flush=True)
        if "FastChat" in sides:
            fc_runs.append(run_fastchat(py, inp, args.work, tok, args.max_length))
            print("FastChat:", json.dumps(fc_runs[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"input": str(inp), "n": n, "loads": loads, "llama-pipe": lp_runs, "FastChat": fc_runs}, indent=1))
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average at the start of each run {', '.join(f'{x:.1f}' for x in loads)}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; best of {args.repeat} runs\n")
    if lp_runs and fc_runs:
        print("\n".join(table(best(lp_runs), best(fc_runs), n)))
    if not args.skip_quality and lp_runs and fc_runs:
        q = quality(args.work, tok, args.max_length, inp)
        qrows = ["| output check | llama-pipe | FastChat |", "| --- | ---: | ---: |"]
        for key in q["llama-pipe"]:
            qrows.append(f"| {key} | {q['llama-pipe'][key]} | {q['FastChat'][key]} |")
        print()
        print("\n".join(qrows))


if __name__ == "__main__":
    main()
