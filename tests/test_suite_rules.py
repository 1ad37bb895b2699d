"""Rules of the suite itself: helpers come from tests/support, never from another test module or a conftest."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# Pure: no server, no process, no network (`just test -m unit`).
pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def _is_test_module_or_conftest(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "tests" and any(p == "conftest" or p.startswith("test_") for p in parts[1:])


def test_tests_import_helpers_only_from_tests_support() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}: {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for module in _imported_modules(path)
        if _is_test_module_or_conftest(module)
    ]
    assert offenders == [], "move what these import into tests/support/:\n" + "\n".join(offenders)


def test_the_rule_sees_an_offending_import(tmp_path: Path) -> None:
    bad = tmp_path / "test_bad.py"
    bad.write_text("from tests.conftest import Stack\nimport tests.test_quotas\nfrom tests.support import logs\n")
    found = [m for m in _imported_modules(bad) if _is_test_module_or_conftest(m)]
    assert found == ["tests.conftest", "tests.test_quotas"]
