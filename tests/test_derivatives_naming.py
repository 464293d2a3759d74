"""Output names are part of the interface: a wrong name is a failing test."""

from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.interfaces.bids import STAGING_DIRNAME, DerivativesDataSink


@pytest.fixture
def source_and_input(tmp_path):
    src = tmp_path / "bids" / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_acq-mprage_run-2_T1w.nii.gz"
    src.parent.mkdir(parents=True)
    img = nb.Nifti1Image(np.zeros((4, 4, 4), dtype=np.int16), np.eye(4))
    nb.save(img, src)
    seg = tmp_path / "seg.nii.gz"
    nb.save(img, seg)
    return src, seg


@pytest.mark.parametrize(
    "entities, expected",
    [
        ({"segmentation": "jlf", "suffix": "dseg"},
         "sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_seg-jlf_dseg.nii.gz"),
        ({"segmentation": "mv", "suffix": "dseg"},
         "sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_seg-mv_dseg.nii.gz"),
        ({"suffix": "dseg"}, "sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_dseg.nii.gz"),
        ({"label": "GM", "suffix": "probseg"},
         "sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_label-GM_probseg.nii.gz"),
        ({"space": "MNI152NLin2009cAsym", "segmentation": "dlf", "suffix": "dseg"},
         "sub-01/ses-pre/anat/sub-01_ses-pre_acq-mprage_run-2_space-MNI152NLin2009cAsym_seg-dlf_dseg.nii.gz"),
    ],
)
def test_sink_names(tmp_path, source_and_input, entities, expected):
    src, seg = source_and_input
    out = tmp_path / "out"
    sink = DerivativesDataSink(base_directory=str(out), source_file=str(src), in_file=str(seg),
                               **entities)
    res = sink.run()
    assert Path(res.outputs.out_file) == out / expected
    assert (out / expected).is_file()
    assert not list((out / STAGING_DIRNAME).glob("*")), "staging folder left behind"


def test_sink_writes_sidecar_next_to_image(tmp_path, source_and_input):
    src, seg = source_and_input
    out = tmp_path / "out"
    sink = DerivativesDataSink(base_directory=str(out), source_file=str(src), in_file=str(seg),
                               segmentation="jlf", suffix="dseg",
                               meta_dict={"Sources": ["bids:raw:sub-01/anat/x_T1w.nii.gz"]})
    res = sink.run()
    meta = Path(res.outputs.out_meta)
    assert meta.name == "sub-01_ses-pre_acq-mprage_run-2_seg-jlf_dseg.json"
    assert meta.parent == Path(res.outputs.out_file).parent
    assert "bids:raw:" in meta.read_text()
