"""DLF through the command lines: dlf-bids-train on an atlas library, then --dlf-model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.run import main as dlf_bids_main
from dlf_bids.cli.train import main as train_main
from dlf_bids.models.model_file import load_model
from dlf_bids.utils.demo_data import make_demo_data
from dlf_bids.utils.labels import read_label_table
from dlf_bids.utils.validator import validate_dataset, validator_available

pytestmark = pytest.mark.slow

TRAIN_ARGS = ["--registration-preset", "fast", "--network", "tiny", "--patch-size", "16",
              "--epochs", "2", "--iterations", "3", "--lr-step", "1", "--nprocs", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # Nipype's process-wide config as an earlier participant run in this process leaves it (file
    # hashes by content), unlike the fresh process of the rerun below: a command that set its
    # settings after building its workflow hashed by the fresh default there and re-registered
    from nipype import config as ncfg

    ncfg.update_config({"execution": {"hash_method": "content"}})
    root = tmp_path_factory.mktemp("dlf")
    data = make_demo_data(root / "data", n_subjects=2, n_atlases=3, voxel_size=4.0)
    model = root / "dlf.pt"
    code = train_main([str(data.atlas_dir), str(model), "-w", str(root / "work"), *TRAIN_ARGS])
    return {"root": root, "data": data, "model": model, "code": code}


def test_training_writes_a_complete_model(trained):
    assert trained["code"] == 0
    _, info = load_model(trained["model"])
    lut = read_label_table(trained["data"].atlas_dir / "dseg.tsv")
    assert info.label_indices == lut.indices
    assert info.modalities == ["T1w", "T2w"] and info.modaug  # the demo atlases have T2w
    assert sorted(info.training_atlases) == ["a01", "a02", "a03"]
    assert info.patch_size == (16, 16, 16)


def test_second_training_run_reuses_registrations(trained, tmp_path):
    """In a fresh process (as a user runs it), which also shows the command is quiet: Nipype's
    import resets its loggers to INFO, which once flooded the demo with scheduler chatter."""
    warped = sorted((trained["root"] / "work").rglob("atlas_dseg_warped.nii.gz"))
    assert len(warped) == 6  # 3 targets x 2 other atlases
    before = [p.stat().st_mtime_ns for p in warped]
    run = subprocess.run([str(Path(sys.executable).parent / "dlf-bids-train"),
                          str(trained["data"].atlas_dir), str(tmp_path / "again.pt"), "-w",
                          str(trained["root"] / "work"), *TRAIN_ARGS],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert [p.stat().st_mtime_ns for p in warped] == before
    said = run.stdout + run.stderr
    assert "registrations ready" in said
    assert "nipype.workflow INFO" not in said and "Currently running" not in said


@pytest.fixture(scope="module")
def dlf_run(trained):
    root, data = trained["root"], trained["data"]
    out = root / "out"
    code = dlf_bids_main([str(data.bids_dir), str(out), "participant", "--atlas-dir",
                          str(data.atlas_dir), "--dlf-model", str(trained["model"]),
                          "--registration-preset", "fast", "-w", str(root / "work-p"),
                          "--nprocs", "2", "--skip-bids-validation"])
    return {"code": code, "out": out, "data": data}


def test_dlf_is_the_default_fusion_with_a_model(dlf_run):
    assert dlf_run["code"] == 0
    anat = dlf_run["out"] / "sub-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-01_seg-dlf_dseg.json", "sub-01_seg-dlf_dseg.nii.gz",
        "sub-01_seg-dlf_uncertainty.json", "sub-01_seg-dlf_uncertainty.nii.gz",
        "sub-01_seg-dlf_volumes.json", "sub-01_seg-dlf_volumes.tsv"]
    assert (dlf_run["out"] / "seg-dlf_dseg.tsv").is_file()


def test_dlf_outputs_in_native_geometry(dlf_run):
    lut = read_label_table(dlf_run["out"] / "seg-dlf_dseg.tsv")
    for sub in ("sub-01", "sub-02"):
        t1w = nb.load(dlf_run["data"].bids_dir / sub / "anat" / f"{sub}_T1w.nii.gz")
        seg = nb.load(dlf_run["out"] / sub / "anat" / f"{sub}_seg-dlf_dseg.nii.gz")
        unc = nb.load(dlf_run["out"] / sub / "anat" / f"{sub}_seg-dlf_uncertainty.nii.gz")
        for img in (seg, unc):
            assert img.shape == t1w.shape and np.allclose(img.affine, t1w.affine, atol=1e-4)
        assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) - {0} <= set(lut.indices)
        u = np.asanyarray(unc.dataobj)
        assert u.min() >= 0.0 and u.max() <= 1.0


def test_dlf_sidecar_says_which_modalities_were_used(dlf_run):
    def meta(sub):
        return json.loads((dlf_run["out"] / sub / "anat" / f"{sub}_seg-dlf_dseg.json").read_text())

    with_t2, without_t2 = meta("sub-01"), meta("sub-02")  # the demo gives sub-01 a T2w only
    assert with_t2["Modalities"] == {"T1w": "image", "T2w": "image"}
    assert without_t2["Modalities"]["T1w"] == "image"
    assert without_t2["Modalities"]["T2w"].startswith("unit white noise")
    assert len(with_t2["ModelSHA256"]) == 64 and with_t2["ModelTrainedWithModAug"] is True
    assert with_t2["Sources"][0] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"


def test_dlf_output_is_valid_bids(dlf_run):
    if not validator_available():
        pytest.skip("bids-validator-deno not installed")
    result = validate_dataset(dlf_run["out"])
    assert not result.errors, result.summary(20)


def test_dlf_probseg_on_request(dlf_run, trained):
    """--dlf-probseg adds one 4D probseg whose most likely label is the dseg's label."""
    data, out = trained["data"], trained["root"] / "out-probseg"
    code = dlf_bids_main([str(data.bids_dir), str(out), "participant", "--atlas-dir",
                          str(data.atlas_dir), "--dlf-model", str(trained["model"]),
                          "--dlf-probseg", "--participant-label", "01",
                          "--registration-preset", "fast", "-w", str(trained["root"] / "work-p"),
                          "--nprocs", "2", "--skip-bids-validation"])
    assert code == 0
    anat = out / "sub-01" / "anat"
    prob = nb.load(anat / "sub-01_seg-dlf_probseg.nii.gz")
    seg = np.asanyarray(nb.load(anat / "sub-01_seg-dlf_dseg.nii.gz").dataobj)
    meta = json.loads((anat / "sub-01_seg-dlf_probseg.json").read_text())
    lut = read_label_table(out / "seg-dlf_dseg.tsv")
    assert meta["LabelIndices"] == list(lut.indices)
    p = np.asarray(prob.dataobj, dtype=np.float32)
    assert p.shape == (*seg.shape, len(lut.indices)) and p.min() >= 0.0 and p.max() <= 1.0
    fg = seg > 0
    volume = np.searchsorted(np.asarray(meta["LabelIndices"]), seg[fg])
    chosen = np.take_along_axis(p[fg], volume[:, None], axis=1)[:, 0]
    assert np.all(chosen >= p[fg].max(axis=1) - 1.0 / 255 - 1e-6)  # uint8 storage
    if validator_available():
        assert not validate_dataset(out).errors


