"""DeepAtlas from the command line: ``dlf-bids-train-deepatlas``, then ``dlf-bids participant
--registration deepatlas`` on the demo data and on the real 3 mm sample.

Tiny networks trained for a few steps: these tests check the plumbing (names, geometry, label
values, transforms that reproduce the warps, exit codes), not accuracy (BENCHMARKS.md has that).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.fs2atlas import main as fs2atlas_main
from dlf_bids.cli.run import main as dlf_bids_main
from dlf_bids.deepatlas_registration import REFINE_STEPS
from dlf_bids.evaluation import mean_dice
from dlf_bids.models.deepatlas_file import read_deepatlas_info
from dlf_bids.utils.labels import read_label_table

from conftest import assert_valid_bids, listing, the_error_line

pytestmark = pytest.mark.slow
TINY = ["--network", "tiny", "--steps", "6", "--phase-steps", "3", "--voxel-size", "3", "--nprocs", "2"]


def train_main(argv) -> int:
    """``dlf-bids-train-deepatlas`` in its own process, as users run it. Training here would start
    torch's OpenMP pool in this process, and the Nipype workers a later participant run forks from
    it would hang in that pool (seen in this file before it trained in subprocesses)."""
    return train_command(argv).returncode


def train_command(argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlf_bids.cli.train_deepatlas", *map(str, argv)],
                          capture_output=True, text=True)


def _bids_t1w(root: Path, subject: str, source: Path) -> Path:
    anat = root / f"sub-{subject}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    img = nb.load(str(source))
    out = anat / f"sub-{subject}_T1w.nii.gz"
    nb.save(nb.Nifti1Image(np.asanyarray(img.dataobj).astype(np.int16), img.affine), str(out))
    return out


@pytest.fixture(scope="module")
def demo_run(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("deepatlas_demo")
    model = root / "deepatlas.pt"
    train_code = train_main([str(demo_data.atlas_dir), str(model), "--unlabelled", str(demo_data.bids_dir),
                             "-w", str(root / "train_work"), *TINY])
    before = listing(demo_data.bids_dir)
    out = root / "out"
    code = dlf_bids_main([str(demo_data.bids_dir), str(out), "participant", "--atlas-dir",
                          str(demo_data.atlas_dir), "--registration", "deepatlas", "--deepatlas-model",
                          str(model), "--fusion", "mv", "-w", str(root / "work"), "--nprocs", "2"])
    return {"train_code": train_code, "code": code, "model": model, "out": out, "root": root,
            "before": before, "demo": demo_data}


def test_training_writes_a_model_with_its_reference(demo_run):
    assert demo_run["train_code"] == 0
    info = read_deepatlas_info(demo_run["model"])
    assert info.reference_image is not None and info.reference_image.ndim == 3
    assert np.allclose(np.abs(np.diag(info.reference_affine)[:3]), 3.0)
    assert info.voxel_size == 3.0 and info.modalities == ["T1w"] and info.alignment == "TRSAA"
    library_labels = read_label_table(demo_run["demo"].atlas_dir / "dseg.tsv").indices
    assert tuple(d["index"] for d in info.labels) == library_labels
    history = info.train_settings["history"]
    assert len(history) == 6 and {h["phase"] for h in history} == {"registration", "segmentation"}
    assert info.train_settings["n_unlabelled"] == 2


def test_participant_outputs(demo_run):
    assert demo_run["code"] == 0
    out = demo_run["out"]
    for sub in ("sub-01", "sub-02"):
        anat = sorted(p.name for p in (out / sub / "anat").iterdir())
        assert anat == [f"{sub}_from-atlasa0{i}_to-T1w_mode-image_xfm.{ext}"
                        for i in (1, 2, 3) for ext in ("h5", "json")] + [
            f"{sub}_seg-deepatlas_dseg.json", f"{sub}_seg-deepatlas_dseg.nii.gz",
            f"{sub}_seg-deepatlas_volumes.json", f"{sub}_seg-deepatlas_volumes.tsv",
            f"{sub}_seg-mv_dseg.json", f"{sub}_seg-mv_dseg.nii.gz",
            f"{sub}_seg-mv_volumes.json", f"{sub}_seg-mv_volumes.tsv"]
    assert (out / "seg-deepatlas_dseg.tsv").is_file()
    assert_valid_bids(out)
    assert listing(demo_run["demo"].bids_dir) == demo_run["before"]


def test_xfm_sidecars_carry_the_warp_qc_into_the_report(demo_run):
    out = demo_run["out"]
    sidecars = sorted((out / "sub-01" / "anat").glob("sub-01_from-*_to-T1w_mode-image_xfm.json"))
    assert len(sidecars) == 3
    values = [json.loads(p.read_text())["MinimumJacobianDeterminant"] for p in sidecars]
    assert f"refined by {REFINE_STEPS} steps" in json.loads(sidecars[0].read_text())["Description"]
    assert all(isinstance(v, float) for v in values)
    assert all(0 <= json.loads(p.read_text())["FoldedVoxelFraction"] <= 1 for p in sidecars)
    html = (out / "sub-01.html").read_text()
    assert "smallest Jacobian determinant per atlas" in html
    assert f"atlasa01 {values[0]:.2f}" in html


def test_segmentations_native_grid_and_labels(demo_run):
    out, demo = demo_run["out"], demo_run["demo"]
    labels = set(read_label_table(out / "seg-deepatlas_dseg.tsv").indices) | {0}
    for sub in ("sub-01", "sub-02"):
        t1w = nb.load(str(demo.bids_dir / sub / "anat" / f"{sub}_T1w.nii.gz"))
        for method in ("deepatlas", "mv"):
            seg = nb.load(str(out / sub / "anat" / f"{sub}_seg-{method}_dseg.nii.gz"))
            assert seg.shape == t1w.shape and np.allclose(seg.affine, t1w.affine)
            values = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
            assert values <= labels and len(values) > 3
        truth = np.asanyarray(nb.load(str(next((demo.truth_dir).glob(f"{sub}*dseg.nii.gz")))).dataobj)
        mv = np.asanyarray(nb.load(str(out / sub / "anat" / f"{sub}_seg-mv_dseg.nii.gz")).dataobj)
        # affine + (barely trained) network: far from a flipped or mixed-up result (< 0.2)
        assert mean_dice(mv, truth, sorted(labels - {0})) > 0.45
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_seg-mv_dseg.json").read_text())
    assert sidecar["Registration"].startswith("DeepAtlas") and sidecar["DeepAtlasModel"] == "deepatlas.pt"
    assert sidecar["DeepAtlasRefineSteps"] == REFINE_STEPS > 0  # the default: refined warps
    assert sidecar["Description"] == ("Majority voting of atlas labels registered to the subject by "
                                      "a DeepAtlas network after an antspyx affine alignment.")
    status = json.loads((out / "logs" / "status" / "sub-01.json").read_text())
    assert status["registration"] == "deepatlas" and len(status["deepatlas_model"]["sha256"]) == 64
    assert "DeepAtlas" in (out / "logs" / "CITATION.md").read_text()


def test_xfm_reproduces_the_warped_atlas(demo_run):
    """The written transform is the one the run used: applying it to the atlas labels gives the
    warped labels the fusion got."""
    import ants

    out, demo, work = demo_run["out"], demo_run["demo"], demo_run["root"] / "work"
    t1w = demo.bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    atlas_dseg = demo.atlas_dir / "sub-a02" / "anat" / "sub-a02_dseg.nii.gz"
    xfm = out / "sub-01" / "anat" / "sub-01_from-atlasa02_to-T1w_mode-image_xfm.h5"
    applied = ants.apply_transforms(ants.image_read(str(t1w)), ants.image_read(str(atlas_dseg)),
                                    [str(xfm)], interpolator="genericLabel").numpy()
    used = next(work.rglob("sub_01_wf/multiatlas_wf/register_atlases/mapflow/_register_atlases1/"
                           "atlas_dseg_warped.nii.gz"))
    np.testing.assert_array_equal(applied.astype(np.int32),
                                  np.asanyarray(nb.load(str(used)).dataobj).astype(np.int32))


def test_one_shot_training_and_unknown_atlas(demo_data, tmp_path):
    code = train_main([str(demo_data.atlas_dir), str(tmp_path / "one.pt"), "--atlases", "sub-a01",
                       "--unlabelled", str(demo_data.bids_dir), "-w", str(tmp_path / "w"), *TINY])
    assert code == 0
    info = read_deepatlas_info(tmp_path / "one.pt")
    assert info.train_settings["atlases"] == ["a01"] and info.train_settings["n_unlabelled"] == 2
    proc = train_command([str(demo_data.atlas_dir), str(tmp_path / "x.pt"), "--atlases", "zz",
                          "-w", str(tmp_path / "w"), *TINY])
    code, err = proc.returncode, proc.stderr
    assert code == 64 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("dlf-bids-train-deepatlas: error: atlas(es) zz not in")


def test_t1w_t2w_model_registers_subjects_with_and_without_a_t2w(demo_data, tmp_path):
    """``--t2w``: the demo atlases and sub-01 have a T2w, sub-02 has none. The model takes both
    channels; at the participant level each image's T2w reaches the reference grid through its
    T1w's alignment, and sub-02 runs on noise in that channel."""
    from dlf_bids.utils.atlas_library import load_atlas_library

    model = tmp_path / "t1t2.pt"
    proc = train_command([demo_data.atlas_dir, model, "--t2w", "--unlabelled", demo_data.bids_dir,
                          "-w", tmp_path / "tw", *TINY])
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = read_deepatlas_info(model)
    n_atlases = len(load_atlas_library(demo_data.atlas_dir).atlases)
    assert info.modalities == ["T1w", "T2w"] and info.config.in_channels == 2
    assert info.train_settings["n_with_t2w"] == n_atlases + 1 and info.train_settings["modaug"]
    assert f"({n_atlases + 1} with a T2w)" in proc.stdout

    out, work = tmp_path / "out", tmp_path / "work"
    assert dlf_bids_main([str(demo_data.bids_dir), str(out), "participant", "--atlas-dir",
                          str(demo_data.atlas_dir), "--registration", "deepatlas", "--deepatlas-model",
                          str(model), "--fusion", "mv", "-w", str(work), "--nprocs", "2",
                          "--skip-bids-validation"]) == 0
    for sub in ("01", "02"):
        for method in ("mv", "deepatlas"):
            assert (out / f"sub-{sub}" / "anat" / f"sub-{sub}_seg-{method}_dseg.nii.gz").is_file()
    sidecars = {sub: json.loads((out / f"sub-{sub}" / "anat" / f"sub-{sub}_seg-deepatlas_dseg.json")
                                .read_text()) for sub in ("01", "02")}
    assert sidecars["01"]["Modalities"] == ["T1w", "T2w"] and sidecars["02"]["Modalities"] == ["T1w", "noise"]
    assert sidecars["01"]["Sources"][1] == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz"
    aligned = {sub: list(work.glob(f"dlf_bids_wf/sub_{sub}_wf/multiatlas_wf/align_t1w_to_reference/"
                                   "t2w_on_reference.nii.gz")) for sub in ("01", "02")}
    assert len(aligned["01"]) == 1 and not aligned["02"]
    assert len(list(work.glob("dlf_bids_wf/align_atlases_to_reference/mapflow/*/t2w_on_reference.nii.gz"))) \
        == n_atlases
    _check_atlas_t2w_rigid_is_registered_once(demo_data, model, tmp_path)
    # no training image with a T2w: refused before any work
    t1w_only = tmp_path / "t1w-only-atlases"
    shutil.copytree(demo_data.atlas_dir, t1w_only, ignore=shutil.ignore_patterns("*_T2w.*"))
    proc = train_command([t1w_only, tmp_path / "x.pt", "--t2w", "--unlabelled", demo_data.bids_dir,
                          "--participant-label", "02", "-w", tmp_path / "tw2", *TINY])
    assert proc.returncode == 64 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("dlf-bids-train-deepatlas: error: --t2w: none "
                                                    "of the training images has a T2w")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "tw2" / "deepatlas_training_wf").exists()


