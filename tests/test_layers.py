"""The library's folders are layers: a module imports only from its own layer or the ones below it.

The order, lowest first, is written in CONTRIBUTING.md ("Layers"); this test holds the code to it
over the import graph (each module's own covidseg imports, as training/codehash.py reads them).
"""

from __future__ import annotations

from covidseg.training.codehash import direct_imports

from conftest import REPO

SRC = REPO / "src" / "covidseg"
LAYERS = (
    ("__init__", "atomic", "device", "logs", "params"),  # foundation: no covidseg imports but among these
    ("data",),  # the dataset: layout, sources, decoding, extraction, preprocessing
    ("masks",),  # what is computed from masks alone: confusion counts, severity
    ("model",),  # networks, losses, the model file
    ("inference",),  # running a model: forward passes, calibration applied, predict
    ("training",),  # the training loop, calibration fitted
    ("evaluation",),  # test metrics, figures, the report, the card, compare
    ("export",),  # the ONNX graph and the export stage
    ("__main__", "check", "cli", "runcache"),  # entry points
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(dotted: str) -> str:
    """The layer unit of a dotted covidseg name: its subpackage or top-level module (the package: __init__)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "__init__"


def _imports_by_module() -> dict[str, set[str]]:
    return {path.relative_to(SRC).as_posix(): direct_imports(path) for path in sorted(SRC.rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    units = {path.relative_to(SRC).parts[0].removesuffix(".py") for path in SRC.rglob("*.py")}
    assert units == set(RANK), (
        f"not in LAYERS: {sorted(units - set(RANK))}; in LAYERS but absent: {sorted(set(RANK) - units)}"
    )


def test_no_import_runs_up_a_layer():
    upward = []
    for module, imported in _imports_by_module().items():
        own = RANK[module.split("/")[0].removesuffix(".py")]
        upward += [f"{module} -> {name}" for name in sorted(imported) if RANK[_unit(name)] > own]
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_contributing_lists_the_same_order():
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text[text.index("## Layers") :]
    line = next(row for row in section.splitlines() if row.startswith("Lowest first:"))
    named = [unit.strip(" `.") for unit in line.removeprefix("Lowest first:").split("<")]
    assert named == [" ".join(units) for units in LAYERS], named
