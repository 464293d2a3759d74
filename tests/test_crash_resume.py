"""Crashes, resumes and concurrent runs, through the real ``dlf-bids`` command in subprocesses.

One uninterrupted run of the demo data is the reference. A run killed mid-way must leave no
partial file under a final name, and re-running it with the same work dir must finish without
redoing the registrations that were done and give byte-identical outputs. Two runs on different
subjects started together into the same output and work dirs (as a cluster array does) must both
succeed with the same bytes. Every comparison is byte for byte, which is also the determinism
check: same inputs and seed, separate processes and work dirs, identical files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.interfaces.bids import STAGING_DIRNAME, DerivativesDataSink

DLF_BIDS = Path(sys.executable).parent / "dlf-bids"
REGISTRATION_RESULTS = "result__register_atlases*.pklz"  # one per finished atlas registration


def command(demo_data, out: Path, work: Path, *extra: str) -> list[str]:
    return [str(DLF_BIDS), str(demo_data.bids_dir), str(out), "participant",
            "--atlas-dir", str(demo_data.atlas_dir), "--fusion", "jlf", "mv",
            "--registration-preset", "fast", "--skip-bids-validation", "-w", str(work), *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def subject_files(out: Path) -> dict[str, bytes]:
    """Every file under ``sub-*`` (label maps and sidecars), by relative path, with its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.glob("sub-*/**/*")) if p.is_file()}


def assert_complete(out: Path) -> None:
    """Every file under a final name is whole: images decompress fully, JSON and TSV parse."""
    for path in out.rglob("*"):
        if not path.is_file() or STAGING_DIRNAME in path.parts or "logs" in path.parts:
            continue
        name = path.name
        if name.endswith((".nii.gz", ".nii")):
            np.asanyarray(nb.load(path).dataobj)  # a truncated gzip stream raises here
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".tsv"):
            header = path.read_text().splitlines()[0]
            assert header.startswith("index\t"), f"{path} is incomplete"


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    result = run(command(demo_data, root / "out", root / "work", "--nprocs", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "out"


def test_killed_run_leaves_no_partial_file_and_resumes(demo_data, reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen(command(demo_data, out, work, "--nprocs", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # progress lines: "(k/N) done _register_atlases0 (4 s)"
            if "done _register_atlases" in line:
                break
        else:
            pytest.fail("the run ended before any registration finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: MultiProc workers too
        proc.wait()
    assert_complete(out)
    finished = {p: p.stat().st_mtime_ns for p in work.rglob(REGISTRATION_RESULTS)}
    assert finished, "no registration was finished before the kill"

    result = run(command(demo_data, out, work, "--nprocs", "2"))
    assert result.returncode == 0, result.stdout + result.stderr
    # the registrations done before the kill were reused, not redone
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert len(list(work.rglob(REGISTRATION_RESULTS))) == 2 * 3  # 2 subjects x 3 atlases
    assert subject_files(out) == subject_files(reference)
    assert_complete(out)


def test_concurrent_runs_share_output_and_work_dirs(demo_data, reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    procs = [subprocess.Popen(command(demo_data, out, work, "--nprocs", "1",
                                      "--participant-label", label),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for label in ("01", "02")]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log
        assert "locked" not in log
    assert subject_files(out) == subject_files(reference)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert_complete(out)


def test_a_sink_that_dies_mid_write_leaves_no_final_file(tmp_path, monkeypatch):
    """The unit below the kill test: the bytes are written under the staging name, never the
    final one, so dying half-way through writing leaves nothing a reader would take as done."""
    from niworkflows.interfaces.bids import DerivativesDataSink as NiworkflowsSink

    src = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    src.parent.mkdir(parents=True)
    nb.save(nb.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), src)
    out = tmp_path / "out"
    final = out / "sub-01" / "anat" / "sub-01_seg-mv_dseg.nii.gz"
    seen = {}

    def dies_half_way(self, runtime):
        # write half of the file where the sink was told to write, as a crash would leave it
        target = Path(self.inputs.base_directory) / final.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        seen["target"] = target
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(NiworkflowsSink, "_run_interface", dies_half_way)
    sink = DerivativesDataSink(base_directory=str(out), source_file=str(src), in_file=str(src),
                               segmentation="mv", suffix="dseg")
    with pytest.raises(KeyboardInterrupt):
        sink.run()
    assert STAGING_DIRNAME in seen["target"].parts  # the half file went to staging
    assert not final.exists()


def test_an_index_without_its_completion_marker_is_rebuilt(tmp_path, make_skeleton):
    """A run killed while pybids was indexing leaves an index that may miss subjects."""
    from dlf_bids.utils.bids import load_layout

    bids = make_skeleton(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": "nii"})
    db = tmp_path / "db"
    assert load_layout(bids, db).get_subjects() == ["01"]
    make_skeleton(bids, {"sub-02/anat/sub-02_T1w.nii.gz": "nii"})
    assert load_layout(bids, db).get_subjects() == ["01"]  # a complete index is reused as is
    (db / ".index-complete").unlink()  # as if the indexing run had been killed
    assert sorted(load_layout(bids, db).get_subjects()) == ["01", "02"]
