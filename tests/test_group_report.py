"""The group level on real runs and on planted cases: long volume table, outliers, method
agreement, failed/skipped/missing subjects, the HTML report and its figures, BIDS validity."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.run import main
from dlf_bids.evaluation import mean_dice
from dlf_bids.group import ENTITY_COLUMNS
from dlf_bids.group_qc import robust_z
from dlf_bids.run_status import RunStatus, write_status
from dlf_bids.utils.demo_data import demo_label_table, make_demo_data
from dlf_bids.utils.labels import Label, LabelTable, write_label_table

from conftest import assert_valid_bids  # skips without bids-validator-deno

ENTITIES = [col for _, col in ENTITY_COLUMNS]
METHODS = ("jlf", "mv")
DEMO_VOXEL_MM3 = 27.0  # make_demo_data(voxel_size=3.0)


def _rows(tsv: Path) -> list[dict]:
    with tsv.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _header(tsv: Path) -> list[str]:
    return tsv.read_text().splitlines()[0].split("\t")


class _PageChecker(HTMLParser):
    """Checks that every element is closed in order and collects the ``src``/``href`` links."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()


def _check_page(report: Path) -> str:
    """The report's text; fails unless it parses and every local link exists."""
    text = report.read_text()
    checker = _PageChecker()
    checker.feed(text)
    checker.close()
    assert checker.open == [], f"unclosed elements {checker.open}"
    local = [link for link in checker.links if not link.startswith("#")]
    assert not [link for link in local if "://" in link], "the report must be self-contained"
    missing = [link for link in local if not (report.parent / link).is_file()]
    assert not missing, f"the report links to missing files {missing}"
    return text


# --- a real 3-subject run, plus a fourth subject that was never processed ---------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    demo = make_demo_data(root / "demo", n_subjects=3, n_atlases=3, voxel_size=3.0)
    bids = demo.bids_dir
    sub04 = bids / "sub-04" / "anat"
    sub04.mkdir(parents=True)
    shutil.copy(bids / "sub-03/anat/sub-03_T1w.nii.gz", sub04 / "sub-04_T1w.nii.gz")
    out = root / "out"
    code = main([str(bids), str(out), "participant", "--atlas-dir", str(demo.atlas_dir),
                 "--fusion", *METHODS, "--registration-preset", "fast", "--nprocs", "2",
                 "--skip-bids-validation", "--participant-label", "01", "02", "03",
                 "-w", str(root / "work")])
    group_code = main([str(bids), str(out), "group"])
    return SimpleNamespace(code=code, group_code=group_code, bids=bids, out=out, root=root)


def test_both_levels_succeed(study):
    assert (study.code, study.group_code) == (0, 0)


def test_participant_volumes_match_the_label_maps(study):
    names = [lab.name for lab in demo_label_table().labels]
    for sub in ("01", "02", "03"):
        for method in METHODS:
            anat = study.out / f"sub-{sub}" / "anat"
            tsv = anat / f"sub-{sub}_seg-{method}_volumes.tsv"
            rows = _rows(tsv)
            assert _header(tsv) == ["index", "name", "volume_mm3", "voxels"]
            assert [r["name"] for r in rows] == names + ["total_brain", "total_intracranial"]
            seg = np.asanyarray(nb.load(anat / f"sub-{sub}_seg-{method}_dseg.nii.gz").dataobj)
            for r in rows[:len(names)]:
                assert int(r["voxels"]) == np.count_nonzero(seg == int(r["index"]))
                assert float(r["volume_mm3"]) == int(r["voxels"]) * DEMO_VOXEL_MM3
            # demo labels 1-4 are grey and white matter, 5-6 CSF
            assert int(rows[-2]["voxels"]) == np.count_nonzero((seg >= 1) & (seg <= 4))
            assert int(rows[-1]["voxels"]) == np.count_nonzero(seg)
            dictionary = json.loads(tsv.with_suffix(".json").read_text())
            assert set(dictionary) == {"index", "name", "volume_mm3", "voxels"}
            assert "Left-CSF, Right-CSF" in dictionary["name"]["Description"]


def test_group_volumes_long_table(study):
    tsv = study.out / "group_volumes.tsv"
    assert _header(tsv) == ENTITIES + ["method", "index", "name", "volume_mm3"]
    rows = _rows(tsv)
    per_image = len(demo_label_table().labels) + 2  # labels + total_brain + total_intracranial
    assert len(rows) == 3 * len(METHODS) * per_image
    assert {(r["participant_id"], r["method"]) for r in rows} == {
        (f"sub-{s}", m) for s in ("01", "02", "03") for m in METHODS}
    assert {r["session_id"] for r in rows} == {"n/a"}
    for r in rows:  # the same numbers as each subject's own table
        own = _rows(study.out / r["participant_id"] / "anat" /
                    f"{r['participant_id']}_seg-{r['method']}_volumes.tsv")
        match = [o for o in own if o["name"] == r["name"]]
        assert [(o["index"], o["volume_mm3"]) for o in match] == [(r["index"], r["volume_mm3"])]
    dictionary = json.loads(tsv.with_suffix(".json").read_text())
    assert set(dictionary) == set(_header(tsv))
    assert dictionary["volume_mm3"]["Units"] == "mm^3"
    # the per-method wide tables are still written
    for method in METHODS:
        assert len(_rows(study.out / f"group_seg-{method}_volumes.tsv")) == 3


