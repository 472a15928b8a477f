"""The test suite's own house rules: shared helpers live in helpers.py (or conftest), never in a test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module name) of every import in ``path``, at any depth (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_no_module_imports_from_a_test_module() -> None:
    """Every test module, helpers.py and conftest.py import no ``test_*`` module (a test module is not a library)."""
    paths = sorted([*TESTS.glob("test_*.py"), TESTS / "helpers.py", TESTS / "conftest.py"])
    assert len(paths) > 40  # the glob found the suite
    offenders = [
        f"{path.name}:{line}: imports {name}"
        for path in paths
        for line, name in imported_modules(path)
        if name.startswith("test_")
    ]
    assert not offenders, "move what is shared into tests/helpers.py:\n" + "\n".join(offenders)


def test_the_check_sees_imports_at_any_depth(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(
        "import os\nfrom helpers import x\n\ndef test_x():\n    from test_other import y\n    import test_more.sub\n"
    )
    assert imported_modules(probe) == [(1, "os"), (2, "helpers"), (5, "test_other"), (6, "test_more")]
