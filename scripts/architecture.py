"""The package's import structure, read from the source with `ast` (nothing is imported).

    python scripts/architecture.py          # rewrite the diagram in docs/architecture.md
    python scripts/architecture.py --check  # exit 1 if docs/architecture.md is out of date

tests/test_structure.py uses the same reading to check the rules: no import circles (imports
written inside functions count), package imports at the top of each module but in the entry
points, dependencies pointing one way between the layers, no module over 350 lines.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "autograd_lab"
DOC = ROOT / "docs" / "architecture.md"

# The layers, lowest first: a module may import its own layer's modules and lower layers' only.
# Entry points (the faces) may import lazily, to keep `--help` and bad input free of torch.
LAYERS = (("leaves", ("errors", "text")), ("files and config", ("disk", "config")),
          ("data and model", ("data", "model")), ("observe", ("observe",)), ("job", ("job",)),
          ("sweep", ("sweep",)), ("faces", ("cli", "api", "train")))
ENTRY_POINTS = ("autograd_lab", "autograd_lab.api", "autograd_lab.train", "autograd_lab.cli")
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_entry_point(name: str) -> bool:
    return name in ENTRY_POINTS or name.startswith("autograd_lab.cli.")


def _imported(node, package: str, mods) -> list[str]:
    """The package modules an import statement names (`from x import y`: x.y if a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every import of a package module."""
    mods = modules()
    found = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        stack = [(node, False) for node in ast.parse(path.read_text()).body]
        while stack:
            node, in_function = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [(name, target, node.lineno, in_function)
                          for target in _imported(node, package, mods)
                          if target in mods and target != name]
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                     ast.Lambda))
            stack += [(child, inner) for child in ast.iter_child_nodes(node)]
    return sorted(found)


def circles(edges) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b, *_ in edges:
        graph.setdefault(a, set()).add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def part(name: str) -> str:
    """The subpackage (or top-level module) a module belongs to: `job`, `errors`, `cli`."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    p = part(name)
    return next((i for i, (_, parts) in enumerate(LAYERS) if p in parts), len(LAYERS))


def mermaid(edges) -> str:
    """The layers as a mermaid flowchart: one box per subpackage, one arrow per dependency
    (but the arrows into the leaves, which every layer may use)."""
    leaves = LAYERS[0][1]  # every layer may use them: their arrows are left out
    pairs = sorted({(part(a), part(b)) for a, b, *_ in edges if part(a) != part(b)
                    and part(a) != "__init__" and part(b) not in leaves})
    lines = ["```mermaid", "flowchart TD"]
    for i, (title, parts) in reversed(list(enumerate(LAYERS))):
        lines.append(f'  subgraph L{i}["{title}"]')
        lines += [f"    {p}[{p}/]" if (PACKAGE / p).is_dir() else f"    {p}[{p}.py]"
                  for p in parts]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in pairs]
    lines.append("```")
    return "\n".join(lines)


BEGIN, END = "<!-- diagram: scripts/architecture.py -->", "<!-- end of diagram -->"


def render(doc: str) -> str:
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{mermaid(imports())}\n{END}{tail}"


def main(argv: list[str]) -> int:
    doc = DOC.read_text()
    new = render(doc)
    if "--check" in argv:
        if new != doc:
            print(f"{DOC} is out of date: run python scripts/architecture.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
