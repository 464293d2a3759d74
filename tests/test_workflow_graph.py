"""The Nipype graph, built but not run: names, connections, registration and sink settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlf_bids.config import Config
from dlf_bids.utils.atlas_library import load_atlas_library
from dlf_bids.utils.bids import AnatomicalInput, collect_anatomicals, load_layout


@pytest.fixture(scope="module")
def library(demo_data):
    return load_atlas_library(demo_data.atlas_dir)


@pytest.fixture(scope="module")
def wf_builder():
    from dlf_bids.workflows.base import init_dlf_bids_wf  # niworkflows: slow first import

    return init_dlf_bids_wf


def make_config(root: Path, tmp_path: Path, library, **kwargs) -> Config:
    return Config(bids_dir=root, output_dir=tmp_path / "out", analysis_level="participant",
                  work_dir=tmp_path / "work", atlas_dir=library.root, **kwargs)


def inputs_of(root: Path) -> list[AnatomicalInput]:
    return collect_anatomicals(load_layout(root)).anatomicals


def real_images(paths) -> dict:
    """A skeleton spec of real tiny images: the graph reads their headers to size each node."""
    return dict.fromkeys(paths, "nii")


def subworkflows(workflow) -> list[str]:
    return sorted({name.split(".")[0] for name in workflow.list_node_names()})


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_single_image_wf(sub, config, anat, library):
    """What every per-image sub-workflow must hold."""
    names = sub.list_node_names()
    edges = [(u.name, v.name, d["connect"]) for u, v, d in sub._graph.edges(data=True)]
    multiatlas = sub.get_node("multiatlas_wf")
    register = multiatlas.get_node("register_atlases")
    # registration: one MapNode over every atlas of the library, threads from the config
    assert type(register).__name__ == "MapNode"
    assert sorted(register.iterfield) == ["atlas_dseg", "atlas_t1w"]
    assert register.inputs.atlas_t1w == [str(a.t1w) for a in library.atlases]
    assert register.inputs.atlas_dseg == [str(a.dseg) for a in library.atlases]
    assert register.n_procs == config.registration_threads
    assert register.inputs.num_threads == config.registration_threads
    assert register.inputs.preset == config.registration_preset
    assert sub.get_node("inputnode").inputs.t1w == str(anat.t1w)
    # one fusion node and one sink per method, nothing for methods not asked for
    for method in ("jlf", "mv"):
        assert (f"ds_seg_{method}" in names) == (method in config.fusion)
        assert (f"multiatlas_wf.fuse_{method}" in names) == (method in config.fusion)
    for method in config.fusion:
        sink = sub.get_node(f"ds_seg_{method}")
        assert as_list(sink.inputs.source_file) == [str(anat.t1w)]
        assert sink.inputs.segmentation == method
        assert sink.inputs.suffix == "dseg"
        assert Path(sink.inputs.base_directory) == config.output_dir
        meta = sink.inputs.meta_dict
        rel = anat.t1w.relative_to(config.bids_dir).as_posix()
        assert meta["Sources"][0] == f"bids:raw:{rel}"
        assert len(meta["Sources"]) == 1 + len(library.atlases)
        assert meta["Atlases"] == [f"sub-{a.atlas_id}" for a in library.atlases]
        # the sink is fed by this method's fused output
        assert ("multiatlas_wf", f"ds_seg_{method}",
                [(f"outputnode.seg_{method}", "in_file")]) in edges
        fuse = multiatlas.get_node(f"fuse_{method}")
        fed = {c for u, v, d in multiatlas._graph.edges(data=True) if v is fuse for c in d["connect"]}
        assert ("warped_dseg", "atlas_dseg") in fed and ("t1w", "target_t1w") in fed
        assert (("warped_t1w", "atlas_t1w") in fed) == (method == "jlf")
    # the report's registration check: drawn from the first registered atlas, copied into
    # sub-<label>/figures/ by a node that always runs
    check = sub.get_node("registration_check")
    assert check.inputs.atlas_t1w == str(library.atlases[0].t1w)
    assert check.inputs.atlas_name == f"sub-{library.atlases[0].atlas_id}"
    assert ("multiatlas_wf", "registration_check",
            [("outputnode.warped_t1w", "warped_atlas_t1w")]) in edges
    publish = sub.get_node("ds_registration_check")
    assert publish.inputs.out_path == str(config.output_dir / f"sub-{anat.subject}" / "figures"
                                          / f"{anat.prefix}_desc-atlasreg_T1w.svg")
    assert publish.interface.always_run
    if "jlf" in config.fusion:
        fuse = multiatlas.get_node("fuse_jlf")
        assert fuse.n_procs == config.threads_per_process
        assert fuse.inputs.num_threads == config.threads_per_process


# --- graphs from real queries -------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [("mv",), ("jlf",), ("jlf", "mv")])
def test_one_subject_no_session(tmp_path, make_skeleton, library, wf_builder, fusion):
    root = make_skeleton(tmp_path / "bids", real_images(["sub-01/anat/sub-01_T1w.nii.gz"]))
    config = make_config(root, tmp_path, library, fusion=fusion, nprocs=4)
    (anat,) = inputs_of(root)
    workflow = wf_builder(config, [anat], library)
    assert workflow.name == "dlf_bids_wf"
    assert Path(workflow.base_dir) == config.work_dir
    assert subworkflows(workflow) == ["sub_01_wf"]
    check_single_image_wf(workflow.get_node("sub_01_wf"), config, anat, library)


def test_two_sessions(tmp_path, make_skeleton, library, wf_builder):
    root = make_skeleton(tmp_path / "bids", real_images(["sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                                                         "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"]))
    config = make_config(root, tmp_path, library, fusion=("jlf", "mv"), nprocs=2)
    anats = inputs_of(root)
    workflow = wf_builder(config, anats, library)
    assert subworkflows(workflow) == ["sub_01_ses_1_wf", "sub_01_ses_2_wf"]
    for anat in anats:
        check_single_image_wf(workflow.get_node(f"{anat.name}_wf"), config, anat, library)


def test_two_runs_and_two_subjects(tmp_path, make_skeleton, library, wf_builder):
    root = make_skeleton(tmp_path / "bids", real_images(["sub-01/anat/sub-01_run-1_T1w.nii.gz",
                                                         "sub-01/anat/sub-01_run-2_T1w.nii.gz",
                                                         "sub-02/anat/sub-02_acq-fast_T1w.nii.gz"]))
    config = make_config(root, tmp_path, library, fusion=("mv",), nprocs=1)
    anats = inputs_of(root)
    workflow = wf_builder(config, anats, library)
    assert subworkflows(workflow) == ["sub_01_run_1_wf", "sub_01_run_2_wf", "sub_02_acq_fast_wf"]
    for anat in anats:
        check_single_image_wf(workflow.get_node(f"{anat.name}_wf"), config, anat, library)


def test_demo_dataset_graph(tmp_path, demo_data, library, wf_builder):
    config = Config(bids_dir=demo_data.bids_dir, output_dir=tmp_path / "out",
                    analysis_level="participant", work_dir=tmp_path / "work",
                    atlas_dir=demo_data.atlas_dir, fusion=("jlf", "mv"), nprocs=16,
                    registration_preset="accurate", omp_nthreads=2)
    anats = inputs_of(demo_data.bids_dir)
    workflow = wf_builder(config, anats, library)
    assert subworkflows(workflow) == ["sub_01_wf", "sub_02_wf"]
    assert config.threads_per_process == 2
    for anat in anats:
        check_single_image_wf(workflow.get_node(f"{anat.name}_wf"), config, anat, library)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # built, not run


@pytest.mark.parametrize("nprocs, omp, expected", [
    (1, None, 1), (2, None, 1), (4, None, 3), (16, None, 8), (64, None, 8),
    (4, 2, 2), (4, 10, 4), (1, 3, 1),
])
def test_threads_per_process(tmp_path, make_skeleton, library, wf_builder, nprocs, omp, expected):
    root = make_skeleton(tmp_path / "bids", real_images(["sub-01/anat/sub-01_T1w.nii.gz"]))
    config = make_config(root, tmp_path, library, fusion=("jlf",), nprocs=nprocs, omp_nthreads=omp)
    assert config.threads_per_process == expected
    # registration is single-threaded unless asked (the reproducible setting)
    assert config.registration_threads == (min(omp, nprocs) if omp else 1)
    workflow = wf_builder(config, inputs_of(root), library)
    register = workflow.get_node("sub_01_wf").get_node("multiatlas_wf").get_node("register_atlases")
    assert register.n_procs == config.registration_threads
    fuse = workflow.get_node("sub_01_wf").get_node("multiatlas_wf").get_node("fuse_jlf")
    assert fuse.n_procs == expected


def test_config_refuses_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="fusion"):
        Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
               work_dir=tmp_path / "w", fusion=("staple",))
    with pytest.raises(ValueError, match="preset"):
        Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
               work_dir=tmp_path / "w", registration_preset="nope")
    config = Config(bids_dir=tmp_path, output_dir=tmp_path / "o", analysis_level="participant",
                    work_dir=tmp_path / "w")
    assert config.database_dir.parent == tmp_path / "w" / "bids_db"


def test_images_differing_by_task_get_their_own_subworkflow(tmp_path, make_skeleton, library,
                                                              wf_builder):
    from dlf_bids.cli.participant import expected_outputs

    root = make_skeleton(tmp_path / "bids", real_images(["sub-01/anat/sub-01_task-still_T1w.nii.gz",
                                                         "sub-01/anat/sub-01_task-nodding_T1w.nii.gz"]))
    config = make_config(root, tmp_path, library, fusion=("mv",), nprocs=2)
    anats = inputs_of(root)
    assert len(anats) == 2
    outputs = {expected_outputs(config, a)["mv"] for a in anats}
    assert len(outputs) == 2
    workflow = wf_builder(config, anats, library)
    assert len(subworkflows(workflow)) == 2