def test_method_agreement_is_the_dice_of_the_label_maps(study):
    rows = _rows(study.out / "group_method_agreement.tsv")
    assert [(r["participant_id"], r["method_a"], r["method_b"]) for r in rows] == [
        (f"sub-{s}", "jlf", "mv") for s in ("01", "02", "03")]
    labels = demo_label_table().indices
    for r in rows:
        anat = study.out / r["participant_id"] / "anat"
        jlf, mv = (np.asanyarray(nb.load(anat / f"{r['participant_id']}_seg-{m}_dseg.nii.gz")
                                 .dataobj) for m in METHODS)
        assert r["mean_dice"] == f"{mean_dice(jlf, mv, labels):.4f}"
        assert 0.5 < float(r["mean_dice"]) <= 1.0  # two fusions of the same registrations


def test_report_lists_the_unprocessed_subject_as_missing(study):
    text = _check_page(study.out / "group_report.html")
    assert "<td>sub-04</td><td>sub-04</td><td>missing</td>" in text
    assert "crash-" not in text  # nothing crashed
    assert "sub-01</td><td>sub-01</td>" not in text  # segmented subjects are not listed
    assert "fewer than 5 images" in text and "No volume is flagged" not in text  # 3 images
    assert _rows(study.out / "group_outliers.tsv") == []
    assert list((study.out / "figures").glob("group_volumes_*.png"))


def test_report_names_a_failed_subject_with_its_reason(study, tmp_path):
    out = Path(shutil.copytree(study.out, tmp_path / "out"))
    crash = "logs/crash-20261203-sub_04_wf.fuse_mv.txt"
    (out / crash).write_text("Node: dlf_bids_wf.sub_04_wf.fuse_mv\nValueError: planted\n")
    write_status(out, RunStatus(name="sub-04", participant_id="sub-04", status="failed",
                                reason="ValueError: planted <failure> for sub-04",
                                crash_files=[crash, "logs/crash-deleted-since.txt"]))
    assert main([str(study.bids), str(out), "group"]) == 0
    text = _check_page(out / "group_report.html")  # the crash report link must resolve
    assert ("<td>sub-04</td><td>sub-04</td><td>failed</td>"
            "<td>ValueError: planted &lt;failure&gt; for sub-04</td>"
            f'<td><a href="{crash}">{Path(crash).name}</a></td>') in text
    assert "<td>missing</td>" not in text  # it has a record now: failed, not missing
    assert len(_rows(out / "group_volumes.tsv")) == len(_rows(study.out / "group_volumes.tsv"))


def test_outputs_validate(study):
    assert_valid_bids(study.out)


# --- planted outlier: label maps written directly, no registration ----------------------------

@pytest.fixture
def planted(tmp_path):
    """8 subjects' mv label maps (2 mm): label A grows slightly with the subject, sub-05's A is
    four times the others'; label B varies a little."""
    bids, out = tmp_path / "bids", tmp_path / "out"
    (bids / "sub-01").mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    write_label_table(LabelTable((Label(1, "A"), Label(2, "B"))), out / "seg-mv_dseg.tsv")
    for i in range(1, 9):
        (bids / f"sub-{i:02d}").mkdir(exist_ok=True)
        seg = np.zeros((20, 20, 20), np.int16)
        seg.flat[:100 + 2 * i] = 1
        if i == 5:
            seg.flat[:400] = 1
        seg.flat[1000:1200 + i % 3] = 2
        anat = out / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        nb.save(nb.Nifti1Image(seg, np.diag([2.0, 2.0, 2.0, 1.0])),
                anat / f"sub-{i:02d}_seg-mv_dseg.nii.gz")
    return bids, out


def test_planted_outlier_is_flagged_and_no_other(planted):
    bids, out = planted
    assert main([str(bids), str(out), "group"]) == 0
    rows = _rows(out / "group_outliers.tsv")
    # A and the brain total that holds it; B and every other subject are not flagged
    assert sorted((r["participant_id"], r["name"]) for r in rows) == [
        ("sub-05", "A"), ("sub-05", "total_brain")]
    a = next(r for r in rows if r["name"] == "A")
    assert (a["method"], a["index"], a["volume_mm3"]) == ("mv", "1", f"{400 * 8:.3f}")
    assert float(a["robust_z"]) > 3.5
    text = _check_page(out / "group_report.html")
    assert "<td>sub-05</td><td>mv</td><td>A</td>" in text
    assert "None: every subject of the dataset has results." in text
    assert _rows(out / "group_method_agreement.tsv") == []  # one method: nothing to compare


def test_skipped_and_vanished_images_are_listed(tmp_path):
    from dlf_bids.group_qc import find_problems

    bids, out = tmp_path / "bids", tmp_path / "out"
    for sub in ("sub-01", "sub-02", "sub-03"):
        (bids / sub).mkdir(parents=True)
    write_status(out, RunStatus(name="sub-01", participant_id="sub-01", status="skipped",
                                reason="no T1w image"))
    write_status(out, RunStatus(name="sub-02_run-1", participant_id="sub-02", status="succeeded",
                                outputs=["sub-02/anat/sub-02_run-1_seg-mv_dseg.nii.gz"]))
    problems = find_problems(bids, out, segmented={"sub-03"})
    assert [(p.image, p.status) for p in problems] == [("sub-01", "skipped"),
                                                      ("sub-02_run-1", "missing")]
    assert problems[0].reason == "no T1w image"
    assert problems[1].reason.startswith("succeeded, but its outputs are gone: sub-02/anat/")


def test_robust_z():
    z = robust_z([10, 11, 9, 10, 10, 12, 50])
    assert abs(z[-1]) > 3.5 and np.all(np.abs(z[:-1]) <= 3.5)
    assert z[0] == 0.0  # the median itself
    # MAD 0 (most values equal): the mean absolute deviation takes over, 4 / (1.2533 x 0.8)
    assert robust_z([5, 5, 5, 5, 9])[-1] == pytest.approx(4 / (1.2533 * 0.8))
    assert robust_z([7, 7, 7]).tolist() == [0.0, 0.0, 0.0]
