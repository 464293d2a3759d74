"""NeuroNet in the app: teacher workflows, ``dlf-bids-train-neuronet``, ``--tissue-model``.

One tiny training run on the demo's 3 mm atlas library (its teachers cached in a work dir the
teacher tests read back) and one participant run with the model it wrote; both are real (ANTs
registrations and Atropos, torch training), so each is run once per module. The teachers also run
on the real 3 mm sample when ``../shared/data`` is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.run import main as dlf_bids_main
from dlf_bids.cli.train_neuronet import main as train_main
from dlf_bids.evaluation import mean_dice
from dlf_bids.models.neuronet_training import load_neuronet
from dlf_bids.utils.atlas_library import load_atlas_library
from dlf_bids.utils.labels import read_label_table

from conftest import assert_valid_bids, the_error_line

pytestmark = pytest.mark.slow

# the demo's six labels (left/right GM, WM, CSF) collapsed to BIDS tissue classes: a protocol
# that is only a spec file
DEMO_TISSUE = """\
name: demotissue
description: GM/WM/CSF collapsed from the demo's left/right labels
classes:
  - {index: 1, name: Gray Matter, abbreviation: GM}
  - {index: 2, name: White Matter, abbreviation: WM}
  - {index: 3, name: Cerebrospinal Fluid, abbreviation: CSF}
labels: {kind: collapse, source: multiatlas, map: {"1": [1, 2], "2": [3, 4], "3": [5, 6]}}
"""
PROTOCOLS = ["atropos", "demotissue", "structures", "library"]
TRAIN_ARGS = ["--teacher-fusion", "mv", "--registration-preset", "fast", "--network", "tiny",
              "--crop-size", "32", "--iterations", "40", "--lr", "5e-3", "--nprocs", "2",
              "--threads", "1"]


def _run(main, args):
    """``(exit code, stdout, stderr)`` of a command's main, in a module-scoped fixture."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def demo_tissue(labels: np.ndarray) -> np.ndarray:
    return np.select([np.isin(labels, [1, 2]), np.isin(labels, [3, 4]), np.isin(labels, [5, 6])],
                     [1, 2, 3], 0)


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("neuronet")
    spec = root / "demotissue.yaml"
    spec.write_text(DEMO_TISSUE)
    model = root / "neuronet.pt"
    # T1w + T2w (the demo atlases have a T2w): ModAug, so it also runs on sub-02, who has none
    code, out, err = _run(train_main, [demo_data.atlas_dir, model, "-w", root / "work",
                                       "--protocols", "atropos", spec, "structures", "library",
                                       "--t2w", *TRAIN_ARGS])
    return {"code": code, "out": out, "err": err, "model": model, "root": root,
            "teachers": root / "work" / "neuronet_teachers_wf", "data": demo_data,
            "library": load_atlas_library(demo_data.atlas_dir)}


def teacher_map(trained, atlas_id: str, protocol: str) -> nb.Nifti1Image:
    """A teacher's label map, read back from the Nipype cache in the work dir."""
    return nb.load(trained["teachers"] / f"case_atlas_{atlas_id}_wf" / f"labels_{protocol}"
                   / f"{protocol}_labels.nii.gz")


# ------------------------------------------------------------------------------------ training
def test_training_command_writes_a_model_with_its_metadata(trained):
    assert trained["code"] == 0, trained["err"]
    model, info = load_neuronet(trained["model"])
    assert [p.name for p in info.protocols] == PROTOCOLS
    assert [(c.index, c.abbreviation) for c in info.protocols[0].classes.labels] == \
        [(1, "GM"), (2, "WM"), (3, "CSF")]
    assert info.protocols[3].classes == trained["library"].labels  # the library's own LUT
    assert info.modalities == ["T1w", "T2w"] and info.modaug and info.config.in_channels == 2
    assert info.normalisation == "volume-zscore"
    for case in ("a01", "a02", "a03"):  # each T2w registered onto its atlas's T1w grid
        assert (trained["teachers"] / f"case_atlas_{case}_wf" / "coregister_t2w"
                / "T2w_on_T1w.nii.gz").is_file()
    assert info.train_settings["voxel_size"] == [3.0, 3.0, 3.0]
    assert info.train_settings["training_images"] == ["atlas_a01", "atlas_a02", "atlas_a03"]
    assert info.versions["dlf_bids"] and info.created
    losses = [h["loss"] for h in info.train_settings["history"]]
    assert len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert "model written to" in trained["out"]


