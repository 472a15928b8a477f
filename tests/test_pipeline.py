"""End to end: the real `dvc repro` on a tiny copy of the repository."""

import json

from conftest import dvc, run, set_params


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_end_to_end_then_nothing_then_only_downstream_of_lr(tiny_repo):
    first = dvc(tiny_repo, "repro").stdout
    assert _ran(first) == {
        "check",
        "synthesize",
        "extract",
        "preprocess",
        "train",
        "evaluate",
        "export",
        "card",
        "plots",
    }
    assert (tiny_repo / "models" / "model.onnx").stat().st_size > 0
    export = json.loads((tiny_repo / "metrics" / "export.json").read_text())
    assert export["parity_images"] == 3 and 0 <= export["parity_max_abs_diff"] <= export["parity_tolerance"] == 1e-4
    assert "## Known failure modes" in (tiny_repo / "models" / "MODEL_CARD.md").read_text()
    test = json.loads((tiny_repo / "metrics" / "test.json").read_text())
    for key in ("rmse", "dice", "iou"):
        assert 0 <= test[key] <= 1
    # severity (the lung head is on by default) and the intervals reach the headline
    for key in ("lung_dice", "share_mae", "extent_kappa", "dice_ci95_low", "rmse_ci95_high", "share_mae_ci95_low"):
        assert key in test, key
    assert test["rmse_ci95_low"] <= test["rmse"] <= test["rmse_ci95_high"]
    assert (tiny_repo / "plots" / "eval" / "severity.csv").is_file()
    assert (tiny_repo / "plots" / "figures" / "bland_altman.png").is_file()
    details = json.loads((tiny_repo / "metrics" / "test_details.json").read_text())
    assert test["rmse"] == details["rmse"] and details["baselines"]["all_background"]["dice_mean"] == 0.0
    data = json.loads((tiny_repo / "metrics" / "data.json").read_text())
    assert [data[f"{s}_images"] for s in ("train", "val", "test")] == [6, 3, 3]
    data_details = json.loads((tiny_repo / "metrics" / "data_details.json").read_text())
    assert [data_details[s]["count"] for s in ("train", "val", "test")] == [6, 3, 3]
    figures = sorted(p.name for p in (tiny_repo / "plots" / "figures").glob("*.png"))
    for name in (
        "sample_overlay.png",
        "loss_curves.png",
        "rmse_curves.png",
        "prediction_triplets.png",
        "prediction_overlay.png",
    ):
        assert name in figures
        assert (tiny_repo / "plots" / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = dvc(tiny_repo, "metrics", "show", "--json").stdout
    assert '"rmse"' in shown and '"dice"' in shown and '"iou"' in shown

    second = dvc(tiny_repo, "repro").stdout
    assert _ran(second) == set(), second
    assert "up to date" in dvc(tiny_repo, "status").stdout

    # Same params, seed and code again, every stage forced: nothing that git tracks may change
    # (no timings or timestamps in metrics, curves or the report; same model bytes, so dvc.lock holds).
    run(["git", "add", "-A"], tiny_repo)
    run(["git", "commit", "-qm", "first run"], tiny_repo)
    forced = dvc(tiny_repo, "repro", "-f").stdout
    assert {"train", "export", "card", "plots"} <= _ran(forced), forced
    assert run(["git", "status", "--porcelain"], tiny_repo).stdout == ""

    set_params(tiny_repo, {"train": {"lr": 0.0005}})
    third = dvc(tiny_repo, "repro").stdout
    assert _ran(third) == {"check", "train", "evaluate", "export", "card", "plots"}, (
        third
    )  # check: constant stamp, nothing else reruns