def test_fusion_dlf_without_model_is_a_usage_error(trained, tmp_path, capsys):
    data = trained["data"]
    code = dlf_bids_main([str(data.bids_dir), str(tmp_path / "o"), "participant", "--atlas-dir",
                          str(data.atlas_dir), "--fusion", "dlf", "--skip-bids-validation",
                          "-w", str(tmp_path / "w")])
    assert code == 64
    assert "--dlf-model" in capsys.readouterr().err
    code = dlf_bids_main([str(data.bids_dir), str(tmp_path / "o"), "participant", "--atlas-dir",
                          str(data.atlas_dir), "--dlf-model", str(tmp_path / "missing.pt"),
                          "--skip-bids-validation", "-w", str(tmp_path / "w")])
    assert code == 66


def test_dlf_run_repeats_byte_for_byte(dlf_run, trained, tmp_path):
    """Same inputs, model and seed, a fresh work dir (registrations redone): identical files."""
    data = trained["data"]
    out = tmp_path / "again"
    code = dlf_bids_main([str(data.bids_dir), str(out), "participant", "--atlas-dir",
                          str(data.atlas_dir), "--dlf-model", str(trained["model"]),
                          "--registration-preset", "fast", "-w", str(tmp_path / "work"),
                          "--nprocs", "2", "--skip-bids-validation"])
    assert code == 0
    first = sorted(p.relative_to(dlf_run["out"]) for p in dlf_run["out"].glob("sub-*/anat/*"))
    assert first == sorted(p.relative_to(out) for p in out.glob("sub-*/anat/*"))
    for rel in first:
        assert (out / rel).read_bytes() == (dlf_run["out"] / rel).read_bytes(), rel
