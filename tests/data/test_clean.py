"""clean: every clean_sharegpt case, the HTML -> markdown guarantees, parallel determinism."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_pipe.config import CleanSettings
from llama_pipe.data.clean import clean_record
from llama_pipe.data.markdown import fence_languages, html_tags_outside_code, to_markdown
from tests.data.conftest import cli, read_jsonl, stats_of, turns, write_jsonl

DIV = '<div class="markdown prose w-full break-words dark:prose-invert light">'


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, content) of every ``` block, content exactly as between the fence lines."""
    return [(m.group(2), m.group(3)) for m in re.finditer(r"^(`{3,})(\S*)\n(.*?)^\1$", text, re.S | re.M)]


def test_code_blocks_are_byte_exact_with_their_language(make_sample: ModuleType) -> None:
    rng = random.Random(1)
    for lang, code in make_sample.CODE:
        for _ in range(2):  # with and without highlighter spans
            html = DIV + "<p>Example:</p>" + make_sample.code_block(lang, code, rng) + "<p>Done.</p></div>"
            md = to_markdown(html)
            blocks = fenced_blocks(md)
            assert blocks == [(lang or "scss", code)], md
            assert md.startswith("Example:\n\n```") and md.endswith("```\n\nDone.")
            assert "Copy code" not in md and not html_tags_outside_code(md)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=6)
                | st.sampled_from(["<", ">", "&", "```", "\n", "    ", "\t", "&amp;", "</pre>", "<span>"]),
                min_size=1, max_size=20).map("".join))
def test_any_code_survives_exactly(code: str) -> None:
    """Whatever the code, escaping it into ChatGPT's HTML and cleaning gives it back unchanged."""
    from html import escape

    if not code.strip():
        return
    html = (DIV + '<pre><div class="bg-black mb-4 rounded-md"><div class="flex"><span class="">rust</span>'
            '<button class="flex ml-auto gap-2"><svg></svg>Copy code</button></div><div class="p-4">'
            f'<code class="!whitespace-pre hljs language-rust">{escape(code)}</code></div></div></pre></div>')
    md = to_markdown(html)
    ticks = re.match(r"`{3,}", md)
    assert ticks and md.startswith(ticks.group(0) + "rust\n") and md.endswith("\n" + ticks.group(0))
    body = md[len(ticks.group(0)) + len("rust\n"): -len(ticks.group(0))]
    assert body == (code if code.endswith("\n") else code + "\n")


def test_markup_entities_tables_links_lists() -> None:
    html = ("1 / 2" + DIV + "<p>Use <code>&lt;div&gt;</code> &amp; &quot;quotes&quot; &#x27;x&#x27; &lt;b&gt;.</p>"
            "<ol><li>first <strong>bold</strong></li><li>second <em>it</em></li></ol>"
            '<table><thead><tr><th>A</th><th>B</th></tr></thead><tbody><tr><td>1</td><td>x_y</td></tr></tbody></table>'
            '<p>See <a href="https://example.com/a_b" target="_new">the docs</a>. Copy12 chars / 3 words</p></div>')
    md = to_markdown(html)
    assert md.startswith("Use `<div>` & \"quotes\" 'x' `<b>`.")  # entities decoded, stray tag put in code
    assert "1. first **bold**\n2. second *it*" in md
    assert "| A | B |\n| --- | --- |\n| 1 | x_y |" in md
    assert "[the docs](https://example.com/a_b)" in md
    assert "Copy12" not in md and "1 / 2" not in md and not html_tags_outside_code(md)


def test_plain_text_is_kept_as_written() -> None:
    text = "Line one\n\nLine_two *not emphasis*\n    indented\n\n```\nx = 1\n```\nUse a <div> or List<String>."
    md = to_markdown(text)
    assert md == "Line one\n\nLine_two *not emphasis*\n    indented\n\n```text\nx = 1\n```\nUse a `<div>` or List<String>."
    assert fence_languages(md) == ["text"] and not html_tags_outside_code(md)


def test_fastchat_copy_code_leftovers_in_plain_text() -> None:
    md = to_markdown("Here:\n```pythonCopy codeprint('hi')\n```\nand ```Copy code```\nend")
    assert fenced_blocks(md) == [("python", "print('hi')\n")] and "Copy code" not in md


