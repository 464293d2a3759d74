"""The command line: documented exit codes, one-line error messages, never writing into bids_dir."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids import __version__
from dlf_bids.cli.run import main
from dlf_bids.config import Config
from dlf_bids.errors import (EXIT_BAD_DATA, EXIT_BIDS_VALIDATION, EXIT_MISSING_INPUT, EXIT_NO_FILES,
                             EXIT_UNKNOWN_LEVEL, EXIT_USAGE, BadDataError)
from conftest import listing, the_error_line  # shared with test_bad_inputs, test_security

VALIDATOR = "bids-validator-deno"


@pytest.fixture
def raw(tmp_path, make_skeleton) -> Path:
    """A valid one-subject BIDS dataset with a real (tiny) T1w."""
    return make_skeleton(tmp_path / "bids", {
        "sub-01/anat/sub-01_T1w.nii.gz": "nii",
        "README": "A tiny test dataset for dlf-bids; nothing to see here.\n",
    })


@pytest.fixture
def atlases(tmp_path, demo_data) -> Path:
    """A private copy of the demo atlas library, free to break."""
    return Path(shutil.copytree(demo_data.atlas_dir, tmp_path / "atlases"))


# --- bids_dir, output_dir, work dir -------------------------------------------------------------

def test_bids_dir_missing(cli, tmp_path):
    code, _, err = cli([tmp_path / "nope", tmp_path / "out", "participant"])
    assert code == EXIT_MISSING_INPUT == 66
    assert "does not exist" in the_error_line(err)
    assert not (tmp_path / "out").exists()


def test_bids_dir_without_description(cli, tmp_path):
    (tmp_path / "data" / "sub-01" / "anat").mkdir(parents=True)
    code, _, err = cli([tmp_path / "data", tmp_path / "out", "participant"])
    assert code == EXIT_BAD_DATA == 65
    assert "dataset_description.json" in the_error_line(err)


def test_bids_dir_is_a_file(cli, raw, tmp_path):
    code, _, err = cli([raw / "README", tmp_path / "out", "participant"])
    assert code == EXIT_BAD_DATA
    assert "not a directory" in the_error_line(err)


@pytest.mark.parametrize("folder", ["sub-01", "sub-01/ses-1"])
def test_subject_folder_as_bids_dir(cli, tmp_path, make_skeleton, folder):
    root = make_skeleton(tmp_path / "bids", ["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"])
    code, _, err = cli([root / folder, tmp_path / "out", "participant"])
    assert code == EXIT_BAD_DATA
    line = the_error_line(err)
    assert "subject/session folder" in line and "dataset root" in line


@pytest.mark.parametrize("level", ["participant", "group"])
@pytest.mark.parametrize("where", ["derivatives/dlf", ".", "sub-01"])
def test_output_dir_inside_bids_dir(cli, raw, tmp_path, demo_data, level, where):
    before = listing(raw)
    code, out, err = cli([raw, raw / where, level, "--atlas-dir", demo_data.atlas_dir,
                          "--skip-bids-validation"])
    assert code == EXIT_USAGE == 64
    line = the_error_line(err)
    assert "inside the input dataset" in line and "output_dir" in line
    assert listing(raw) == before  # nothing written into bids_dir
    assert out == ""


def test_work_dir_inside_bids_dir(cli, raw, tmp_path, demo_data):
    before = listing(raw)
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                        "-w", raw / "work"])
    assert code == EXIT_USAGE
    assert "work dir" in the_error_line(err)
    assert listing(raw) == before
    assert not (tmp_path / "out").exists()


def test_output_dir_inside_atlas_library(cli, raw, atlases):
    code, _, err = cli([raw, atlases / "out", "participant", "--atlas-dir", atlases])
    assert code == EXIT_USAGE
    assert "atlas library" in the_error_line(err)
    assert not (atlases / "out").exists()


def _dotdot(raw: Path) -> Path:
    (raw.parent / "elsewhere").mkdir(exist_ok=True)
    return raw.parent / "elsewhere" / ".." / raw.name / "derivatives"


def _symlinked(raw: Path) -> Path:
    link = raw.parent / "link-to-bids"
    link.symlink_to(raw, target_is_directory=True)
    return link / "derivatives"


@pytest.mark.parametrize("spell", [_dotdot, _symlinked], ids=["dotdot", "symlink"])
def test_output_dir_inside_bids_dir_spelled_otherwise(cli, raw, spell):
    out_dir = spell(raw)
    before = listing(raw)
    code, _, err = cli([raw, out_dir, "group"])
    assert code == EXIT_USAGE, err
    assert "inside the input dataset" in the_error_line(err)
    assert listing(raw) == before


# --- arguments ----------------------------------------------------------------------------------

def test_unknown_analysis_level(raw, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(raw), str(tmp_path / "out"), "subject"])
    assert exc.value.code == EXIT_UNKNOWN_LEVEL == 17
    err = capsys.readouterr().err
    assert "invalid choice" in err and "analysis_level" in err and "Traceback" not in err


def test_other_argparse_errors_keep_code_2(raw, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(raw), str(tmp_path / "out"), "participant", "--nprocs", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([str(raw), str(tmp_path / "out"), "participant", "--fusion", "magic"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main([str(raw), str(tmp_path / "out"), "participant", "--registration", "deepatlas",
              "--deepatlas-refine-steps", "-1"])
    assert exc.value.code == 2 and "--deepatlas-refine-steps: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(raw), str(tmp_path / "out"), "participant", "--omp-nthreads", "two"])
    assert exc.value.code == 2 and "--omp-nthreads: invalid int value: 'two'" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"dlf-bids {__version__}"


def test_participant_level_needs_atlas_dir(cli, raw, tmp_path):
    code, _, err = cli([raw, tmp_path / "out", "participant", "--skip-bids-validation"])
    assert code == EXIT_USAGE
    assert "--atlas-dir" in the_error_line(err)
    assert not (tmp_path / "out").exists()


def test_atlas_dir_missing(cli, raw, tmp_path):
    code, _, err = cli([raw, tmp_path / "out", "participant", "--skip-bids-validation",
                        "--atlas-dir", tmp_path / "no-atlases"])
    assert code == EXIT_MISSING_INPUT
    assert "atlas library" in the_error_line(err)


# --- the atlas library --------------------------------------------------------------------------

def test_atlas_library_with_one_atlas(cli, raw, tmp_path, atlases):
    for extra in sorted(atlases.glob("sub-*"))[1:]:
        shutil.rmtree(extra)
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", atlases,
                        "--skip-bids-validation"])
    assert code == EXIT_BAD_DATA
    assert "1 atlas(es); at least 2" in the_error_line(err)
    assert not (tmp_path / "out").exists()


def test_atlas_labels_not_on_t1w_grid(cli, raw, tmp_path, atlases):
    dseg_path = atlases / "sub-a02" / "anat" / "sub-a02_dseg.nii.gz"
    dseg = nb.load(dseg_path)
    shifted = dseg.affine.copy()
    shifted[:3, 3] += 5.0
    nb.save(nb.Nifti1Image(np.asanyarray(dseg.dataobj), shifted, dseg.header), dseg_path)
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", atlases,
                        "--skip-bids-validation"])
    assert code == EXIT_BAD_DATA
    line = the_error_line(err)
    assert "sub-a02" in line and "not on the T1w grid" in line


def test_atlas_label_not_in_lut(cli, raw, tmp_path, atlases):
    lut = atlases / "dseg.tsv"
    lines = lut.read_text().splitlines()
    lut.write_text("\n".join(line for line in lines if not line.startswith("6\t")) + "\n")
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", atlases,
                        "--skip-bids-validation"])
    assert code == EXIT_BAD_DATA
    line = the_error_line(err)
    assert "labels [6]" in line and "dseg.tsv" in line


# --- selecting inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["02", "sub-02"])
def test_participant_label_not_found(cli, raw, tmp_path, demo_data, label):
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                        "--skip-bids-validation", "--participant-label", label])
    assert code == EXIT_MISSING_INPUT
    line = the_error_line(err)
    assert "sub-02" in line and "not found" in line and "sub-sub-" not in line
    assert not (tmp_path / "out").exists()


def test_filter_file_selecting_nothing(cli, raw, tmp_path, demo_data):
    filt = tmp_path / "filters.json"
    filt.write_text(json.dumps({"t1w": {"acquisition": "mprage"}}))
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                        "--skip-bids-validation", "--bids-filter-file", filt])
    assert code == EXIT_NO_FILES == 18
    assert "selected no T1w" in the_error_line(err)


def test_session_label_selecting_nothing(cli, raw, tmp_path, demo_data):
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                        "--skip-bids-validation", "--session-label", "ses-9"])
    assert code == EXIT_NO_FILES
    the_error_line(err)


@pytest.mark.parametrize("text", ['{"t1w": {"acquisition": ', '{"t1w": "mprage"}', '{"dwi": {}}'])
def test_bad_filter_file(cli, raw, tmp_path, demo_data, text):
    filt = tmp_path / "filters.json"
    filt.write_text(text)
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                        "--skip-bids-validation", "--bids-filter-file", filt])
    assert code == EXIT_USAGE
    assert "filter file" in the_error_line(err)


def test_filter_file_missing(cli, raw, tmp_path, demo_data):
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                        "--bids-filter-file", tmp_path / "nope.json"])
    assert code == EXIT_MISSING_INPUT
    assert "filter file" in the_error_line(err)


def _mixed_dataset(make_skeleton, root, nifti):
    """sub-01: only a func file; sub-02: a good T1w; sub-03: an empty (unreadable) T1w;
    sub-04: an all-zero T1w; sub-05: a 4D 'T1w'."""
    return make_skeleton(root, {
        "sub-01/func/sub-01_task-rest_bold.nii.gz": "nii",
        "sub-02/anat/sub-02_T1w.nii.gz": "nii",
        "sub-03/anat/sub-03_T1w.nii.gz": None,
        "sub-04/anat/sub-04_T1w.nii.gz": nb.Nifti1Image(np.zeros((6, 6, 6), np.int16), np.eye(4)),
        "sub-05/anat/sub-05_T1w.nii.gz": nb.Nifti1Image(np.ones((6, 6, 6, 3), np.int16), np.eye(4)),
    })


def test_select_inputs_reports_skipped_subjects(tmp_path, make_skeleton, nifti, capsys):
    from dlf_bids.cli.participant import select_inputs

    root = _mixed_dataset(make_skeleton, tmp_path / "bids", nifti)
    config = Config(bids_dir=root, output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work")
    usable, skipped = select_inputs(config)
    assert [a.subject for a in usable] == ["02"]
    assert sorted(s for s, _ in skipped) == ["01", "03", "04", "05"]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("dlf-bids: skipping sub-0") for line in lines)
    by_subject = {line.split()[2].rstrip(":"): line for line in lines}
    assert "no T1w image in anat/" in by_subject["sub-01"]
    assert "empty file" in by_subject["sub-03"]
    assert "is constant (every voxel is 0)" in by_subject["sub-04"]
    assert "not a 3D image" in by_subject["sub-05"]
    assert (tmp_path / "work" / "bids_db").is_dir()  # the index lives in the work dir


def test_select_inputs_nothing_usable(tmp_path, make_skeleton, capsys):
    from dlf_bids.cli.participant import select_inputs

    root = make_skeleton(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    config = Config(bids_dir=root, output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work")
    with pytest.raises(BadDataError, match="no usable T1w"):
        select_inputs(config)
    assert capsys.readouterr().err.startswith("dlf-bids: skipping sub-01: ")


def test_participant_level_reports_skipped_subjects(cli, tmp_path, make_skeleton, nifti,
                                                    demo_data, monkeypatch):
    """Through main(): skip lines on stderr, others go on. The real graph is built but its run()
    does nothing (registration would take minutes), so sub-02 ends without outputs."""
    import dlf_bids.cli.participant as participant
    import dlf_bids.workflows.base as base

    built = []
    real_init = base.init_dlf_bids_wf

    def fake_init(config, anatomicals, library):
        workflow = real_init(config, anatomicals, library)
        built.append([a.subject for a in anatomicals])
        workflow.run = lambda *args, **kwargs: None
        return workflow

    monkeypatch.setattr(base, "init_dlf_bids_wf", fake_init)

    def fake_nipype_config(config):  # keep nipype's global config untouched by this test
        log_dir = config.output_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        return log_dir

    monkeypatch.setattr(participant, "_configure_nipype", fake_nipype_config)
    root = _mixed_dataset(make_skeleton, tmp_path / "bids", nifti)
    before = listing(root)
    code, out, err = cli([root, tmp_path / "out", "participant", "--atlas-dir", demo_data.atlas_dir,
                          "--stop-on-first-crash", "--skip-bids-validation", "--fusion", "mv"])
    assert built == [["02"]]
    assert code == 1  # sub-02 produced no output: a processing failure, not a usage error
    skip_lines = [line for line in err.splitlines() if line.startswith("dlf-bids: skipping")]
    assert len(skip_lines) == 4
    assert "Traceback" not in err
    assert any("FAILED" in line and "sub-02" in line for line in out.splitlines()), out
    assert any("skipped sub-01" in line for line in out.splitlines()), out
    assert (tmp_path / "out" / "dataset_description.json").is_file()
    assert (tmp_path / "out" / "seg-mv_dseg.tsv").is_file()
    assert listing(root) == before


# --- group level --------------------------------------------------------------------------------

def test_group_level_without_participant_outputs(cli, raw, tmp_path):
    code, _, err = cli([raw, tmp_path / "out", "group"])
    assert code == EXIT_MISSING_INPUT
    assert "run the participant level first" in the_error_line(err)
    (tmp_path / "out").mkdir()
    code, _, err = cli([raw, tmp_path / "out", "group"])
    assert code == EXIT_MISSING_INPUT
    assert "run the participant level first" in the_error_line(err)


# --- BIDS validation ----------------------------------------------------------------------------

@pytest.fixture
def validator(monkeypatch):
    if shutil.which(VALIDATOR) is None:
        venv_bin = Path(sys.executable).parent
        if not (venv_bin / VALIDATOR).is_file():
            pytest.skip(f"{VALIDATOR} not installed")
        monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def invalid(tmp_path, make_skeleton, nifti) -> Path:
    return make_skeleton(tmp_path / "bids", {
        "sub-01/anat/sub-01_T1w.nii.gz": "nii",
        "sub-01/anat/sub-01_foo.nii.gz": "nii",
        "README": "A tiny test dataset for dlf-bids; nothing to see here.\n",
    })


def test_invalid_dataset_fails_validation(validator, cli, invalid, tmp_path):
    before = listing(invalid)
    code, _, err = cli([invalid, tmp_path / "out", "participant", "--atlas-dir", tmp_path / "none"])
    assert code == EXIT_BIDS_VALIDATION == 16
    line = the_error_line(err)
    assert "fails BIDS validation" in line and "sub-01_foo.nii.gz" in line
    assert "--skip-bids-validation" in line
    assert listing(invalid) == before


def test_skip_bids_validation_goes_on(validator, cli, invalid, tmp_path):
    # past validation, the next check is the atlas library: a missing one is exit 66
    code, _, err = cli([invalid, tmp_path / "out", "participant", "--atlas-dir", tmp_path / "none",
                        "--skip-bids-validation"])
    assert code == EXIT_MISSING_INPUT
    assert "atlas library" in the_error_line(err)


def test_valid_dataset_passes_validation(validator, cli, raw, tmp_path):
    code, _, err = cli([raw, tmp_path / "out", "participant", "--atlas-dir", tmp_path / "none"])
    assert code == EXIT_MISSING_INPUT, err
    assert "atlas library" in the_error_line(err)


def test_group_level_skips_a_method_without_segmentations(tmp_path, capsys):
    """A method whose participants all failed gets a warning; the others still get tables."""
    from dlf_bids.utils.labels import Label, LabelTable, write_label_table

    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    out = tmp_path / "out"
    lut = LabelTable((Label(1, "A"), Label(2, "B")))
    write_label_table(lut, out / "seg-mv_dseg.tsv")
    write_label_table(lut, out / "seg-jlf_dseg.tsv")
    seg = np.zeros((4, 4, 4), np.int16)
    seg[:2] = 1
    anat = out / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nb.save(nb.Nifti1Image(seg, np.diag([2.0, 2.0, 2.0, 1.0])), anat / "sub-01_seg-mv_dseg.nii.gz")
    assert main([str(bids), str(out), "group"]) == 0
    assert (out / "group_seg-mv_volumes.tsv").is_file()
    assert not (out / "group_seg-jlf_volumes.tsv").exists()
    assert "no group table for jlf" in capsys.readouterr().err
    rows = (out / "group_seg-mv_volumes.tsv").read_text().splitlines()
    assert rows[1].split("\t")[:1] == ["sub-01"] and "256.0" in rows[1].split("\t")
