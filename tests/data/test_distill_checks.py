"""distill's checks of a generated reply: facts a rewrite must keep, names it may not bring in, loops."""

from __future__ import annotations

from llama_pipe.config import DistillSettings
from llama_pipe.data import distill_checks


def test_a_rewrite_that_keeps_the_facts_is_used() -> None:
    settings = DistillSettings()
    original = "Sure! Rest it for 5 minutes, then see https://example.org. Ask Maria; run `ls`.\n\n1. First\n2. Second"
    kept = "Rest it 5 minutes. Maria knows; run `ls` and read https://example.org. First, then second."
    assert distill_checks.rewrite_problem(kept, original, "Tell me.", "stop", settings, set()) is None
    assert distill_checks.rewrite_problem(kept, original, "", "length", settings, set()) == "truncated"
    assert distill_checks.rewrite_problem("Hi, I am SmolLM.", "Hi.", "", "stop", settings, {"SmolLM"}) == "new_name"
    # a name the user wrote may appear in the rewrite; "AI" (an acronym) may be added
    assert distill_checks.rewrite_problem("Hello Maria, I am an AI.", "Hello!", "I am Maria.", "stop", settings, set()) is None
    loose = DistillSettings(require=[])
    assert distill_checks.rewrite_problem("Rest it a while.", original, "", "stop", loose, set()) is None


def test_numbers_names_and_loops() -> None:
    text = "1. Use 2 eggs and 1.5 cups.\n2. Bake at 180 for 25 minutes (see `x = 3`).\n\nAsk Ada Lovelace or NASA."
    assert distill_checks.numbers(text) == {"2", "1.5", "180", "25"}  # list markers and inline code are not facts
    assert distill_checks.names(text) == {"Ada", "Lovelace", "NASA"}
    assert distill_checks.names("Hello. I'm SmolLM, by Hugging Face.", new_only=True) == {"SmolLM", "Hugging", "Face"}
    assert distill_checks.names("| 1 | Get up early |\n- Carry cash") == set()
    assert distill_checks.degenerate("it is text-based text-based text-based text-based text-based", "")
    assert not distill_checks.degenerate("Rest it for five minutes so the juices settle before you cut it.", "")