# ------------------------------------------------------------------------------------ teachers
@pytest.mark.parametrize("atlas_id", ["a01", "a02"])
def test_atropos_teacher_gives_bids_tissue_classes_ordered_by_intensity(trained, atlas_id):
    atlas = next(a for a in trained["library"].atlases if a.atlas_id == atlas_id)
    t1w = nb.load(atlas.t1w)
    seg = teacher_map(trained, atlas_id, "atropos")
    assert seg.shape == t1w.shape and np.allclose(seg.affine, t1w.affine, atol=1e-4)
    labels = np.asanyarray(seg.dataobj)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
    image = np.asanyarray(t1w.dataobj)
    gm, wm, csf = (image[labels == k].mean() for k in (1, 2, 3))
    assert csf < gm < wm  # on a T1w
    truth = demo_tissue(np.asanyarray(nb.load(atlas.dseg).dataobj))
    # measured 0.50 / 0.65 (3 mm, 2 other atlases for the mask); a class mix-up scores < 0.2
    assert mean_dice(labels, truth, [1, 2, 3]) > 0.35


def test_multiatlas_collapse_and_own_label_teachers(trained):
    atlas = trained["library"].atlases[0]
    truth = np.asanyarray(nb.load(atlas.dseg).dataobj)
    structures = np.asanyarray(teacher_map(trained, atlas.atlas_id, "structures").dataobj)
    collapsed = np.asanyarray(teacher_map(trained, atlas.atlas_id, "demotissue").dataobj)
    own = np.asanyarray(teacher_map(trained, atlas.atlas_id, "library").dataobj)
    assert set(np.unique(structures).tolist()) <= {0, *trained["library"].labels.indices}
    # the collapse is exactly the protocol's map applied to the fused structures
    assert np.array_equal(collapsed, demo_tissue(structures))
    assert np.array_equal(own, truth)  # the atlas's own labels, untouched
    assert mean_dice(structures, truth, range(1, 7)) > 0.5  # fused from the 2 other atlases


def test_atropos_is_reproducible(trained, tmp_path):
    from dlf_bids.teachers import atropos_tissue

    atlas = trained["library"].atlases[0]
    mask = next((trained["teachers"] / f"case_atlas_{atlas.atlas_id}_wf" / "brain_mask").glob("*.nii.gz"))
    cached = (trained["teachers"] / f"case_atlas_{atlas.atlas_id}_wf" / "atropos_k3"
              / "atropos_classes.nii.gz")
    again = atropos_tissue(atlas.t1w, mask, tmp_path / "again.nii.gz")
    assert np.array_equal(np.asanyarray(nb.load(again).dataobj), np.asanyarray(nb.load(cached).dataobj))


def test_training_images_from_a_bids_dataset(trained, tmp_path):
    from dlf_bids.cli.train_neuronet import training_cases

    data, library = trained["data"], trained["library"]
    cases = training_cases(library, data.bids_dir, ["sub-01"], use_atlases=True, with_t2w=True,
                           database_dir=tmp_path / "db")
    assert [c.case_id for c in cases] == ["atlas_a01", "atlas_a02", "atlas_a03", "bids_sub_01_T1w"]
    assert cases[0].atlases == library.atlases[1:] and cases[0].reference == library.atlases[0].dseg
    bids = cases[-1]
    assert bids.atlases == library.atlases and bids.reference is None
    assert bids.t1w == data.bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    assert bids.t2w == data.bids_dir / "sub-01" / "anat" / "sub-01_T2w.nii.gz"