def _check_atlas_t2w_rigid_is_registered_once(demo_data, deepatlas_model, tmp_path):
    """With a T1w + T2w DLF model too, DLF's warped atlas T2w go through the T2w -> T1w rigid of
    the run's atlas alignment (one registration per atlas per run, not per subject): the graph,
    built, not run."""
    from dlf_bids.config import Config
    from dlf_bids.models.dlf import DeepLabelFusion, DLFConfig
    from dlf_bids.models.model_file import save_model
    from dlf_bids.utils.atlas_library import load_atlas_library
    from dlf_bids.utils.bids import collect_anatomicals, load_layout
    from dlf_bids.workflows.base import init_dlf_bids_wf

    table = read_label_table(demo_data.atlas_dir / "dseg.tsv")
    dlf_model = save_model(tmp_path / "dlf_t1t2.pt", DeepLabelFusion(DLFConfig(
        n_labels=len(table.labels) + 1, n_modalities=2, wv_channels=(4, 8, 16), ft_channels=(4, 8, 16, 32))),
        {"labels": table, "modalities": ["T1w", "T2w"], "patch_size": (16, 16, 16)})
    library = load_atlas_library(demo_data.atlas_dir)
    config = Config(bids_dir=demo_data.bids_dir, output_dir=tmp_path / "graph-out", analysis_level="participant",
                    work_dir=tmp_path / "graph-work", atlas_dir=library.root, fusion=("dlf",),
                    dlf_model=dlf_model, registration="deepatlas", deepatlas_model=deepatlas_model)
    from dlf_bids.cli.participant import deepatlas_label_table
    from dlf_bids.utils.derivatives import write_method_luts

    write_method_luts(config.output_dir, ["dlf"], library.labels)  # the sinks' look-up tables
    write_method_luts(config.output_dir, ["deepatlas"], deepatlas_label_table(read_deepatlas_info(deepatlas_model)))
    workflow = init_dlf_bids_wf(config, collect_anatomicals(load_layout(demo_data.bids_dir)).anatomicals, library)
    edges = {(u.name, v.name): d["connect"] for u, v, d in workflow._graph.edges(data=True)}
    assert ("t2w_to_t1w", "multiatlas_wf.inputnode.atlas_t2w_to_t1w") in \
        edges[("align_atlases_to_reference", "sub_01_wf")]
    register = workflow.get_node("sub_01_wf").get_node("multiatlas_wf").get_node("register_atlases")
    assert {"atlas_t2w", "atlas_t2w_to_t1w", "atlas_t2w_on_reference"} <= set(register.iterfield)


