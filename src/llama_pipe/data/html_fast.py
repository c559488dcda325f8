"""A fast HTML -> markdown converter for the markup ChatGPT rendered; anything else goes to markdownify.

ShareGPT's gpt turns use a small, well-formed subset of HTML: paragraphs, headings, lists, tables,
block quotes, rules, links, images, bold/italic/strikethrough, inline code and line breaks, wrapped
in ``<div>``/``<span>`` (code blocks are cut out before this runs). markdownify handles that through
BeautifulSoup at about 1 ms per turn; this module tokenizes with one regular expression, builds the
tree with an explicit stack and renders it directly, about 10x faster, with the same markdown
conventions (ATX headings, ``-`` bullets, ``**bold**``, ``*italic*``, pipe tables, ``[text](url)``).

:func:`convert` raises :class:`Unsupported` on any element outside that subset (forms, iframes,
definition lists, ...); the caller then uses markdownify, so coverage never drops below it.
"""

from __future__ import annotations

import html
import re

MAX_DEPTH = 200

# Linear in the text: a tag's attributes end at the next "<" or ">" (quoted values stop at their
# closing quote), so an unclosed "<p " costs the distance to the next "<", not to the end of the
# text; an unclosed comment runs to the end of the text (as in a browser), once.
_TOKEN = re.compile(
    r"<(/?)([A-Za-z][A-Za-z0-9]*)((?:[^<>\"']|\"[^\"<]*\"|'[^'<]*')*)>|(<!--.*?(?:-->|\Z)|<![^<>]*>)|([^<]+)|(<)", re.S
)
_ATTR = {name: re.compile(rf"\b{name}\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>]+))", re.I) for name in ("href", "src", "alt", "title", "start")}
_WS = re.compile(r"[ \t\n\r\f]+")
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_START = re.compile(r"[0-9]{1,9}")
_SUBLIST = re.compile(r"\n\n(?=(?:- |\d+\. ))")  # a nested list follows its item's text directly

VOID = {"br", "hr", "img", "wbr", "input", "meta", "link", "col", "area", "source", "track"}
TRANSPARENT = {"div", "span", "section", "article", "main", "header", "footer", "body", "html", "thead", "tbody",
               "tfoot", "u", "small", "mark", "sup", "sub", "abbr", "cite", "kbd", "samp", "var", "time", "ins", "nav"}
BLOCK = {"p", "div", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote", "hr", "section",
         "article", "main", "header", "footer", "nav"}
SUPPORTED = TRANSPARENT | BLOCK | {"br", "img", "strong", "b", "em", "i", "code", "a", "del", "s", "strike", "tr", "th", "td"}


class Unsupported(Exception):
    """The HTML uses an element this converter does not handle (use markdownify)."""


class TooDeep(Exception):
    """Nesting deeper than :data:`MAX_DEPTH`."""


class TooLarge(Exception):
    """The markdown would be longer than the ``max_chars`` given to :func:`convert` (a table whose
    rows are padded to its widest row, or deeply indented lists, can grow far beyond the input)."""


# The output bound of the :func:`convert` call in progress (one call at a time per process).
_max_chars: int | None = None


def _bounded(size: int, what: str) -> None:
    if _max_chars is not None and size > _max_chars:
        raise TooLarge(f"{what} would be at least {size} characters, over the limit of {_max_chars}")


class Node:
    __slots__ = ("tag", "attrs", "children")

    def __init__(self, tag: str, attrs: str) -> None:
        self.tag = tag
        self.attrs = attrs
        self.children: list[Node | str] = []

    def attr(self, name: str) -> str | None:
        m = _ATTR[name].search(self.attrs)
        return html.unescape(next(g for g in m.groups() if g is not None)) if m else None


def parse(text: str) -> Node:
    """A tree of :class:`Node` (text children are raw, still-escaped strings)."""
    root = Node("#root", "")
    stack = [root]
    for m in _TOKEN.finditer(text):
        if m.group(5) is not None or m.group(6) is not None:
            stack[-1].children.append(m.group(5) or "&lt;")
            continue
        if m.group(4) is not None:  # comment / doctype
            continue
        closing, tag = m.group(1), m.group(2).lower()
        if tag not in SUPPORTED:
            raise Unsupported(tag)
        if closing:
            for i in range(len(stack) - 1, 0, -1):
                if stack[i].tag == tag:
                    del stack[i:]
                    break
            continue
        if tag in ("p", "li") and stack[-1].tag == tag:  # implicit end of the previous p / li
            stack.pop()
        node = Node(tag, m.group(3))
        stack[-1].children.append(node)
        if tag not in VOID and not m.group(3).rstrip().endswith("/"):
            stack.append(node)
            if len(stack) > MAX_DEPTH:
                raise TooDeep(f"nesting deeper than {MAX_DEPTH}")
    return root


def _text(node: Node) -> str:
    """Plain text content (for inline code)."""
    return "".join(html.unescape(c) if isinstance(c, str) else _text(c) for c in node.children)


def _inline(node: Node) -> str:
    out: list[str] = []
    for c in node.children:
        if isinstance(c, str):
            out.append(_WS.sub(" ", html.unescape(c)))
        else:
            out.append(_render(c))
    return "".join(out)


