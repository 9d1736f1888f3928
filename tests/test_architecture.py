"""The layout rules of docs/architecture.md, checked on the source: each package imports
only what its row of the table allows (lazy imports inside functions count), no two
packages import each other, and modules and functions stay small enough to read."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "apo_fast"
MAX_MODULE_LINES = 520
MAX_FUNCTION_CODE_LINES = 80  # docstring excluded


def _allowed() -> dict[str, set[str]]:
    """{package: the apo_fast packages it may import}, read from the architecture table."""
    table = (REPO / "docs" / "architecture.md").read_text().split("## Layers and what each may import")[1]
    allowed: dict[str, set[str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        may = set() if cells[2] == "(none)" else {c.strip() for c in cells[2].split(",")}
        for name in names:
            allowed[name] = may
    return allowed


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "apo_fast" or len(parts) == 1:
        return None
    return parts[1]


def _modules(repo: Path = REPO):
    for path in sorted((repo / "apo_fast").rglob("*.py")):
        name = ".".join(path.relative_to(repo).with_suffix("").parts)
        yield path, name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _edges(repo: Path = REPO) -> dict[tuple[str, str], list[str]]:
    package = repo / "apo_fast"
    units = {p.stem for p in package.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()} | {"kernels"}
    edges: dict[tuple[str, str], list[str]] = {}
    for path, module in _modules(repo):
        src = _unit(module)
        for target in _imports(path):
            dst = _unit(target)
            if src and dst and dst != src and dst in units:
                edges.setdefault((src, dst), []).append(f"{module} imports {target}")
    return edges


def test_every_package_has_a_row_and_imports_only_what_it_allows():
    allowed = _allowed()
    present = {_unit(m) for _, m in _modules()} - {None, "__main__"}
    assert present <= set(allowed), f"packages missing from docs/architecture.md: {sorted(present - set(allowed))}"
    wrong = [why for (src, dst), whys in _edges().items() if dst not in allowed[src] for why in whys[:1]]
    assert not wrong, "imports the architecture table does not allow:\n" + "\n".join(sorted(wrong))


def test_no_two_packages_import_each_other():
    edges = _edges()
    cycles = sorted({tuple(sorted((a, b))) for (a, b) in edges if (b, a) in edges})
    assert not cycles, "package import cycles: " + "; ".join(
        f"{a} <-> {b} ({edges[(a, b)][0]}; {edges[(b, a)][0]})" for a, b in cycles)


def test_the_table_itself_has_no_cycle():
    allowed = _allowed()
    seen: dict[str, int] = {}

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"the architecture table allows a cycle: {' -> '.join(stack + (name,))}"
        if seen.get(name):
            return
        for dep in allowed.get(name, ()):
            visit(dep, stack + (name,))
        seen[name] = 1

    for name in allowed:
        visit(name, ())


def _code_lines(node: ast.AST) -> int:
    n = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        n -= body[0].end_lineno - body[0].lineno + 1
    return n


@pytest.mark.parametrize("root", ["apo_fast", "kernels"])
def test_modules_and_functions_stay_small(root):
    too_long = []
    for path in sorted((REPO / root).rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_CODE_LINES:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {_code_lines(node)} code lines")
    assert not too_long, "\n".join(too_long)


def test_the_rules_catch_a_violation(tmp_path):
    """The checks can fail: in a copy of the layout, a lazy import of `training` inside `ops`
    is an edge the table forbids, and `training` importing `ops` back makes a cycle."""
    for pkg in ("ops", "training"):
        (tmp_path / "apo_fast" / pkg).mkdir(parents=True)
        (tmp_path / "apo_fast" / pkg / "__init__.py").write_text("")
    (tmp_path / "apo_fast" / "ops" / "probe.py").write_text("def f():\n    from apo_fast.training import trainer\n")
    (tmp_path / "apo_fast" / "training" / "probe.py").write_text("import apo_fast.ops.probe\n")
    edges = _edges(tmp_path)
    assert ("ops", "training") in edges and "training" not in _allowed()["ops"]
    assert ("training", "ops") in edges  # a cycle test_no_two_packages_import_each_other would report
