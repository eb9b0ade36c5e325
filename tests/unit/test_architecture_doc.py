"""docs/ARCHITECTURE.md's module table must match the code, so it cannot drift.

The table lists every module under streamagent/ (``__init__.py`` files aside), one row each,
with a third column naming the Kafka/Faust libraries the module reaches: those its own import
statements name (function-level imports included) plus those of the streamagent modules it
imports, transitively. "no" means none.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PKG = ROOT / "streamagent"
HEADER = re.compile(r"^\|\s*path\s*\|\s*what it is\s*\|\s*imports Kafka/Faust\?\s*\|\s*$")
MODULE_CELL = re.compile(r"^`(streamagent/[\w/]+\.py)`$")
# top-level import name -> the name the table uses for it
LIBS = {"faust": "faust", "mode": "faust", "aiokafka": "aiokafka",
        "confluent_kafka": "confluent-kafka"}


def _table() -> list[tuple[str, str, str]]:
    """(path, what, kafka) for each module row of the module table; group rows are skipped."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if HEADER.match(line.strip())]
    assert len(starts) == 1, (f"{DOC}: expected exactly one table with the header "
                              f"'| path | what it is | imports Kafka/Faust? |', "
                              f"found {len(starts)}")
    rows = []
    for line in lines[starts[0] + 2:]:  # skip the header and its |---| line
        line = line.strip()
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3, f"{DOC}: a module row needs 3 cells, got {len(cells)}: {line}"
        if cells[0].startswith("**"):  # a package group row, e.g. | **streamagent/core/** ... |
            continue
        m = MODULE_CELL.match(cells[0])
        assert m, (f"{DOC}: the first cell must be a module path in backticks "
                   f"(`streamagent/....py`) or a **group** label: {line}")
        rows.append((m.group(1), cells[1], cells[2]))
    return rows


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under streamagent/ (packages too)."""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imported_names(mod: str, path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    """Dotted module -> (the streamagent modules it imports, the Kafka/Faust libraries it
    imports itself). Importing a.b.c runs a, a.b and a.b.c, so packages count too."""
    files = _modules()
    graph = {}
    for mod, path in files.items():
        deps, libs = set(), set()
        for name in _imported_names(mod, path):
            parts = name.split(".")
            if parts[0] in LIBS:
                libs.add(LIBS[parts[0]])
            for i in range(1, len(parts) + 1):
                dotted = ".".join(parts[:i])
                if dotted in files and dotted != mod:
                    deps.add(dotted)
        graph[mod] = (deps, libs)
    return graph


def _kafka_libs_reached() -> dict[str, set[str]]:
    """Module path -> the Kafka/Faust libraries it reaches, directly or through streamagent."""
    files, graph = _modules(), _graph()
    reached = {}
    for mod, path in files.items():
        if path.name == "__init__.py":
            continue
        seen, stack, libs = set(), [mod], set()
        while stack:
            m = stack.pop()
            if m in seen:
                continue
            seen.add(m)
            libs |= graph[m][1]
            stack += graph[m][0]
        reached[path.relative_to(ROOT).as_posix()] = libs
    return reached


def _named_libs(cell: str) -> set[str]:
    text = cell.lower()
    named = {lib for lib in ("faust", "aiokafka", "confluent-kafka") if lib in text}
    if not named:
        assert re.match(r"^no\b", text), \
            f"the Kafka/Faust cell must name libraries or say no: {cell!r}"
    return named


def test_module_table_lists_exactly_the_modules_in_the_code():
    rows = _table()
    paths = [p for p, _, _ in rows]
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    in_code = {p.relative_to(ROOT).as_posix() for p in PKG.rglob("*.py")
               if p.name != "__init__.py"}
    in_doc = set(paths)
    missing, extra = sorted(in_code - in_doc), sorted(in_doc - in_code)
    assert not (missing or extra or dupes), (
        f"docs/ARCHITECTURE.md's module table is out of date.\n"
        f"  modules missing from the table: {missing}\n"
        f"  rows for modules that do not exist: {extra}\n"
        f"  modules listed more than once: {dupes}")


def test_every_row_says_what_the_module_is():
    empty = [p for p, what, _ in _table() if not what]
    assert not empty, f"docs/ARCHITECTURE.md: rows with no description: {empty}"


def test_kafka_column_matches_the_imports():
    reached = _kafka_libs_reached()
    wrong = []
    for path, _, cell in _table():
        if path not in reached:
            continue  # reported by test_module_table_lists_exactly_the_modules_in_the_code
        named, actual = _named_libs(cell), reached[path]
        if named != actual:
            wrong.append(f"{path}: table says {sorted(named) or 'no'}, "
                         f"imports reach {sorted(actual) or 'none'}")
    assert not wrong, ("docs/ARCHITECTURE.md's 'imports Kafka/Faust?' column is out of date:\n  "
                       + "\n  ".join(wrong))


def _in(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def test_layering_described_in_the_doc_holds():
    """ARCHITECTURE.md, "Layers": core imports only core, errors and units from streamagent;
    the product (core, stream, ops, params, config, metrics) never imports sim or bench."""
    graph = _graph()
    core_ok = ("streamagent.core", "streamagent.errors", "streamagent.units")
    product = ("streamagent.core", "streamagent.stream", "streamagent.ops", "streamagent.params",
               "streamagent.config", "streamagent.metrics", "streamagent.errors",
               "streamagent.units")
    wrong = []
    for mod, (deps, _) in sorted(graph.items()):
        if _in(mod, "streamagent.core"):
            wrong += [f"{mod} imports {d}" for d in sorted(deps)
                      if d != "streamagent" and not _in(d, *core_ok)]
        if _in(mod, *product):
            wrong += [f"{mod} imports {d}" for d in sorted(deps)
                      if _in(d, "streamagent.sim", "streamagent.bench")]
    assert not wrong, ("the layering in docs/ARCHITECTURE.md no longer holds (fix the code or "
                       "the doc):\n  " + "\n  ".join(wrong))
