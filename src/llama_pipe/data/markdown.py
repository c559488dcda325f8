"""One turn of a ShareGPT scrape -> clean markdown.

Two paths, chosen per turn:

* **HTML** (the value starts with a tag such as ``<div class="markdown prose ...">``, optionally
  after a "1 / 2" regenerate counter): code blocks are cut out first, the rest is converted by
  :mod:`llama_pipe.data.html_fast` (ChatGPT's markup subset, ~10x faster) or, for any other
  element, by markdownify; then the code comes back as fenced blocks. A ChatGPT code block
  (``<pre><div ...><span>LANG</span><button>...Copy code</button></div><div><code class="language-LANG">``)
  becomes ``\\`\\`\\`LANG`` + the code + ``\\`\\`\\```; the code is the ``<code>`` element's text with
  highlighter tags removed and entities decoded, so it is byte-exact with what the user saw.
  Entities are decoded, tables become pipe tables, links ``[text](url)``.
* **Plain text** (the human turns of a scrape, or data cleaned before): left as written except
  FastChat's leftovers ("```pythonCopy code...", "CopyN chars / N words", empty copy-code blocks).
  FastChat runs markdownify here too, which collapses blank lines and backslash-escapes ``_`` and
  ``*``; llama-pipe does not.

``<script>`` and ``<style>`` elements of an HTML turn are dropped with their content. On both paths
control characters are removed (NUL, C0 except tab/LF/CR, DEL, C1; VT/FF/NEL become newlines), a
fence without a language gets ``text`` (every code block names its language),
and any HTML tag left outside code (``use a <div> here``) is put in inline code, so no tag
survives outside code. :func:`html_tags_outside_code` and :func:`fence_languages` are the checks
the tests (and users) run on the output.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterator
from typing import TypedDict

from llama_pipe.data import html_fast

# Element names that count as "an HTML tag" (stray angle brackets such as List<String> or a<b do not).
HTML_TAGS = frozenset(
    "a abbr address area article aside audio b base bdi bdo blockquote body br button canvas caption cite code "
    "col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption figure footer "
    "form h1 h2 h3 h4 h5 h6 head header hr html i iframe img input ins kbd label legend li link main map mark "
    "menu meta meter nav noscript object ol optgroup option output p param picture pre progress q rp rt ruby s "
    "samp script section select small source span strong style sub summary sup svg table tbody td template "
    "textarea tfoot th thead time title tr track u ul var video wbr path rect circle polygon polyline line g".split()
)
_TAG = re.compile(r"</?([A-Za-z][A-Za-z0-9]*)(?:\s[^<>]*)?/?>")
_COUNTER_HTML = re.compile(r"^\s*\d+\s*/\s*\d+\s*(?=<)")
_COUNTER_GLUED = re.compile(r"^\d+ / \d+(?=\S)")
_STARTS_WITH_TAG = re.compile(r"^\s*<([A-Za-z][A-Za-z0-9]*)[\s>/]")
# Every pattern below runs in time linear in its input: no unbounded repetition may backtrack
# across a later "<" (an unclosed tag ends at the next one), and element bodies are found by a
# forward search for the closing tag (:func:`_elements`), never by a lazy ``.*?`` per opening.
_PRE_OPEN = re.compile(r"<pre\b[^<>]*>", re.I)
_PRE_CLOSE = re.compile(r"</pre\s*>", re.I)
_CODE_OPEN = re.compile(r"<code\b([^<>]*)>", re.I)
_CODE_CLOSE = re.compile(r"</code\s*>", re.I)
_LANG_CLASS = re.compile(r"language-([\w+#.-]+)")
_HEADER_LANG = re.compile(r"<span\b[^<>]*>([^<]*)</span>", re.I)
_ANY_TAG = re.compile(r"<[^<>]*>")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
_FENCE_LINE = re.compile(r"^( {0,3})(`{3,}|~{3,})([^\n]*)$", re.M)
_TICKS = re.compile(r"`+")
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_SCRIPT_STYLE_OPEN = re.compile(r"<(script|style)\b[^<>]*>", re.I)
_SCRIPT_STYLE_CLOSE = {"script": re.compile(r"</script\s*>", re.I), "style": re.compile(r"</style\s*>", re.I)}
# C0 controls except tab, LF, CR; DEL; C1 controls. VT, FF and NEL (U+0085) are line breaks.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_BREAK_CONTROLS = {"\x0b": "\n", "\x0c": "\n", "\x85": "\n"}
# A code block cut out of an HTML turn is held by a NUL-delimited mark while the rest is converted.
# NUL is removed from the input first and no entity decodes to it, so user text cannot forge one.
_PLACEHOLDER = "\x00CODEBLOCK{}\x00"
_PLACEHOLDER_LINE = re.compile(r"^([^\n\x00]*)\x00CODEBLOCK(\d+)\x00([^\n]*)$", re.M)
_PLACEHOLDER_ANY = re.compile(r"\x00CODEBLOCK(\d+)\x00")


class _MarkdownifyOptions(TypedDict):
    """The keyword arguments given to ``markdownify.markdownify`` (typed, so ``**`` is checked)."""

    heading_style: str
    bullets: str
    escape_asterisks: bool
    escape_underscores: bool
    escape_misc: bool
    strip: list[str]


_MD_OPTIONS = _MarkdownifyOptions(
    heading_style="atx", bullets="-", escape_asterisks=False, escape_underscores=False, escape_misc=False,
    strip=["button", "svg", "script", "style"],
)


class ConversionError(Exception):
    """A turn that cannot be converted; ``reason`` is the rejects key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_html(value: str) -> bool:
    """True when the turn is rendered HTML (starts with a known tag, after any regenerate counter)."""
    m = _STARTS_WITH_TAG.match(_COUNTER_HTML.sub("", value, count=1))
    return bool(m and m.group(1).lower() in HTML_TAGS)