def test_cli_refuses_deepatlas_without_a_usable_model(demo_data, tmp_path, cli):
    base = [str(demo_data.bids_dir), str(tmp_path / "out"), "participant", "--atlas-dir",
            str(demo_data.atlas_dir), "--skip-bids-validation"]
    code, _, err = cli(base + ["--registration", "deepatlas"])
    assert code == 64 and "--deepatlas-model" in the_error_line(err)
    code, _, err = cli(base + ["--registration", "deepatlas", "--deepatlas-model", str(tmp_path / "no.pt")])
    assert code == 66 and "does not exist" in the_error_line(err)
    code, _, err = cli(base + ["--deepatlas-model", str(tmp_path / "no.pt")])
    assert code == 64 and "--registration deepatlas" in the_error_line(err)
    code, _, err = cli(base + ["--deepatlas-refine-steps", "3"])
    assert code == 64 and "--registration deepatlas" in the_error_line(err)

    # a DeepAtlas file without a reference grid (saved by the model API, not the training command)
    from dlf_bids.models.deepatlas import DeepAtlas, DeepAtlasConfig
    from dlf_bids.models.deepatlas_file import save_deepatlas

    labels = (0, *read_label_table(demo_data.atlas_dir / "dseg.tsv").indices)
    bare = save_deepatlas(tmp_path / "bare.pt", DeepAtlas(DeepAtlasConfig(
        n_labels=len(labels), labels=labels, reg_channels=(4, 4, 4), seg_channels=(4, 4, 4))))
    assert read_deepatlas_info(bare).alignment == "Affine"  # files without the key: the first models'
    code, _, err = cli(base + ["--registration", "deepatlas", "--deepatlas-model", str(bare)])
    assert code == 65 and "no reference grid" in the_error_line(err)
    assert not (tmp_path / "out" / "sub-01").exists()


