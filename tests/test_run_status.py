"""The end of a participant run: what happened to each image, said and recorded in logs/status/."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from dlf_bids.cli.run import main
from dlf_bids.errors import EXIT_PROCESSING_FAILED
from dlf_bids.run_status import (RunStatus, crash_files_of, crash_reason, read_statuses,
                                 write_status)


def test_crash_reason_of_a_real_nipype_crash(tmp_path):
    from nipype import config as ncfg
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    def explode():
        raise ValueError("planted failure 42")

    logs = tmp_path / "logs"
    ncfg.update_config({"execution": {"crashdump_dir": str(logs), "crashfile_format": "txt"}})
    workflow = pe.Workflow("sub_07_wf", base_dir=str(tmp_path / "work"))
    workflow.add_nodes([pe.Node(Function(function=explode, input_names=[], output_names=[]),
                                name="explode")])
    started = time.time()
    with pytest.raises(RuntimeError):
        workflow.run(plugin="Linear")
    (crash,) = crash_files_of(logs, "sub_07_wf", since=started - 1)
    assert crash_reason(crash) == "ValueError: planted failure 42"
    assert crash_files_of(logs, "sub_08_wf", since=started - 1) == []
    assert crash_files_of(logs, "sub_07_wf", since=time.time() + 10) == []


def test_records_round_trip_and_damaged_ones_are_skipped(tmp_path):
    record = RunStatus(name="sub-01_run-1", participant_id="sub-01", status="failed",
                       reason="ValueError: x", warnings=["anisotropic"])
    write_status(tmp_path, record)
    (tmp_path / "logs" / "status" / "sub-02.json").write_text("{not json")
    assert read_statuses(tmp_path) == [record]
    with pytest.raises(ValueError):
        RunStatus(name="x", participant_id="sub-01", status="maybe")


@pytest.fixture
def three_subjects(demo_data, tmp_path) -> Path:
    """The demo dataset plus sub-03, who has a T2w but no T1w."""
    bids = Path(shutil.copytree(demo_data.bids_dir, tmp_path / "bids"))
    (bids / "sub-03" / "anat").mkdir(parents=True)
    shutil.copy(bids / "sub-01" / "anat" / "sub-01_T2w.nii.gz",
                bids / "sub-03" / "anat" / "sub-03_T2w.nii.gz")
    return bids


def test_failed_succeeded_and_skipped_are_said_and_recorded(three_subjects, demo_data, tmp_path,
                                                            monkeypatch, capsys):
    import dlf_bids.interfaces.fusion as fusion_interfaces

    real_vote = fusion_interfaces.majority_vote

    def vote_failing_for_sub_02(stack):
        if f"{os.sep}sub_02_wf{os.sep}" in os.getcwd() + os.sep:  # the node runs in its work dir
            raise ValueError("planted failure for sub-02")
        return real_vote(stack)

    monkeypatch.setattr(fusion_interfaces, "majority_vote", vote_failing_for_sub_02)
    linear = tmp_path / "linear.yml"  # in-process, so the planted failure is seen by the node
    linear.write_text("plugin: Linear\n")
    out = tmp_path / "out"
    code = main([str(three_subjects), str(out), "participant", "--atlas-dir",
                 str(demo_data.atlas_dir), "--fusion", "mv", "--registration-preset", "fast",
                 "--skip-bids-validation", "--plugin-config", str(linear),
                 "-w", str(tmp_path / "work")])
    said = capsys.readouterr().out
    assert code == EXIT_PROCESSING_FAILED
    assert "ok      sub-01: sub-01_seg-mv_dseg.nii.gz" in said
    assert "FAILED  sub-02: ValueError: planted failure for sub-02 (crash report: " in said
    assert "skipped sub-03: no T1w image in anat/" in said

    records = {r.name: r for r in read_statuses(out)}
    assert sorted(records) == ["sub-01", "sub-02", "sub-03"]
    ok, failed, skipped = records["sub-01"], records["sub-02"], records["sub-03"]
    assert ok.status == "succeeded" and ok.outputs == ["sub-01/anat/sub-01_seg-mv_dseg.nii.gz"]
    assert ok.t1w == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert ok.t2w == "bids:raw:sub-01/anat/sub-01_T2w.nii.gz" and ok.t2w_used is False
    assert ok.fusion == ["mv"] and len(ok.atlases) == 3 and ok.elapsed_s > 0
    assert failed.status == "failed" and failed.outputs == []
    assert failed.reason == "ValueError: planted failure for sub-02"
    assert failed.crash_files and all((out / c).is_file() for c in failed.crash_files)
    assert skipped.status == "skipped" and skipped.reason == "no T1w image in anat/"
    assert json.loads((out / "logs" / "status" / "sub-02.json").read_text())["status"] == "failed"
