"""Every import, module and dotted name the README and docs/ show resolves (the 0.1 paths
they still name included), so the docs cannot drift from the layout."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


def _import_lines() -> list[str]:
    lines = re.findall(r"^\s*(from apo_fast[\w.]* import [^\n;#]+|import apo_fast[\w.]*)", _text(), re.M)
    return sorted({" ".join(line.split()) for line in lines})


def _dotted_names() -> list[str]:
    return sorted(set(re.findall(r"`(apo_fast(?:\.\w+)+)`", _text())) |
                  set(re.findall(r"python -m (apo_fast(?:\.\w+)+)", _text())))


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_docs_show_imports_and_names():
    assert len(_import_lines()) >= 3 and len(_dotted_names()) >= 5


@pytest.mark.parametrize("line", _import_lines())
def test_documented_import_works(line):
    if line.startswith("import "):
        importlib.import_module(line.split()[1])
        return
    module, names = re.match(r"from (\S+) import (.+)", line).groups()
    mod = importlib.import_module(module)
    for name in (n.strip().split(" as ")[0] for n in names.strip("()").split(",")):
        assert hasattr(mod, name), f"{line}: {module} has no {name}"


@pytest.mark.parametrize("dotted", _dotted_names())
def test_documented_name_resolves(dotted):
    assert _resolve(dotted) is not None


def test_every_top_level_export_resolves():
    import apo_fast

    assert len(apo_fast.__all__) > 20
    for name in apo_fast.__all__:
        assert getattr(apo_fast, name) is not None, name
