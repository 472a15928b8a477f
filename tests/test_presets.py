"""presets/*.yaml and the choice among them: `extends:` resolves to one merged set of overrides, and
`covidseg machine-preset` (what `make real` runs) sizes the preset to the machine.

Every branch of the choice runs on any machine: CUDA is monkeypatched and ``COVIDSEG_NATIVE_BF16``
forces the CPU probe, so CI on an AVX2 CPU and on a bf16 CPU covers all three.
"""

import pytest
import torch
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.device import MACHINE_PRESETS, NATIVE_BF16_ENV, machine_kind, machine_preset
from covidseg.params import ParamsError, preset_flags, read_preset, read_yaml

from conftest import REPO

RUNNER = CliRunner()


def _pairs(flags: list[str]) -> dict[str, str]:
    assert flags[0::2] == ["-S"] * (len(flags) // 2)
    return dict(flag.split("=", 1) for flag in flags[1::2])


@pytest.mark.parametrize(
    "cuda, native, kind, preset",
    [(True, "0", "cuda", "gpu.yaml"), (True, "1", "cuda", "gpu.yaml"), (False, "1", "cpu-bf16", "real-bf16.yaml"),
     (False, "0", "cpu", "real.yaml")],
)  # fmt: skip
def test_the_machine_preset_follows_cuda_then_native_bf16(monkeypatch, cuda, native, kind, preset):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv(NATIVE_BF16_ENV, native)
    assert (machine_kind(), machine_preset()) == (kind, preset)
    result = RUNNER.invoke(app, ["machine-preset", "--presets", str(REPO / "presets")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(REPO / "presets" / preset)


def test_every_machine_kind_has_a_valid_preset_file():
    for name in MACHINE_PRESETS.values():
        preset_flags(REPO / "presets" / name, REPO / "params.yaml")  # raises on a typo or a bad value


def test_machine_preset_refuses_a_bad_override_and_a_missing_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(NATIVE_BF16_ENV, "maybe")
    result = RUNNER.invoke(app, ["machine-preset"])
    assert result.exit_code == 2 and "COVIDSEG_NATIVE_BF16='maybe'" in result.output
    monkeypatch.setenv(NATIVE_BF16_ENV, "1")
    result = RUNNER.invoke(app, ["machine-preset", "--presets", str(tmp_path)])
    assert result.exit_code == 2 and "real-bf16.yaml not found" in result.output and "cpu-bf16" in result.output


def test_the_bf16_preset_is_the_cpu_preset_three_times_and_the_gpu_preset_builds_on_it():
    real = _pairs(preset_flags(REPO / "presets/real.yaml", REPO / "params.yaml"))
    bf16 = _pairs(preset_flags(REPO / "presets/real-bf16.yaml", REPO / "params.yaml"))
    assert bf16 == {**real, "train.members": "3"}
    gpu = _pairs(preset_flags(REPO / "presets/gpu.yaml", REPO / "params.yaml"))
    changed = {key: value for key, value in gpu.items() if real.get(key) != value}
    assert changed == {
        "train.epochs": "40",
        "train.batch_size": "16",
        "train.warmup_epochs": "2",
        "train.base_channels": "32",  # twice as wide
        "train.downsample": "1",  # full resolution
    }
    assert set(gpu) >= set(real)


def test_extends_merges_the_parent_under_the_child_key_by_key(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 5\n  lr: 0.001\nevaluate:\n  bootstrap_resamples: 200\n")
    (tmp_path / "mid.yaml").write_text("extends: base.yaml\ntrain:\n  lr: 0.002\n  members: 2\n")
    (tmp_path / "top.yaml").write_text("extends: mid.yaml\ntrain:\n  members: 3\n")
    assert read_preset(tmp_path / "top.yaml") == {
        "train": {"epochs": 5, "lr": 0.002, "members": 3},
        "evaluate": {"bootstrap_resamples": 200},
    }
    assert _pairs(preset_flags(tmp_path / "top.yaml", REPO / "params.yaml")) == {
        "train.epochs": "5",
        "train.lr": "0.002",
        "train.members": "3",
        "evaluate.bootstrap_resamples": "200",
    }
    assert read_yaml(tmp_path / "top.yaml")["extends"] == "mid.yaml"  # the file itself is not rewritten


def test_extends_errors_name_the_preset(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\ntrain:\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ParamsError, match=r"a.yaml: presets extend each other in a cycle: .*a.yaml -> .*b.yaml"):
        read_preset(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ParamsError, match=r"c.yaml: extends: 'missing.yaml' is not a file next to it"):
        read_preset(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ParamsError, match=r"d.yaml: 'extends' must name a preset file"):
        read_preset(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("extends: c.yaml\ntrian:\n  lr: 0.1\n")  # the child's own typo comes first
    with pytest.raises(ParamsError, match=r"c.yaml: extends: 'missing.yaml'"):
        read_preset(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text("trian:\n  lr: 0.1\n")
    (tmp_path / "g.yaml").write_text("extends: f.yaml\n")
    with pytest.raises(ParamsError, match=r"f.yaml: unknown section 'trian'"):
        read_preset(tmp_path / "g.yaml")
    (tmp_path / "h.yaml").write_text("extends: f.yaml\ntrain:\n  lr: 2\n")
    (tmp_path / "f.yaml").write_text("train:\n  epochs: 3\n")
    with pytest.raises(ParamsError, match=r"h.yaml: .*lr must be in"):
        preset_flags(tmp_path / "h.yaml", REPO / "params.yaml")


def test_make_real_asks_the_machine_unless_preset_is_given():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("\nreal:") :].split("\n\n", 1)[0]
    assert "PRESET ?=\n" in makefile  # empty by default: the recipe asks covidseg machine-preset
    assert 'preset="$(PRESET)"' in recipe and 'preset="$$($(BIN)/covidseg machine-preset)"' in recipe
    assert recipe.index("machine-preset") < recipe.index('covidseg preset "$$preset"') < recipe.index("dvc exp run")