def to_markdown(value: str, max_chars: int | None = None) -> str:
    """Clean one turn (either path); raises :class:`ConversionError` (``too_large`` when the
    markdown would be longer than ``max_chars``; tables and lists are checked before they are built).

    Control characters are removed before and after conversion (:func:`strip_controls`), so no
    NUL byte or other control character reaches the output (entities such as ``&#12;`` included).
    """
    value = strip_controls(value)
    md = html_to_markdown(value, max_chars) if is_html(value) else plain_to_markdown(value)
    md = strip_controls(md).strip()
    if max_chars is not None and len(md) > max_chars:
        raise ConversionError("too_large", f"cleaned turn is {len(md)} characters, over the limit of {max_chars}")
    return md


def strip_controls(text: str) -> str:
    """``text`` without control characters: C0 (except tab, LF, CR), DEL and C1 are removed;
    vertical tab, form feed and NEL (U+0085) become a newline."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: _LINE_BREAK_CONTROLS.get(m.group(0), ""), text)


# ----------------------------------------------------------------------------- code regions


def code_regions(text: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of fenced blocks and inline code spans, in order."""
    regions: list[tuple[int, int]] = []
    pos = 0
    fences = list(_FENCE_LINE.finditer(text))
    i = 0
    while i < len(fences):
        m = fences[i]
        if m.start() < pos:
            i += 1
            continue
        char, n = m.group(2)[0], len(m.group(2))
        if char == "`" and "`" in m.group(3):  # not a fence opening (``` inside a line of inline code)
            i += 1
            continue
        end = len(text)
        for j in range(i + 1, len(fences)):
            c = fences[j]
            if c.group(2)[0] == char and len(c.group(2)) >= n and not c.group(3).strip():
                end, i = c.end(), j
                break
        else:
            i = len(fences)
        regions.extend(_inline_regions(text, pos, m.start()))
        regions.append((m.start(), end))
        pos = end
        i += 1
    regions.extend(_inline_regions(text, pos, len(text)))
    return regions


