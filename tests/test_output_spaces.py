"""--output-spaces: TemplateFlow templates found offline, the T1w registered to them, the
segmentations warped there, transforms written, all as valid BIDS-Derivatives.

The TemplateFlow home is made here from the real template nilearn ships: the MNI ICBM152 2009a
symmetric T1w at 1 mm, i.e. TemplateFlow's ``tpl-MNI152NLin2009aSym`` (nilearn's copy is
skull-stripped; it stands in for the head T1w). ``res-2`` and the brain masks are DERIVED here
(the T1w resampled to 2 mm; the mask thresholds it as nilearn's ``load_mni152_brain_mask``
does); ``template_description.json`` is TemplateFlow's own, from the skeleton its package ships.
No test may touch the network: a guard fails any attempt.
"""

from __future__ import annotations

import json
import shutil
import socket
import zipfile
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
from nibabel.processing import resample_from_to, resample_to_output

from dlf_bids.cli.run import main as dlf_bids_main
from dlf_bids.errors import BadDataError, MissingInputError, UsageError
from dlf_bids.evaluation import mean_dice
from dlf_bids.templates import (OutputSpace, parse_output_space, parse_output_spaces,
                                registration_targets, resolve_output_spaces)
from dlf_bids.utils.validator import validate_dataset, validator_available

from conftest import listing, the_error_line

TEMPLATE = "MNI152NLin2009aSym"
DEMO_LABELS = range(1, 7)  # left/right grey matter, white matter, CSF


# --- a TemplateFlow home, and no network ------------------------------------------------------

def _nilearn_template() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _mask_of(img: nb.Nifti1Image) -> nb.Nifti1Image:
    # nilearn's load_mni152_brain_mask: the template above 0.2 of its (0..1) range
    data = np.asanyarray(img.dataobj).astype(np.float32)
    return nb.Nifti1Image((data > 0.2 * data.max()).astype(np.uint8), img.affine)


def make_templateflow_home(root: Path) -> Path:
    """``root/tpl-MNI152NLin2009aSym/`` as TemplateFlow lays it out (res-1 real, res-2 derived)."""
    import templateflow

    folder = root / f"tpl-{TEMPLATE}"
    folder.mkdir(parents=True)
    res1 = nb.load(_nilearn_template())
    shutil.copyfile(_nilearn_template(), folder / f"tpl-{TEMPLATE}_res-1_T1w.nii.gz")
    res2 = resample_to_output(nb.Nifti1Image(res1.get_fdata(dtype=np.float32), res1.affine),
                              voxel_sizes=2.0, order=1)
    nb.save(res2, folder / f"tpl-{TEMPLATE}_res-2_T1w.nii.gz")
    for res, img in ((1, res1), (2, res2)):
        nb.save(_mask_of(img), folder / f"tpl-{TEMPLATE}_res-{res}_desc-brain_mask.nii.gz")
    skeleton = zipfile.ZipFile(Path(templateflow.__file__).parent / "conf/templateflow-skel.zip")
    (folder / "template_description.json").write_bytes(
        skeleton.read(f"tpl-{TEMPLATE}/template_description.json"))
    return root


@pytest.fixture(scope="module")
def tf_home(tmp_path_factory) -> Path:
    return make_templateflow_home(tmp_path_factory.mktemp("templateflow"))


@pytest.fixture
def own_home(tmp_path, tf_home) -> Path:
    """A private copy of the home, free to break."""
    return Path(shutil.copytree(tf_home, tmp_path / "templateflow"))


class NetworkGuard:
    """Replaces socket connections and name look-ups; records and refuses every attempt."""

    def __init__(self):
        self.attempts: list[str] = []

    def refuse(self, what):
        self.attempts.append(str(what))
        raise OSError(f"network access attempted in a test: {what}")


