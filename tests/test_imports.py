"""The package's modules import each other without a circle, counting the imports written inside
functions too: a lazy import that closes a circle only hides it (the module at the bottom then
depends on the one at the top, and a change to either can break the other at call time)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in modules:  # llama_pipe.x.func -> llama_pipe.x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (SRC / "llama_pipe").rglob("*.py")}
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_circle_hidden_in_a_function() -> None:
    edges = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert circles(edges) == [["p.a", "p.b", "p.c"]]
    assert circles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_lazy_and_relative_imports_count(tmp_path: Path) -> None:
    pkg = tmp_path / "llama_pipe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from llama_pipe.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from llama_pipe.a import g  # lazy\n    from . import a\n")
    mods = {"llama_pipe", "llama_pipe.a", "llama_pipe.b"}
    assert imported("llama_pipe.b", pkg / "b.py", mods) == {"llama_pipe.a", "llama_pipe"}


def test_no_import_circle_in_the_package() -> None:
    edges = graph()
    assert len(edges) > 50 and "llama_pipe.chat_template.builtin" in edges["llama_pipe.evaluation.eval"] | edges["llama_pipe.models.model_dir"]
    assert circles(edges) == [], "modules that import each other (directly or through others)"


# ----------------------------------------------------------------------------- floors

#: The package's floors, lowest first (docs/architecture.md): a module may import its own floor and
#: the floors below it, never one above. Within a floor, packages may import each other as long as
#: no circle forms (checked above). The longest matching prefix decides a module's floor.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("llama_pipe.core", "llama_pipe.assets"),
    ("llama_pipe.config",),
    ("llama_pipe.stages",),
    ("llama_pipe.chat_template",),
    ("llama_pipe.weights",),
    ("llama_pipe.models",),
    ("llama_pipe.data", "llama_pipe.train", "llama_pipe.adapters", "llama_pipe.evaluation", "llama_pipe.report", "llama_pipe.serve"),
    ("llama_pipe", "llama_pipe.cli", "llama_pipe.entry", "llama_pipe.__main__"),
)


def floor_of(module: str) -> int:
    best, found = -1, -1
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), level
    if found < 0:
        raise KeyError(f"{module} is on no floor: add its package to FLOORS (and to docs/architecture.md)")
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a lower floor to a higher one."""
    return sorted(f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
                  for a, deps in edges.items() for b in deps if floor_of(b) > floor_of(a))


def test_the_floor_check_finds_an_upward_import() -> None:
    edges = {"llama_pipe.core.records": {"llama_pipe.models.model_dir"}, "llama_pipe.data.clean": {"llama_pipe.core.records"}}
    assert upward(edges) == ["llama_pipe.core.records (floor 0) imports llama_pipe.models.model_dir (floor 5)"]
    assert floor_of("llama_pipe.cli") == len(FLOORS) - 1 and floor_of("llama_pipe.config.schema") == 1


def test_every_module_is_on_a_floor_and_none_imports_upward() -> None:
    edges = graph()
    for module in edges:
        floor_of(module)
    assert upward(edges) == [], "a lower floor imports a higher one (docs/architecture.md, 'The floors')"
    top = set(FLOORS[-1])
    assert not [m for m in edges if m not in top and floor_of(m) == len(FLOORS) - 1]
