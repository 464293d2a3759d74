"""Per-subject HTML reports, their figures, the methods text and ``--reports-only``.

Two real participant runs on the demo data share one work dir: ``jlf mv`` for both subjects,
then ``mv`` for sub-01 alone (its registrations come from the cache), so the citations of a run
with and without joint label fusion can be compared. Tests that change an output dir work on a
copy of it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids import __version__
from dlf_bids.cli.run import main
from dlf_bids.errors import EXIT_MISSING_INPUT
from dlf_bids.reports.citations import methods_of
from dlf_bids.reports.figures import plot_segmentation
from dlf_bids.reports.report import segmentations_of, t2w_note, write_reports
from dlf_bids.run_status import RunStatus, read_statuses, write_status
from dlf_bids.utils.labels import read_label_table

from conftest import listing, the_error_line

pytestmark = pytest.mark.slow

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}


def participant(demo_data, out: Path, work: Path, *args) -> int:
    return main([str(demo_data.bids_dir), str(out), "participant", "--atlas-dir",
                 str(demo_data.atlas_dir), "--registration-preset", "fast", "--nprocs", "2",
                 "--skip-bids-validation", "-w", str(work), *args])


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reports")
    work = root / "work"
    assert participant(demo_data, root / "both", work, "--fusion", "jlf", "mv") == 0
    assert participant(demo_data, root / "mv", work, "--fusion", "mv",
                       "--participant-label", "01") == 0
    return {"both": root / "both", "mv": root / "mv", "work": work}


class _Checker(HTMLParser):
    """Open tags (void elements aside) must close in order; collects every src and href."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.links: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}> "
                               f"at line {self.getpos()[0]}")
        else:
            self.stack.pop()


def parse(html: str) -> _Checker:
    checker = _Checker()
    checker.feed(html)
    checker.close()
    assert not checker.errors, checker.errors
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    return checker


def local_links(report: Path) -> list[str]:
    links = parse(report.read_text()).links
    return [link for link in links if not link.startswith(("http://", "https://", "#"))]


def test_reports_and_figures_exist_and_every_link_resolves(runs):
    out = runs["both"]
    for subject in ("01", "02"):
        report = out / f"sub-{subject}.html"
        links = local_links(report)
        assert len(links) >= 5  # 2 label maps, the registration check, CITATION.md and .bib
        for link in links:
            assert (out / link).is_file(), f"{report.name} links to missing {link}"
        figures = sorted(p.name for p in (out / f"sub-{subject}" / "figures").iterdir())
        assert figures == [f"sub-{subject}_desc-atlasreg_T1w.svg",
                           f"sub-{subject}_seg-jlf_dseg.svg", f"sub-{subject}_seg-mv_dseg.svg"]
        for name in figures:
            assert (out / f"sub-{subject}" / "figures" / name).stat().st_size > 10_000


def test_report_shows_each_method_the_registration_check_and_the_summary(runs):
    html = (runs["both"] / "sub-01.html").read_text()
    for method, name in (("jlf", "joint label fusion"), ("mv", "majority voting")):
        assert f'src="sub-01/figures/sub-01_seg-{method}_dseg.svg"' in html
        assert f"Segmentation: {name} ({method})" in html
    assert 'src="sub-01/figures/sub-01_desc-atlasreg_T1w.svg"' in html
    assert "Atlas registration check (sub-a01)" in html
    # sub-01 has a T2w that JLF and MV do not use; the report says so, and why
    assert ("bids:raw:sub-01/anat/sub-01_T2w.nii.gz (not used: no model of this run has a T2w "
            "channel; Deep Label Fusion, DeepAtlas and NeuroNet models can, and this run fused "
            "with jlf, mv)") in html
    assert f"dlf-bids {__version__}" in html
    assert re.search(r"nipype \d+\.\d+", html) and re.search(r"antspyx \d+\.\d+", html)
    assert "Left-Grey-Matter" in html  # the legend, from the look-up table
    assert "none found for this T1w" in (runs["both"] / "sub-02.html").read_text()


