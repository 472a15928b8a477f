"""DVC stage export: models/model.pt -> models/model.onnx (calibration baked in), parity-checked on the test images,
and models/model-int8.onnx, kept only when it ties with fp32 on the test images."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's library, not the venv's

import typer  # noqa: E402

from covidseg.export.stage import export_stage  # noqa: E402
from covidseg.params import ExportParams, load_section  # noqa: E402


def main(
    model: str = "models/model.pt",
    prepared: str = "data/prepared",
    onnx: str = "models/model.onnx",
    int8: str = "models/model-int8.onnx",
    metrics: str = "metrics/export.json",
    params: str = "params.yaml",
) -> None:
    s = export_stage(
        model, prepared, onnx, load_section(ExportParams, "export", params), summary_path=metrics, int8_path=int8
    )
    typer.echo(
        f"export: {onnx} (opset {s['opset']}, {s['onnx_bytes'] / 2**20:.1f} MiB), max |p_torch - p_onnx| "
        f"{s['parity_max_abs_diff']:.2g} <= {s['parity_tolerance']:g} on {s['parity_images']} test images"
    )
    d = s["int8"]["dice"]
    typer.echo(
        f"export: {int8} ties with fp32 on {s['int8']['images']} test images: per-image Dice "
        f"{d['difference']:+.4f} [{d['difference_ci95'][0]:+.4f}, {d['difference_ci95'][1]:+.4f}], "
        f"within fp32's interval half-width {d['margin']:.4f}"
    )


if __name__ == "__main__":
    typer.run(main)