def install_network_guard(patch: pytest.MonkeyPatch) -> NetworkGuard:
    guard = NetworkGuard()
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family == socket.AF_UNIX:  # local pipes (multiprocessing) are not the network
            return real_connect(sock, address)
        guard.refuse(address)

    patch.setattr(socket.socket, "connect", connect)
    patch.setattr(socket, "create_connection", lambda address, *a, **k: guard.refuse(address))
    patch.setattr(socket, "getaddrinfo", lambda host, *a, **k: guard.refuse(host))
    return guard


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    guard = install_network_guard(monkeypatch)
    yield guard
    assert guard.attempts == [], f"network was attempted: {guard.attempts}"


def _reference_labels_on(grid: nb.Nifti1Image) -> np.ndarray:
    """The demo's true labels of the template itself (every demo image derives from it)."""
    from dlf_bids.utils.demo_data import _load_template

    template = _load_template()
    labels = nb.Nifti1Image(template.labels.astype(np.int16), template.affine)
    return np.asanyarray(resample_from_to(labels, grid, order=0).dataobj)


# --- parsing --------------------------------------------------------------------------------

def test_parse_output_spaces():
    assert parse_output_space(f"{TEMPLATE}:res-2") == (OutputSpace(TEMPLATE, 2),)
    assert parse_output_space(f"{TEMPLATE}:resolution-02:") == (OutputSpace(TEMPLATE, 2),)
    assert parse_output_space(TEMPLATE) == (OutputSpace(TEMPLATE, None),)
    assert parse_output_space("T1w") == parse_output_space("anat") == ()
    spaces = parse_output_spaces([f"{TEMPLATE}:res-1:res-2", "T1w", f"{TEMPLATE}:res-2",
                                  "MNI152NLin2009cAsym"])
    assert spaces == (OutputSpace(TEMPLATE, 1), OutputSpace(TEMPLATE, 2),
                      OutputSpace("MNI152NLin2009cAsym", None))
    assert [str(s) for s in spaces] == [f"{TEMPLATE}:res-1", f"{TEMPLATE}:res-2",
                                        "MNI152NLin2009cAsym"]
    assert spaces[1].entities == {"space": TEMPLATE, "resolution": "2"}
    assert spaces[2].entities == {"space": "MNI152NLin2009cAsym"}


@pytest.mark.parametrize("word, says", [
    (f"{TEMPLATE}:res-x", "unsupported modifier 'res-x'"),
    (f"{TEMPLATE}:cohort-1", "unsupported modifier 'cohort-1'"),
    ("T1w:res-2", "takes no modifiers"),
    ("MNI152/../x", "TemplateFlow template name"),
])
def test_bad_space_syntax_is_an_argument_error(demo_data, tmp_path, capsys, word, says):
    with pytest.raises(SystemExit) as exc:  # argparse's own exit
        dlf_bids_main([str(demo_data.bids_dir), str(tmp_path / "out"), "participant",
                       "--atlas-dir", str(demo_data.atlas_dir), "--output-spaces", word])
    assert exc.value.code == 2
    line = the_error_line(capsys.readouterr().err)
    assert "--output-spaces" in line and says in line
    assert not (tmp_path / "out").exists()


# --- finding templates offline ----------------------------------------------------------------

def test_resolve_finds_files_and_writes_nothing(tf_home):
    before = listing(tf_home)
    folder = tf_home / f"tpl-{TEMPLATE}"
    res2, default = resolve_output_spaces([OutputSpace(TEMPLATE, 2), OutputSpace(TEMPLATE)],
                                          tf_home)
    assert res2.t1w == folder / f"tpl-{TEMPLATE}_res-2_T1w.nii.gz"
    assert res2.mask == folder / f"tpl-{TEMPLATE}_res-2_desc-brain_mask.nii.gz"
    assert default.t1w == folder / f"tpl-{TEMPLATE}_res-1_T1w.nii.gz"  # no res: resolution 1
    # the finest grid asked for is the one registered to, once per template
    assert registration_targets([res2, default]) == {TEMPLATE: default}
    assert listing(tf_home) == before  # no TemplateFlow skeleton unpacked, nothing fetched


