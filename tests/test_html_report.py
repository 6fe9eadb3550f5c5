"""``artifactscan report``: one self-contained HTML page for a results folder.

The results folder is made by the real pipeline (``scan`` + ``write_scan_outputs``) on a tiny random ViT with one
planted high-norm token; other result kinds are written as the JSON their commands write. The last test opens the
page in a real headless Chromium (installed with apt-get when missing; skipped with the reason when it cannot be).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from artifactscan.core.errors import InputError
from artifactscan.core.summaries import ImageSummary
from artifactscan.render.html_report import build_html_report, write_html_report

EVIL = "<b>x</b>.png"


# ----------------------------------------------------------------------------------------------- fixtures
def _tiny_scan(plant: bool):
    import timm

    from artifactscan.models.loading import wrap_module
    from artifactscan.analysis.scan import scan

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2).eval()
    if plant:
        with torch.no_grad():
            model.pos_embed[0, 5] += 60.0  # one patch position gets a huge norm in every image
    images = torch.rand(6, 3, 32, 32)
    return scan(wrap_module(model), images, device="cpu", batch_size=6, num_maps=2)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    from artifactscan.analysis.compare import CompareReport, ModelRow
    from artifactscan.analysis.emergence import EmergenceGroup, EmergencePoint, EmergenceReport
    from artifactscan.core.results import atomic_write_text
    from artifactscan.render.outputs import write_scan_outputs

    root = tmp_path_factory.mktemp("results")
    report = _tiny_scan(plant=True)
    assert report.onset_layer is not None, "the planted token must be flagged"
    report.maps[0].image = EVIL  # an image name that is also HTML
    for o in report.outliers:
        if o.image_index == report.maps[0].image_index:
            o.image = EVIL
    write_scan_outputs(report, root / "real")

    phantom = copy.deepcopy(report)
    phantom.model.kind = "phantom"
    phantom.model.name = "phantom"
    phantom.model.calibration_note = "CALIBRATION PHANTOM: built in on purpose."
    write_scan_outputs(phantom, root / "phantom", figures=False)
    shutil.copy(root / "real" / "layer_norms.png", root / "phantom" / "layer_norms.png")

    row = dict(name="m", arch="vit", step=None, onset_layer=None, outlier_fraction=0.0, max_over_median=1.5,
               image_fraction_with_outliers=0.0, peak_outlier_fraction=0.0, register_norm_mean=None,
               median_patch_norm=2.0)
    cmp = CompareReport(model=[], images=ImageSummary.described_only("synthetic:8"), rows=[
        ModelRow(label="base", registers=0, prefix_attention={"cls": 0.1}, **row),
        ModelRow(label="reg4", registers=4, prefix_attention={"cls": 0.05, "registers": 0.3}, **row)],
        headline="CANNOT CONFIRM THE FIX: the baseline grew no outliers & <nothing> to remove.")
    atomic_write_text(root / "cmp" / "compare.json", json.dumps(cmp.to_dict()))  # to_dict leaves out the scans
    shutil.copy(root / "real" / "norm_histogram.png", root / "cmp" / "compare.png")

    em = EmergenceReport("runs/a", [EmergenceGroup("vit regs=0", 0, [
        EmergencePoint(100, "runs/a/step_100.safetensors", None, [0.0, 0.0], [1.2, 1.3]),
        EmergencePoint(200, "runs/a/step_200.safetensors", 1, [0.0, 0.02], [1.2, 9.0])])], notes=[], model=[],
        images=ImageSummary.described_only("synthetic:8"), headline="outliers from block 1 at step 200")
    atomic_write_text(root / "emergence" / "emergence.json", json.dumps(em.to_dict()))

    # kinds being added by colleagues, and a kind nobody knows yet: shown without code changes
    (root / "extra").mkdir()
    (root / "extra" / "attention.json").write_text(json.dumps({
        "schema": "artifactscan.attention/1", "headline": "Attention sinks <script>alert(1)</script> at block 1",
        "model": {"name": "demo", "kind": "model"}, "layers": [{"block": 0, "sink_mass": 0.1}]}))
    (root / "extra" / "fix.json").write_text(json.dumps({
        "schema": "artifactscan.fix/1", "verdict": {"label": "fixed", "summary": "outliers 6.25% -> 0%",
                                                    "reasons": ["registers soak them up"]}}))
    (root / "extra" / "future.json").write_text(json.dumps({
        "schema": "artifactscan.future/7", "alpha": 1.5, "beta": "a & b", "nested": {"k": 1}}))
    shutil.copy(root / "real" / "norm_histogram.png", root / "extra" / "attention.png")
    shutil.copy(root / "real" / "norm_histogram.png", root / "extra" / "<i>y<i>.png")

    # a train-reg run folder (plain JSON, recognised by name)
    tr = root / "train"
    (tr / "reg0").mkdir(parents=True)
    (tr / "reg4").mkdir()
    (tr / "train_reg.json").write_text(json.dumps({"registers": [0, 4], "baseline_checkpoint": None}))
    (tr / "config.json").write_text(json.dumps({"arch": "demo", "steps": 20, "seed": 0}))
    (tr / "comparison.json").write_text(json.dumps({"run_dir": str(tr), "config": {}, "variants": [
        {"registers": 0, "checkpoint": str(tr / "reg0/final.safetensors"), "run_dir": str(tr / "reg0"),
         "val_acc": 0.5, "trained": True, "steps": 20, "wall_s": 3.0, "img_per_s": 100.0, "checkpoints": []},
        {"registers": 4, "checkpoint": str(tr / "reg4/final.safetensors"), "run_dir": str(tr / "reg4"),
         "val_acc": 0.55, "trained": True, "steps": 20, "wall_s": 3.2, "img_per_s": 90.0, "checkpoints": []}],
        "step_time_ratio_vs_reg0": {"0": 1.0, "4": 1.11}}))
    for reg in ("reg0", "reg4"):
        (tr / reg / "config.json").write_text("{}")
        (tr / reg / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 2.0 / s, "val_loss": 2.1 / s, "val_acc": 0.1 * s, "img_per_s": 99.0}) + "\n"
            for s in (1, 2, 3)))

    (root / "broken").mkdir()
    (root / "broken" / "report.json").write_text("{ not json")
    (root / "foreign.json").write_text(json.dumps({"hello": "world"}))  # not ours: ignored quietly
    return root


@pytest.fixture(scope="module")
def page(results) -> tuple[str, object, list[str]]:
    warnings: list[str] = []
    out = results.parent / "page" / "report.html"
    summary = write_html_report(results, out, warn=warnings.append)
    return out.read_text(), summary, warnings


def _img_srcs(text: str) -> list[str]:
    return re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', text)


# ----------------------------------------------------------------------------------------------- the page
def test_self_contained_every_image_is_a_png_data_uri(page):
    text, summary, _ = page
    assert not re.search(r'\b(?:src|href)\s*=\s*["\']?\s*(?:https?:)?//', text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    srcs = _img_srcs(text)
    assert len(srcs) == summary.figures >= 6
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            assert im.width > 10 and im.height > 10


def _lead(text: str) -> str:
    return text.split('class="lead"', 1)[1].split("</div>", 1)[0]


def test_headline_tables_and_figures_of_the_scan(page, results, tmp_path):
    from artifactscan.analysis.scan import load_scan_report as load_report

    text, summary, _ = page
    assert "CANNOT CONFIRM THE FIX" in _lead(text)  # a comparison's verdict leads the page
    real = load_report(results / "real" / "report.json")
    for sub in ("real", "phantom"):
        shutil.copytree(results / sub, tmp_path / sub)
    # without a comparison: the first scan's headline, a real model's before the phantom's
    assert real.headline.replace("'", "&#x27;") in _lead(build_html_report(tmp_path))
    scans = [r for r in summary.results if r.kind == "scan" and r.path == "real/report.json"]
    assert len(scans) == 1 and scans[0].num_outliers == len(real.outliers) > 0
    assert {"real/norm_histogram.png", "real/layer_norms.png"} <= set(scans[0].figures)
    assert sum(f.startswith("real/maps/") for f in scans[0].figures) == 2
    for col in ("median", "p99", "max/median", "threshold", "% flagged", "images with outliers", "&gt; 150"):
        assert f">{col}</th>" in text
    assert 'class="flagged"' in text  # flagged layers stand out
    assert f"{len(real.outliers):,}" in text


def test_text_is_escaped(page):
    text, _, _ = page
    assert EVIL not in text and "<i>y<i>" not in text and "<script>alert" not in text
    assert "&lt;b&gt;x&lt;/b&gt;.png" in text
    assert "&lt;i&gt;y&lt;i&gt;.png" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&amp; &lt;nothing&gt; to remove" in text


def test_phantom_banner_only_when_a_result_is_the_phantom(page, results, tmp_path):
    text, summary, _ = page
    assert summary.phantom
    banner = text.split('<div class="banner"', 1)[1].split("</div>", 1)[0]
    assert "built in by construction" in banner and "not findings about real models" in banner
    assert "CALIBRATION PHANTOM: built in on purpose." in banner
    assert [r.path for r in summary.results if r.phantom] == ["phantom/report.json"]
    alone = build_html_report(results / "real")
    assert '<div class="banner"' not in alone


def test_every_kind_is_rendered(page):
    text, summary, warnings = page
    kinds = {r.path: r.kind for r in summary.results}
    assert kinds == {"cmp/compare.json": "compare", "real/report.json": "scan", "phantom/report.json": "scan",
                     "extra/attention.json": "attention", "extra/fix.json": "fix", "emergence/emergence.json":
                     "emergence", "train": "train-reg", "extra/future.json": "other"}
    assert list(kinds.values())[0] == "compare"  # comparisons first
    heads = {r.path: r.headline for r in summary.results}
    assert heads["extra/fix.json"] == "fixed: outliers 6.25% -> 0%"
    assert "registers soak them up" in text
    assert ">alpha</th><td>1.5</td>" in text and "a &amp; b" in text  # the unknown kind: a compact key table
    assert "extra/attention.png" in next(r for r in summary.results if r.kind == "attention").figures
    assert "val. accuracy" in text and "55.00%" in text and "training curves" in text
    assert "block 1: % / ratio" in text  # emergence table
    assert "reg4" in text and "registers=30.0%" in text  # compare table


def test_renamed_run_files_new_name_first_and_one_section_each(results, tmp_path):
    """A 0.3 run folder holds variants.json and held_out_comparison.json plus their old names (same content): the
    page reads the new names and shows each result once; a run written before 0.3 (old names only) still reads."""
    run = tmp_path / "run"
    shutil.copytree(results / "train", run)
    old_variants = json.loads((run / "comparison.json").read_text())
    new_variants = copy.deepcopy(old_variants)
    new_variants["variants"][1]["val_acc"] = 0.75  # tells which file the page read
    (run / "variants.json").write_text(json.dumps(new_variants))
    compared = json.loads((results / "cmp" / "compare.json").read_text())
    verdict = {"schema": "artifactscan.train_reg_verdict/1", "run_dir": str(run), "images": "synthetic:8",
               "comparison": compared, "validation_accuracy": {"reg0": 0.5}, "verdict": compared["verdict"]}
    for name in ("held_out_comparison.json", "verdict.json"):
        (run / name).write_text(json.dumps(verdict))
    summary = write_html_report(run, tmp_path / "page.html")
    text = (tmp_path / "page.html").read_text()
    assert "75.00%" in text and "55.00%" not in text
    assert sorted(r.path for r in summary.results) == [".", "held_out_comparison.json"]
    (run / "variants.json").unlink()
    write_html_report(run, tmp_path / "old.html")
    assert "55.00%" in (tmp_path / "old.html").read_text()


def test_unreadable_json_is_skipped_with_a_warning(page):
    text, summary, warnings = page
    assert summary.skipped == ["broken/report.json"]
    assert any("broken/report.json" in w and "JSON" in w for w in warnings)
    assert "broken/report.json" in text  # listed on the page too
    assert "foreign.json" not in text


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_html_report(tmp_path / "nope")
    with pytest.raises(InputError, match="nothing to report: .* run `artifactscan norms"):
        build_html_report(tmp_path)
    (tmp_path / "a.json").write_text("{oops")
    (tmp_path / "b.json").write_text('{"schema": "other.tool/1"}')
    with pytest.raises(InputError, match="nothing to report.*1 unreadable"):
        build_html_report(tmp_path, warn=lambda m: None)


def test_output_path(results, tmp_path):
    summary = write_html_report(results / "real", tmp_path / "new" / "deeper" / "r.html")
    assert summary.out_path.is_file() and summary.bytes > 10_000
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="afile is a file, not a folder"):
        write_html_report(results / "real", tmp_path / "afile" / "r.html")


def test_cli(results, tmp_path):
    from artifactscan.cli import app

    runner = CliRunner()
    out = tmp_path / "made" / "report.html"
    res = runner.invoke(app, ["report", str(results / "real"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output
    for args, needle in (([str(tmp_path / "missing")], "does not exist"),
                         ([str(tmp_path / "made" / "report.html")], "is a file"),
                         ([str(tmp_path / "made")], "nothing to report"),
                         ([str(results / "real"), "-o", str(out / "x.html")], "is a file, not a folder")):
        res = runner.invoke(app, ["report", *args])
        assert res.exit_code == 1, res.output
        assert needle in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------- real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (root only). Skips with the reason otherwise."""
    exe = _chromium()
    if exe is None and os.environ.get("ARTIFACTSCAN_NO_APT"):
        pytest.skip("chromium not installed and ARTIFACTSCAN_NO_APT is set")
    if exe is None:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            try:
                subprocess.run(cmd, env=env, capture_output=True, timeout=900)
            except subprocess.TimeoutExpired:
                break
            exe = _chromium()
            if exe is not None:
                break
        if exe is None:
            pytest.skip("chromium is not installed and `apt-get install -y chromium` failed")
    return exe


