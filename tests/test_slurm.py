"""dlf-bids on a real Slurm scheduler: Nipype's SLURM plugin and the job-array script.

Needs a running Slurm cluster (``tests/slurm/start_cluster.sh`` starts a single-node one as root;
``.ci/run`` does). Without one the tests skip, unless ``DLF_BIDS_REQUIRE_SLURM=1`` (set by CI) turns
the skip into a failure, so CI cannot pass by not running them.

Each way of running must give exactly the label maps and group tables of a MultiProc run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest

from dlf_bids.cli.run import main as dlf_bids_main
from dlf_bids.utils.demo_data import make_demo_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["--fusion", "mv", "jlf", "--registration-preset", "fast", "--skip-bids-validation"]
JOB_TIMEOUT_S = 1200


def _cluster_state() -> str | None:
    """The node states sinfo reports, or None when there is no reachable cluster."""
    if shutil.which("sinfo") is None:
        return None
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


@pytest.fixture(scope="module")
def slurm_env():
    state = _cluster_state()
    if state is None or not {"idle", "mixed", "allocated"} & set(state.split()):
        message = (f"no usable Slurm cluster (sinfo: {state!r}); "
                   "start one with tests/slurm/start_cluster.sh")
        if os.environ.get("DLF_BIDS_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    # jobs inherit the submitting environment (sbatch --export=ALL): put this Python's
    # console scripts (dlf-bids) first on PATH
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _sbatch(args: list[str], env: dict, cwd: Path) -> tuple[int, str, str]:
    """Submit a job: (exit status of sbatch, job id, stderr)."""
    result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=JOB_TIMEOUT_S)
    return result.returncode, result.stdout.strip().split(";")[0], result.stderr.strip()


@pytest.fixture(scope="module")
def runs(slurm_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    data = make_demo_data(root / "data", n_subjects=2, n_atlases=2, seed=0, voxel_size=3.0)
    bids, atlases = str(data.bids_dir), str(data.atlas_dir)
    outs = {name: root / f"out-{name}" for name in ("multiproc", "plugin", "array")}

    # 1. the reference: MultiProc on this machine
    codes = {"multiproc": dlf_bids_main([bids, str(outs["multiproc"]), "participant",
                                         "--atlas-dir", atlases, "-w", str(root / "work-mp"),
                                         "--nprocs", "2", *OPTIONS])}
    codes["multiproc-group"] = dlf_bids_main([bids, str(outs["multiproc"]), "group"])

    # 2. every node an sbatch job, with the plugin file we ship
    codes["plugin"] = dlf_bids_main([bids, str(outs["plugin"]), "participant", "--atlas-dir",
                                     atlases, "-w", str(root / "work-plugin"), "--plugin-config",
                                     str(REPO / "workflows" / "plugins" / "slurm.yml"), *OPTIONS])
    codes["plugin-group"] = dlf_bids_main([bids, str(outs["plugin"]), "group"])

    # 3. the job-array script, one task per participant, then the group level as a dependent job
    env = dict(slurm_env, BIDS_DIR=bids, OUT_DIR=str(outs["array"]), ATLAS_DIR=atlases,
               WORK_ROOT=str(root / "work-array"), DLF_BIDS_ARGS=" ".join(OPTIONS[:-1]))
    logs = root / "slurm-logs"
    logs.mkdir()
    code, array_id, err = _sbatch(["--array=1-2", "--cpus-per-task=1", "--mem=4G",
                                   f"--output={logs}/array-%A_%a.out",
                                   str(REPO / "workflows" / "slurm_array.sh")], env, root)
    assert code == 0, f"sbatch refused the array job: {err}"
    # --wait returns when the group job ends; --kill-on-invalid-dep cancels it (instead of
    # leaving it pending forever) when an array task failed
    codes["array-group"], _, _ = _sbatch(
        ["--wait", f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes",
         "--cpus-per-task=1", "--mem=2G", f"--output={logs}/group-%j.out",
         "--wrap", f"dlf-bids {bids} {outs['array']} group"], env, root)
    return {"codes": codes, "outs": outs, "logs": logs}


def _dsegs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.glob("sub-*/anat/*_dseg.nii.gz"))


def test_participant_runs_succeed(runs):
    assert all(code == 0 for code in runs["codes"].values()), runs["codes"]
    assert _dsegs(runs["outs"]["multiproc"]) == [
        f"sub-0{s}/anat/sub-0{s}_seg-{m}_dseg.nii.gz" for s in (1, 2) for m in ("jlf", "mv")]


def test_plugin_file_really_used_slurm(runs):
    """The SLURM plugin submitted batch jobs: Nipype leaves its sbatch scripts in the work dir."""
    batch = list((runs["outs"]["plugin"].parent / "work-plugin").rglob("batch/batchscript_*.sh"))
    assert batch, "no sbatch scripts: the graph did not run through the SLURM plugin"


@pytest.mark.parametrize("way", ["plugin", "array"])
def test_same_label_maps_as_multiproc(runs, way):
    reference, other = runs["outs"]["multiproc"], runs["outs"][way]
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(runs["logs"].glob("*.out")))
    assert _dsegs(other) == _dsegs(reference), logs
    for rel in _dsegs(reference):
        a, b = nb.load(reference / rel), nb.load(other / rel)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), rel
        assert np.allclose(a.affine, b.affine), rel


@pytest.mark.parametrize("way", ["plugin", "array"])
def test_same_group_tables_as_multiproc(runs, way):
    reference, other = runs["outs"]["multiproc"], runs["outs"][way]
    tables = sorted(p.name for p in reference.glob("group_*.tsv"))
    assert tables, "the MultiProc run wrote no group table"
    for name in tables:
        assert (other / name).read_text() == (reference / name).read_text(), name
