"""Whole runs: the 3 mm real sample and the demo, from the command line to validated derivatives.

These run real ANTs registrations and label fusion (minutes in all on 2 cores), so each result is
computed once per module and checked from several angles.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.demo import main as demo_main
from dlf_bids.cli.fs2atlas import main as fs2atlas_main
from dlf_bids.cli.run import main as dlf_bids_main
from dlf_bids.evaluation import mean_dice
from dlf_bids.interfaces.bids import STAGING_DIRNAME
from dlf_bids.utils.labels import read_label_table

from conftest import assert_valid_bids  # skips without bids-validator-deno

pytestmark = pytest.mark.slow

# Aseg structures large enough at 3 mm to score (see ../shared/data/README.md)
ASEG_EVAL = [2, 3, 4, 7, 8, 10, 11, 12, 13, 16, 17, 18, 41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54]


def _listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


# --- the real 3 mm sample: atlases from real FreeSurfer subjects ------------------------------

@pytest.fixture(scope="module")
def mne_run(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("mne")
    bids = root / "bids"
    anat = bids / "sub-sample" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "MNE sample (3 mm)", "BIDSVersion": "1.10.0", "DatasetType": "raw",
                    "Authors": ["MNE-Python developers", "dlf-bids tests"]}))
    (bids / "README").write_text("One real T1w at 3 mm from the MNE sample data, for fast tests.\n")
    t1 = nb.load(shared_data / "mne-sample" / "sample_T1.mgz")
    nb.save(nb.Nifti1Image(np.asanyarray(t1.dataobj).astype(np.int16), t1.affine),
            anat / "sub-sample_T1w.nii.gz")
    (anat / "sub-sample_T1w.json").write_text("{}")

    library = root / "atlases"
    subjects = [str(shared_data / "fs-training" / f"sub-0{i}") for i in (1, 2, 3)]
    assert fs2atlas_main([*subjects, "--library", str(library), "--voxel-size", "3",
                          "--brain-only"]) == 0

    before = _listing(bids)
    out = root / "out"
    code = dlf_bids_main([str(bids), str(out), "participant", "--atlas-dir", str(library),
                          "--fusion", "mv", "jlf", "--registration-preset", "fast",
                          "-w", str(root / "work"), "--nprocs", "2"])
    group_code = dlf_bids_main([str(bids), str(out), "group"])
    return {"code": code, "group_code": group_code, "bids": bids, "before": before, "out": out,
            "library": library, "truth": np.asanyarray(
                nb.load(shared_data / "mne-sample" / "sample_aseg.mgz").dataobj).astype(int),
            "t1w": anat / "sub-sample_T1w.nii.gz"}


def test_mne_exit_codes(mne_run):
    assert mne_run["code"] == 0
    assert mne_run["group_code"] == 0


def test_mne_output_names(mne_run):
    out = mne_run["out"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
                   and "logs" not in p.parts)
    assert files == [
        ".bidsignore", "README.md", "dataset_description.json",
        "figures/group_volumes_01.png", "figures/group_volumes_02.png",
        "figures/group_volumes_03.png", "figures/group_volumes_04.png",
        "group_method_agreement.json", "group_method_agreement.tsv",
        "group_outliers.json", "group_outliers.tsv", "group_report.html",
        "group_seg-jlf_volumes.json", "group_seg-jlf_volumes.tsv",
        "group_seg-mv_volumes.json", "group_seg-mv_volumes.tsv",
        "group_volumes.json", "group_volumes.tsv",
        "seg-jlf_dseg.tsv", "seg-mv_dseg.tsv",
        "sub-sample.html",
        "sub-sample/anat/sub-sample_seg-jlf_dseg.json",
        "sub-sample/anat/sub-sample_seg-jlf_dseg.nii.gz",
        "sub-sample/anat/sub-sample_seg-jlf_volumes.json",
        "sub-sample/anat/sub-sample_seg-jlf_volumes.tsv",
        "sub-sample/anat/sub-sample_seg-mv_dseg.json",
        "sub-sample/anat/sub-sample_seg-mv_dseg.nii.gz",
        "sub-sample/anat/sub-sample_seg-mv_volumes.json",
        "sub-sample/anat/sub-sample_seg-mv_volumes.tsv",
        "sub-sample/figures/sub-sample_desc-atlasreg_T1w.svg",
        "sub-sample/figures/sub-sample_seg-jlf_dseg.svg",
        "sub-sample/figures/sub-sample_seg-mv_dseg.svg",
    ]
    assert not (out / STAGING_DIRNAME).exists() or not any((out / STAGING_DIRNAME).iterdir())


def test_mne_input_untouched(mne_run):
    assert _listing(mne_run["bids"]) == mne_run["before"]


def test_mne_native_geometry_and_accuracy(mne_run):
    t1w = nb.load(mne_run["t1w"])
    # "fast" registration at 3 mm with 3 atlases: ~0.5; a flipped or mixed-up result scores < 0.2
    for method, floor in (("mv", 0.45), ("jlf", 0.45)):
        seg = nb.load(mne_run["out"] / "sub-sample" / "anat" / f"sub-sample_seg-{method}_dseg.nii.gz")
        assert seg.shape == t1w.shape
        assert np.allclose(seg.affine, t1w.affine, atol=1e-4)
        assert seg.get_data_dtype() == np.int16
        dice = mean_dice(np.asanyarray(seg.dataobj), mne_run["truth"], ASEG_EVAL)
        assert dice > floor, f"{method}: mean Dice {dice:.3f} against the sample's own aseg"


def test_mne_lut_and_sidecar(mne_run):
    out = mne_run["out"]
    lut = read_label_table(out / "seg-jlf_dseg.tsv")
    assert lut == read_label_table(mne_run["library"] / "dseg.tsv")
    seg = np.asanyarray(nb.load(out / "sub-sample/anat/sub-sample_seg-jlf_dseg.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) - {0} <= set(lut.indices)
    meta = json.loads((out / "sub-sample/anat/sub-sample_seg-jlf_dseg.json").read_text())
    assert meta["Sources"][0] == "bids:raw:sub-sample/anat/sub-sample_T1w.nii.gz"
    assert meta["Sources"][1:] == [f"bids:atlases:sub-0{i}/anat/sub-0{i}_dseg.nii.gz" for i in (1, 2, 3)]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "dlf-bids"
    assert set(desc["DatasetLinks"]) == {"raw", "atlases"}


def test_mne_group_volumes(mne_run):
    out = mne_run["out"]
    rows = [r.split("\t") for r in (out / "group_seg-mv_volumes.tsv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    lut = read_label_table(out / "seg-mv_dseg.tsv")
    assert header[0] == "participant_id" and header[-1] == "total_labelled"
    assert [lab.name for lab in lut.labels] == header[-1 - len(lut.labels):-1]
    assert len(body) == 1 and body[0][0] == "sub-sample"
    seg = nb.load(out / "sub-sample/anat/sub-sample_seg-mv_dseg.nii.gz")
    n_wm = int((np.asanyarray(seg.dataobj) == 2).sum())
    col = header.index(lut.name_of(2))
    assert float(body[0][col]) == pytest.approx(n_wm * 27.0, abs=0.1)  # 3 mm voxels
    dictionary = json.loads((out / "group_seg-mv_volumes.json").read_text())
    assert dictionary[lut.name_of(2)]["Units"] == "mm^3"


def test_mne_output_is_valid_bids(mne_run):
    assert_valid_bids(mne_run["out"])


# --- the demo, through its own command --------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # the demo's default: train a (here very short) DLF model, then DLF, JLF and MV
    code = demo_main([str(root), "--subjects", "2", "--atlases", "3", "--voxel-size", "3",
                      "--nprocs", "2", "--dlf-epochs", "1", "--dlf-iterations", "4"])
    return {"code": code, "root": root, "out": root / "derivatives", "data": root / "data"}


def test_demo_runs(demo_run, capsys):
    assert demo_run["code"] == 0


def test_demo_outputs_match_truth_in_native_geometry(demo_run):
    out, data = demo_run["out"], demo_run["data"]
    for sub in ("sub-01", "sub-02"):
        t1w = nb.load(data / "bids" / sub / "anat" / f"{sub}_T1w.nii.gz")
        truth = np.asanyarray(nb.load(data / "truth" / f"{sub}_dseg.nii.gz").dataobj)
        for method in ("dlf", "jlf", "mv"):
            seg = nb.load(out / sub / "anat" / f"{sub}_seg-{method}_dseg.nii.gz")
            # sub-02 is stored in LIA voxel order: outputs must keep it, not be resampled
            assert nb.aff2axcodes(seg.affine) == nb.aff2axcodes(t1w.affine)
            assert np.allclose(seg.affine, t1w.affine, atol=1e-4) and seg.shape == t1w.shape
            if method == "dlf":
                continue  # 4 training iterations here: its accuracy is the benchmark's business
            dice = mean_dice(np.asanyarray(seg.dataobj), truth, range(1, 7))
            assert dice > 0.6, f"{sub} {method}: Dice {dice:.3f}"


def test_demo_group_table_and_validity(demo_run):
    out = demo_run["out"]
    lines = (out / "group_seg-jlf_volumes.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines[1:]] == ["sub-01", "sub-02"]
    assert_valid_bids(out)
    assert_valid_bids(demo_run["data"] / "bids")


def test_same_seed_same_outputs(demo_run, tmp_path):
    """Re-running from scratch (new work dir) with the same seed gives identical label maps."""
    data, first = demo_run["data"], demo_run["out"]
    out = tmp_path / "again"
    code = dlf_bids_main([str(data / "bids"), str(out), "participant", "--atlas-dir",
                          str(data / "atlases"), "--fusion", "mv", "--registration-preset", "fast",
                          "-w", str(tmp_path / "work"), "--participant-label", "01",
                          "--skip-bids-validation", "--nprocs", "2"])
    assert code == 0
    a = nb.load(first / "sub-01/anat/sub-01_seg-mv_dseg.nii.gz")
    b = nb.load(out / "sub-01/anat/sub-01_seg-mv_dseg.nii.gz")
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
