"""The layer order of docs/ARCHITECTURE.md holds: every module is placed, and imports only point downwards."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nc_lib"
GUIDE = ROOT / "docs" / "ARCHITECTURE.md"
#: inside a paper package: the grid at the bottom, then what runs it, then the figures, then the entry points
PAPER_ORDER = {"grid": 0, "runs": 1, "cost": 1, "memory": 1, "figures": 2, "__main__": 3, "__init__": 3}
#: the one level whose modules may import each other (docs/ARCHITECTURE.md, "Layers")
SIBLINGS_ALLOWED = "drawing"


def module_names() -> dict[str, Path]:
    """Module name -> file: ``"train"``, ``"papers.zhu2021.grid"``, ``"papers.zhu2021.__init__"``; the
    package's own ``__init__`` is ``"__init__"``, that of ``nc_lib.papers`` is ``"papers"``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts == ["papers", "__init__"]:
            parts = ["papers"]
        out[".".join(parts)] = path
    return out


def layers() -> dict[str, tuple[int, str]]:
    """module -> (level, layer name), read from the diagram of docs/ARCHITECTURE.md (lines ``N | name | modules``)."""
    text = GUIDE.read_text()
    block = text[text.index("## Layers"):]
    block = block[block.index("```text") + len("```text"):]
    block = block[:block.index("```")]
    out: dict[str, tuple[int, str]] = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        for name in re.split(r"[\s,]+", cells[2]):
            if name:
                out[name] = (int(cells[0]), cells[1])
    return out


def place(module: str, table: dict[str, tuple[int, str]]) -> tuple[int, str, int]:
    """(level, layer, order inside a paper package) of a module; the package's own ``__init__`` is foundation."""
    if module in ("__init__", "papers"):
        return (0, "foundation", 0)
    if module.startswith("papers."):
        paper, _, sub = module[len("papers."):].partition(".")
        level, layer = table[f"papers.{paper}"]
        return (level, layer, PAPER_ORDER[sub or "__init__"])
    level, layer = table[module]
    return (level, layer, 0)


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The nc_lib modules that ``module`` imports, at the top or inside functions."""
    package = module.split(".")[:-1]

    def known_as(name: str) -> str | None:
        for candidate in (name, f"{name}.__init__"):
            if candidate in known:
                return candidate
        return "__init__" if name == "" else None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "nc_lib":
                target = node.module[len("nc_lib"):].lstrip(".")
            else:
                continue
            submodules = {known_as(f"{target}.{a.name}".lstrip(".")) for a in node.names} - {None}
            found |= submodules or {known_as(target)}
        elif isinstance(node, ast.Import):
            found |= {known_as(a.name[len("nc_lib"):].lstrip(".")) for a in node.names
                      if a.name.split(".")[0] == "nc_lib"}
    found.discard(None)
    found.discard(module)
    return found


def test_every_module_has_a_place_in_the_diagram():
    table = layers()
    assert table, "no layer diagram found in docs/ARCHITECTURE.md"
    missing = [m for m in module_names() if m not in ("__init__", "papers")
               and not m.startswith("papers.") and m not in table]
    papers = {m.split(".")[1] for m in module_names() if m.startswith("papers.")}
    missing += [f"papers.{p}" for p in sorted(papers) if f"papers.{p}" not in table]
    assert not missing, f"modules without a layer in docs/ARCHITECTURE.md: {missing}"
    stale = [m for m in table if m not in module_names() and f"{m}.__init__" not in module_names()]
    assert not stale, f"docs/ARCHITECTURE.md names modules that do not exist: {stale}"


def test_imports_point_only_downwards():
    table = layers()
    known = module_names()
    wrong = []
    placed = {m for m in known if m in ("__init__", "papers") or m in table or ".".join(m.split(".")[:2]) in table}
    for module, path in known.items():
        if module not in placed:
            continue  # test_every_module_has_a_place_in_the_diagram says so
        level, layer, order = place(module, table)
        for target in imports(module, path, known) & placed:
            t_level, t_layer, t_order = place(target, table)
            same_paper = module.split(".")[:2] == target.split(".")[:2] and module.startswith("papers.")
            if same_paper:
                ok = t_order < order
            elif t_level == level:
                ok = layer == SIBLINGS_ALLOWED
            else:
                ok = t_level < level
            if not ok:
                wrong.append(f"{module} ({layer}) imports {target} ({t_layer})")
    assert not wrong, "imports that do not point downwards:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(module_names()))
def test_every_module_says_what_it_is_for(module):
    doc = ast.get_docstring(ast.parse(module_names()[module].read_text()))
    assert doc and doc.splitlines()[0].strip(), f"{module} has no docstring"