def test_reports_keep_the_output_valid_bids(runs):
    from dlf_bids.utils.validator import validate_dataset, validator_available

    if not validator_available():
        pytest.skip("bids-validator-deno not installed")
    result = validate_dataset(runs["both"])  # sub-<label>.html, sub-<label>/figures/, logs/
    assert not result.errors, result.summary(20)


def test_registration_check_is_published_even_when_its_node_is_cached(runs):
    # the second run found the drawing node in the work dir's cache and still published it
    assert (runs["mv"] / "sub-01" / "figures" / "sub-01_desc-atlasreg_T1w.svg").is_file()
    assert not (runs["mv"] / "sub-02.html").exists()  # only sub-01 was in that run


def bibtex_keys(bib: str) -> list[str]:
    entries = re.findall(r"^@(\w+)\{([^,\s]+),$", bib, re.MULTILINE)
    assert bib.count("{") == bib.count("}")
    for body in bib.split("\n@"):
        assert re.search(r"^\s+title = \{", body, re.MULTILINE), body
        assert re.search(r"^\s+author = \{", body, re.MULTILINE), body
    return [key for _, key in entries]


def test_citations_name_only_what_the_run_used(runs):
    both_md = (runs["both"] / "logs" / "CITATION.md").read_text()
    mv_md = (runs["mv"] / "logs" / "CITATION.md").read_text()
    both_keys = bibtex_keys((runs["both"] / "logs" / "CITATION.bib").read_text())
    mv_keys = bibtex_keys((runs["mv"] / "logs" / "CITATION.bib").read_text())
    assert {"wang2013", "heckemann2006", "avants2008", "nipype", "pybids", "bids"} <= set(both_keys)
    assert "wang2013" not in mv_keys and "heckemann2006" in mv_keys
    assert "xie2023" not in both_keys and "pytorch" not in both_keys  # DLF did not run
    assert "Joint label fusion (Wang et al., 2013)" in both_md
    assert "Wang et al., 2013" not in mv_md and "Majority voting" in mv_md
    assert "registration preset `fast`" in mv_md
    # the report carries the same methods text
    html = (runs["mv"] / "sub-01.html").read_text()
    shown = visible_text(html[html.index('<section id="methods"'):])
    for paragraph in mv_md.split("\n\n")[1:-3]:  # between the title and the notice
        assert re.sub(r"[`*]", "", paragraph) in shown


def visible_text(html: str) -> str:
    """The text a browser shows, on one line."""
    import html as html_lib

    return " ".join(html_lib.unescape(re.sub(r"<[^>]+>", "", html)).split())


def test_failed_subject_report_shows_the_error_and_what_exists(runs, demo_data, tmp_path):
    out = Path(shutil.copytree(runs["both"], tmp_path / "out"))
    (record,) = [r for r in read_statuses(out) if r.name == "sub-02"]
    crash = out / "logs" / "crash-20261203-000000-root-fuse_jlf-planted.txt"
    crash.write_text("Node: dlf_bids_wf.sub_02_wf.multiatlas_wf.fuse_jlf\n"
                     "RuntimeError: planted JLF failure\n")
    (out / "sub-02" / "anat" / "sub-02_seg-jlf_dseg.nii.gz").unlink()
    (out / "sub-02.html").unlink()
    record.status, record.reason = "failed", "RuntimeError: planted JLF failure"
    record.crash_files = [crash.relative_to(out).as_posix()]
    write_status(out, record)
    write_status(out, RunStatus(name="sub-03", participant_id="sub-03", status="failed",
                                reason="ValueError: nothing of sub-03 was written",
                                t1w="bids:raw:sub-03/anat/sub-03_T1w.nii.gz", fusion=["mv"]))
    assert main([str(demo_data.bids_dir), str(out), "participant", "--reports-only"]) == 0

    html = (out / "sub-02.html").read_text()
    errors = html[html.index('id="errors"'):html.index('id="summary"')]
    assert "RuntimeError: planted JLF failure" in errors
    assert f'href="{record.crash_files[0]}"' in errors
    assert "sub-02_seg-mv_dseg.svg" in html and "sub-02_seg-jlf_dseg.svg" not in html
    for link in local_links(out / "sub-02.html"):
        assert (out / link).is_file()
    nothing = (out / "sub-03.html").read_text()
    assert "ValueError: nothing of sub-03 was written" in nothing
    assert "sub-03_T1w.nii.gz is not there" in nothing
    parse(nothing)


