"""dvc.yaml keeps its rules: thin stage entries, deps = entry + every covidseg module it imports."""

import re

import yaml

from covidseg.training.codehash import module_files

from conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_every_stage_runs_its_own_entry():
    for name, stage in DVC["stages"].items():
        launcher = r"\$\{launch\.train\}" if name == "train" else "python"  # train may run under torchrun
        assert re.fullmatch(rf"{launcher} stages/{name}\.py( .*)?", stage["cmd"]), f"{name}: {stage['cmd']}"


def test_deps_list_entry_and_every_imported_library_module():
    for name, stage in DVC["stages"].items():
        entry = f"stages/{name}.py"
        deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
        code_deps = {d for d in deps if d.startswith("src/")}
        expected = {p.relative_to(REPO).as_posix() for p in module_files(REPO / entry, REPO / "src")}
        assert entry in deps, name
        assert code_deps == expected, (
            f"stage {name}: missing {sorted(expected - code_deps)}, extra {sorted(code_deps - expected)}"
        )


def test_stage_params_exist_and_are_sections_or_keys_of_params_yaml():
    for name, stage in DVC["stages"].items():
        for p in stage.get("params", []):
            key = p if isinstance(p, str) else next(iter(p))
            node = PARAMS
            for part in key.split("."):
                assert part in node, f"stage {name} declares param {key!r}, absent from params.yaml"
                node = node[part]


def test_metrics_and_plots_are_declared():
    assert {"metrics/test.json", "metrics/train.json", "metrics/data.json"} <= set(DVC["metrics"])
    stage_plots = {next(iter(p)) for st in DVC["stages"].values() for p in st.get("plots", [])}
    assert {"plots/figures", "plots/train/curves.tsv", "plots/eval/pr.csv", "plots/eval/calibration.csv"} <= stage_plots
    assert {"loss", "rmse", "val_dice"} <= {next(iter(p)) for p in DVC["plots"]}


def _entries(stage: dict, kind: str) -> dict[str, dict]:
    return {(o if isinstance(o, str) else next(iter(o))): ({} if isinstance(o, str) else o[next(iter(o))] or {})
            for o in stage.get(kind, [])}  # fmt: skip


def test_every_stage_can_be_recorded_in_and_restored_from_the_run_cache():
    """DVC keeps no run-cache entry for a stage with a persist output, or with a `cache: false` output
    that is not one of the stage's own metrics or plots; a teammate's `dvc exp run` would then rerun it."""
    for name, stage in DVC["stages"].items():
        for kind in ("outs", "metrics", "plots"):
            for path, props in _entries(stage, kind).items():
                assert not props.get("persist"), f"stage {name}: {path} is persist"
                if kind == "outs":
                    assert props.get("cache", True), f"stage {name}: {path} is cache: false but not a metric or plot"


def test_editing_a_plot_module_does_not_touch_training():
    train_deps = set(DVC["stages"]["train"]["deps"])
    assert "src/covidseg/evaluation/figures.py" not in train_deps and "src/covidseg/model/unet.py" in train_deps


def test_check_stage_guards_every_other_stage_without_a_cycle():
    check = DVC["stages"]["check"]
    check_deps = {d if isinstance(d, str) else next(iter(d)) for d in check["deps"]}
    assert "params.yaml" in check_deps  # any edit, a misspelt section included, reruns the check
    assert not any("${" in d for d in check_deps)  # the default source is synthesize's output: no cycle
    assert check["outs"] == ["data/checked.txt"]
    for name, stage in DVC["stages"].items():
        if name != "check":
            assert "data/checked.txt" in stage["deps"], f"stage {name} can run (and lose its outputs) before the check"


def test_every_params_section_has_a_validating_class():
    from covidseg.params import TOP_LEVEL

    assert set(PARAMS) == set(TOP_LEVEL)


def _numeric_leaves(node) -> int:
    if isinstance(node, dict):
        return sum(_numeric_leaves(v) for v in node.values())
    return int(node is None or (isinstance(node, (int, float)) and not isinstance(node, bool)))


def test_declared_metrics_stay_a_short_headline():
    """`dvc exp show` lists every number of every declared metrics file: keep them to at most 40, flat."""
    import json

    stage_level = {
        next(iter(m)) if isinstance(m, dict) else m for st in DVC["stages"].values() for m in st.get("metrics", [])
    }
    declared = [REPO / m for m in sorted(set(DVC["metrics"]) | stage_level)]
    counts = {m.name: _numeric_leaves(json.loads(m.read_text())) for m in declared}
    assert sum(counts.values()) <= 40, counts
    test = json.loads((REPO / "metrics/test.json").read_text())
    assert {"rmse", "dice", "iou"} <= set(test)
    assert all(not isinstance(v, (dict, list)) for m in declared for v in json.loads(m.read_text()).values())
    assert not any("_details" in m.name for m in declared)