def test_no_resolution_asked(own_home):
    """Without :res-N: resolution 1, else the template's only one, else the user must choose."""
    folder = own_home / f"tpl-{TEMPLATE}"
    (folder / f"tpl-{TEMPLATE}_res-1_T1w.nii.gz").unlink()
    (space,) = resolve_output_spaces([OutputSpace(TEMPLATE)], own_home)
    assert space.t1w.name == f"tpl-{TEMPLATE}_res-2_T1w.nii.gz"
    shutil.copyfile(space.t1w, folder / f"tpl-{TEMPLATE}_res-3_T1w.nii.gz")
    with pytest.raises(UsageError, match=r"several resolutions \(res-2, res-3\): choose one, "
                                         f"e.g. {TEMPLATE}:res-2"):
        resolve_output_spaces([OutputSpace(TEMPLATE)], own_home)


def test_mask_placeholder_is_not_used(own_home):
    """A zero-byte mask is a TemplateFlow placeholder never downloaded: registration goes on
    without it (the mask is optional), and nothing tries to fetch it."""
    (own_home / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-2_desc-brain_mask.nii.gz").write_bytes(b"")
    (space,) = resolve_output_spaces([OutputSpace(TEMPLATE, 2)], own_home)
    assert space.mask is None and space.t1w.name == f"tpl-{TEMPLATE}_res-2_T1w.nii.gz"


def _participant(cli, demo_data, tmp_path, *spaces):
    return cli([demo_data.bids_dir, tmp_path / "out", "participant", "--atlas-dir",
                demo_data.atlas_dir, "--participant-label", "01", "--skip-bids-validation",
                "--output-spaces", *spaces])


@pytest.mark.parametrize("space, says", [
    ("MNI152NLin6Asym", "template MNI152NLin6Asym is not in TEMPLATEFLOW_HOME ({home}/tpl-MNI152NLin6Asym not found)"),
    (f"{TEMPLATE}:res-3", "{home}/tpl-" + TEMPLATE + " has no res-3 T1w"),
])
def test_missing_template_or_resolution(cli, demo_data, tmp_path, monkeypatch, tf_home, space, says):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tf_home))
    code, _, err = _participant(cli, demo_data, tmp_path, space)
    assert code == MissingInputError.exit_code == 66
    line = the_error_line(err)
    assert says.format(home=tf_home) in line
    assert "TEMPLATEFLOW_HOME must hold it" in line and "never downloads" in line
    if ":res-3" in space:
        assert "available: res-1, res-2" in line
    assert not (tmp_path / "out").exists()  # refused before any work


def test_empty_home(cli, demo_data, tmp_path, monkeypatch):
    empty = tmp_path / "empty-home"
    empty.mkdir()
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(empty))
    code, _, err = _participant(cli, demo_data, tmp_path, TEMPLATE)
    assert code == 66
    line = the_error_line(err)
    assert f"TEMPLATEFLOW_HOME {empty} is missing or empty" in line and "never downloads" in line
    assert list(empty.iterdir()) == []  # templateflow did not unpack its skeleton there


@pytest.mark.parametrize("content, says", [
    (b"", "is an empty file (0 bytes)"),
    (b"not an image at all, a broken copy" * 20, "cannot be read as a NIfTI image"),
])
def test_unusable_template_file(cli, demo_data, tmp_path, monkeypatch, own_home, content, says):
    bad = own_home / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-2_T1w.nii.gz"
    bad.write_bytes(content)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(own_home))
    code, _, err = _participant(cli, demo_data, tmp_path, f"{TEMPLATE}:res-2")
    assert code == BadDataError.exit_code == 65
    line = the_error_line(err)
    assert f"template file {bad} is unusable" in line and says in line
    assert bad.read_bytes() == content  # left as it was: nothing fetched into it