def test_reports_only_rebuilds_a_deleted_report_without_running(runs, demo_data, tmp_path):
    out = Path(shutil.copytree(runs["both"], tmp_path / "out"))
    (out / "sub-01.html").unlink()
    figures = {p: p.stat().st_mtime_ns for p in out.glob("sub-*/figures/*.svg")}
    work_before = listing(runs["work"])
    started = time.time()
    assert main([str(demo_data.bids_dir), str(out), "participant", "--reports-only",
                 "--participant-label", "sub-01", "-w", str(runs["work"])]) == 0
    assert time.time() - started < 20  # no registration, no fusion: seconds
    assert listing(runs["work"]) == work_before  # not one node ran
    assert (out / "sub-01.html").is_file()
    parse((out / "sub-01.html").read_text())
    # figures newer than their images are kept as they are
    assert {p: p.stat().st_mtime_ns for p in figures} == figures


def test_reports_only_without_outputs_is_one_line_error(demo_data, tmp_path, capsys):
    code = main([str(demo_data.bids_dir), str(tmp_path / "empty"), "participant",
                 "--reports-only"])
    line = the_error_line(capsys.readouterr().err)
    assert code == EXIT_MISSING_INPUT
    assert "no status records" in line and "run the participant level first" in line


def test_figures_are_byte_identical_when_redrawn(runs, demo_data, tmp_path):
    t1w = demo_data.bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    dseg = runs["both"] / "sub-01" / "anat" / "sub-01_seg-jlf_dseg.nii.gz"
    table = read_label_table(runs["both"] / "seg-jlf_dseg.tsv")
    first = plot_segmentation(t1w, dseg, table, tmp_path / "a.svg", title="jlf").read_bytes()
    again = plot_segmentation(t1w, dseg, table, tmp_path / "b.svg", title="jlf").read_bytes()
    assert again == first
    assert first == (runs["both"] / "sub-01/figures/sub-01_seg-jlf_dseg.svg").read_bytes()


def test_dlf_uncertainty_map_gets_its_figure(runs, demo_data, tmp_path):
    """A map where JLF and MV disagree stands for DLF's uncertainty map (the same kind of
    0..1 image) without training a model here; the report draws what it finds under the name."""
    out = Path(shutil.copytree(runs["both"], tmp_path / "out"))
    anat = out / "sub-01" / "anat"
    jlf = nb.load(anat / "sub-01_seg-jlf_dseg.nii.gz")
    mv = np.asanyarray(nb.load(anat / "sub-01_seg-mv_dseg.nii.gz").dataobj)
    disagree = (np.asanyarray(jlf.dataobj) != mv).astype(np.float32)
    assert 0 < disagree.mean() < 0.5
    nb.save(nb.Nifti1Image(disagree, jlf.affine), anat / "sub-01_seg-dlf_uncertainty.nii.gz")
    (report,) = write_reports(out, demo_data.bids_dir, ["01"])
    html = report.read_text()
    assert "<h3>Deep Label Fusion uncertainty</h3>" in html
    assert 'src="sub-01/figures/sub-01_seg-dlf_uncertainty.svg"' in html
    assert (out / "sub-01" / "figures" / "sub-01_seg-dlf_uncertainty.svg").stat().st_size > 10_000