def test_t1w_t2w_model_runs_with_and_without_a_t2w(trained, tmp_path):
    from dlf_bids.config import Config
    from dlf_bids.neuronet_segmentation import neuronet_segment
    from dlf_bids.utils.bids import AnatomicalInput
    from dlf_bids.workflows.base import init_single_image_wf

    data, model = trained["data"], trained["model"]
    anat_dir = data.bids_dir / "sub-01" / "anat"  # the demo's T2w is on its T1w grid already
    with_t2w = neuronet_segment(anat_dir / "sub-01_T1w.nii.gz", model, tmp_path / "a",
                                t2w_file=anat_dir / "sub-01_T2w.nii.gz")
    without = neuronet_segment(anat_dir / "sub-01_T1w.nii.gz", model, tmp_path / "b")
    assert with_t2w.provenance["Modalities"] == ["T1w", "T2w"]
    assert without.provenance["Modalities"] == ["T1w", "noise"]
    for result in (with_t2w, without):
        labels = np.asanyarray(nb.load(result.dsegs["atropos"]).dataobj)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    # the participant graph registers the subject's T2w for the model
    anat = AnatomicalInput("01", anat_dir / "sub-01_T1w.nii.gz", {}, t2w=anat_dir / "sub-01_T2w.nii.gz")
    config = Config(bids_dir=data.bids_dir, output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work", atlas_dir=data.atlas_dir, fusion=("mv",),
                    tissue_model=model)
    wf = init_single_image_wf(config, anat, trained["library"])
    edges = [(u.name, v.name, d["connect"]) for u, v, d in wf._graph.edges(data=True)]
    assert ("coregister_t2w", "neuronet", [("t2w_on_t1w", "t2w")]) in edges


def test_dlf_and_neuronet_share_one_t2w_registration(trained, tmp_path):
    """With a T1w + T2w DLF model too, the subject's T2w is registered once, for both."""
    from dlf_bids.config import Config
    from dlf_bids.models.dlf import DeepLabelFusion, DLFConfig
    from dlf_bids.models.model_file import save_model
    from dlf_bids.utils.bids import AnatomicalInput
    from dlf_bids.workflows.base import init_single_image_wf

    data, library = trained["data"], trained["library"]
    dlf = DeepLabelFusion(DLFConfig(n_labels=len(library.labels.labels) + 1, n_modalities=2,
                                    wv_channels=(4, 8, 16), ft_channels=(4, 8, 16, 32)))
    dlf_model = save_model(tmp_path / "dlf.pt", dlf, {"labels": library.labels, "modalities": ["T1w", "T2w"],
                                                      "patch_size": (16, 16, 16)})
    anat_dir = data.bids_dir / "sub-01" / "anat"
    anat = AnatomicalInput("01", anat_dir / "sub-01_T1w.nii.gz", {}, t2w=anat_dir / "sub-01_T2w.nii.gz")
    config = Config(bids_dir=data.bids_dir, output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work", atlas_dir=data.atlas_dir, fusion=("dlf",),
                    dlf_model=dlf_model, tissue_model=trained["model"])
    wf = init_single_image_wf(config, anat, library)
    edges = [(u.name, v.name, d["connect"]) for u, v, d in wf._graph.edges(data=True)]
    assert ("coregister_t2w", "neuronet", [("t2w_on_t1w", "t2w")]) in edges
    assert [n for n in wf.list_node_names() if "coregister_t2w" in n] == ["coregister_t2w"]


def test_a_t1w_model_on_a_reoriented_image(trained, tmp_path):
    """The one-channel path: an untrained T1w network (weights do not change shapes or grids)."""
    import torch

    from dlf_bids.models.neuronet import NeuroNet
    from dlf_bids.models.neuronet_training import save_neuronet
    from dlf_bids.neuronet_segmentation import neuronet_segment

    _, info = load_neuronet(trained["model"])
    torch.manual_seed(0)
    network = NeuroNet(dataclasses.replace(info.config, in_channels=1))
    model = tmp_path / "t1w.pt"
    save_neuronet(model, network, info.protocols, ["T1w"], train_settings={"voxel_size": [3.0] * 3})
    t1w = trained["data"].bids_dir / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    result = neuronet_segment(t1w, model, tmp_path / "out", t2w_file=t1w)  # a T2w is ignored
    assert result.provenance["Modalities"] == ["T1w"] and result.tissue_protocol == "atropos"
    native = nb.load(t1w)
    for path in [*result.dsegs.values(), *result.probsegs.values()]:
        img = nb.load(path)
        assert img.shape == native.shape and np.allclose(img.affine, native.affine, atol=1e-4)