def test_mne_sample_with_deepatlas(shared_data, tmp_path):
    """The real 3 mm sample, atlases from three real FreeSurfer subjects."""
    bids = tmp_path / "bids"
    t1w = _bids_t1w(bids, "sample", shared_data / "mne-sample" / "sample_T1.mgz")
    library = tmp_path / "atlases"
    subjects = [str(shared_data / "fs-training" / f"sub-0{i}") for i in (1, 2, 3)]
    assert fs2atlas_main([*subjects, "--library", str(library), "--voxel-size", "3", "--brain-only"]) == 0
    model = tmp_path / "deepatlas.pt"
    assert train_main([str(library), str(model), "--unlabelled", str(bids), "-w", str(tmp_path / "tw"),
                       *TINY]) == 0
    out = tmp_path / "out"
    code = dlf_bids_main([str(bids), str(out), "participant", "--atlas-dir", str(library),
                          "--registration", "deepatlas", "--deepatlas-model", str(model),
                          "--fusion", "mv", "-w", str(tmp_path / "work"), "--nprocs", "2",
                          "--skip-bids-validation"])
    assert code == 0
    seg = nb.load(str(out / "sub-sample" / "anat" / "sub-sample_seg-mv_dseg.nii.gz"))
    assert seg.shape == nb.load(str(t1w)).shape
    truth = np.asanyarray(nb.load(str(shared_data / "mne-sample" / "sample_aseg.mgz")).dataobj)
    # aseg structures large enough at 3 mm (as tests/test_end_to_end.py)
    labels = [2, 3, 4, 7, 8, 10, 11, 12, 13, 16, 17, 18, 41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54]
    assert mean_dice(np.asanyarray(seg.dataobj), truth, labels) > 0.35


