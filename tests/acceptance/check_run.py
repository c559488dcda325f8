"""Check a finished default DAG against its acceptance numbers (issues 14 and 25; run by .ci/run after `make run`).

    python tests/acceptance/check_run.py [results/default/eval]

Reads ``metrics.json`` and ``answers.jsonl`` written by ``llama-pipe eval`` and requires:

* the tuned model names "Llama Pipe" in at least 90 % of the held-out identity questions,
* the base model in none of them,
* the tuned model answers the capital of France correctly (question ``general-france``),
* the tuned model's held-out perplexity is lower than the base's,
* retention, on every set eval scored (the bundled bank and the public benchmark): the tuned
  accuracy is at least the base's minus the bound (2 points) and the paired 95% interval of the
  difference excludes a larger drop,
* no three-word opening in more than 15 % of the tuned model's answers to the general questions.

Exit 0 when all hold, 1 naming each one that does not, 2 when the files are missing or unreadable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MIN_IDENTITY_RATE = 0.9
MAX_OPENING_SHARE = 0.15
RETENTION_SETS = 2  # the bundled bank and the public benchmark
FRANCE = "general-france"


def failures(metrics: dict[str, Any], answers: list[dict[str, Any]]) -> list[str]:
    """What the run misses of the acceptance numbers (empty when it passes)."""
    out = []
    identity = (metrics.get("scores") or {}).get("identity") or {}
    tuned, base = identity.get("tuned"), identity.get("base")
    if not tuned or not base:
        return ["no identity scores in metrics.json (were the bundled held-out questions answered?)"]
    if tuned["rate"] < MIN_IDENTITY_RATE:
        out.append(f"tuned names 'Llama Pipe' in {tuned['correct']}/{tuned['scored']} identity questions, "
                   f"needs >= {MIN_IDENTITY_RATE:.0%}")
    if base["correct"] != 0:
        out.append(f"base names 'Llama Pipe' in {base['correct']}/{base['scored']} identity questions, needs none")
    france = [a for a in answers if a.get("model_id") == "tuned" and str(a.get("question_id")) == FRANCE]
    if not france:
        out.append(f"no tuned answer to question {FRANCE!r} in answers.jsonl")
    elif france[0].get("correct") is not True:
        out.append(f"tuned answer to the capital of France is wrong: {france[0]['choices'][0]['turns'][-1]!r}")
    if not metrics["tuned_ppl"] < metrics["base_ppl"]:
        out.append(f"tuned perplexity {metrics['tuned_ppl']:.3f} is not below the base's {metrics['base_ppl']:.3f}")
    retention = metrics.get("retention") or {}
    if len(retention) < RETENTION_SETS:
        out.append(f"retention scored on {len(retention)} set(s) ({', '.join(retention) or 'none'}), needs {RETENTION_SETS} "
                   "(the bundled bank and the public benchmark)")
    for name, r in retention.items():
        o = r["overall"]
        if not o["holds"]:
            out.append(f"retention on {name}: tuned {o['tuned']:.1f} vs base {o['base']:.1f} ({o['diff']:+.1f} points, 95% CI "
                       f"[{o['ci95'][0]:+.1f}, {o['ci95'][1]:+.1f}]) is not within {r.get('bound', 2.0)} points")
    share = ((metrics.get("style") or {}).get("tuned") or {}).get("top_opening_share")
    if share is None:
        out.append("no style of the tuned answers in metrics.json")
    elif share > MAX_OPENING_SHARE:
        top = metrics["style"]["tuned"]["top_opening"]
        out.append(f"{share:.0%} of the tuned general answers open with {top!r}, needs <= {MAX_OPENING_SHARE:.0%}")
    return out


def main(argv: list[str]) -> int:
    eval_dir = Path(argv[0] if argv else "results/default/eval")
    try:
        metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
        answers = [json.loads(line) for line in (eval_dir / "answers.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        print(f"check_run: {eval_dir}: cannot read metrics.json / answers.jsonl ({exc}); run `make run` first", file=sys.stderr)
        return 2
    scores = metrics.get("scores") or {}
    for category, cell in sorted(scores.items()):
        print(f"check_run: {category}: " + ", ".join(f"{m} {c['correct']}/{c['scored']}" for m, c in sorted(cell.items())))
    print(f"check_run: perplexity base {metrics.get('base_ppl')} -> tuned {metrics.get('tuned_ppl')}")
    for name, r in (metrics.get("retention") or {}).items():
        o = r["overall"]
        print(f"check_run: retention {name}: base {o['base']:.1f} -> tuned {o['tuned']:.1f} ({o['diff']:+.1f}, 95% CI "
              f"[{o['ci95'][0]:+.1f}, {o['ci95'][1]:+.1f}], {o['n']} items)")
    missed = failures(metrics, answers)
    for why in missed:
        print(f"check_run: FAILED: {why}", file=sys.stderr)
    if not missed:
        print("check_run: acceptance numbers met")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