_CHECK = """<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<script>
var blocked = 0, errors = 0;
document.addEventListener('securitypolicyviolation', function () { blocked++; });
window.addEventListener('error', function () { errors++; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.title = 'IMGCHECK total=' + imgs.length + ' bad=' + bad + ' blocked=' + blocked + ' errors=' + errors;
});
</script>"""


def _browser(exe: str, profile: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_page_in_headless_chromium(chromium, page, tmp_path):
    text, summary, _ = page
    start = time.monotonic()
    page_path = tmp_path / "report.html"
    page_path.write_text(text)
    shot = tmp_path / "shot.png"
    res = _browser(chromium, tmp_path / "profile1", f"--screenshot={shot}", "--window-size=1200,2000",
                   "--enable-logging=stderr", "--v=0", page_path.as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Failed to load" in line
               or "Refused to" in line]
    assert not console, console
    import numpy as np

    with Image.open(shot) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert rgb.shape == (2000, 1200, 3)
    assert rgb.var() > 100, f"screenshot looks blank (variance {rgb.var():.1f})"
    top = rgb[:500]
    reds = int(((top[..., 0] > 140) & (top[..., 1] < 60) & (top[..., 2] < 60)).sum())
    assert reds > 500, "the phantom banner should stand out at the top of the page"

    # the same page under a CSP that allows nothing but inline style and data: images: every <img> must decode,
    # nothing may be blocked (a blocked load would mean an external resource), and no error may fire
    wrapper = tmp_path / "check.html"
    wrapper.write_text(text.replace("<head>", "<head>\n" + _CHECK, 1))
    res = _browser(chromium, tmp_path / "profile2", "--dump-dom", "--virtual-time-budget=5000", wrapper.as_uri())
    m = re.search(r"<title>IMGCHECK total=(\d+) bad=(\d+) blocked=(\d+) errors=(\d+)</title>", res.stdout)
    assert m, (res.stdout[:500], res.stderr[-2000:])
    total, bad, blocked, errors = map(int, m.groups())
    assert total == summary.figures and bad == 0 and blocked == 0 and errors == 0, m.group(0)
    assert time.monotonic() - start < 60


def test_attention_fix_and_calibration_have_their_own_sections(tmp_path):
    """Real results of the three kinds (read from the previous schema's files and written in the current one): each
    gets its headline, its key table, its records and the figures its command writes, not the generic section."""
    from artifactscan.analysis.attention_maps import AttentionReport
    from artifactscan.analysis.calibrate import CalibrationReport
    from artifactscan.analysis.fix import FixReport

    schemas = Path(__file__).parent / "data" / "schemas"
    results = {}
    for kind, cls, name in (("attention", AttentionReport, "attention-v2.json"), ("fix", FixReport, "fix-v1.json"),
                            ("calibration", CalibrationReport, "calibration-v1.json")):
        results[kind] = cls.from_dict(json.loads((schemas / name).read_text()))
        (tmp_path / kind).mkdir()
        (tmp_path / kind / f"{kind}.json").write_text(results[kind].to_json())
    (tmp_path / "attention" / "attention_maps").mkdir()
    for png in (tmp_path / "attention" / "attention_mass.png", tmp_path / "attention" / "attention_maps" / "img0.png",
                tmp_path / "calibration" / "calibration.png"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(png)
    summary = write_html_report(tmp_path, tmp_path / "page.html")
    text = (tmp_path / "page.html").read_text()
    by_kind = {r.kind: r for r in summary.results}
    assert set(by_kind) == {"attention", "fix", "calibration"}
    for kind, result in results.items():
        assert by_kind[kind].headline == result.headline
    assert "Detection limit" in text and "ratio (weakest block)" in text and "found from" in text
    assert sorted(by_kind["calibration"].figures) == ["calibration/calibration.png"]
    assert "spike = outliers" in text and "why this query" in text
    assert sorted(by_kind["attention"].figures) == ["attention/attention_maps/img0.png",
                                                    "attention/attention_mass.png"]
    assert "Register neurons moved by the test-time register" in text and "outliers removed" in text
    assert "1.56% → 0.00%" in text  # before -> after, from the fix's own numbers


def test_signatures_have_their_own_section(tmp_path):
    """A real `artifactscan signatures` folder: the verdict on each signature and the per-block table beside the
    nulls, with its figure."""
    from typer.testing import CliRunner

    from artifactscan.cli import app

    out = tmp_path / "sig"
    result = CliRunner().invoke(app, ["signatures", "demo", "synthetic-objects:4", "--null-seeds", "1",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = write_html_report(tmp_path, tmp_path / "page.html")
    text = (tmp_path / "page.html").read_text()
    (only,) = summary.results
    assert only.kind == "signatures" and only.headline == json.loads((out / "signatures.json").read_text())["headline"]
    assert "Artifact signatures" in text and "position share (shuffled null)" in text and "hit ratio" in text
    assert "shift residual flagged / unflagged (null 99%)" in text
    assert only.figures == ["sig/signatures.png"]