def test_stock_templateflow_get_would_download(own_home, no_network):
    """Why dlf-bids never calls templateflow's get(): on a zero-byte placeholder it goes to the
    network (here the guard stops it). This also shows that the guard works."""
    from templateflow.client import TemplateFlowClient

    (own_home / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-2_T1w.nii.gz").write_bytes(b"")
    client = TemplateFlowClient(root=own_home, use_datalad=False, autoupdate=False)
    with pytest.raises(Exception):
        client.get(TEMPLATE, resolution=2, suffix="T1w", desc=None, extension=".nii.gz")
    assert no_network.attempts  # it tried
    no_network.attempts.clear()


# --- registration and warping (the pure functions) --------------------------------------------

def test_register_to_template_and_back(demo_data, tf_home, tmp_path):
    """sub-02 (stored LIA) to the 2 mm template: its true labels land on the template's own
    anatomy, and the inverse brings the template's labels back onto the subject."""
    from dlf_bids.registration import register_to_template, warp_labels

    (space,) = resolve_output_spaces([OutputSpace(TEMPLATE, 2)], tf_home)
    t1w = demo_data.bids_dir / "sub-02/anat/sub-02_T1w.nii.gz"
    truth = demo_data.truth_dir / "sub-02_dseg.nii.gz"
    xfms = register_to_template(t1w, space.t1w, tmp_path / "reg", preset="fast", seed=0,
                                n_threads=1, template_mask=space.mask)
    for xfm in (xfms.forward, xfms.inverse):
        assert xfm.suffix == ".h5" and xfm.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"

    template = nb.load(space.t1w)
    out = nb.load(warp_labels(truth, space.t1w, xfms.forward, tmp_path / "in_template.nii.gz"))
    assert out.shape == template.shape and np.array_equal(out.affine, template.affine)
    labels = np.asanyarray(out.dataobj)
    assert out.get_data_dtype() == nb.load(truth).get_data_dtype()
    assert set(np.unique(labels)) <= set(np.unique(np.asanyarray(nb.load(truth).dataobj)))
    # 0.69 here; the headers alone (no registration) give 0.49, a left/right mix-up 0.02
    assert mean_dice(labels, _reference_labels_on(template), DEMO_LABELS) > 0.6

    reference = tmp_path / "template_labels.nii.gz"
    nb.save(nb.Nifti1Image(_reference_labels_on(template).astype(np.int16), template.affine),
            reference)
    back = nb.load(warp_labels(reference, t1w, xfms.inverse, tmp_path / "back.nii.gz"))
    assert np.allclose(back.affine, nb.load(t1w).affine)
    assert mean_dice(np.asanyarray(back.dataobj), np.asanyarray(nb.load(truth).dataobj),
                     DEMO_LABELS) > 0.6


# --- the graph ---------------------------------------------------------------------------------

def test_graph_registers_once_per_template(demo_data, tf_home, tmp_path):
    from dlf_bids.cli.participant import expected_outputs
    from dlf_bids.config import Config
    from dlf_bids.utils.atlas_library import load_atlas_library
    from dlf_bids.utils.bids import collect_anatomicals, load_layout
    from dlf_bids.workflows.base import init_dlf_bids_wf

    spaces = resolve_output_spaces([OutputSpace(TEMPLATE, 2), OutputSpace(TEMPLATE, 1)], tf_home)
    config = Config(bids_dir=demo_data.bids_dir, output_dir=tmp_path / "out",
                    analysis_level="participant", work_dir=tmp_path / "work",
                    atlas_dir=demo_data.atlas_dir, fusion=("jlf", "mv"), nprocs=2,
                    output_spaces=spaces, templateflow_home=tf_home)
    anat = collect_anatomicals(load_layout(demo_data.bids_dir), ["01"]).anatomicals[0]
    workflow = init_dlf_bids_wf(config, [anat], load_atlas_library(demo_data.atlas_dir))
    sub = workflow.get_node("sub_01_wf").get_node("output_spaces_wf")
    names = sorted(sub.list_node_names())
    assert [n for n in names if n.startswith("register_")] == [f"register_{TEMPLATE}"]
    register = sub.get_node(f"register_{TEMPLATE}")
    assert register.inputs.template_t1w == str(spaces[1].t1w)  # 1 mm: the finer grid
    assert register.inputs.template_mask == str(spaces[1].mask)
    assert (register.inputs.preset, register.inputs.seed) == ("quick", 0)
    assert sorted(n for n in names if n.startswith("warp_")) == [
        f"warp_{m}_{TEMPLATE}_res{r}" for m in ("jlf", "mv") for r in (1, 2)]
    sink = sub.get_node(f"ds_seg_mv_{TEMPLATE}_res2")
    assert (sink.inputs.space, sink.inputs.resolution, sink.inputs.segmentation) == (TEMPLATE, "2", "mv")
    assert sub.get_node(f"warp_mv_{TEMPLATE}_res2").inputs.reference == str(spaces[0].t1w)
    outputs = expected_outputs(config, anat)
    assert outputs[f"mv in {TEMPLATE}:res-2"].name == f"sub-01_space-{TEMPLATE}_seg-mv_res-2_dseg.nii.gz"
    assert outputs[f"T1w-to-{TEMPLATE} xfm"].name == f"sub-01_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5"
    assert outputs[f"{TEMPLATE}-to-T1w xfm"].name == f"sub-01_from-{TEMPLATE}_to-T1w_mode-image_xfm.h5"
    assert len(outputs) == 2 + 4 + 2  # native jlf, mv; 2 methods x 2 grids; 2 transforms


def test_config_needs_resolved_spaces(tmp_path, tf_home):
    from dlf_bids.config import Config

    common = dict(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
                  work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="resolved"):
        Config(**common, output_spaces=(OutputSpace(TEMPLATE, 2),), templateflow_home=tf_home)
    resolved = resolve_output_spaces([OutputSpace(TEMPLATE, 2)], tf_home)
    with pytest.raises(ValueError, match="templateflow_home"):
        Config(**common, output_spaces=resolved)
    assert Config(**common, output_spaces=resolved, templateflow_home=tf_home).output_spaces == resolved


def test_memory_plan_counts_the_template(demo_data, tf_home):
    from dlf_bids.resources import plan_memory

    atlases = sorted(demo_data.atlas_dir.glob("sub-*/anat/*_T1w.nii.gz"))
    t1w = demo_data.bids_dir / "sub-01/anat/sub-01_T1w.nii.gz"
    template = tf_home / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-1_T1w.nii.gz"
    without = plan_memory(t1w, atlases, ["mv"], 6)
    plan = plan_memory(t1w, atlases, ["mv"], 6, [template])
    assert without.template_registration == 0.0 and without.largest[0] != "template registration"
    # a 1 mm template has far more voxels than the 3 mm demo images: the largest node
    assert plan.largest == ("template registration", plan.template_registration)
    assert plan.template_registration > plan.registration


# --- one participant, end to end ----------------------------------------------------------------

@pytest.fixture(scope="module")
def space_run(demo_data, tf_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("spaces")
    out = root / "out"
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the autouse guard is not on yet
        guard = install_network_guard(patch)
        patch.setenv("TEMPLATEFLOW_HOME", str(tf_home))
        code = dlf_bids_main([str(demo_data.bids_dir), str(out), "participant", "--atlas-dir",
                              str(demo_data.atlas_dir), "--participant-label", "01", "--fusion",
                              "mv", "--registration-preset", "fast", "--nprocs", "2",
                              "--skip-bids-validation", "-w", str(root / "work"),
                              "--output-spaces", f"{TEMPLATE}:res-2"])
    return {"code": code, "out": out, "anat": out / "sub-01" / "anat", "network": guard.attempts,
            "template": tf_home / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-2_T1w.nii.gz"}


def test_run_writes_segmentation_in_template_space(space_run, demo_data):
    assert space_run["code"] == 0
    assert space_run["network"] == []
    anat = space_run["anat"]
    assert sorted(p.name for p in anat.iterdir()) == [
        f"sub-01_from-{TEMPLATE}_to-T1w_mode-image_xfm.h5",
        f"sub-01_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5",
        "sub-01_seg-mv_dseg.json", "sub-01_seg-mv_dseg.nii.gz",
        "sub-01_seg-mv_volumes.json", "sub-01_seg-mv_volumes.tsv",  # native geometry only
        f"sub-01_space-{TEMPLATE}_seg-mv_res-2_dseg.json",
        f"sub-01_space-{TEMPLATE}_seg-mv_res-2_dseg.nii.gz",
    ]
    template = nb.load(space_run["template"])
    seg = nb.load(anat / f"sub-01_space-{TEMPLATE}_seg-mv_res-2_dseg.nii.gz")
    assert seg.shape == template.shape
    assert np.allclose(seg.affine, template.affine, atol=1e-6)
    native = np.asanyarray(nb.load(anat / "sub-01_seg-mv_dseg.nii.gz").dataobj)
    labels = np.asanyarray(seg.dataobj)
    assert set(np.unique(labels)) <= set(np.unique(native))
    # 0.64 here (majority voting itself scores 0.73 on the T1w); resampling by the headers
    # alone, without registration, gives 0.52, and a left/right flip 0.02
    assert mean_dice(labels, _reference_labels_on(template), DEMO_LABELS) > 0.58
    for xfm in anat.glob("*_xfm.h5"):
        assert xfm.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_run_sidecar_and_dataset_links(space_run, tf_home):
    anat, out = space_run["anat"], space_run["out"]
    meta = json.loads((anat / f"sub-01_space-{TEMPLATE}_seg-mv_res-2_dseg.json").read_text())
    assert meta["Sources"] == ["bids::sub-01/anat/sub-01_seg-mv_dseg.nii.gz",
                               f"bids::sub-01/anat/sub-01_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5"]
    assert meta["SpatialReference"] == f"bids:templateflow:tpl-{TEMPLATE}/tpl-{TEMPLATE}_res-2_T1w.nii.gz"
    assert meta["Resolution"] == f"TemplateFlow {TEMPLATE} resolution 2: 2x2x2 mm voxels, 99x117x95 grid"
    assert meta["RegistrationPreset"] == "fast"
    links = json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    assert links["templateflow"] == tf_home.as_uri()
    assert "*_xfm.*" in (out / ".bidsignore").read_text().splitlines()


def test_run_output_is_valid_bids(space_run):
    if not validator_available():
        pytest.skip("bids-validator-deno not installed")
    result = validate_dataset(space_run["out"])
    assert not result.errors, result.summary(20)


def test_group_level_reads_native_segmentations_only(space_run, demo_data, tmp_path):
    """A space- copy without res- matches the native name's pattern: it must not add a row."""
    out = Path(shutil.copytree(space_run["out"], tmp_path / "out"))
    anat = out / "sub-01" / "anat"
    shutil.copyfile(anat / f"sub-01_space-{TEMPLATE}_seg-mv_res-2_dseg.nii.gz",
                    anat / f"sub-01_space-{TEMPLATE}_seg-mv_dseg.nii.gz")
    # --output-spaces means nothing to the group level: not even looked up there
    assert dlf_bids_main([str(demo_data.bids_dir), str(out), "group",
                          "--output-spaces", "NotATemplate"]) == 0
    rows = (out / "group_seg-mv_volumes.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == ["sub-01"]
