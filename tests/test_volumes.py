"""Per-image label volumes: exact mm³ from hand-made label maps, the totals, the node and sink."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.utils.labels import Label, LabelTable, write_label_table
from dlf_bids.volumes import (TOTAL_BRAIN, TOTAL_INTRACRANIAL, is_csf_label,
                              is_extracranial_label, label_groups, measure_volumes,
                              volumes_dictionary, volumes_tsv)

# 1.5 x 2 x 4 mm: 12 mm³ voxels, exact in binary
AFFINE = np.diag([1.5, 2.0, 4.0, 1.0])
ASEG_LIKE = LabelTable((Label(17, "Left-Hippocampus"), Label(4, "Left-Lateral-Ventricle"),
                        Label(24, "CSF"), Label(53, "Right-Hippocampus"), Label(200, "Skull")))


@pytest.fixture
def known_map(tmp_path) -> Path:
    data = np.zeros((10, 10, 10), np.int16)
    data[:3] = 17          # 300 voxels
    data[3, :5] = 4        # 50
    data[4, 0, :7] = 24    # 7
    data[9] = 200          # 100 (skull: outside the intracranial totals)
    data[8, 8, 8] = 99     # 1 voxel of a label the table does not list: in no row
    path = tmp_path / "sub-01_seg-jlf_dseg.nii.gz"
    nb.save(nb.Nifti1Image(data, AFFINE), path)
    return path


def test_volumes_table_of_a_known_map(known_map):
    assert volumes_tsv(measure_volumes(known_map, ASEG_LIKE)).splitlines() == [
        "index\tname\tvolume_mm3\tvoxels",
        "17\tLeft-Hippocampus\t3600.000\t300",
        "4\tLeft-Lateral-Ventricle\t600.000\t50",
        "24\tCSF\t84.000\t7",
        "53\tRight-Hippocampus\t0.000\t0",
        "200\tSkull\t1200.000\t100",
        f"n/a\t{TOTAL_BRAIN}\t3600.000\t300",             # hippocampi only
        f"n/a\t{TOTAL_INTRACRANIAL}\t4284.000\t357",      # + ventricle + CSF, not the skull
    ]


def test_odd_voxel_sizes_stay_exact_to_the_voxel(tmp_path):
    data = np.zeros((5, 5, 5), np.uint8)
    data[0, 0, 0] = 1
    path = tmp_path / "seg.nii.gz"
    nb.save(nb.Nifti1Image(data, np.diag([1.2, 1.2, 1.2, 1.0])), path)
    (row, total) = measure_volumes(path, LabelTable((Label(1, "Left-Putamen"),)))
    assert volumes_tsv([row]).splitlines()[1] == "1\tLeft-Putamen\t1.728\t1"
    assert (total.name, total.voxels) == (TOTAL_BRAIN, 1)


@pytest.mark.parametrize("name, csf, outside", [
    ("Left-Lateral-Ventricle", True, False), ("Left-Inf-Lat-Vent", True, False),
    ("3rd-Ventricle", True, False), ("4thVentricle", True, False), ("CSF", True, False),
    ("Left-CSF", True, False), ("Right-choroid-plexus", True, False),
    ("Left-VentralDC", False, False), ("Left-Cerebral-Cortex", False, False),
    ("Optic-Chiasm", False, False), ("Hair", False, False),
    ("Skull", False, True), ("Scalp", False, True), ("Non-Brain", False, True),
    ("Left-Eye", False, True),
])
def test_label_names_are_classified_word_by_word(name, csf, outside):
    assert (is_csf_label(name), is_extracranial_label(name)) == (csf, outside)


def test_no_csf_label_means_no_intracranial_total(tmp_path):
    """Without CSF or ventricles the 'intracranial' sum would repeat the brain: not written."""
    labels = LabelTable((Label(1, "Left-Grey-Matter"), Label(2, "Left-White-Matter")))
    assert label_groups(labels) == {TOTAL_BRAIN: (1, 2)}
    description = volumes_dictionary(labels, "mv")["name"]["Description"]
    assert f"No '{TOTAL_INTRACRANIAL}' row" in description


def test_dictionary_says_what_the_totals_sum(known_map):
    dictionary = volumes_dictionary(ASEG_LIKE, "jlf")
    assert list(dictionary) == ["index", "name", "volume_mm3", "voxels"]
    assert dictionary["volume_mm3"]["Units"] == "mm^3"
    text = dictionary["name"]["Description"]
    assert "Left-Lateral-Ventricle, CSF" in text and "(Skull)" in text
    assert "true total intracranial volume (TIV) only if" in text and "underestimate" in text
    assert "seg-jlf_dseg.tsv" in dictionary["index"]["Description"]


def test_label_volumes_node_and_sink(tmp_path, known_map):
    """The Nipype node writes the table; our sink names it like the dseg, sidecar beside it."""
    from dlf_bids.interfaces.bids import DerivativesDataSink
    from dlf_bids.interfaces.volumes import LabelVolumes

    lut = write_label_table(ASEG_LIKE, tmp_path / "dseg.tsv")
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    result = LabelVolumes(in_file=str(known_map), label_table=str(lut), method="jlf").run(
        cwd=str(node_dir))
    table = Path(result.outputs.out_file)
    assert table.read_text() == volumes_tsv(measure_volumes(known_map, ASEG_LIKE))

    source = tmp_path / "bids" / "sub-01" / "ses-pre" / "anat" / "sub-01_ses-pre_run-2_T1w.nii.gz"
    out = tmp_path / "out"
    sink = DerivativesDataSink(base_directory=str(out), source_file=str(source),
                               in_file=str(table), segmentation="jlf", suffix="volumes",
                               meta_dict=result.outputs.data_dictionary).run()
    expected = out / "sub-01/ses-pre/anat/sub-01_ses-pre_run-2_seg-jlf_volumes.tsv"
    assert Path(sink.outputs.out_file) == expected
    assert expected.read_text() == table.read_text()
    assert json.loads(expected.with_suffix(".json").read_text()) == result.outputs.data_dictionary


def test_every_method_gets_a_volumes_node_and_sink(demo_data, tmp_path):
    from dlf_bids.config import Config
    from dlf_bids.utils.atlas_library import load_atlas_library
    from dlf_bids.utils.bids import collect_anatomicals, load_layout
    from dlf_bids.workflows.base import init_single_image_wf

    library = load_atlas_library(demo_data.atlas_dir)
    anat = collect_anatomicals(load_layout(demo_data.bids_dir)).anatomicals[0]
    config = Config(bids_dir=demo_data.bids_dir, output_dir=tmp_path / "out",
                    analysis_level="participant", work_dir=tmp_path / "work",
                    atlas_dir=library.root, fusion=("jlf", "mv"))
    workflow = init_single_image_wf(config, anat, library)
    edges = {(u.name, v.name): d["connect"] for u, v, d in workflow._graph.edges(data=True)}
    for method in config.fusion:
        assert edges[("multiatlas_wf", f"volumes_{method}")] == [
            (f"outputnode.seg_{method}", "in_file")]
        assert edges[(f"volumes_{method}", f"ds_volumes_{method}")] == [
            ("out_file", "in_file"), ("data_dictionary", "meta_dict")]
        node = workflow.get_node(f"volumes_{method}")
        assert (node.inputs.method, node.inputs.label_table) == (
            method, str(library.root / "dseg.tsv"))
        sink = workflow.get_node(f"ds_volumes_{method}")
        assert (sink.inputs.segmentation, sink.inputs.suffix) == (method, "volumes")
        assert Path(sink.inputs.base_directory) == config.output_dir
