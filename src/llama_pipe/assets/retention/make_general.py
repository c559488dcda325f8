"""Writes ``general.jsonl``, llama-pipe's own retention item bank (``python make_general.py``).

Deterministic: the same bytes every run. Five categories: ``arithmetic`` and ``units`` are
generated here (fixed seeds); ``world_facts``, ``word_tasks`` and ``short_reasoning`` are the
hand-written lists in ``bank_rows.py`` (well-known, unambiguous facts; distractors of the same
kind that are plainly wrong). None of it is, or may be put, in training data: a test checks that no question
appears in the project's training inputs. Facts the bundled training sample teaches (the capital
of Italy, a spider's legs, minutes in an hour, 3 + 5, water's boiling point, Brazil's language,
the largest ocean) and the held-out eval questions' facts are left out on purpose.

Each item: ``id``, ``category``, ``question``, ``choices`` (the correct one at a rotating
position, so "always the first choice" scores 1/k), ``answer`` (its index) and ``split``: every
fourth item of a category (after a fixed shuffle) is ``dev`` (checkpoint selection), the rest
``test`` (the reported eval).

The bank grew once (December 2026): about 80 more ``test`` items a category, to make the reported
eval's interval narrower. They come after the first bank's 442 items, numbered on from each
category's last id, from their own random streams (arithmetic and units from other seeds, no
question the first bank asks; the hand-written rows in ``bank_added.py``), so the first bank's
items, and the 113-item dev split, keep every byte.

Run as a script or loaded from its path (the bank's test does), so the sibling row modules are
imported from this file's folder, which is not a Python package.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bank_added import SHORT_REASONING_ADDED, UNIT_ROWS_ADDED, WORD_TASKS_ADDED, WORLD_FACTS_ADDED  # noqa: E402
from bank_rows import SHORT_REASONING, WORD_TASKS, WORLD_FACTS, Row  # noqa: E402

# Reply frames for the hand-written lists' common question forms (a choice is the whole reply:
# "The opposite of hot is cold.", which a chat model says, rather than a bare "cold").
FRAMES = [
    (r"What is the capital of (.+)\?", "The capital of {0} is {{}}."),
    (r"What is the opposite of '(.+)'\?", "The opposite of {0} is {{}}."),
    (r"Which word means the same as '(.+)'\?", "A word that means the same as {0} is {{}}."),
    (r"What is the plural of '(.+)'\?", "The plural of {0} is {{}}."),
    (r"What is the past tense of '(.+)'\?", "The past tense of {0} is {{}}."),
    (r"Which word rhymes with '(.+)'\?", "{0} rhymes with {{}}."),
    (r"What is a baby (.+) called\?", "A baby {0} is called {{}}."),
    (r"What is the (female|comparative|superlative) form of '(.+)'\?", "The {0} form of {1} is {{}}."),
    (r"What do you call a person who (.+)\?", "A person who {0} is called {{}}."),
]


def framed(row: Row) -> tuple[str, list[str]]:
    """The question and its choices (the correct one first): a row's own frame (its second field,
    holding ``{}``), else the first matching :data:`FRAMES` entry, else the bare answers."""
    question, *rest = row
    if "{}" in rest[0]:
        frame, answers = rest[0], rest[1:]
    else:
        frame, answers = "{}", rest
        for pattern, template in FRAMES:
            if m := re.fullmatch(pattern, question):
                frame = template.format(*m.groups())
                break
    return question, [(c := frame.format(a))[0].upper() + c[1:] for a in answers]


# ----------------------------------------------------------------------------- generated categories


def _near(rng: random.Random, answer: int, avoid: set[int]) -> list[str]:
    """Three distractors close to ``answer``: positive, not an operand (a model that echoes the
    question would pick it), and no number written as the start of another ("1" vs "12")."""
    pool = [answer + d for d in (-10, -2, -1, 1, 2, 10) if answer + d > 0 and answer + d not in avoid]
    pool = [x for x in pool if not (str(x).startswith(str(answer)) or str(answer).startswith(str(x)))]
    picked: list[int] = []
    for x in rng.sample(pool, len(pool)):
        if len(picked) < 3 and not any(str(x).startswith(str(y)) or str(y).startswith(str(x)) for y in picked):
            picked.append(x)
    return [str(x) for x in picked]


def arithmetic(rng: random.Random, n: int = 90, skip: frozenset[str] = frozenset()) -> list[Row]:
    """Small sums, differences, products and quotients, answered as the equation ("4 + 3 = 7"),
    none of them a question in ``skip``."""
    rows: list[Row] = []
    seen: set[str] = set(skip)
    kinds = ["add", "sub", "mul", "div", "add2"]
    while len(rows) < n:
        kind = kinds[len(rows) % len(kinds)]
        if kind == "add":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, f, ans = f"What is {a} + {b}?", f"{a} + {b} = {{}}", a + b
        elif kind == "add2":
            a, b = rng.randint(10, 49), rng.randint(10, 49)
            q, f, ans = f"What is {a} + {b}?", f"{a} + {b} = {{}}", a + b
        elif kind == "sub":
            a, b = rng.randint(10, 30), rng.randint(2, 9)
            q, f, ans = f"What is {a} - {b}?", f"{a} - {b} = {{}}", a - b
        elif kind == "mul":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q, f, ans = f"What is {a} times {b}?", f"{a} × {b} = {{}}", a * b
        else:
            b, ans = rng.randint(2, 9), rng.randint(2, 9)
            a = b * ans
            q, f = f"What is {a} divided by {b}?", f"{a} ÷ {b} = {{}}"
        if q in seen or {a, b} == {3, 5}:  # 3 + 5 is in the training sample
            continue
        seen.add(q)
        rows.append((q, f, str(ans), *_near(rng, ans, {a, b})))
    return rows


# (unit, its plural, smaller unit, how many of the smaller in one); minutes per hour is taught in training: left out
UNIT_FACTS = [
    ("meter", "meters", "centimeters", 100), ("kilometer", "kilometers", "meters", 1000), ("kilogram", "kilograms", "grams", 1000),
    ("liter", "liters", "milliliters", 1000), ("minute", "minutes", "seconds", 60), ("day", "days", "hours", 24), ("week", "weeks", "days", 7),
    ("year", "years", "months", 12), ("foot", "feet", "inches", 12), ("yard", "yards", "feet", 3), ("centimeter", "centimeters", "millimeters", 10),
    ("meter", "meters", "millimeters", 1000), ("century", "centuries", "years", 100), ("decade", "decades", "years", 10),
    ("millennium", "millennia", "years", 1000), ("pound", "pounds", "ounces", 16), ("byte", "bytes", "bits", 8),
]
WRONG_FACTOR = {60: 100, 100: 60, 1000: 100, 12: 10, 10: 100, 24: 12, 7: 5, 3: 12, 16: 12, 8: 10}

UNIT_ROWS: list[Row] = [
    ("Which is longer: one meter or one centimeter?", "{} is longer.", "One meter", "One centimeter"),
    ("Which is longer: one mile or one inch?", "{} is longer.", "One mile", "One inch"),
    ("Which is longer: one week or one day?", "{} is longer.", "One week", "One day"),
    ("Which is longer: one year or one month?", "{} is longer.", "One year", "One month"),
    ("Which is longer: one minute or one second?", "{} is longer.", "One minute", "One second"),
    ("Which is longer: one decade or one century?", "{} is longer.", "One century", "One decade"),
    ("Which is longer: one foot or one yard?", "{} is longer.", "One yard", "One foot"),
    ("Which is heavier: one kilogram or one gram?", "{} is heavier.", "One kilogram", "One gram"),
    ("Which is heavier: one ton or one kilogram?", "{} is heavier.", "One ton", "One kilogram"),
    ("Which holds more: one liter or one milliliter?", "{} holds more.", "One liter", "One milliliter"),
    ("Which is shorter: one millimeter or one meter?", "{} is shorter.", "One millimeter", "One meter"),
    ("Which is shorter: one second or one hour?", "{} is shorter.", "One second", "One hour"),
    ("Which is lighter: one gram or one kilogram?", "{} is lighter.", "One gram", "One kilogram"),
    ("Which is bigger: one kilobyte or one byte?", "{} is bigger.", "One kilobyte", "One byte"),
    ("What unit is commonly used to measure temperature?", "Temperature is measured in {}.", "degrees Celsius", "kilograms", "meters", "liters"),
    ("What unit is commonly used to measure the weight of a person?", "A person's weight is measured in {}.", "kilograms", "liters", "degrees",
     "seconds"),
    ("What unit is commonly used to measure the volume of milk?", "The volume of milk is measured in {}.", "liters", "meters", "kilograms", "degrees"),
    ("What unit is commonly used to measure the distance between two cities?", "The distance between cities is measured in {}.", "kilometers",
     "grams", "liters", "seconds"),
    ("What unit is commonly used to measure electric current?", "Electric current is measured in {}.", "amperes", "kilograms", "meters", "liters"),
    ("What is the symbol for kilogram?", "The symbol for kilogram is {}.", "kg", "km", "kl", "kgm"),
    ("What is the symbol for centimeter?", "The symbol for centimeter is {}.", "cm", "ct", "cr", "c"),
    ("What is the symbol for milliliter?", "The symbol for milliliter is {}.", "mL", "mg", "mm", "ms"),
    ("What does the 'kilo' in kilometer mean?", "Kilo means {}.", "one thousand", "one hundred", "one tenth", "one million"),
    ("What does the 'centi' in centimeter mean?", "Centi means {}.", "one hundredth", "one thousand", "one tenth", "one hundred"),
    ("Water freezes at what temperature in degrees Celsius?", "Water freezes at {} degrees Celsius.", "0", "100", "32", "-50"),
    ("Normal human body temperature is about how many degrees Celsius?", "It is about {} degrees Celsius.", "37", "100", "10", "60"),
    ("How many sides does a square have?", "A square has {} sides.", "4", "3", "5", "6"),
    ("How many sides does a triangle have?", "A triangle has {} sides.", "3", "4", "5", "2"),
    ("How many degrees are in a right angle?", "A right angle has {} degrees.", "90", "180", "45", "360"),
    ("How many degrees are in a full circle?", "A full circle has {} degrees.", "360", "180", "90", "100"),
    ("How many hours are in half a day?", "Half a day is {} hours.", "12", "24", "6", "30"),
    ("How many months are in half a year?", "Half a year is {} months.", "6", "12", "4", "3"),
    ("How many centimeters are in half a meter?", "Half a meter is {} centimeters.", "50", "5", "500", "100"),
    ("How many grams are in half a kilogram?", "Half a kilogram is {} grams.", "500", "50", "5000", "250"),
    ("How many seconds are in two minutes?", "Two minutes is {} seconds.", "120", "60", "200", "100"),
    ("How many items are in a dozen?", "A dozen is {} items.", "12", "10", "20", "6"),
]


def units(rng: random.Random, n: int = 90) -> list[Row]:
    """Unit facts ("1 kilogram = 1000 grams"), small multiples ("3 kilograms = 3000 grams") and the
    hand-written :data:`UNIT_ROWS` (which is longer, what measures what, symbols)."""
    rows: list[Row] = []
    for big, _bigs, small, k in UNIT_FACTS:
        wrong = sorted({k * 10, max(k // 10, 2), WRONG_FACTOR.get(k, k + 2)} - {k})
        rows.append((f"How many {small} are in one {big}?", f"1 {big} = {{}} {small}", str(k), *[str(w) for w in wrong]))
    for big, bigs, small, k in UNIT_FACTS:
        if big == "millennium":
            continue
        for m in rng.sample([2, 3, 4, 5], 2):
            wrong = sorted({k * m * 10, k + m, k * (m + 1), k * (m - 1) if m > 2 else k * m + k * 2} - {k * m})
            rows.append((f"How many {small} are in {m} {bigs}?", f"{m} {bigs} = {{}} {small}", str(k * m), *[str(w) for w in wrong[:3]]))
    rows += UNIT_ROWS
    rng.shuffle(rows)
    return rows[:n]


def units_added(rng: random.Random, first: list[Row]) -> list[Row]:
    """The units rows added to the test split: for each unit pair, the two small multiples (2 to 5)
    :func:`units` did not ask, one larger multiple (6 to 9) and one conversion back ("How many
    kilograms are in 3000 grams?"), then :data:`UNIT_ROWS_ADDED`; none asked in ``first``."""
    asked = {row[0] for row in first}
    rows: list[Row] = []
    for big, bigs, small, k in UNIT_FACTS:
        if big == "millennium":
            continue
        multiples = [m for m in (2, 3, 4, 5) if f"How many {small} are in {m} {bigs}?" not in asked] + [rng.randint(6, 9)]
        for m in multiples:
            wrong = sorted({k * m * 10, k + m, k * (m + 1), k * (m - 1) if m > 2 else k * m + k * 2} - {k * m})
            rows.append((f"How many {small} are in {m} {bigs}?", f"{m} {bigs} = {{}} {small}", str(k * m), *[str(w) for w in wrong[:3]]))
        m = rng.randint(2, 5)
        wrong = sorted({m * 10, m + 1, m - 1 if m > 2 else m + 2} - {m})
        rows.append((f"How many {bigs} are in {k * m} {small}?", f"{k * m} {small} = {{}} {bigs}", str(m), *[str(w) for w in wrong]))
    return rows + UNIT_ROWS_ADDED


# ----------------------------------------------------------------------------- writing


# Held-out eval questions the arithmetic generator could write (3 + 5, taught in training, it never does)
HELDOUT_ARITHMETIC = frozenset({"What is 2 + 2?", "What is 10 - 3?", "What is 3 times 5?"})


def _item(category: str, n: int, row: Row, rng: random.Random, split: str) -> dict[str, object]:
    """Item ``n`` (0-based) of a category: the distractors shuffled, the correct choice at
    position ``n`` modulo the number of choices."""
    question, (correct, *wrong) = framed(row)
    choices = list(wrong)
    rng.shuffle(choices)
    answer = n % (len(choices) + 1)
    choices.insert(answer, correct)
    return {"id": f"{category}-{n + 1:03d}", "category": category, "question": question, "choices": choices, "answer": answer, "split": split}


def items() -> list[dict[str, object]]:
    """The first bank (442 items, written as it always was), then the added test items."""
    rng = random.Random(25)
    banks = {"arithmetic": arithmetic(random.Random(1)), "units": units(random.Random(2)), "world_facts": WORLD_FACTS,
             "word_tasks": WORD_TASKS, "short_reasoning": SHORT_REASONING}
    out: list[dict[str, object]] = []
    for category, rows in banks.items():
        order = list(range(len(rows)))
        rng.shuffle(order)
        dev = {order[i] for i in range(0, len(order), 4)}
        for n, row in enumerate(rows):
            out.append(_item(category, n, row, rng, "dev" if n in dev else "test"))
    asked = {str(item["question"]) for item in out}
    added = {"arithmetic": arithmetic(random.Random(101), 80, skip=frozenset(asked) | HELDOUT_ARITHMETIC),
             "units": units_added(random.Random(102), banks["units"]), "world_facts": WORLD_FACTS_ADDED,
             "word_tasks": WORD_TASKS_ADDED, "short_reasoning": SHORT_REASONING_ADDED}
    rng = random.Random(26)
    for category, rows in added.items():
        for n, row in enumerate(rows, start=len(banks[category])):
            item = _item(category, n, row, rng, "test")
            if item["question"] in asked:
                raise ValueError(f"{item['id']}: the bank already asks {item['question']!r}")
            asked.add(str(item["question"]))
            out.append(item)
    return out


def main() -> None:
    path = Path(__file__).with_name("general.jsonl")
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items()), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