def test_same_seed_same_model_and_segmentation(demo_run, tmp_path):
    """CPU runs repeat: training again with the same seed gives the same weights, and segmenting
    again (fresh work dir) gives the same label maps."""
    import torch

    demo = demo_run["demo"]
    again = tmp_path / "again.pt"
    assert train_main([str(demo.atlas_dir), str(again), "--unlabelled", str(demo.bids_dir),
                       "-w", str(tmp_path / "train_work"), *TINY]) == 0
    first = torch.load(demo_run["model"], weights_only=True)["state_dict"]
    second = torch.load(again, weights_only=True)["state_dict"]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    out = tmp_path / "out"
    assert dlf_bids_main([str(demo.bids_dir), str(out), "participant", "--atlas-dir",
                          str(demo.atlas_dir), "--registration", "deepatlas", "--deepatlas-model",
                          str(demo_run["model"]), "--fusion", "mv", "-w", str(tmp_path / "work"),
                          "--nprocs", "2", "--participant-label", "01", "--skip-bids-validation"]) == 0
    for method in ("mv", "deepatlas"):
        name = f"sub-01/anat/sub-01_seg-{method}_dseg.nii.gz"
        a = np.asanyarray(nb.load(str(demo_run["out"] / name)).dataobj)
        b = np.asanyarray(nb.load(str(out / name)).dataobj)
        np.testing.assert_array_equal(a, b)