def _wrap(mark: str, inner: str) -> str:
    """``**x**`` with surrounding spaces kept outside the markers (``** x**`` is not bold)."""
    core = inner.strip()
    if not core:
        return inner
    lead, trail = inner[: len(inner) - len(inner.lstrip())], inner[len(inner.rstrip()) :]
    return f"{lead}{mark}{core}{mark}{trail}"


def _list(node: Node, ordered: bool) -> str:
    start = node.attr("start") if ordered else None
    # ASCII digits only ("²".isdigit() is true), and few enough that int() takes them
    n = int(start) if start and _START.fullmatch(start) else 1
    items = []
    for c in node.children:
        if isinstance(c, str):
            if c.strip():
                items.append(("- " if not ordered else f"{n}. ", _WS.sub(" ", html.unescape(c)).strip()))
            continue
        prefix = f"{n}. " if ordered else "- "
        body = _SUBLIST.sub("\n", _blocks(c)) if c.tag == "li" else _render(c).strip()
        items.append((prefix, body))
        n += c.tag == "li"
    _bounded(sum(len(p) + len(b) + (len(p) + 1) * b.count("\n") for p, b in items), "a list")
    lines = []
    for prefix, body in items:
        pad = " " * len(prefix)
        sub = body.split("\n")
        lines.append(prefix + sub[0])
        lines += [(pad + s) if s.strip() else "" for s in sub[1:]]
    return "\n\n" + "\n".join(lines) + "\n\n"


def _blocks(node: Node) -> str:
    return _BLANKS.sub("\n\n", _inline(node)).strip()


def _cell(node: Node) -> str:
    return _WS.sub(" ", _inline(node)).strip().replace("|", "\\|")


def _table(node: Node) -> str:
    rows: list[list[str]] = []
    header_cells = False

    def walk(n: Node) -> None:
        nonlocal header_cells
        for c in n.children:
            if isinstance(c, Node):
                if c.tag == "tr":
                    cells = [x for x in c.children if isinstance(x, Node) and x.tag in ("td", "th")]
                    if not rows and cells and all(x.tag == "th" for x in cells):
                        header_cells = True
                    rows.append([_cell(x) for x in cells])
                else:
                    walk(c)

    walk(node)
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    _bounded(sum(len(c) for r in rows for c in r) + (len(rows) + 2) * (3 * width + 2), "a table")
    rows = [r + [""] * (width - len(r)) for r in rows]
    if not header_cells:
        rows.insert(0, [""] * width)
    lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join(["---"] * width) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n\n" + "\n".join(lines) + "\n\n"


def _render(node: Node) -> str:
    tag = node.tag
    if tag in ("p", "div", "section", "article", "main", "header", "footer", "nav"):
        inner = _blocks(node)
        return f"\n\n{inner}\n\n" if inner else ""
    if tag in TRANSPARENT or tag in ("tr", "td", "th"):
        return _inline(node)
    if tag in ("strong", "b"):
        return _wrap("**", _inline(node))
    if tag in ("em", "i"):
        return _wrap("*", _inline(node))
    if tag in ("del", "s", "strike"):
        return _wrap("~~", _inline(node))
    if tag == "code":
        code = _text(node)
        if not code:
            return ""
        ticks = "``" if "`" in code else "`"
        pad = " " if ticks == "``" else ""
        return f"{ticks}{pad}{code}{pad}{ticks}"
    if tag == "a":
        text, href = _inline(node).strip(), node.attr("href")
        if not href:
            return text
        title = node.attr("title")
        return f"[{text or href}]({href}{f' {chr(34)}{title}{chr(34)}' if title else ''})"
    if tag == "img":
        return f"![{node.attr('alt') or ''}]({node.attr('src') or ''})"
    if tag == "br":
        return "\n"
    if tag == "hr":
        return "\n\n---\n\n"
    if tag[0] == "h" and len(tag) == 2:
        inner = _WS.sub(" ", _inline(node)).strip()
        return f"\n\n{'#' * int(tag[1])} {inner}\n\n" if inner else ""
    if tag in ("ul", "ol"):
        return _list(node, tag == "ol")
    if tag == "li":
        return "\n- " + _blocks(node) + "\n"
    if tag == "table":
        return _table(node)
    if tag == "blockquote":
        inner = _blocks(node)
        return "\n\n" + "\n".join(("> " + ln) if ln else ">" for ln in inner.split("\n")) + "\n\n"
    raise Unsupported(tag)  # pragma: no cover - parse() only admits SUPPORTED tags


def convert(text: str, max_chars: int | None = None) -> str:
    """Markdown for ``text``; raises :class:`Unsupported`, :class:`TooDeep`, or :class:`TooLarge`
    when a table or list would make it longer than ``max_chars`` (checked before building them)."""
    global _max_chars
    root = parse(text)
    _max_chars = max_chars
    try:
        md = _inline(root)
    except RecursionError:
        raise TooDeep("nesting too deep to render") from None
    finally:
        _max_chars = None
    md = "\n".join(line.rstrip() for line in md.split("\n"))
    return _BLANKS.sub("\n\n", md).strip()
