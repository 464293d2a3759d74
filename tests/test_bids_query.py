"""Finding the T1w images to segment (and their T2w) with pybids: skeletons and real layouts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dlf_bids.errors import (BadDataError, DlfBidsError, MissingInputError, NoFilesSelectedError,
                             UsageError)
from dlf_bids.utils.bids import (AnatomicalInput, check_bids_dir, collect_anatomicals,
                                 load_filters, load_layout, strip_prefix)


def collect(root, **kwargs):
    return collect_anatomicals(load_layout(root), **kwargs)


def names(paths):
    return [Path(p).name if p is not None else None for p in paths]


# --- small helpers ------------------------------------------------------------------------------

@pytest.mark.parametrize("labels, expected", [
    (None, None), ([], None), (["01"], ["01"]), (["sub-01"], ["01"]),
    (["sub-01", "02"], ["01", "02"]), (["sub-sub-1"], ["sub-1"]),
])
def test_strip_prefix(labels, expected):
    assert strip_prefix(labels, "sub-") == expected


def test_anatomical_input_name():
    anat = AnatomicalInput("01", Path("x_T1w.nii.gz"),
                           {"session": "pre", "acquisition": "mp-rage", "run": 2})
    assert anat.name == "sub_01_ses_pre_acq_mprage_run_2"
    assert anat.session == "pre"
    assert AnatomicalInput("01", Path("x"), {}).name == "sub_01"
    assert AnatomicalInput("01", Path("x"), {}).session is None


def test_check_bids_dir(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path / "ds", {"sub-01/anat/sub-01_T1w.nii.gz": None})
    assert check_bids_dir(root) == root.absolute()
    with pytest.raises(MissingInputError, match="does not exist"):
        check_bids_dir(tmp_path / "nope")
    with pytest.raises(BadDataError, match="subject/session folder"):
        check_bids_dir(root / "sub-01")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BadDataError, match="no dataset_description.json"):
        check_bids_dir(tmp_path / "plain")
    with pytest.raises(BadDataError, match="not a directory"):
        check_bids_dir(root / "dataset_description.json")


# --- skeletons ----------------------------------------------------------------------------------

def test_no_session(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, {
        "sub-01/anat/sub-01_T1w.nii.gz": None, "sub-01/anat/sub-01_T1w.json": {"EchoTime": 0.003},
        "sub-01/func/sub-01_task-rest_bold.nii.gz": None,
        "sub-02/anat/sub-02_T1w.nii": None, "sub-02/anat/sub-02_T2w.nii.gz": None,
        "sub-02/anat/sub-02_FLAIR.nii.gz": None,
    })
    got = collect(root)
    assert got.skipped == []
    assert [(a.subject, a.t1w.name) for a in got.anatomicals] == [
        ("01", "sub-01_T1w.nii.gz"), ("02", "sub-02_T1w.nii")]
    assert all(a.entities == {} for a in got.anatomicals)
    assert all(a.session is None for a in got.anatomicals)
    assert got.anatomicals[0].t2w is None
    assert got.anatomicals[1].t2w.name == "sub-02_T2w.nii.gz"
    assert all(a.t1w.is_absolute() and a.t1w.is_file() for a in got.anatomicals)


def _two_sessions(tmp_path, make_skeleton):
    return make_skeleton(tmp_path, [
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
    ])


def test_sessions_one_input_each(tmp_path, make_skeleton):
    got = collect(_two_sessions(tmp_path, make_skeleton))
    assert [(a.subject, a.session) for a in got.anatomicals] == [("01", "1"), ("01", "2"), ("02", "1")]
    assert [a.entities for a in got.anatomicals] == [{"session": "1"}, {"session": "2"}, {"session": "1"}]
    assert names(a.t2w for a in got.anatomicals) == ["sub-01_ses-1_T2w.nii.gz", None, None]
    assert [a.name for a in got.anatomicals] == ["sub_01_ses_1", "sub_01_ses_2", "sub_02_ses_1"]


@pytest.mark.parametrize("label", ["2", "ses-2"])
def test_session_label(tmp_path, make_skeleton, label):
    got = collect(_two_sessions(tmp_path, make_skeleton), session_labels=[label])
    assert names(a.t1w for a in got.anatomicals) == ["sub-01_ses-2_T1w.nii.gz"]
    assert got.anatomicals[0].entities == {"session": "2"}
    # sub-02 has no session 2: skipped with a reason, not an error
    assert [s for s, _ in got.skipped] == ["02"]
    assert "no T1w" in got.skipped[0][1]


def test_session_label_selecting_nothing(tmp_path, make_skeleton):
    root = _two_sessions(tmp_path, make_skeleton)
    with pytest.raises(NoFilesSelectedError, match="selected no T1w"):
        collect(root, session_labels=["ses-9"])


def test_several_runs_paired_by_run(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, [
        "sub-01/anat/sub-01_run-1_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz",
        "sub-01/anat/sub-01_run-1_T2w.nii.gz", "sub-01/anat/sub-01_run-2_T2w.nii.gz",
    ])
    got = collect(root).anatomicals
    assert len(got) == 2
    assert [str(a.entities["run"]) for a in got] == ["1", "2"]
    assert names(a.t2w for a in got) == ["sub-01_run-1_T2w.nii.gz", "sub-01_run-2_T2w.nii.gz"]
    assert len({a.name for a in got}) == 2


def test_run_without_matching_t2w_falls_back_to_same_session(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, [
        "sub-01/anat/sub-01_run-1_T1w.nii.gz", "sub-01/anat/sub-01_run-2_T1w.nii.gz",
        "sub-01/anat/sub-01_run-2_T2w.nii.gz",
    ])
    got = collect(root).anatomicals
    assert names(a.t2w for a in got) == ["sub-01_run-2_T2w.nii.gz"] * 2


def test_no_t2w(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, ["sub-01/anat/sub-01_T1w.nii.gz",
                                    "sub-01/anat/sub-01_inplaneT2.nii.gz",
                                    "sub-01/anat/sub-01_T2starw.nii.gz"])
    (anat,) = collect(root).anatomicals
    assert anat.t2w is None


def test_t2w_in_other_session_not_paired(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, [
        "sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
        "sub-01/ses-b/anat/sub-01_ses-b_T2w.nii.gz",
    ])
    (anat,) = collect(root).anatomicals
    assert anat.session == "a" and anat.t2w is None


def test_t2w_of_other_subject_not_paired(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, ["sub-01/anat/sub-01_T1w.nii.gz",
                                    "sub-02/anat/sub-02_T1w.nii.gz",
                                    "sub-02/anat/sub-02_T2w.nii.gz"])
    got = collect(root).anatomicals
    assert names(a.t2w for a in got) == [None, "sub-02_T2w.nii.gz"]


# --- filters ------------------------------------------------------------------------------------

@pytest.fixture
def acq_dataset(tmp_path, make_skeleton):
    return make_skeleton(tmp_path / "ds", [
        "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz",
        "sub-01/anat/sub-01_acq-spgr_T1w.nii.gz",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_acq-fast_T2w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "sub-02/anat/sub-02_acq-spgr_T1w.nii.gz",
    ])


def test_filter_value(acq_dataset):
    got = collect(acq_dataset, filters={"t1w": {"acquisition": "mprage"}})
    assert names(a.t1w for a in got.anatomicals) == ["sub-01_acq-mprage_T1w.nii.gz"]
    assert got.anatomicals[0].entities == {"acquisition": "mprage"}
    assert [s for s, _ in got.skipped] == ["02"]
    assert "matching the filters" in got.skipped[0][1]


def test_filter_null_means_entity_absent(acq_dataset):
    got = collect(acq_dataset, filters={"t1w": {"acquisition": None}})
    assert names(a.t1w for a in got.anatomicals) == ["sub-01_T1w.nii.gz"]
    assert got.anatomicals[0].entities == {}


def test_filter_star_means_any_value(acq_dataset):
    got = collect(acq_dataset, filters={"t1w": {"acquisition": "*"}})
    assert names(a.t1w for a in got.anatomicals) == [
        "sub-01_acq-mprage_T1w.nii.gz", "sub-01_acq-spgr_T1w.nii.gz", "sub-02_acq-spgr_T1w.nii.gz"]


def test_filter_on_t2w(acq_dataset):
    got = collect(acq_dataset, filters={"t1w": {"acquisition": None}, "t2w": {"acquisition": "fast"}})
    assert names(a.t2w for a in got.anatomicals) == ["sub-01_acq-fast_T2w.nii.gz"]


def test_no_filter_takes_every_t1w(acq_dataset):
    got = collect(acq_dataset)
    assert Counter(a.subject for a in got.anatomicals) == {"01": 3, "02": 1}
    assert len({a.name for a in got.anatomicals}) == 4


def test_filters_selecting_nothing(acq_dataset):
    with pytest.raises(NoFilesSelectedError, match="filters selected no T1w"):
        collect(acq_dataset, filters={"t1w": {"acquisition": "nope"}})
    assert NoFilesSelectedError.exit_code == 18


def test_load_filters(tmp_path):
    assert load_filters(None) is None
    good = tmp_path / "f.json"
    good.write_text('{"t1w": {"acquisition": null, "run": "*"}, "t2w": {"session": "1"}}')
    assert load_filters(good) == {"t1w": {"acquisition": None, "run": "*"}, "t2w": {"session": "1"}}
    with pytest.raises(MissingInputError):
        load_filters(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, match in [('{"t1w": {', "not valid JSON"), ('["t1w"]', "must map"),
                        ('{"t1w": "mprage"}', "must map"), ('{"bold": {}}', "unknown queries")]:
        bad.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_filters(bad)


# --- subjects -----------------------------------------------------------------------------------

def test_subject_without_t1w_skipped_others_go_on(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, [
        "sub-01/func/sub-01_task-rest_bold.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz",
        "sub-03/anat/sub-03_T2w.nii.gz",
    ])
    got = collect(root)
    assert [a.subject for a in got.anatomicals] == ["02"]
    assert [s for s, _ in got.skipped] == ["01", "03"]
    assert all(reason == "no T1w image in anat/" for _, reason in got.skipped)


def test_no_t1w_at_all(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, ["sub-01/func/sub-01_task-rest_bold.nii.gz"])
    with pytest.raises(MissingInputError, match="no T1w images"):
        collect(root)


def test_no_subjects(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, {"README": "empty"})
    with pytest.raises(MissingInputError, match="no subjects"):
        collect(root)


@pytest.mark.parametrize("labels", [["02"], ["sub-02"], ["sub-02", "02"]])
def test_participant_labels(tmp_path, make_skeleton, labels):
    root = make_skeleton(tmp_path, ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz"])
    got = collect(root, participant_labels=labels)
    assert [a.subject for a in got.anatomicals] == ["02"]


def test_unknown_participant(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, ["sub-01/anat/sub-01_T1w.nii.gz"])
    with pytest.raises(MissingInputError, match="sub-07") as err:
        collect(root, participant_labels=["01", "sub-07"])
    assert "sub-01" not in str(err.value).split("not found")[0]


def test_derivatives_and_code_are_ignored(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "derivatives/foo/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
        "derivatives/foo/sub-09/anat/sub-09_T1w.nii.gz",
        "sourcedata/sub-08/anat/sub-08_T1w.nii.gz",
        "code/sub-07/anat/sub-07_T1w.nii.gz",
    ])
    got = collect(root)
    assert [a.t1w.relative_to(root).as_posix() for a in got.anatomicals] == [
        "sub-01/anat/sub-01_T1w.nii.gz"]


def test_malformed_sidecar_does_not_crash(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path, {"sub-01/anat/sub-01_T1w.nii.gz": None,
                                    "sub-01/anat/sub-01_T1w.json": "{not json"})
    try:
        got = collect(root)
    except DlfBidsError:
        return  # a one-line error is fine too
    assert [a.subject for a in got.anatomicals] == ["01"]


# --- the pybids index cache ---------------------------------------------------------------------

def test_layout_index_cached(tmp_path, make_skeleton):
    root = make_skeleton(tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz"])
    db = tmp_path / "work" / "bids_db"
    first = load_layout(root, db)
    assert first.get_subjects() == ["01"]
    assert db.is_dir() and any(db.iterdir())
    second = load_layout(root, db)
    assert second.get_subjects() == ["01"]
    assert names(a.t1w for a in collect_anatomicals(second).anatomicals) == ["sub-01_T1w.nii.gz"]
    again = load_layout(root, db, reset=True)
    assert again.get_subjects() == ["01"]
    assert not list(root.rglob("*.sqlite"))  # never written into the dataset


def test_layout_index_of_another_dataset_not_reused(tmp_path, make_skeleton):
    first = make_skeleton(tmp_path / "a", ["sub-01/anat/sub-01_T1w.nii.gz"])
    other = make_skeleton(tmp_path / "b", ["sub-x1/anat/sub-x1_T1w.nii.gz"])
    db = tmp_path / "work" / "bids_db"
    load_layout(first, db)
    layout = load_layout(other, db)
    assert layout.get_subjects() == ["x1"]


# --- real layouts (bids-examples, empty placeholder images) -------------------------------------

_LAYOUTS: dict = {}


def _real(bids_examples, name):
    root = bids_examples / name
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


def _real_layout(bids_examples, name):
    """Index each (read-only) example once per test session."""
    root = _real(bids_examples, name)
    if name not in _LAYOUTS:
        _LAYOUTS[name] = load_layout(root)
    return root, _LAYOUTS[name]


def test_ds001(bids_examples):
    root, layout = _real_layout(bids_examples, "ds001")
    got = collect_anatomicals(layout)
    assert got.skipped == []
    assert len(got.anatomicals) == 16
    assert [a.subject for a in got.anatomicals] == [f"{i:02d}" for i in range(1, 17)]
    for anat in got.anatomicals:
        assert anat.t1w == root / f"sub-{anat.subject}" / "anat" / f"sub-{anat.subject}_T1w.nii.gz"
        assert anat.entities == {}
        assert anat.t2w is None  # inplaneT2 is not a T2w
    assert len({a.name for a in got.anatomicals}) == 16


def test_ds001_participant_subset(bids_examples):
    root, layout = _real_layout(bids_examples, "ds001")
    got = collect_anatomicals(layout, participant_labels=["sub-03", "11"])
    assert [a.subject for a in got.anatomicals] == ["03", "11"]
    with pytest.raises(MissingInputError, match="sub-17"):
        collect_anatomicals(layout, participant_labels=["17"])


def test_ds114_sessions(bids_examples):
    root, layout = _real_layout(bids_examples, "ds114")
    got = collect_anatomicals(layout)
    assert len(got.anatomicals) == 20
    per_subject = Counter(a.subject for a in got.anatomicals)
    assert per_subject == {f"{i:02d}": 2 for i in range(1, 11)}
    for anat in got.anatomicals:
        ses = anat.entities["session"]
        assert ses in ("test", "retest") and anat.entities == {"session": ses}
        assert anat.t1w.name == f"sub-{anat.subject}_ses-{ses}_T1w.nii.gz"
        assert anat.t1w.parent == root / f"sub-{anat.subject}" / f"ses-{ses}" / "anat"
        assert anat.t2w is None
    assert len({a.name for a in got.anatomicals}) == 20
    retest = collect_anatomicals(layout, session_labels=["ses-retest"]).anatomicals
    assert len(retest) == 10 and {a.session for a in retest} == {"retest"}


def test_ds004332_entities_and_t2w(bids_examples):
    root, layout = _real_layout(bids_examples, "ds004332")
    got = collect_anatomicals(layout)
    assert got.skipped == []
    # 16 T1w per subject: acq-{mprage,t1tirm}PMC{on,off} x rec-{wore,wre} x task-...
    assert Counter(a.subject for a in got.anatomicals) == {"01": 16, "02": 16}
    for anat in got.anatomicals:
        assert set(anat.entities) == {"task", "acquisition", "reconstruction"}
        assert f"_acq-{anat.entities['acquisition']}_" in anat.t1w.name
        assert f"_rec-{anat.entities['reconstruction']}_" in anat.t1w.name
        assert anat.entities["acquisition"].startswith(("mprage", "t1tirm"))
        # every subject has T2w (t2tse) images: each T1w gets one of its own subject, never a T2starw
        assert anat.t2w is not None
        assert anat.t2w.name.startswith(f"sub-{anat.subject}_") and anat.t2w.name.endswith("_T2w.nii")
    mprage = collect_anatomicals(layout, filters={"t1w": {"acquisition": "mpragePMCon", "reconstruction": "wre"}})
    assert [a.t1w.name for a in mprage.anatomicals] == [
        "sub-01_task-nodding_acq-mpragePMCon_rec-wre_T1w.nii",
        "sub-01_task-shaking_acq-mpragePMCon_rec-wre_T1w.nii",
        "sub-02_task-nodding_acq-mpragePMCon_rec-wre_T1w.nii",
        "sub-02_task-shaking_acq-mpragePMCon_rec-wre_T1w.nii",
    ]


@pytest.mark.parametrize("dataset", ["ds001", "ds114"])
def test_names_unique(bids_examples, dataset):
    got = collect_anatomicals(_real_layout(bids_examples, dataset)[1]).anatomicals
    assert len({a.name for a in got}) == len(got)


def test_names_unique_ds004332(bids_examples):
    got = collect_anatomicals(_real_layout(bids_examples, "ds004332")[1]).anatomicals
    assert len({a.name for a in got}) == len(got)