# ---------------------------------------------------------------------------- model grid
def test_model_grid_reorients_exactly_and_resamples_otherwise():
    from dlf_bids.model_grid import to_model_grid, to_native

    rng = np.random.default_rng(0)
    data = rng.random((6, 7, 8)).astype(np.float32)
    lia = np.array([[-2.0, 0, 0, 10], [0, 0, 2.0, -5], [0, -2.0, 0, 7], [0, 0, 0, 1]])
    img = nb.Nifti1Image(data, lia)
    grid = to_model_grid(img, (2, 2, 2))
    assert nb.aff2axcodes(grid.affine) == ("R", "A", "S") and grid.shape == (6, 8, 7)
    # the same voxels in another order: nothing interpolated, and back exactly
    assert np.array_equal(np.sort(np.asarray(grid.dataobj).ravel()), np.sort(data.ravel()))
    assert np.array_equal(to_native(np.asarray(grid.dataobj)[None], grid, img)[0], data)
    # another voxel size: resampled onto the model grid, and back onto the native grid
    coarse = to_model_grid(img, (4, 4, 4))
    assert np.allclose(np.abs(np.diag(coarse.affine)[:3]), 4)
    assert to_native(np.asarray(coarse.dataobj)[None], coarse, img).shape == (1, 6, 7, 8)


# ------------------------------------------------------------------------------ participant
@pytest.fixture(scope="module")
def participant(trained):
    root, data = trained["root"], trained["data"]
    out = root / "out"
    code, stdout, err = _run(dlf_bids_main, [
        data.bids_dir, out, "participant", "--atlas-dir", data.atlas_dir, "--fusion", "mv",
        "--registration-preset", "fast", "--tissue-model", trained["model"],
        "--participant-label", "02", "-w", root / "pwork", "--skip-bids-validation",
        "--nprocs", "2"])
    return {"code": code, "out": out, "stdout": stdout, "err": err}


def test_participant_writes_the_smriprep_names(participant):
    assert participant["code"] == 0, participant["err"]
    out = participant["out"]
    anat = sorted(p.name for p in (out / "sub-02" / "anat").iterdir())
    assert anat == [
        "sub-02_dseg.json", "sub-02_dseg.nii.gz",
        "sub-02_label-CSF_probseg.nii.gz", "sub-02_label-GM_probseg.nii.gz",
        "sub-02_label-WM_probseg.nii.gz",
        "sub-02_seg-demotissue_dseg.json", "sub-02_seg-demotissue_dseg.nii.gz",
        "sub-02_seg-library_dseg.json", "sub-02_seg-library_dseg.nii.gz",
        "sub-02_seg-mv_dseg.json", "sub-02_seg-mv_dseg.nii.gz",
        "sub-02_seg-mv_volumes.json", "sub-02_seg-mv_volumes.tsv",
        "sub-02_seg-structures_dseg.json", "sub-02_seg-structures_dseg.nii.gz",
    ]
    luts = sorted(p.name for p in out.glob("*.tsv"))
    assert luts == ["dseg.tsv", "seg-demotissue_dseg.tsv", "seg-library_dseg.tsv",
                    "seg-mv_dseg.tsv", "seg-structures_dseg.tsv"]
    assert [(lab.index, lab.abbreviation) for lab in read_label_table(out / "dseg.tsv").labels] == \
        [(1, "GM"), (2, "WM"), (3, "CSF")]
    assert "NeuroNet model neuronet.pt" in participant["stdout"]


