"""Every params key reaches DVC's run-cache key: changing a stage's params reruns it and changes its output.

DVC 3 treats params named ``size`` or ``nfiles`` as file metadata and leaves them out of the key
(treeverse/dvc#10296): such a change is "cached - skipping run" and restores the old outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml

from conftest import REPO, dvc, set_params

METADATA_NAMES = {"size", "nfiles"}


def _keys(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{prefix}{k}", str(k)
            yield from _keys(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _keys(v, f"{prefix}{i}.")


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        h.update(f.read_bytes())
    return h.hexdigest()


def test_no_params_key_is_one_dvc_hides_from_its_run_cache():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    bad = [dotted for dotted, name in _keys(params) if name in METADATA_NAMES]
    assert not bad, f"params.yaml keys {bad} are invisible to DVC's run cache (treeverse/dvc#10296): rename them"


def test_changing_preprocess_image_size_reruns_preprocess_even_when_the_run_cache_has_the_old_run(tiny_repo):
    dvc(tiny_repo, "repro", "preprocess")
    assert np.load(tiny_repo / "data/prepared/train.npz")["images"].shape[-1] == 64
    set_params(tiny_repo, {"preprocess": {"image_size": 32}})
    out = dvc(tiny_repo, "repro", "preprocess").stdout
    assert "preprocess" in _ran(out), out
    assert np.load(tiny_repo / "data/prepared/train.npz")["images"].shape[-1] == 32
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert lock["stages"]["preprocess"]["params"]["params.yaml"]["preprocess"] == {"image_size": 32, "contrast": "none"}


def test_changing_preprocess_contrast_reruns_preprocess_and_records_it(tiny_repo):
    dvc(tiny_repo, "repro", "preprocess")
    before = np.load(tiny_repo / "data/prepared/train.npz")["images"]
    set_params(tiny_repo, {"preprocess": {"contrast": "clahe"}})
    out = dvc(tiny_repo, "repro", "preprocess").stdout
    assert "preprocess" in _ran(out), out  # (check reruns too: params.yaml is its dep)
    assert not np.array_equal(np.load(tiny_repo / "data/prepared/train.npz")["images"], before)
    assert json.loads((tiny_repo / "data/prepared/source.json").read_text())["contrast"] == "clahe"
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert lock["stages"]["preprocess"]["params"]["params.yaml"]["preprocess"]["contrast"] == "clahe"


# (section change, the stage it must rerun, the output that must change)
CHANGES = [
    ({"synth": {"image_size": 48}}, "synthesize", "data/raw/synthetic"),
    ({"seed": 7}, "synthesize", "data/raw/synthetic"),
    ({"data": {"classes": ["COVID-19", "Normal"]}}, "extract", "metrics/data.json"),
    ({"preprocess": {"image_size": 32}}, "preprocess", "data/prepared"),
    ({"preprocess": {"contrast": "equalize"}}, "preprocess", "data/prepared"),
    ({"train": {"lr": 0.003}}, "train", "models/model.pt"),
    ({"evaluate": {"calibration_bins": 5}}, "evaluate", "plots/eval/calibration.csv"),
    ({"export": {"opset": 17}}, "export", "models/model.onnx"),
    ({"plots": {"dpi": 60}}, "plots", "plots/figures"),
]


def test_changing_each_stage_section_reruns_that_stage_and_changes_its_output(tiny_repo):
    dvc(tiny_repo, "repro")
    for change, stage, output in CHANGES:
        before = _digest(tiny_repo / output)
        set_params(tiny_repo, change)
        out = dvc(tiny_repo, "repro", "--single-item", stage).stdout
        assert _ran(out) == {stage}, (change, out)
        assert _digest(tiny_repo / output) != before, f"{change}: {output} did not change"
    data = json.loads((tiny_repo / "metrics/data_details.json").read_text())
    assert "Normal" in json.dumps(data)
