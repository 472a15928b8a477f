"""plots/report.html: self-contained (checked by parsing it) and rendered in real headless Chromium.

The browser half is skipped when no ``chromium`` is on PATH (.ci/run installs the Debian package).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from covidseg.evaluation.figures import FIGURES
from covidseg.evaluation.report import write_report

from helpers import run_figures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--hide-scrollbars",
]


class _Refs(HTMLParser):
    """Collects tags and every attribute that could make a browser fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action") and value is not None:
                self.refs.append((tag, name, value))
        if tag == "img":
            self.imgs.append(dict(attrs).get("src", ""))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    run = run_figures(root)
    (root / "train.json").write_text(
        json.dumps({"epochs_run": 3, "best_epoch": 2, "threshold": 0.45, "temperature": 1.0})
    )
    (root / "data.json").write_text(
        json.dumps({"train": {"count": 4}, "val": {"count": 2}, "test": {"count": 4}, "skipped_total": 0})
    )
    return write_report(
        run["details"],
        root / "train.json",
        root / "data.json",
        run["written"],
        root / "report.html",
        source="tiny/test & <data>",
    )


def test_report_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    parser = _Refs()
    parser.feed(text)
    assert "script" not in parser.tags, "the report must not need JavaScript"
    assert "link" not in parser.tags, "no external stylesheets or fonts"
    for tag, name, value in parser.refs:
        assert value.startswith(("data:", "#")), f"<{tag} {name}={value[:60]!r}> would be fetched"
    assert not re.search(r"url\(|@import|https?://", text), "CSS or text points outside the file"
    assert len(parser.imgs) == len(FIGURES)
    assert all(src.startswith("data:image/png;base64,") for src in parser.imgs)


def test_report_content(report):
    text = report.read_text(encoding="utf-8")
    metrics = json.loads((report.parent / "metrics" / "test.json").read_text())
    for needle in (
        "RMSE",
        "Brier",
        "ECE",
        "Dice, per-image mean",
        "Dice, global",
        "IoU, global",
        "Precision",
        "Recall",
        "HD95",
        "all background",
        "constant prior",
        "lung mask",
        "0.2288",
        "0.740 to 0.756",
        "Empty-truth rule",
        f"{metrics['rmse']:.4f}",
        "tuned on val: 0.450",
    ):
        assert needle in text, needle
    assert "tiny/test &amp; &lt;data&gt;" in text, "user strings must be HTML-escaped"
    # severity: the tiny model has no lung head, so the model row says why; the oracle row has numbers
    assert "Severity: infected share of each lung" in text and "no lung head" in text
    details = json.loads((report.parent / "metrics" / "test_details.json").read_text())
    rmse_ci = f"RMSE [{details['intervals']['rmse_ci95_low']:.4f}, {details['intervals']['rmse_ci95_high']:.4f}]"
    assert "95 % intervals" in text and rmse_ci in text
    assert "oracle: predicted infection in the true lungs" in text and "Bland-Altman" in text


def test_report_names_a_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: test metrics not found"):
        write_report(tmp_path / "nope.json", None, None, [], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def _chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = ["nice", "-n", "15", CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium); .ci/run installs it")
def test_report_renders_in_headless_chromium(report, tmp_path):
    # 1. every <img> decodes: a copy of the report with a tiny check script that writes its verdict into the DOM
    probe = tmp_path / "probe.html"
    script = (
        "<script>window.addEventListener('load',function(){var i=[].slice.call(document.images);"
        "var bad=i.filter(function(x){return !(x.complete&&x.naturalWidth>0);}).length;"
        "var p=document.createElement('pre');p.id='imgcheck';p.textContent='IMAGES '+i.length+' BAD '+bad;"
        "document.body.appendChild(p);});</script>"
    )
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    proc = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path / "profile1")
    found = re.search(r'id="imgcheck">IMAGES (\d+) BAD (\d+)<', proc.stdout)
    assert found, f"no check result in the DOM (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert (int(found.group(1)), int(found.group(2))) == (len(FIGURES), 0)
    assert "covidseg: COVID-19 infection segmentation report" in proc.stdout

    # 2. the untouched report paints something: a screenshot that is not one flat colour
    shot = tmp_path / "shot.png"
    proc = _chromium(["--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()], tmp_path / "profile2")
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}):\n{proc.stderr[-2000:]}"
    with Image.open(shot) as im:
        grey = im.convert("L")
        lo, hi = grey.getextrema()
        assert hi - lo > 50, f"blank screenshot: grey levels {lo}..{hi}"
        colours = grey.getcolors(maxcolors=256 * 256)
        assert colours is not None and len(colours) > 20, "screenshot has almost no distinct shades"
