"""The covidseg modules a script imports, directly or through other covidseg modules.

Used to hold ``dvc.yaml`` to its rule: each stage's deps list its entry script and every
library module it imports, so editing the model reruns training and editing a plot does not.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "covidseg"


def direct_imports(path: Path) -> set[str]:
    """The covidseg modules (dotted names) that one file imports itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_files(script: str | Path, src_root: str | Path = "src") -> set[Path]:
    """Files of every covidseg module that ``script`` imports transitively.

    The package's ``__init__.py`` is left out: it holds only the version string.
    """
    src_root = Path(src_root)
    seen: set[Path] = set()
    todo = [Path(script)]
    while todo:
        current = todo.pop()
        for name in direct_imports(current):
            parts = name.split(".")
            candidates = [src_root.joinpath(*parts).with_suffix(".py"), src_root.joinpath(*parts, "__init__.py")]
            for c in candidates:
                if c.name != "__init__.py" and c.exists() and c not in seen:
                    seen.add(c)
                    todo.append(c)
    return seen


def code_hash(entry: str | Path, src_root: str | Path) -> str:
    """SHA-256 (hex) of ``entry`` and of every covidseg module it imports transitively.

    Each file contributes its path relative to ``src_root`` and its bytes, in sorted path order,
    so an edit to any covered module (or a renamed one) changes the hash and an edit elsewhere does not.
    """
    entry, src_root = Path(entry).resolve(), Path(src_root).resolve()
    h = hashlib.sha256()
    for path in sorted(module_files(entry, src_root) | {entry}):
        h.update(path.relative_to(src_root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