def test_t2w_note_says_why():
    base = dict(name="sub-01", participant_id="sub-01", status="succeeded")
    assert t2w_note(RunStatus(**base, t2w="bids:raw:a_T2w.nii.gz", t2w_used=True,
                              fusion=["dlf"])).endswith("(used by Deep Label Fusion)")
    assert "has no T2w channel" in t2w_note(RunStatus(**base, t2w="bids:raw:a_T2w.nii.gz",
                                                      fusion=["dlf", "mv"]))
    assert t2w_note(RunStatus(**base, t2w="bids:raw:a_T2w.nii.gz", fusion=["mv"],
                              t2w_used_by=["deepatlas", "neuronet"])).endswith(
        "(used by DeepAtlas, NeuroNet)")
    assert "no model of this run has a T2w channel" in t2w_note(
        RunStatus(**base, t2w="bids:raw:a_T2w.nii.gz", fusion=["jlf"]))
    dropped = "sub-01_T2w.nii.gz does not overlap the T1w; T2w not used"
    assert t2w_note(RunStatus(**base, warnings=["anisotropic voxels", dropped])) == \
        f"none used: {dropped}"


def test_methods_text_says_which_images_gave_deepatlas_their_t2w():
    base = dict(status="succeeded", fusion=["mv"], atlases=["sub-a01"], registration="deepatlas",
                deepatlas_model={"file": "da.pt", "sha256": "cd" * 32}, version="0.1.0")
    one = RunStatus(name="sub-01", participant_id="sub-01", t2w_used_by=["deepatlas"], **base)
    two = RunStatus(name="sub-02", participant_id="sub-02", **base)
    text = "\n".join(methods_of([one, two]).paragraphs)
    assert "For 1 of 2 T1w images, the subject's T2w image, rigidly registered onto the T1w" in text
    assert "second input" not in "\n".join(methods_of([two]).paragraphs)


def test_methods_text_of_a_dlf_run():
    record = RunStatus(name="sub-01", participant_id="sub-01", status="succeeded", fusion=["dlf"],
                       t2w_used=True, atlases=["sub-a01", "sub-a02"], registration_preset="quick",
                       dlf_model={"file": "dlf.pt", "sha256": "ab" * 32}, version="0.1.0",
                       packages={"torch": "2.13.0", "nipype": "1.11.0"})
    methods = methods_of([record])
    text = "\n".join(methods.paragraphs)
    assert "Deep Label Fusion (Xie et al., 2023)" in text and "PyTorch 2.13.0" in text
    assert f"`dlf.pt` (SHA-256 {'ab' * 32})" in text and "second input" in text
    assert "Nipype 1.11.0" in text and "2 atlases (sub-a01, sub-a02)" in text
    assert {"xie2023", "pytorch"} <= set(methods.keys) and "wang2013" not in methods.keys
    skipped = RunStatus(name="sub-02", participant_id="sub-02", status="skipped", fusion=["jlf"])
    assert "avants2008" not in methods_of([skipped]).keys  # nothing was registered


def test_segmentations_of_one_image_only(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    for name in ("sub-01_run-1_seg-jlf_dseg.nii.gz", "sub-01_run-10_seg-jlf_dseg.nii.gz",
                 "sub-01_run-1_seg-mv_dseg.nii.gz", "sub-01_run-1_seg-dlf_uncertainty.nii.gz"):
        (anat / name).write_bytes(b"")
    record = RunStatus(name="sub-01_run-1", participant_id="sub-01", status="succeeded")
    assert {m: p.name for m, p in segmentations_of(tmp_path, record).items()} == {
        "jlf": "sub-01_run-1_seg-jlf_dseg.nii.gz", "mv": "sub-01_run-1_seg-mv_dseg.nii.gz"}


def test_screenshot_in_a_real_browser(runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("DLF_BIDS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("DLF_BIDS_REQUIRE_CHROMIUM=1 but chromium is not installed")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from PIL import Image

    png = tmp_path / "report.png"
    # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers have a small /dev/shm
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1280,2000",
                    (runs["both"] / "sub-01.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1280, 3)
    # the page is white; the figures are slices on black with coloured labels over them
    dark = (pixels.max(axis=2) < 40).mean()
    reddish = ((pixels[..., 0] > 120) & (pixels[..., 0] > pixels[..., 1] + 40)).sum()
    colours = len(np.unique(pixels.reshape(-1, 3) // 8, axis=0))
    assert dark > 0.15, f"only {dark:.0%} of the screenshot is figure background"
    assert reddish > 5000, "no label overlay visible"
    assert colours > 400, f"only {colours} distinct colours: figures missing?"  # text alone: ~230