@pytest.mark.parametrize("lead", ["", "<dl><dt>x</dt></dl>"])  # fast path, markdownify fallback
def test_deep_nesting_is_a_reject_not_a_crash(lead: str) -> None:
    deep = DIV + lead + "<div>" * 3000 + "<p>deep</p>" + "</div>" * 3000 + "</div>"
    res = clean_record({"id": "d", "conversations": turns("q?", deep)}, CleanSettings())
    assert res.record is None and res.reason == "html_too_deep"


def _clean(recs: list[object], tmp_path: Path, *flags: str, name: str = "c") -> tuple[list[dict], dict]:
    inp = write_jsonl(tmp_path / f"{name}.in.jsonl", recs)
    out = tmp_path / f"{name}.jsonl"
    assert cli("clean", inp, "-o", out, *flags) == 0
    return read_jsonl(out), stats_of(out)


def test_fastchat_cases(tmp_path: Path) -> None:
    ok = DIV + "<p>A long enough answer about the sky.</p></div>"
    recs = [
        {"id": "first_gpt", "conversations": [{"from": "gpt", "value": ok}] + turns("Why is the sky blue?", ok)},
        {"id": "last_human", "conversations": turns("Tell me about rice.", ok, "and more?")},
        {"id": "non_alt", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": ok}]},
        {"id": "one_turn", "conversations": turns("alone")},
        {"id": "rate", "conversations": turns("Poem please", DIV + "<p>Too many requests in 1 hour. Try again later.</p></div>")},
        {"id": "blocked", "conversations": turns("Who are you?", DIV + "<p>I was trained by OpenAI.</p></div>")},
        {"id": "short", "conversations": turns("hi", "yo")},
        {"id": "empty_first", "conversations": turns("", ok)},
        {"id": "cut", "conversations": turns("Question one here", ok, "Question two", DIV + "</div>")},
        {"id": "dup", "conversations": turns("Tell me about bread.", ok)},
        {"id": "dup", "conversations": turns("Another question entirely", ok)},
        {"id": "same_first", "conversations": turns("Why is the sky blue?", ok, "more", ok)},
        {"id": "plug", "plugins": ["web"], "conversations": turns("Search the web for me", ok)},
        {"id": "bad", "conversations": "nope"},
    ]
    kept, stats = _clean(recs, tmp_path)
    assert [r["id"] for r in kept] == ["first_gpt", "last_human", "cut", "dup"]
    assert kept[0]["conversations"][0] == {"from": "human", "value": "Why is the sky blue?"}
    assert len(kept[1]["conversations"]) == 2 and len(kept[2]["conversations"]) == 2
    assert stats["rejected"] == {"non_alternating_roles": 1, "too_few_turns": 1, "blocked_reply": 1, "blocked_word": 1,
                                 "too_short": 1, "empty_turn": 1, "duplicate_id": 1, "duplicate_first_exchange": 1,
                                 "plugin": 1, "malformed_record": 1}
    assert stats["repaired"] == {"first_gpt_dropped": 1, "trailing_human_dropped": 1, "cut_at_empty_turn": 1}
    # the lists are configurable, and a gpt-first record can be rejected instead
    kept2, stats2 = _clean(recs, tmp_path, "--blocked-words", "[]", "--fix-roles", "reject", name="c2")
    assert "blocked" in [r["id"] for r in kept2] and stats2["rejected"]["first_turn_not_human"] == 1


def test_sample_output_guarantees_and_worker_independence(tmp_path: Path, sample: Path) -> None:
    out1, out2 = tmp_path / "w1.jsonl", tmp_path / "w2.jsonl"
    assert cli("clean", sample, "-o", out1, "--workers", "1") == 0
    assert cli("clean", sample, "-o", out2, "--workers", "2") == 0
    assert out1.read_bytes() == out2.read_bytes()
    stats = stats_of(out1)
    kept = read_jsonl(out1)
    assert stats["in"] == len(json.loads(sample.read_text())) and stats["out"] == len(kept) > 60
    assert {r["id"] for r in kept}.isdisjoint({"broken_rate_limit", "broken_blocked_word", "broken_non_alternating"})
    n_blocks = 0
    for rec in kept:
        for t in rec["conversations"]:
            assert not html_tags_outside_code(t["value"]), t["value"][:300]
            langs = fence_languages(t["value"])
            assert all(langs), t["value"][:300]
            n_blocks += len(langs)
            assert "Copy code" not in t["value"] and not re.match(r"\d+ / \d+", t["value"])
    assert n_blocks > 20


def test_shared_real_samples(tmp_path: Path, shared_data: Path) -> None:
    for name in ("fastchat_dummy_conversation.json", "gitcloner_dummy_cn.json", "gitcloner_test.json"):
        out = tmp_path / f"{name}.jsonl"
        assert cli("clean", shared_data / name, "-o", out) == 0
        stats = stats_of(out)
        src = json.loads((shared_data / name).read_text())
        assert stats["in"] == len(src) and stats["out"] > 0
        kept = read_jsonl(out)
        by_id = {r["id"]: r for r in src}
        for rec in kept:
            for t, orig in zip(rec["conversations"], by_id[rec["id"]]["conversations"]):
                assert not html_tags_outside_code(t["value"])
                # plain text is not reflowed: the cleaned turn is the original, stripped
                assert t["value"] == orig["value"].strip()


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<ul><li>a<ul><li>b</li><li>c</li></ul></li><li>d</li></ul>", "- a\n  - b\n  - c\n- d"),
        ('<ol start="3"><li><p>first</p><p>second</p></li><li>x</li></ol>', "3. first\n\n   second\n4. x"),
        ("<blockquote><p>quoted</p><p>two</p></blockquote>", "> quoted\n>\n> two"),
        ("<h2>Title &amp; more</h2><hr><p>x</p>", "## Title & more\n\n---\n\nx"),
        ("<table><tr><td>a|b</td><td>c</td></tr></table>", "|  |  |\n| --- | --- |\n| a\\|b | c |"),
        ('<p>Use <code>a`b</code> and <img src="i.png" alt="pic"> <del>old</del></p>', "Use `` a`b `` and ![pic](i.png) ~~old~~"),
    ],
)
def test_fast_converter_markup(html: str, expected: str) -> None:
    from llama_pipe.data import html_fast

    assert html_fast.convert(html) == expected


