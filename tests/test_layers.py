"""DESIGN.md's rule that import-linter cannot express: the domain uses only eventsourcing.domain."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[1] / "src" / "domain"
ALLOWED_THIRD_PARTY = {"eventsourcing.domain"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_domain_imports_only_stdlib_itself_and_eventsourcing_domain() -> None:
    files = sorted(DOMAIN.glob("*.py"))
    assert len(files) >= 8
    offending = {}
    for path in files:
        for name in _imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "domain" or name in ALLOWED_THIRD_PARTY:
                continue
            offending.setdefault(path.name, []).append(name)
    assert offending == {}