def _inline_regions(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Inline code spans in ``text[start:end]``: a run of N backticks up to the next run of exactly
    N backticks (CommonMark's rule), found in one pass over the runs (linear in the text)."""
    runs = [(m.start(), m.end()) for m in _TICKS.finditer(text, start, end)]
    partner: list[int | None] = [None] * len(runs)
    later: dict[int, int] = {}
    for i in range(len(runs) - 1, -1, -1):
        n = runs[i][1] - runs[i][0]
        partner[i] = later.get(n)
        later[n] = i
    i = 0
    while i < len(runs):
        j = partner[i]
        if j is None:
            i += 1
            continue
        yield runs[i][0], runs[j][1]
        i = j + 1


def _elements(text: str, opening: re.Pattern[str], closing: Callable[[re.Match[str]], re.Pattern[str]],
              ) -> Iterator[tuple[re.Match[str], int, int]]:
    """``(opening match, body end, element end)`` of each element, left to right, without overlap.

    An element whose closing tag never comes runs to the end of the text (body end = element end =
    ``len(text)``) and is the last one. One forward search per element: linear in the text.
    """
    pos = 0
    while True:
        m = opening.search(text, pos)
        if m is None:
            return
        c = closing(m).search(text, m.end())
        if c is None:
            yield m, len(text), len(text)
            return
        yield m, c.start(), c.end()
        pos = c.end()


def _outside_code(text: str) -> Iterator[tuple[int, int]]:
    pos = 0
    for s, e in code_regions(text):
        if s > pos:
            yield pos, s
        pos = max(pos, e)
    if pos < len(text):
        yield pos, len(text)


def html_tags_outside_code(text: str) -> list[str]:
    """HTML tags (known element names) that appear outside fenced blocks and inline code."""
    found = []
    for s, e in _outside_code(text):
        found += [m.group(0) for m in _TAG.finditer(text, s, e) if m.group(1).lower() in HTML_TAGS]
    return found


def fence_languages(text: str) -> list[str]:
    """The info string (language) of every fenced code block, in order ('' when missing)."""
    out = []
    for s, e in code_regions(text):
        m = _FENCE_LINE.match(text, s)
        if m and m.start() == s and text[s:e].lstrip(" ").startswith(("```", "~~~")):
            out.append(m.group(3).strip())
    return out


def protect_tags(text: str) -> str:
    """Put HTML tags found outside code into inline code (``<div>`` -> ```<div>```)."""
    if "<" not in text:
        return text
    parts: list[str] = []
    pos = 0
    for s, e in _outside_code(text):
        parts.append(text[pos:s])
        parts.append(_TAG.sub(_wrap_tag, text[s:e]))
        pos = e
    parts.append(text[pos:])
    return "".join(parts)


def _wrap_tag(m: re.Match[str]) -> str:
    tag = m.group(0)
    if m.group(1).lower() not in HTML_TAGS:
        return tag
    return f"`` {tag} ``" if "`" in tag else f"`{tag}`"


def _fence(lang: str, code: str) -> str:
    longest = max((len(r) for r in re.findall(r"`{3,}", code)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{code}{'' if code.endswith(chr(10)) else chr(10)}{ticks}"


def _label_bare_fences(text: str) -> str:
    """Give every fence opening without a language the language ``text``."""
    if "```" not in text and "~~~" not in text:
        return text
    out, pos = [], 0
    for s, e in code_regions(text):
        m = _FENCE_LINE.match(text, s)
        if m and m.start() == s and not m.group(3).strip() and text[s:e].lstrip(" ")[:3] in ("```", "~~~"):
            out.append(text[pos : m.end()] + "text")
            pos = m.end()
    out.append(text[pos:])
    return "".join(out)


# ----------------------------------------------------------------------------- HTML path


def _extract_code(pre_inner: str) -> tuple[str, str]:
    """(language, code) of one ``<pre>`` element's inner HTML."""
    lang = ""
    head, code_html = pre_inner, None
    element = next(_elements(pre_inner, _CODE_OPEN, lambda m: _CODE_CLOSE), None)
    if element is not None and element[1] < len(pre_inner):  # a closed <code> element
        cm = element[0]
        head, code_html = pre_inner[: cm.start()], pre_inner[cm.end() : element[1]]
        lm = _LANG_CLASS.search(cm.group(1))
        if lm:
            lang = lm.group(1)
    if "Copy code" in head or "<button" in head:
        hm = _HEADER_LANG.search(head)
        if hm and hm.group(1).strip():
            lang = hm.group(1).strip()
    if code_html is None:
        cut = pre_inner.rfind("Copy code")
        code_html = pre_inner[cut + len("Copy code") :] if cut >= 0 else pre_inner
    code = html.unescape(_ANY_TAG.sub("", code_html))
    lang = re.sub(r"[^\w+#.-]", "", lang.split()[0]).lower() if lang.split() else ""
    return lang or "text", code


def _cut_elements(text: str, opening: re.Pattern[str], closing: Callable[[re.Match[str]], re.Pattern[str]],
                  replace: Callable[[str], str], closed_only: bool = False) -> str:
    """``text`` with each element (see :func:`_elements`) replaced by ``replace(its body)``;
    ``closed_only``: an element that is never closed is left as it is."""
    out: list[str] = []
    pos = 0
    for m, body_end, end in _elements(text, opening, closing):
        if closed_only and body_end == len(text):
            break
        out.append(text[pos : m.start()])
        out.append(replace(text[m.end() : body_end]))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _markdownify(html_text: str) -> str:
    import markdownify

    try:
        return str(markdownify.markdownify(html_text, **_MD_OPTIONS))
    except RecursionError:
        raise ConversionError("html_too_deep", "HTML nested too deeply to convert") from None
    except (AssertionError, ValueError) as exc:  # bs4.ParserRejectedMarkup is a ValueError subclass
        raise ConversionError("html_parse_error", f"{type(exc).__name__}: {exc}"[:200]) from None


def html_to_markdown(value: str, max_chars: int | None = None) -> str:
    """Rendered ChatGPT HTML -> markdown (see the module docstring)."""
    value = _COUNTER_HTML.sub("", value, count=1).replace("\x00", "")
    if "<s" in value or "<S" in value:  # not content: dropped with the element (to the end if unclosed)
        value = _cut_elements(value, _SCRIPT_STYLE_OPEN, lambda m: _SCRIPT_STYLE_CLOSE[m.group(1).lower()],
                              lambda body: "")
    blocks: list[str] = []

    def cut(body: str) -> str:
        lang, code = _extract_code(body)
        if not code.strip():
            return ""  # FastChat drops empty code blocks too
        blocks.append(_fence(lang, code))
        return f"<p>{_PLACEHOLDER.format(len(blocks) - 1)}</p>"

    rest = _cut_elements(value, _PRE_OPEN, lambda m: _PRE_CLOSE, cut, closed_only=True)
    try:
        md = html_fast.convert(rest, max_chars)
    except html_fast.TooLarge as exc:
        raise ConversionError("too_large", str(exc)) from None
    except html_fast.TooDeep as exc:
        raise ConversionError("html_too_deep", f"HTML nested too deeply to convert ({exc})") from None
    except html_fast.Unsupported:
        md = _markdownify(rest)
    md = _COPY_CHARS.sub("", md)

    md = _BLANKS.sub("\n\n", md.replace("\r\n", "\n"))
    md = protect_tags(md).strip()

    def put(m: re.Match[str]) -> str:
        before, k, after = m.group(1), int(m.group(2)), m.group(3)
        lines = [before.rstrip()] if before.strip() else []
        lines.append(blocks[k])
        after = _PLACEHOLDER_ANY.sub(lambda n: "\n" + blocks[int(n.group(1))] + "\n", after).strip()
        if after:
            lines.append(after)
        return "\n".join(lines)

    return _PLACEHOLDER_LINE.sub(put, md) if blocks else md


# ----------------------------------------------------------------------------- plain path


def plain_to_markdown(value: str) -> str:
    """Plain text: FastChat's leftovers fixed, bare fences labelled, stray tags put in code."""
    text = _COUNTER_GLUED.sub("", value, count=1)
    if "Copy" in text:
        text = _COPY_CHARS.sub("", text)
        text = _drop_empty_copy_code(text)
        text = _fix_copy_code(text)
    text = _label_bare_fences(text)
    return protect_tags(text).strip()


_COPY = "Copy code"
_SPACE_RUN = re.compile(r"\s*")


def _drop_empty_copy_code(text: str) -> str:
    """Remove FastChat's empty copy-code blocks: three backticks, anything on the same line, "Copy
    code", optional whitespace, three backticks. One pass over the "Copy code" marks: each search
    moves forward, so the cost is linear in the text."""
    out: list[str] = []
    pos = 0  # text before pos is final
    line_start = scanned = 0  # newlines before `scanned` are reflected in line_start
    ticks_from, ticks_at = -1, -1  # cached: the first ``` at or after ticks_from
    c = text.find(_COPY)
    while c >= 0:
        nl = text.rfind("\n", scanned, c)
        if nl >= 0:
            line_start = nl + 1
        scanned = c
        lo = max(pos, line_start)
        if not (0 <= ticks_from <= lo and (ticks_at < 0 or ticks_at >= lo)):
            ticks_from, ticks_at = lo, text.find("```", lo)
        close = _SPACE_RUN.match(text, c + len(_COPY)).end()  # type: ignore[union-attr]
        if 0 <= ticks_at and ticks_at + 3 <= c and text.startswith("```", close):
            out.append(text[pos:ticks_at])
            pos = scanned = close + 3
            c = text.find(_COPY, pos)
            continue
        c = text.find(_COPY, c + len(_COPY))
    out.append(text[pos:])
    return "".join(out)


def _fix_copy_code(text: str) -> str:
    """FastChat's leftover ``\u0060\u0060\u0060LANGCopy codeCODE\u0060\u0060\u0060`` -> a fenced block of LANG (``text``
    when none): the language runs to the first "Copy code" (repeats are skipped), the code to the
    next three backticks. Each block is found by forward searches only (linear)."""
    out: list[str] = []
    pos = 0
    while True:
        s = text.find("```", pos)
        c = text.find(_COPY, s + 3) if s >= 0 else -1
        if c < 0:
            break
        e = c
        while text.startswith(_COPY, e):
            e += len(_COPY)
        close = text.find("```", e + 1)
        if close < 0 and e - c >= 2 * len(_COPY) and text.startswith("```", e):
            e, close = e - len(_COPY), e  # the last "Copy code" is the code (as FastChat's regex)
        if close < 0:
            break
        code = text[e] + text[e + 1 : close].rstrip()  # at least one character, then no trailing space
        out.append(text[pos:s])
        out.append(_fence(text[s + 3 : c].strip() or "text", code.strip("\n")))
        pos = close + 3
    out.append(text[pos:])
    return "".join(out)
