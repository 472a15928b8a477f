"""`covidseg predict`: outputs per input (mask, overlay, probs), the CSV, errors, names, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from covidseg.cli import app
from covidseg.data.arrays import resize_image
from covidseg.data.decode import decode_grey
from covidseg.inference.forward import predict_logits, probabilities
from covidseg.inference.overlay import TINT, TINT_ALPHA
from covidseg.inference.predict import CSV_COLUMNS, read_csv, unique_stems
from covidseg.model.checkpoint import load_model, save_model
from covidseg.model.unet import UNet, UNetConfig

from helpers import FAST_PREDICT_FLAGS, TINY_SIZE, grey_array, invoke_predict, make_predict_model, save_image

runner = CliRunner()


def rows_by_stem(out: Path) -> dict[str, dict[str, str]]:
    rows = read_csv(out / "predictions.csv")
    return {r["stem"]: r for r in rows}


def no_temp_files(out: Path) -> bool:
    """Atomic writes leave no hidden temporary files behind."""
    return not [p for p in out.rglob(".*")]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_predict_model(tmp_path / "model.pt", threshold=0.5)


# ----------------------------------------------------------------------------- CLI surface


def test_help_lists_commands_and_exit_codes():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "predict" in top.output
    sub = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert sub.exit_code == 0
    for word in ("--model", "--out", "--threshold", "--save-probs", "--device", "Exit status", "failed"):
        assert word in sub.output


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("forced", ["0", "1"])
def test_precision_is_fp32_by_default_whatever_the_cpu_and_bf16_on_request(tmp_path, model, monkeypatch, forced):
    """fp32 unless asked (the ONNX file's numbers); --precision bf16 runs bf16 and warns where it is emulated."""
    monkeypatch.setenv("COVIDSEG_NATIVE_BF16", forced)
    g = grey_array(TINY_SIZE, TINY_SIZE, seed=7)  # the model's own size: no resizing on either side
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.fromarray(g).save(src)
    probs = {}
    for name, extra in (("default", []), ("bf16", ["--precision", "bf16"])):
        result = invoke_predict(
            src, "--model", model, "--out", tmp_path / name, "--save-probs", "--device", "cpu", *extra
        )
        assert result.exit_code == 0, result.output
        assert f"torch on cpu, {'fp32' if name == 'default' else 'bf16'}" in result.output
        emulated = "bf16 on a CPU without native bf16" in result.output
        assert emulated is (name == "bf16" and forced == "0"), result.output
        probs[name] = np.load(tmp_path / name / "probs" / "a.npy")
    net, _ = load_model(model)
    want = probabilities(predict_logits(net, g[None, None], torch.device("cpu"), "fp32"))[0]
    np.testing.assert_allclose(probs["default"], want, atol=1e-6)
    assert not np.array_equal(probs["default"], probs["bf16"])


def test_every_mode_and_size_gives_outputs_at_input_size(tmp_path, model):
    inputs = {
        "grey": save_image(tmp_path / "in" / "grey.png", "grey", 100, 80),
        "rgb": save_image(tmp_path / "in" / "rgb.png", "rgb", 300, 200, seed=1),
        "rgba": save_image(tmp_path / "in" / "rgba.png", "rgba", 64, 48, seed=2),
        "grey16": save_image(tmp_path / "in" / "grey16.png", "grey16", 50, 70, seed=3),
        "palette": save_image(tmp_path / "in" / "palette.png", "palette", 40, 40, seed=4),
        "photo": save_image(tmp_path / "in" / "photo.jpg", "jpeg", 150, 120, seed=5),
    }
    assert Image.open(inputs["grey16"]).mode.startswith("I")
    assert Image.open(inputs["palette"]).mode == "P"
    out = tmp_path / "out"
    result = invoke_predict(*inputs.values(), "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output

    rows = read_csv(out / "predictions.csv")
    assert list(rows[0].keys()) == list(CSV_COLUMNS)
    assert [r["stem"] for r in rows] == list(inputs)  # input order kept
    for stem, src in inputs.items():
        w, h = Image.open(src).size
        row = rows_by_stem(out)[stem]
        assert row["input"] == str(src) and row["status"] == "ok" and row["error"] == ""
        assert (int(row["width"]), int(row["height"])) == (w, h)

        mask_img = Image.open(out / "masks" / f"{stem}.png")
        assert mask_img.mode == "L" and mask_img.size == (w, h)
        mask = np.asarray(mask_img)
        assert set(np.unique(mask)) <= {0, 255}

        overlay = Image.open(out / "overlays" / f"{stem}.png")
        assert overlay.mode == "RGB" and overlay.size == (w, h)

        probs = np.load(out / "probs" / f"{stem}.npy")
        assert probs.dtype == np.float32 and probs.shape == (h, w)
        assert probs.min() >= 0.0 and probs.max() <= 1.0
        np.testing.assert_array_equal(mask == 255, probs >= 0.5)
        assert float(row["infected_fraction"]) == pytest.approx((mask == 255).mean(), abs=1e-6)
        assert float(row["mean_probability"]) == pytest.approx(float(probs.mean()), abs=1e-6)
    assert no_temp_files(out)


@pytest.mark.parametrize("bias, fraction", [(20.0, 1.0), (-20.0, 0.0)])
def test_all_or_nothing_model_gives_exact_masks_fractions_and_overlays(tmp_path, bias, fraction):
    model = make_predict_model(tmp_path / "m.pt", bias=bias, threshold=0.5)
    src = save_image(tmp_path / "x.png", "grey", 90, 60)
    out = tmp_path / "out"
    result = invoke_predict(src, "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(out / "masks" / "x.png"))
    assert (mask == (255 if fraction else 0)).all()
    row = rows_by_stem(out)["x"]
    assert float(row["infected_fraction"]) == fraction
    assert float(row["mean_probability"]) == pytest.approx(fraction, abs=1e-6)

    g = grey_array(90, 60).astype(np.float32)
    overlay = np.asarray(Image.open(out / "overlays" / "x.png")).astype(np.float32)
    if fraction:
        expected = (1 - TINT_ALPHA) * g[..., None] + TINT_ALPHA * 255 * np.asarray(TINT, np.float32)
    else:
        expected = np.repeat(g[..., None], 3, axis=2)  # untouched X-ray
    assert np.abs(overlay - np.round(expected)).max() <= 1


def test_threshold_from_model_file_and_override(tmp_path):
    """A zero-logit model predicts exactly 0.5 everywhere; infected means probability >= threshold."""
    src = save_image(tmp_path / "x.png", "grey", 40, 30)
    cases = [
        (0.6, [], 0.0),
        (0.5, [], 1.0),
        (0.6, ["--threshold", "0.4"], 1.0),
        (0.4, ["--threshold", "0.7"], 0.0),
        (None, [], 1.0),
    ]  # no threshold saved: 0.5
    for i, (saved, extra, fraction) in enumerate(cases):
        model = make_predict_model(tmp_path / f"m{i}.pt", bias=0.0, threshold=saved)
        out = tmp_path / f"out{i}"
        result = invoke_predict(src, "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS, *extra)
        assert result.exit_code == 0, result.output
        assert float(rows_by_stem(out)["x"]["infected_fraction"]) == fraction, (saved, extra)
        assert (np.load(out / "probs" / "x.npy") == 0.5).all()
    bad = invoke_predict(
        src, "--model", tmp_path / "m0.pt", "--out", tmp_path / "o", "--threshold", "1.5", *FAST_PREDICT_FLAGS
    )
    assert bad.exit_code == 2


def test_flip_averaging_follows_the_model_file_unless_overridden(tmp_path):
    """A model calibrated with flip averaging predicts with it by default; the option overrides either way."""
    src = save_image(tmp_path / "x.png", "grey", TINY_SIZE, TINY_SIZE)
    image = np.array(Image.open(src))[None, None]
    for saved in (True, False, None):
        model_path = make_predict_model(tmp_path / f"m{saved}.pt", seed=5, flip_tta=saved)
        net, _ = load_model(model_path)
        expected = {
            tta: probabilities(predict_logits(net, image, torch.device("cpu"), flip_tta=tta))[0]
            for tta in (False, True)
        }
        assert not np.allclose(expected[False], expected[True], atol=1e-4)  # the random net is not mirror-symmetric
        for extra, tta in (([], bool(saved)), (["--flip-tta"], True), (["--no-flip-tta"], False)):
            out = tmp_path / f"out{saved}{extra}"
            result = invoke_predict(
                src, "--model", model_path, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS, *extra
            )
            assert result.exit_code == 0, result.output
            np.testing.assert_allclose(np.load(out / "probs" / "x.npy"), expected[tta], atol=1e-5)


def test_preprocessing_matches_training(tmp_path):
    """Same grey levels via L, RGB, 16-bit -> same probabilities as the pipeline's own path."""
    model_path = make_predict_model(tmp_path / "m.pt", threshold=0.5, temperature=2.0, seed=3)
    g = grey_array(TINY_SIZE, TINY_SIZE, seed=7)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(g).save(d / "a_grey.png")
    Image.fromarray(np.stack([g, g, g], axis=2)).save(d / "b_rgb.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(d / "c_g16.png")
    big = grey_array(3 * TINY_SIZE, 2 * TINY_SIZE, seed=8)  # (64, 96): resized down, probabilities resized up
    Image.fromarray(big).save(d / "d_big.png")
    out = tmp_path / "out"
    result = invoke_predict(d, "--model", model_path, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output

    from covidseg.model.checkpoint import load_model

    net, meta = load_model(model_path)
    cpu = torch.device("cpu")
    expected = probabilities(predict_logits(net, g[None, None], cpu, "fp32"), 2.0)[0]
    for stem in ("a_grey", "b_rgb", "c_g16"):
        np.testing.assert_allclose(np.load(out / "probs" / f"{stem}.npy"), expected, atol=1e-6, err_msg=stem)

    # Larger input: decode_grey -> PIL bilinear to TINY_SIZE -> model / temperature -> bilinear back to (H, W).
    small = np.array(resize_image(decode_grey((d / "d_big.png").read_bytes(), "d_big")[0], TINY_SIZE))
    p = torch.from_numpy(probabilities(predict_logits(net, small[None, None], cpu, "fp32"), 2.0))
    up = F.interpolate(p[None], size=big.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    got = np.load(out / "probs" / "d_big.npy")
    assert got.shape == big.shape
    np.testing.assert_allclose(got, up, atol=1e-5)


def test_batching_does_not_change_results(tmp_path, model):
    d = tmp_path / "in"
    for i, (w, h) in enumerate([(40, 30), (64, 64), (20, 50), (33, 33), (100, 10)]):
        save_image(d / f"im{i}.png", "grey", w, h, seed=i)
    outs = {}
    for bs in (1, 2, 8):
        outs[bs] = tmp_path / f"out{bs}"
        result = invoke_predict(
            d, "--model", model, "--out", outs[bs], "--save-probs", "--batch-size", bs, *FAST_PREDICT_FLAGS
        )
        assert result.exit_code == 0, result.output
    for i in range(5):
        ref = np.load(outs[8] / "probs" / f"im{i}.npy")
        for bs in (1, 2):
            np.testing.assert_allclose(np.load(outs[bs] / "probs" / f"im{i}.npy"), ref, atol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_bad_files_are_reported_and_the_others_still_run(tmp_path, model):
    d = tmp_path / "in"
    good1 = save_image(d / "good1.png", "grey", 50, 40)
    whole = (d / "good1.png").read_bytes()
    truncated = d / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    text = d / "notes.png"
    text.write_text("this is not an image\n")
    good2 = save_image(d / "good2.jpg", "jpeg", 70, 30, seed=1)
    empty = d / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    result = invoke_predict(good1, truncated, text, good2, empty, "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 1
    for bad in (truncated, text, empty):
        assert str(bad) in result.stderr
    rows = rows_by_stem(out)
    assert [r["stem"] for r in read_csv(out / "predictions.csv")] == ["good1", "truncated", "notes", "good2", "empty"]
    for stem in ("truncated", "notes", "empty"):
        assert rows[stem]["status"] == "error"
        assert rows[stem]["input"] in rows[stem]["error"] and "BytesIO" not in rows[stem]["error"]
    assert "cannot decode image" in rows["truncated"]["error"]
    assert "not an image (starts with b'this is " in rows["notes"]["error"]
    assert "not an image (an empty file" in rows["empty"]["error"]
    for stem in ("truncated", "notes", "empty"):
        assert rows[stem]["width"] == rows[stem]["infected_fraction"] == ""
        assert not (out / "masks" / f"{stem}.png").exists()
    for stem, size in (("good1", (50, 40)), ("good2", (70, 30))):
        assert rows[stem]["status"] == "ok"
        assert Image.open(out / "masks" / f"{stem}.png").size == size
        assert Image.open(out / "overlays" / f"{stem}.png").size == size
    assert "3 failed" in result.stdout
    assert no_temp_files(out)


def test_inputs_matching_nothing_stop_before_any_work(tmp_path, model):
    (tmp_path / "empty_dir").mkdir()
    out = tmp_path / "out"
    result = invoke_predict(
        tmp_path / "missing.png",
        str(tmp_path / "nothing" / "*.png"),
        tmp_path / "empty_dir",
        "--model",
        model,
        "--out",
        out,
        *FAST_PREDICT_FLAGS,
    )
    assert result.exit_code == 2
    assert "missing.png: no such file or folder" in result.stderr
    assert "pattern matches no image files" in result.stderr
    assert "empty_dir: folder holds no image files" in result.stderr
    assert not out.exists()


def test_unreadable_model_is_a_clear_error(tmp_path):
    src = save_image(tmp_path / "x.png", "grey", 20, 20)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    for path, words in ((junk, "not a covidseg model file"), (tmp_path / "absent.pt", "model file not found")):
        result = invoke_predict(src, "--model", path, "--out", tmp_path / "out", *FAST_PREDICT_FLAGS)
        assert result.exit_code == 2
        assert str(path) in result.stderr and words in result.stderr


# ----------------------------------------------------------------------------- inputs and names


def test_folder_and_glob_inputs(tmp_path, model):
    a = tmp_path / "a"
    save_image(a / "one.png", "grey", 30, 20)
    save_image(a / "two.JPG", "jpeg", 20, 30)
    (a / "readme.txt").write_text("skip me")
    save_image(a / "sub" / "deep.png", "grey", 16, 16)
    b = tmp_path / "b"
    save_image(b / "three.png", "rgb", 25, 25)
    Image.fromarray(grey_array(10, 12)).save(b / "four.bmp")
    out = tmp_path / "out"
    result = invoke_predict(a, str(b / "*.png"), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    assert [r["stem"] for r in read_csv(out / "predictions.csv")] == ["one", "two", "three"]

    out_r = tmp_path / "out_r"
    result = invoke_predict(a, str(b / "*"), "--recursive", "--model", model, "--out", out_r, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    assert sorted(r["stem"] for r in read_csv(out_r / "predictions.csv")) == ["deep", "four", "one", "three", "two"]


def test_duplicate_stems_do_not_overwrite(tmp_path, model):
    x = save_image(tmp_path / "x" / "scan.png", "grey", 40, 30)
    y = save_image(tmp_path / "y" / "scan.png", "grey", 50, 20, seed=1)
    z = save_image(tmp_path / "z" / "SCAN.jpg", "jpeg", 60, 10, seed=2)
    w = save_image(tmp_path / "w" / "scan-1.png", "grey", 12, 12, seed=3)
    out = tmp_path / "out"
    result = invoke_predict(
        x, y, x, z, w, "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS
    )  # x twice: kept once
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "predictions.csv")
    assert [(r["input"], r["stem"]) for r in rows] == [
        (str(x), "scan"),
        (str(y), "scan-1"),
        (str(z), "SCAN-2"),
        (str(w), "scan-1-1"),
    ]
    for r in rows:
        size = (int(r["width"]), int(r["height"]))
        assert Image.open(out / "masks" / f"{r['stem']}.png").size == size
        assert Image.open(out / "overlays" / f"{r['stem']}.png").size == size
        assert np.load(out / "probs" / f"{r['stem']}.npy").shape == size[::-1]


def test_unique_stems_rule():
    names = [Path("a/x.png"), Path("b/x.png"), Path("c/x-1.png"), Path("d/X.png"), Path("e/y.png")]
    assert unique_stems(names) == ["x", "x-1", "x-1-1", "X-2", "y"]


# ----------------------------------------------------------------------------- installed script, real data


def test_installed_console_script(tmp_path, model):
    script = Path(sys.executable).parent / "covidseg"
    if not script.exists():
        pytest.skip(f"console script not installed at {script} (pip install -e .)")
    save_image(tmp_path / "in" / "good.png", "rgb", 80, 60)
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    top = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0 and "predict" in top.stdout
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(script), "predict", str(tmp_path / "in"), "--model", str(model), "--out", str(out), *FAST_PREDICT_FLAGS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"error: {bad}: cannot decode image" in proc.stderr
    assert "1 of 2 images done, 1 failed" in proc.stdout
    assert Image.open(out / "masks" / "good.png").size == (80, 60)
    assert {r["stem"]: r["status"] for r in read_csv(out / "predictions.csv")} == {"bad": "error", "good": "ok"}


def test_real_dev_images(tmp_path, dev_data, model):
    images = sorted(
        (
            dev_data / "Infection Segmentation Data" / "Infection Segmentation Data" / "Test" / "COVID-19" / "images"
        ).glob("*.png")
    )[:2]
    if len(images) < 2:
        pytest.skip("dev data has no Test/COVID-19 images")
    out = tmp_path / "out"
    result = invoke_predict(*images, "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    for src in images:
        size = Image.open(src).size
        assert Image.open(out / "masks" / f"{src.stem}.png").size == size
        assert np.load(out / "probs" / f"{src.stem}.npy").shape == size[::-1]


# ----------------------------------------------------------------------------- output folder failures


def _fail_replace(monkeypatch, should_fail, err: int):
    """Make covidseg.atomic's os.replace raise OSError(err) for destinations ``should_fail`` picks."""
    import os

    import covidseg.atomic as atomic

    real = os.replace

    def replace(src, dst):
        if should_fail(Path(dst)):
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)


def three_inputs(tmp_path: Path) -> list[Path]:
    return [save_image(tmp_path / "in" / f"{n}.png", "grey", 30, 20, seed=i) for i, n in enumerate(("a", "b", "c"))]


def test_output_folder_inside_a_file_stops_with_exit_2(tmp_path, model):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    out = blocker / "out"
    result = invoke_predict(*three_inputs(tmp_path), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: output folder {out}: cannot write there (Not a directory" in result.stderr
    assert "Traceback" not in result.output
    assert blocker.read_text() == "a regular file"


def test_read_only_output_folder_stops_with_exit_2(tmp_path, model, monkeypatch):
    """Tests run as root, where chmod does not stop writes: a read-only file system is simulated."""
    import errno
    import os

    import covidseg.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()

    def mkstemp(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    result = invoke_predict(*three_inputs(tmp_path), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 2, result.output
    assert f"error: output folder {out}: cannot write there (Read-only file system: {out})" in result.stderr
    assert list(out.iterdir()) == []


@pytest.mark.skipif(
    not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
    reason="root ignores folder permissions",
)
def test_read_only_folder_by_permissions(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir(mode=0o555)
    try:
        result = invoke_predict(*three_inputs(tmp_path), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    finally:
        out.chmod(0o755)
    assert result.exit_code == 2 and f"output folder {out}: cannot write there" in result.stderr


def test_disk_full_mid_run_stops_and_the_csv_lists_exactly_what_was_written(tmp_path, model, monkeypatch):
    import errno

    inputs = three_inputs(tmp_path)
    out = tmp_path / "out"
    _fail_replace(monkeypatch, lambda dst: dst == out / "overlays" / "b.png", errno.ENOSPC)  # b's mask is written first
    result = invoke_predict(*inputs, "--model", model, "--out", out, "--batch-size", "1", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"error: output folder {out}: writing stopped (No space left on device" in result.stderr
    assert "lists the 1 of 3 inputs whose outputs were written" in result.stderr
    rows = rows_by_stem(out)
    assert [rows[s]["status"] for s in "abc"] == ["ok", "error", "not_run"]
    assert "No space left on device" in rows["b"]["error"] and rows["b"]["infected_fraction"] == ""
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "masks/a.png",
        "overlays/a.png",
        "predictions.csv",
    ]  # b's mask, written before the failure, is removed
    assert no_temp_files(out)


def test_one_image_failing_to_write_removes_its_partial_outputs(tmp_path, model, monkeypatch):
    import errno

    inputs = three_inputs(tmp_path)
    out = tmp_path / "out"
    _fail_replace(monkeypatch, lambda dst: dst == out / "probs" / "b.npy", errno.EFBIG)  # this file only
    result = invoke_predict(*inputs, "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 1, result.output
    assert f"error: {inputs[1]}: cannot write outputs (File too large" in result.stderr
    rows = rows_by_stem(out)
    assert [rows[s]["status"] for s in "abc"] == ["ok", "error", "ok"]
    for folder, ext in (("masks", "png"), ("overlays", "png"), ("probs", "npy")):
        assert (out / folder / f"a.{ext}").exists() and (out / folder / f"c.{ext}").exists()
        assert not (out / folder / f"b.{ext}").exists()
    assert no_temp_files(out)


def test_unwritable_csv_stops_with_exit_2(tmp_path, model, monkeypatch):
    import errno

    out = tmp_path / "out"
    _fail_replace(monkeypatch, lambda dst: dst.name == "predictions.csv", errno.ENOSPC)
    result = invoke_predict(*three_inputs(tmp_path), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 2, result.output
    assert f"error: {out / 'predictions.csv'}: cannot write the results table (No space left on device" in result.stderr
    assert not (out / "predictions.csv").exists() and no_temp_files(out)


def test_rerun_leaves_no_stale_outputs_of_failed_images(tmp_path, model):
    src = save_image(tmp_path / "in" / "x.png", "grey", 30, 20)
    out = tmp_path / "out"
    assert invoke_predict(src, "--model", model, "--out", out, "--save-probs", *FAST_PREDICT_FLAGS).exit_code == 0
    assert invoke_predict(src, "--model", model, "--out", out, *FAST_PREDICT_FLAGS).exit_code == 0
    assert (out / "masks" / "x.png").exists() and not (out / "probs" / "x.npy").exists()  # not from this run
    src.write_bytes(b"now broken")
    assert invoke_predict(src, "--model", model, "--out", out, *FAST_PREDICT_FLAGS).exit_code == 1
    assert rows_by_stem(out)["x"]["status"] == "error"
    assert not (out / "masks" / "x.png").exists() and not (out / "overlays" / "x.png").exists()


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run(tmp_path, model):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    left = [
        out / f".predictions.csv.{dead.pid}.k1ll3d00.csv",
        out / "masks" / f".a.png.{dead.pid}.abcdefgh.png",
        out / "overlays" / f".a.png.{dead.pid}.ijklmnop.png",
        out / "probs" / f".z.npy.{dead.pid}.qrstuvwx.npy",
    ]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half")
    result = invoke_predict(*three_inputs(tmp_path), "--model", model, "--out", out, *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in left) and no_temp_files(out)


def test_outline_is_the_mask_boundary_by_hand():
    from covidseg.inference.overlay import LUNG_OUTLINE, draw_outline, outline

    mask = np.zeros((5, 6), bool)
    mask[1:4, 1:5] = True  # 3 x 4 block: its 2 interior pixels are (2, 2) and (2, 3)
    edge = outline(mask)
    assert edge.sum() == 12 - 2 and not edge[2, 2] and not edge[2, 3] and edge[1, 1] and not edge[0, 0]
    rgb = draw_outline(np.zeros((5, 6, 3), np.uint8), mask)
    assert tuple(rgb[1, 1]) == tuple(round(255 * c) for c in LUNG_OUTLINE) and tuple(rgb[2, 2]) == (0, 0, 0)
    assert not outline(np.zeros((3, 3), bool)).any()


def test_severity_of_by_hand():
    from covidseg.inference.predict import severity_of

    lungs = np.zeros((10, 20), bool)
    lungs[2:8, 2:8] = True  # image-left lung = patient's right, 36 px
    lungs[2:8, 12:18] = True  # image-right lung = patient's left, 36 px
    infection = np.zeros_like(lungs)
    infection[2:8, 2:5] = True  # right lung 18/36 = 50 %
    infection[0, 0] = True  # one infected pixel outside the lungs
    s = severity_of(infection, lungs)
    assert s["right_lung_infected_pct"] == pytest.approx(50.0) and s["left_lung_infected_pct"] == 0.0
    assert s["lungs_infected_pct"] == pytest.approx(25.0)
    assert (s["right_extent"], s["left_extent"], s["extent_score"]) == (3, 0, 3)
    assert s["infected_outside_lungs_pct"] == pytest.approx(100 / 19)


def test_lungs_and_severity_columns_match_the_files_written(tmp_path):
    """A model with a lung head: lungs/<stem>.png at the input's size, the overlay outlines them, and the
    CSV's severity columns equal what the written masks give."""
    from PIL import Image

    from covidseg.inference.overlay import LUNG_OUTLINE, outline
    from covidseg.inference.predict import severity_of

    torch.manual_seed(3)
    model = tmp_path / "m.pt"
    save_model(model, UNet(UNetConfig(base_channels=4, depth=2, out_channels=2)), {"threshold": 0.5, "size": 32})
    src = save_image(tmp_path / "in" / "x.png", "grey", 48, 40)
    result = invoke_predict(src, "--model", model, "--out", tmp_path / "out", "-q", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    lungs = np.asarray(Image.open(tmp_path / "out" / "lungs" / "x.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "x.png"))
    assert lungs.shape == (40, 48) and set(np.unique(lungs)) <= {0, 255}
    row = read_csv(tmp_path / "out" / "predictions.csv")[0]
    from covidseg.inference.predict import load_input

    expected = severity_of(mask == 255, lungs == 255, grey=load_input(src)[0], view="unknown")
    said = expected.pop("severity_warning")
    for column, value in expected.items():
        assert row[column] == ("" if value is None else (f"{value:.6f}" if isinstance(value, float) else str(value)))
    assert (f"no severity: {said}" in row["warning"]) if said else row["severity_status"] == "ok"
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / "x.png"))
    edge = outline(lungs == 255)
    if edge.any():
        assert (overlay[edge] == np.round(255 * np.asarray(LUNG_OUTLINE))).all()


def test_version_is_defined_once_and_python_m_covidseg_runs_the_cli():
    import importlib.metadata

    import covidseg

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"covidseg {covidseg.__version__}"
    assert importlib.metadata.version("covidseg") == covidseg.__version__  # pyproject reads it (dynamic)
    proc = subprocess.run([sys.executable, "-m", "covidseg", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"covidseg {covidseg.__version__}"


def test_overlays_of_real_sized_films_mark_the_sides_and_carry_a_legend(tmp_path):
    """256 px and up: "R" top-left, "L" top-right (image left = the patient's right), a legend bottom-left."""
    from covidseg.inference.overlay import ANNOTATE_MIN_SIDE, TINT, annotate, tint

    grey = np.full((256, 256), 90, np.uint8)
    plain = tint(grey, np.zeros_like(grey, bool))
    marked = annotate(plain, 0.5, with_lungs=False)
    changed = np.any(marked != plain, axis=2)
    corner = 256 // 6
    assert changed[:corner, :corner].any() and changed[:corner, -corner:].any()  # R and L
    assert not changed[corner:-corner, corner:-corner].any()  # the film itself untouched
    swatch = np.round(255 * np.asarray(TINT)).astype(np.uint8)
    assert (marked[-corner:, :corner] == swatch).all(axis=2).any()  # the infection swatch
    small = tint(np.full((ANNOTATE_MIN_SIDE - 1, 200), 90, np.uint8), np.zeros((ANNOTATE_MIN_SIDE - 1, 200), bool))
    assert np.array_equal(annotate(small, 0.5, with_lungs=True), small)  # too small to mark: unchanged

    model = make_predict_model(tmp_path / "m.pt")
    Image.fromarray(grey_array(300, 260)).save(tmp_path / "film.png")
    result = invoke_predict(tmp_path / "film.png", "--model", model, "--out", tmp_path / "out", *FAST_PREDICT_FLAGS)
    assert result.exit_code == 0, result.output
    written = np.asarray(Image.open(tmp_path / "out" / "overlays" / "film.png"))
    assert written.shape == (260, 300, 3) and (written[-corner:, :corner] == swatch).all(axis=2).any()
