"""The covidseg modules a script imports, directly or through other covidseg modules.

Used to hold ``dvc.yaml`` to its rule: each stage's deps list its entry script and every
library module it imports, so editing the model reruns training and editing a plot does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "covidseg"


def _direct_imports(path: Path) -> set[str]:
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
        for name in _direct_imports(current):
            parts = name.split(".")
            candidates = [src_root.joinpath(*parts).with_suffix(".py"), src_root.joinpath(*parts, "__init__.py")]
            for c in candidates:
                if c.name != "__init__.py" and c.exists() and c not in seen:
                    seen.add(c)
                    todo.append(c)
    return seen