def test_unknown_markup_falls_back_to_markdownify() -> None:
    from llama_pipe.data import html_fast

    html = DIV + "<dl><dt>term</dt><dd>definition</dd></dl><p>after</p></div>"
    with pytest.raises(html_fast.Unsupported):
        html_fast.convert(html)
    md = to_markdown(html)
    assert "term" in md and "definition" in md and "after" in md and not html_tags_outside_code(md)


def test_fast_converter_agrees_with_markdownify_on_the_sample(sample: Path) -> None:
    """On every HTML turn of the sample the fast path gives markdownify's markdown."""
    from llama_pipe.data import html_fast
    from llama_pipe.data.markdown import _markdownify, is_html

    n = 0
    for rec in json.loads(sample.read_text()):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            continue
        for t in rec["conversations"]:
            v = t.get("value") if isinstance(t, dict) else None
            if isinstance(v, str) and is_html(v) and "<pre" not in v:
                n += 1
                assert html_fast.convert(v) == _markdownify(v).strip().replace("  \n", "\n")
    assert n > 100


def test_control_characters_are_removed() -> None:
    """NUL and other control characters never reach the output; VT/FF/NEL become line breaks;
    tab, newline, CR and non-control characters (U+2028, emoji) stay."""
    assert to_markdown("a\x00b\x01c\x7fd\x9fe") == "abcde"
    assert to_markdown("one\x0ctwo\x85three\x0bfour") == "one\ntwo\nthree\nfour"
    assert to_markdown("tab\there\r\nline\u2028sep \U0001f600") == "tab\there\r\nline\u2028sep \U0001f600"
    assert to_markdown(DIV + "<p>Yes\x00 &amp; no&#12;</p></div>") == "Yes & no"
    assert to_markdown("\x00\x00") == ""
    rec = {"id": "n", "conversations": [{"from": "human", "value": "\x00\x00"}, {"from": "gpt", "value": "a reply"}]}
    assert clean_record(rec, CleanSettings()).reason == "empty_turn"


def test_script_and_style_are_dropped_with_their_content() -> None:
    html = (DIV + "<style>.x{color:red}</style><script>alert('a')</script><p>Hello <b>you</b>.</p>"
            '<SCRIPT type="text/javascript">document.cookie="c"</SCRIPT><p>Bye.</p><script>never closed</div>')
    assert to_markdown(html) == "Hello **you**.\n\nBye."
    # markup markdownify converts (a form element) goes the same way
    assert to_markdown("<div><form><p>x</p></form><script>alert(1)</script><style>p{}</style></div>") == "x"
    # in plain text it is the user's own text: kept, the tags put in code
    assert to_markdown("What does <script>alert(1)</script> do?") == "What does `<script>`alert(1)`</script>` do?"