def test_participant_label_values_probabilities_and_native_grid(participant, trained):
    anat = participant["out"] / "sub-02" / "anat"
    t1w = nb.load(trained["data"].bids_dir / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    dseg = nb.load(anat / "sub-02_dseg.nii.gz")
    # sub-02 is stored LIA: outputs keep its grid although the network works on a RAS grid
    assert nb.aff2axcodes(t1w.affine) == ("L", "I", "A")
    assert dseg.shape == t1w.shape and np.allclose(dseg.affine, t1w.affine, atol=1e-4)
    assert dseg.get_data_dtype() == np.int16
    labels = np.asanyarray(dseg.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3} and labels.any()
    probs = []
    for name in ("GM", "WM", "CSF"):
        img = nb.load(anat / f"sub-02_label-{name}_probseg.nii.gz")
        assert img.get_data_dtype() == np.float32 and img.shape == t1w.shape
        assert np.allclose(img.affine, t1w.affine, atol=1e-4)
        probs.append(np.asanyarray(img.dataobj))
    probs = np.stack(probs)
    assert probs.min() >= 0 and probs.sum(axis=0).max() <= 1 + 1e-5
    # the dseg is the argmax of the same probabilities (background = 1 - their sum)
    full = np.concatenate([1 - probs.sum(axis=0, keepdims=True), probs])
    assert np.mean(np.argmax(full, axis=0) == labels) > 0.999
    lib = read_label_table(participant["out"] / "seg-library_dseg.tsv")
    seg = np.asanyarray(nb.load(anat / "sub-02_seg-library_dseg.nii.gz").dataobj)
    assert set(np.unique(seg).tolist()) <= {0, *lib.indices}
    meta = json.loads((anat / "sub-02_dseg.json").read_text())
    assert meta["Sources"] == ["bids:raw:sub-02/anat/sub-02_T1w.nii.gz"]
    assert meta["Protocols"] == PROTOCOLS and len(meta["ModelSHA256"]) == 64
    assert meta["Modalities"] == ["T1w", "noise"]  # sub-02 has no T2w: ModAug's noise


def test_what_smriprep_queries_find(participant):
    """sMRIPrep's --derivatives queries (its io_spec 'baseline') on niworkflows' entities."""
    from bids import BIDSLayout
    from niworkflows.data import load as nwf_load

    layout = BIDSLayout(participant["out"], config=str(nwf_load("nipreps.json")), validate=False)
    tpms = layout.get(subject="02", datatype="anat", label=["GM", "WM", "CSF"], suffix="probseg")
    assert sorted(f.filename for f in tpms) == [f"sub-02_label-{k}_probseg.nii.gz"
                                                for k in ("CSF", "GM", "WM")]
    # nipreps.json has no seg entity: the dseg query also returns the seg-<name> maps (README)
    dsegs = [f.filename for f in layout.get(subject="02", datatype="anat", suffix="dseg",
                                            extension=[".nii.gz", ".nii"])]
    assert "sub-02_dseg.nii.gz" in dsegs and len(dsegs) == 5


def test_participant_methods_text_and_status_name_the_model(participant, trained):
    from dlf_bids.models.model_file import model_hash

    sha = model_hash(trained["model"])
    citation = (participant["out"] / "logs" / "CITATION.md").read_text()
    assert "NeuroNet" in citation and sha in citation and "Rajchl" in citation
    assert "`seg-structures`" in citation
    status = json.loads((participant["out"] / "logs" / "status" / "sub-02.json").read_text())
    assert status["tissue_model"] == {"file": "neuronet.pt", "sha256": sha,
                                      "tissue_protocol": "atropos",
                                      "protocols": ["demotissue", "structures", "library"]}
    assert "sub-02/anat/sub-02_label-GM_probseg.nii.gz" in status["outputs"]


def test_participant_output_is_valid_bids(participant):
    assert_valid_bids(participant["out"])


def test_group_level_tabulates_the_neuronet_protocols(participant, trained):
    code, _, err = _run(dlf_bids_main, [trained["data"].bids_dir, participant["out"], "group"])
    assert code == 0, err
    for protocol in ("demotissue", "structures", "library"):
        rows = (participant["out"] / f"group_seg-{protocol}_volumes.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows[1:]] == ["sub-02"]


def test_bad_or_missing_tissue_model_is_one_line_before_any_work(trained, tmp_path, cli):
    data = trained["data"]
    base = [data.bids_dir, tmp_path / "out", "participant", "--atlas-dir", data.atlas_dir,
            "--skip-bids-validation"]
    code, _, err = cli([*base, "--tissue-model", tmp_path / "absent.pt"])
    assert code == 66 and "absent.pt does not exist" in the_error_line(err)
    (tmp_path / "bad.pt").write_bytes(b"not a model at all")
    code, _, err = cli([*base, "--tissue-model", tmp_path / "bad.pt"])
    assert code == 65 and "bad.pt" in the_error_line(err)
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*_wf"))


def test_foreign_or_incomplete_model_files_are_refused(trained, tmp_path, cli):
    """A DLF model, or a NeuroNet file that does not say its voxel size: exit 65, one line."""
    import torch

    from dlf_bids.models.neuronet_training import save_neuronet

    model, info = load_neuronet(trained["model"])
    save_neuronet(tmp_path / "novoxel.pt", model, info.protocols, info.modalities)
    data = trained["data"]
    base = [data.bids_dir, tmp_path / "out", "participant", "--atlas-dir", data.atlas_dir,
            "--skip-bids-validation", "--tissue-model"]
    code, _, err = cli([*base, tmp_path / "novoxel.pt"])
    assert code == 65 and "does not say at which voxel size" in the_error_line(err)
    torch.save({"format_version": 1, "dlf_config": {}}, tmp_path / "dlf.pt")
    code, _, err = cli([*base, tmp_path / "dlf.pt"])
    assert code == 65 and "is not a dlf-bids NeuroNet model" in the_error_line(err)


def test_no_tissue_model_no_neuronet_step(trained, tmp_path):
    from dlf_bids.cli.participant import check_tissue_model
    from dlf_bids.config import Config
    from dlf_bids.utils.bids import AnatomicalInput
    from dlf_bids.workflows.base import init_single_image_wf

    data, library = trained["data"], trained["library"]
    anat = AnatomicalInput("01", data.bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz", {})
    names = {}
    for model in (None, trained["model"]):
        config = Config(bids_dir=data.bids_dir, output_dir=tmp_path / "out",
                        analysis_level="participant", work_dir=tmp_path / "work",
                        atlas_dir=library.root, fusion=("mv",), tissue_model=model)
        names[model] = init_single_image_wf(config, anat, library).list_node_names()
        if model is None:
            assert check_tissue_model(config) is None
    assert not [n for n in names[None] if "neuronet" in n]
    assert {"neuronet", "ds_neuronet_dseg", "ds_neuronet_probseg",
            "ds_neuronet_seg_library"} <= set(names[trained["model"]])


def test_memory_plan_counts_the_neuronet_node(trained, tmp_path):
    from dlf_bids.config import Config
    from dlf_bids.resources import MARGIN, MIB, NEURONET, n_voxels, neuronet_gb, plan_for_run

    data, library = trained["data"], trained["library"]
    t1w = data.bids_dir / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    config = Config(bids_dir=data.bids_dir, output_dir=tmp_path, analysis_level="participant",
                    work_dir=tmp_path, atlas_dir=library.root, fusion=("mv",),
                    tissue_model=trained["model"])
    # 4 + 4 + 7 + 7 output channels (background included); the demo's grid is the model's
    from dlf_bids.model_grid import to_model_grid
    from dlf_bids.neuronet_segmentation import inference_window, model_outputs

    outputs = model_outputs(str(trained["model"]))
    grid = to_model_grid(nb.load(t1w), outputs.voxel_size).shape
    window = inference_window(grid, outputs.config)
    assert outputs.window_voxels(t1w) == (np.prod(grid), np.prod(window))
    assert plan_for_run(config, t1w, library).neuronet == pytest.approx(
        neuronet_gb(n_voxels(t1w), np.prod(grid), np.prod(window), 22))
    base_gb = MARGIN * NEURONET[0] * MIB / 1e9  # torch, MONAI and the model
    # a 1 mm head under a 2 mm model (one 136^3 window) needs less than under a 1 mm model
    # (64^3 windows slid over a 256^3 grid), and more channels need more
    assert neuronet_gb(256**3, 256**3, 64**3, 50) > neuronet_gb(256**3, 129**3, 136**3, 50) \
        > neuronet_gb(256**3, 129**3, 136**3, 4) > base_gb


@pytest.mark.parametrize("extra, code, message", [
    (["--protocols", "nosuch"], 65, "unknown protocol 'nosuch'"),
    (["--protocols", "absent.yaml"], 66, "protocol file absent.yaml does not exist"),
    (["--no-atlas-images"], 64, "--no-atlas-images needs --bids-dir"),
    (["--protocols", "atropos", "atropos"], 64, "protocol names must differ"),
    (["--protocols", "tissue"], 65, "protocol tissue does not map multiatlas label(s) 1, 6"),
    (["--protocols", "aseg"], 65, "protocol aseg has no class for multiatlas label(s) 1, 6"),
    (["--bids-dir", "BIDS", "--protocols", "library"], 64, "need a label map with every"),
    (["--bids-dir", "NOWHERE"], 66, "does not exist"),
    (["--bids-dir", "NOTBIDS"], 65, "is not a BIDS dataset"),
    (["--bids-dir", "BIDS", "--participant-label", "99"], 66, "participant(s) sub-99 not found"),
])
def test_training_command_refuses_bad_input_in_one_line(demo_data, tmp_path, extra, code, message):
    extra = [{"BIDS": demo_data.bids_dir, "NOWHERE": tmp_path / "nowhere",
              "NOTBIDS": tmp_path}.get(a, a) for a in extra]
    got, _, err = _run(train_main, [demo_data.atlas_dir, tmp_path / "m.pt", "-w", tmp_path / "w",
                                    *extra])
    lines = [line for line in err.splitlines() if "error" in line]
    assert got == code and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("dlf-bids-train-neuronet: error: ") and message in lines[0]
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------- the real 3 mm sample (shared)
def test_teachers_on_the_real_3mm_sample(shared_data, tmp_path):
    from dlf_bids.cli.fs2atlas import main as fs2atlas_main
    from dlf_bids.cli.train_neuronet import run_teachers
    from dlf_bids.models.protocols import ASEG_TO_TISSUE, builtin_protocol, collapse_labels
    from dlf_bids.workflows.teachers import TeacherCase

    t1 = nb.load(shared_data / "mne-sample" / "sample_T1.mgz")
    t1w = tmp_path / "sample_T1w.nii.gz"
    nb.save(nb.Nifti1Image(np.asanyarray(t1.dataobj).astype(np.int16), t1.affine), t1w)
    library_dir = tmp_path / "atlases"
    assert fs2atlas_main([str(shared_data / "fs-training" / f"sub-0{i}") for i in (1, 2)]
                         + ["--library", str(library_dir), "--voxel-size", "3", "--brain-only"]) == 0
    library = load_atlas_library(library_dir)
    protocols = [builtin_protocol(n) for n in ("atropos", "tissue", "aseg")]
    labels = run_teachers([TeacherCase("sample", t1w, library.atlases)], protocols,
                          tmp_path / "work", "fast", 0, "mv", 2)[0]["sample"]
    aseg = np.asanyarray(nb.load(shared_data / "mne-sample" / "sample_aseg.mgz").dataobj)
    truth = collapse_labels(np.where(np.isin(aseg, [0, *sum(ASEG_TO_TISSUE.values(), [])]), aseg, 0),
                            ASEG_TO_TISSUE)
    maps = {name: np.asanyarray(nb.load(path).dataobj) for name, path in labels.items()}
    assert set(np.unique(maps["atropos"]).tolist()) == {0, 1, 2, 3}
    assert set(np.unique(maps["tissue"]).tolist()) == {0, 1, 2, 3}
    # GM and WM against FreeSurfer's (2 atlases, "fast" registration, 3 mm): measured 0.69 for
    # Atropos, 0.47 for the collapsed fusion; a class mix-up scores < 0.2. CSF is not scored:
    # aseg's CSF is the ventricles, Atropos's also the sulci (Dice 0.08 here, by definition)
    assert mean_dice(maps["atropos"], truth, [1, 2]) > 0.55
    assert mean_dice(maps["tissue"], truth, [1, 2]) > 0.35
    assert np.array_equal(maps["tissue"], collapse_labels(maps["aseg"], ASEG_TO_TISSUE))
