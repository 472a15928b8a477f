"""The ``covidseg`` command line: use a trained model (``covidseg predict``; more subcommands to come).

Heavy imports (torch) happen inside the commands, so ``covidseg --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import logging
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:  # rich is imported lazily, so `covidseg --help` answers at once
    from rich.console import Console

app = typer.Typer(
    help="covidseg: COVID-19 infection segmentation on chest X-rays. Use a trained model on your own images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

EXIT_FAILED_INPUTS = 1  # some inputs could not be processed (their rows say why)
EXIT_USAGE = 2  # nothing was run (bad INPUT, model file or option), or the output folder failed


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class IdBy(str, Enum):
    path = "path"
    sop_uid = "sop-uid"


def _print_version(value: bool) -> None:
    if value:
        from covidseg import __version__

        typer.echo(f"covidseg {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="Also log debug detail (devices, threads, what was resolved)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    """covidseg: COVID-19 infection segmentation on chest X-rays."""
    from covidseg import logs

    try:
        verbosity = logs.verbosity_from_flags(verbose, quiet)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    logs.configure(verbosity)
    ctx.obj = {"verbosity": verbosity}


def _verbosity(ctx: typer.Context) -> int:
    """The verbosity the top-level ``-v`` / ``-q`` chose (normal when a command is invoked on its own)."""
    from covidseg import logs

    return (ctx.find_root().obj or {}).get("verbosity", logs.NORMAL)


def _stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _die(console: Console, message: str) -> NoReturn:
    console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


@app.command()
def predict(
    ctx: typer.Context,
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT",
        show_default=False,
        help="X-ray files (PNG, JPEG, ..., DICOM), folders (their image and DICOM files) or quoted glob patterns "
        "such as 'scans/**/*.png'.",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        "-m",
        show_default=False,
        help="Trained model file: models/model.pt from `dvc repro` (torch), or an exported .onnx "
        "(onnxruntime on the CPU, no torch needed). [default: the reference model shipped with covidseg, "
        "trained on real COVID-QU-Ex films: models/reference/MODEL_CARD.md]",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; files of the same name are replaced)."),
    threshold: float | None = typer.Option(
        None,
        min=0.0,
        max=1.0,
        show_default=False,
        help="Probability at or above which a pixel is infected. [default: the model's val-tuned threshold]",
    ),
    save_probs: bool = typer.Option(
        False, "--save-probs", help="Also write `probs/<stem>.npy`: float32 (H, W) in [0, 1]."
    ),
    device: Device = typer.Option(
        Device.auto, help="Where a torch model runs: auto picks the GPU when there is one. (.onnx: always the CPU.)"
    ),
    precision: Precision = typer.Option(
        Precision.fp32,
        help="Numeric precision of a torch model. fp32 gives the same probabilities as the ONNX file and as "
        "evaluate on every machine; bf16 is a faster opt-in on CPUs with native bf16 (AVX512-BF16/AMX) and "
        "GPUs, and moves some mask pixels (docs/predict.md); auto: bf16 only where the hardware has it. "
        "(.onnx: always fp32.)",
    ),
    batch_size: int = typer.Option(8, min=1, help="Images decoded and run through the model at once."),
    flip_tta: bool | None = typer.Option(
        None,
        "--flip-tta/--no-flip-tta",
        show_default=False,
        help="Average with the left-right mirrored prediction. [default: as the model was calibrated on val; "
        "fixed inside an .onnx]",
    ),
    recursive: bool = typer.Option(
        False, "--recursive", "-r", help="Also take images from subfolders of folder INPUTs."
    ),
    dicom_seg: bool = typer.Option(
        False,
        "--dicom-seg",
        help="Also write `OUT/seg/<stem>.dcm` for each DICOM input: a DICOM Segmentation (infection and lungs) "
        "that references the film, for OHIF, 3D Slicer or a PACS to show over it.",
    ),
    id_by: IdBy = typer.Option(
        IdBy.path,
        "--id",
        help="Name rows and outputs by the input's path, or by its DICOM SOP Instance UID (sop-uid: no path or "
        "file name in the CSV or the output names; inputs without a UID are error rows).",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress bar and no summary line (as `covidseg -q predict`)."
    ),
) -> None:
    """Segment infection on X-rays of any size and mode (grey, RGB, RGBA, 16-bit, palette; PNG, JPEG, ...; DICOM).

    Writes, at each input's own size: `OUT/masks/<stem>.png` (0/255 grey), `OUT/overlays/<stem>.png`
    (the X-ray with the predicted region tinted), with `--save-probs` `OUT/probs/<stem>.npy`, and
    `OUT/predictions.csv` (one row per input: input, stem, width, height, sop_instance_uid (DICOM),
    infected_fraction, mean_probability, severity, status, error). Two inputs with the same name get
    `<stem>-1`, `<stem>-2`, ... DICOM files are recognised by their `DICM` marker whatever their name;
    multi-frame, colour and undecodable compressed DICOMs are refused by name.

    Exit status: 0 when every input was processed; 1 when one or more inputs failed (an
    unreadable, truncated or non-image file: the message names it, its CSV row has status
    "error", and the other inputs are still processed); 2 when nothing ran (an INPUT that
    matches nothing, an unreadable model file, or a bad option) or when the output folder or
    `predictions.csv` cannot be written (read-only, full, not a folder): the message says why,
    and the CSV, if it could be written, lists exactly the images whose outputs exist.
    """
    from covidseg.inference.predict import (
        InputError,
        OutputError,
        PredictOptions,
        collect_inputs,
        load_model_for_predict,
        model_warnings,
        mostly_infected_warning,
        predict_files,
        provenance_lines,
    )

    quiet = quiet or _verbosity(ctx) < 0
    console = _stderr_console()
    options = PredictOptions(
        threshold=threshold,
        save_probs=save_probs,
        batch_size=batch_size,
        device=device.value,
        precision=precision.value,
        flip_tta=flip_tta,
        recursive=recursive,
        dicom_seg=dicom_seg,
        id_by=id_by.value,
    )
    try:
        paths = collect_inputs(inputs, recursive=recursive)
    except InputError as exc:
        _die(console, str(exc))
    if model is None:
        from covidseg.inference.reference import NAME, reference_model

        try:
            model = reference_model()
        except FileNotFoundError as exc:
            _die(console, str(exc))
        console.print(
            f"predict: no --model given, using {NAME} ({model}; research use only, not a medical device; "
            "its MODEL_CARD.md is beside it)",
            markup=False,
            soft_wrap=True,
        )
    try:
        prepared = load_model_for_predict(model, options)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        _die(console, str(exc))
    logging.getLogger(__name__).debug(
        f"predict: {len(paths)} inputs; model {model} ({prepared.description}), input {prepared.size} px, "
        f"threshold {prepared.threshold:g} ({prepared.threshold_source}), batch {batch_size}"
    )
    for line in ([] if quiet else provenance_lines(prepared)) + model_warnings(prepared):
        console.print(line, markup=False, soft_wrap=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("predict"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    with progress:
        task = progress.add_task("predict", total=len(paths))

        def on_row(row) -> None:
            if row.status != "ok":
                console.print(f"error: {row.error}", markup=False, soft_wrap=True)
            if row.warning:
                console.print(f"warning: {row.warning}", markup=False, soft_wrap=True)
            progress.advance(task)

        try:
            rows = predict_files(paths, out, prepared, options, on_row=on_row)
        except OutputError as exc:
            progress.stop()
            _die(console, str(exc))

    warning = mostly_infected_warning(rows)
    if warning:
        console.print(warning, markup=False, soft_wrap=True)
    failed = sum(r.status != "ok" for r in rows)
    if not quiet:
        typer.echo(
            f"predict: {len(rows) - failed} of {len(rows)} images done, {failed} failed; "
            f"threshold {prepared.threshold:g} ({prepared.threshold_source}); "
            f"results in {out / 'predictions.csv'}"
        )
    if failed:
        raise typer.Exit(EXIT_FAILED_INPUTS)


@app.command()
def compare(
    a: str = typer.Argument(..., help="Run A: per_image.csv, a folder, a git revision or a DVC experiment name."),
    b: str = typer.Argument(..., help="Run B, named the same ways."),
    metric: str = typer.Option("dice_tuned", help="Per-image column of plots/eval/per_image.csv to compare."),
    resamples: int = typer.Option(1000, min=100, help="Bootstrap resamples of the images."),
    repo: Path = typer.Option(Path("."), help="The git repository that revisions and experiment names refer to."),
) -> None:
    """Paired difference A - B of a per-image metric on the same test images, with its 95 % bootstrap interval.

    An interval that holds 0 is a tie. Example: `covidseg compare exp-a exp-b --metric rmse`. Two
    `covidseg predict` tables compare by stem (e.g. --metric infected_fraction). Duplicate or unshared ids,
    fewer than 10 paired images, non-numeric values and ambiguous experiment names are errors (exit 2).
    """
    from covidseg.evaluation.compare import CompareError, digits_for, read_run
    from covidseg.evaluation.compare import compare as run_compare

    try:
        result = run_compare(read_run(a, repo), read_run(b, repo), metric, resamples)
    except CompareError as exc:
        _die(_stderr_console(), str(exc))
    k = digits_for(result.diff, result.low, result.high)
    typer.echo(
        f"{metric} over {result.n} images: A {result.mean_a:.{k}f}, B {result.mean_b:.{k}f}; "
        f"A - B {result.diff:+.{k}f}, 95 % interval [{result.low:+.{k}f}, {result.high:+.{k}f}]: {result.verdict}"
    )


@app.command()
def evaluate(
    model: Path = typer.Argument(
        ..., help="model.pt, model.onnx, or a folder of predicted masks (<case>.png, 0/1 or 0/255, e.g. nnU-Net's)."
    ),
    source: Path = typer.Argument(
        ...,
        help="Labelled films: a Kaggle-layout folder or .zip, a manifest (CSV or MONAI datalist, or its folder; "
        "without a split every film is scored), or an extract folder.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where metrics.json, details.json, per_image.csv, ... go."),
    split: str = typer.Option("test", help="The split of SOURCE to score (train, val or test)."),
    params: Path = typer.Option(Path("params.yaml"), help="Its data and evaluate sections, when present."),
) -> None:
    """External validation: every test metric with its 95 % interval, severity against the true lungs, per film.

    `covidseg compare OUT_A/per_image.csv OUT_B/per_image.csv` then pairs two models on the same films.
    """
    from covidseg.data.sources import SourceError
    from covidseg.evaluation.external import ExternalEvaluationError, evaluate_external
    from covidseg.params import DataParams, EvaluateParams, ParamsError, load_section

    console = _stderr_console()
    try:
        data = load_section(DataParams, "data", params) if params.is_file() else DataParams()
        scoring = load_section(EvaluateParams, "evaluate", params) if params.is_file() else EvaluateParams()
        summary = evaluate_external(model, source, out, split=split, data=data, params=scoring)
    except (ExternalEvaluationError, SourceError, ParamsError, FileNotFoundError, ValueError) as exc:
        _die(console, str(exc))
    iv = summary["intervals"]
    sev = summary["severity"].get("model", {})
    line = (
        f"evaluate: {summary['n_images']} films of {source} ({split}): Dice {summary['dice']:.4f} "
        f"[{iv['dice_ci95_low']:.4f}, {iv['dice_ci95_high']:.4f}], IoU {summary['iou']:.4f} "
        f"[{iv['iou_ci95_low']:.4f}, {iv['iou_ci95_high']:.4f}], RMSE {summary['rmse']:.4f} "
        f"[{iv['rmse_ci95_low']:.4f}, {iv['rmse_ci95_high']:.4f}]"
    )
    if isinstance(sev.get("share_mae"), float) and sev["share_mae"] == sev["share_mae"]:
        line += f"; per-lung share MAE {sev['share_mae']:.2f} points"
    typer.echo(line + f"; results in {out}")


@app.command("export-nnunet")
def export_nnunet(
    source: Path = typer.Argument(
        Path("data/extracted"),
        help="The extract stage's folder (manifest.csv, subset.zip), or a data source (Kaggle folder or .zip, a "
        "manifest CSV or MONAI datalist), which is extracted first with params.yaml's data section.",
    ),
    out: Path = typer.Argument(..., help="Where nnUNet_raw/, nnUNet_preprocessed/ and test_labels/ go."),
    dataset_id: int = typer.Option(501, "--dataset-id", help="nnU-Net's three-digit dataset id."),
    name: str = typer.Option("COVIDQUEx", help="The dataset name (DatasetNNN_<name>)."),
    params: Path = typer.Option(Path("params.yaml"), help="Its data section is used when SOURCE must be extracted."),
) -> None:
    """The same films and split as covidseg's, as an nnU-Net v2 raw dataset with covidseg's train/val as fold 0.

    Then: nnUNetv2_plan_and_preprocess -d 501; nnUNetv2_train 501 2d 0; nnUNetv2_predict on imagesTs
    (docs/training.md#the-nnu-net-baseline-on-the-same-split).
    """
    import tempfile

    from covidseg.data.extract import extract
    from covidseg.data.layout import is_extract_output
    from covidseg.data.sources import SourceError
    from covidseg.export.nnunet import NnunetExportError
    from covidseg.export.nnunet import export_nnunet as run_export
    from covidseg.params import DataParams, ParamsError, load_section

    console = _stderr_console()
    try:
        if is_extract_output(source):
            summary = run_export(source, out, dataset_id, name)
        else:
            data = load_section(DataParams, "data", params) if params.is_file() else DataParams()
            data = dataclasses.replace(data, source=str(source))  # a manifest's seeded split as the pipeline's
            with tempfile.TemporaryDirectory() as tmp:
                extract(source, Path(tmp) / "extracted", Path(tmp) / "data.json", data)
                summary = run_export(Path(tmp) / "extracted", out, dataset_id, name)
    except (NnunetExportError, SourceError, ParamsError, ValueError) as exc:
        _die(console, str(exc))
    typer.echo(
        f"export-nnunet: {out}/nnUNet_raw/{summary['dataset']} (imagesTr {summary['train'] + summary['val']}: "
        f"train {summary['train']} + val {summary['val']}, imagesTs {summary['test']}); fold 0 of "
        f"{out}/nnUNet_preprocessed/{summary['dataset']}/splits_final.json is covidseg's split"
    )


@app.command()
def preset(
    path: Path = typer.Argument(..., help="A preset file of params overrides, e.g. presets/real.yaml."),
    params: Path = typer.Option(Path("params.yaml"), help="The params file the preset is checked against."),
) -> None:
    """Print a preset as `dvc exp run -S` flags, one per line, after checking every key and value.

    Use: `dvc exp run $(covidseg preset presets/real.yaml) -S data.source=/path/to/covidqu`.
    """
    from covidseg.params import ParamsError, preset_flags

    try:
        flags = preset_flags(path, params)
    except ParamsError as exc:
        _die(_stderr_console(), str(exc))
    typer.echo("\n".join(flags))


@app.command("machine-preset")
def machine_preset_command(
    presets: Path = typer.Option(Path("presets"), help="The folder of preset files."),
) -> None:
    """Print the preset sized to this machine: gpu.yaml under CUDA, real-bf16.yaml on a CPU with native bf16, else real.yaml.

    `make real` runs it unless PRESET= is given; COVIDSEG_NATIVE_BF16=0 (or 1) overrides the CPU probe.
    """
    from covidseg.device import MACHINE_PRESETS, machine_kind

    try:
        kind = machine_kind()
    except ValueError as exc:
        _die(_stderr_console(), str(exc))
    path = presets / MACHINE_PRESETS[kind]
    if not path.is_file():
        _die(_stderr_console(), f"machine-preset: {path} not found (this machine is {kind!r})")
    typer.echo(str(path))


@app.command("push-runs")
def push_runs(
    remote: str | None = typer.Option(None, "--remote", "-r", help="The DVC remote (default: the default remote)."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1, help="Parallel uploads (DVC's default when unset)."),
) -> None:
    """Upload the outputs that this clone's DVC run records name, after `dvc push --run-cache`.

    `dvc push --run-cache` uploads the run records but not the outputs of runs other than the
    workspace's, nor any `cache: false` metric or plot; without them a teammate's `dvc exp run`
    of the same params runs the stage again. `make push` runs both (docs/teams.md).
    """
    from covidseg.runcache import push_run_outputs

    console = _stderr_console()
    try:
        counts = push_run_outputs(".", remote=remote, jobs=jobs)
    except Exception as exc:  # DVC's own errors (no remote, no repository) as one line
        _die(console, f"push-runs: {type(exc).__name__}: {exc}")
    typer.echo(
        f"push-runs: {counts['records']} run records name {counts['objects']} objects; "
        f"{counts['transferred']} uploaded, {counts['failed']} failed"
    )
    if counts["failed"]:
        raise typer.Exit(1)


@app.command("source-path")
def source_path(
    path: Path = typer.Argument(..., help="A data source (the Kaggle folder or .zip)."),
    repo: Path = typer.Option(Path("."), help="The checkout whose dvc.lock will record the path."),
) -> None:
    """Print PATH as `data.source` should record it: relative to the checkout when inside it, else absolute.

    A relative path is the same in a teammate's clone, so DVC's run cache serves them too; an absolute
    path outside the checkout is recorded as it is (and a note on stderr says the run cache then serves
    that path only). `make real` uses it.
    """
    from covidseg.data.sources import recorded_source_path

    recorded, inside = recorded_source_path(path, repo)
    if not inside:
        _stderr_console().print(
            f"note: {path} is outside this checkout, so dvc.lock records the absolute path {recorded}: "
            "the run cache then serves only clones that see the data at that same path "
            "(put the data inside the checkout, e.g. `dvc add data/raw/covidqu.zip`, to share runs)",
            markup=False,
            soft_wrap=True,
        )
    typer.echo(recorded)


if __name__ == "__main__":  # pragma: no cover
    app()
