"""--plugin-config: Nipype plugin files are read, checked and turned into workflow.run arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dlf_bids.cli.run import main
from dlf_bids.errors import EXIT_MISSING_INPUT, EXIT_USAGE, MissingInputError, UsageError
from dlf_bids.execution import load_plugin_config, plugin_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, plugin", [("multiproc.yml", "MultiProc"), ("slurm.yml", "SLURM"),
                                          ("sge.yml", "SGE")])
def test_shipped_plugin_files_load(name, plugin):
    found, args = load_plugin_config(REPO / "workflows" / "plugins" / name)
    assert found == plugin and isinstance(args, dict)
    if plugin == "SLURM":
        assert "--cpus-per-task" in args["sbatch_args"]


def test_plugin_name_is_case_insensitive(tmp_path):
    path = tmp_path / "p.yml"
    path.write_text("plugin: slurm\nplugin_args:\n  max_jobs: 3\n")
    assert load_plugin_config(path) == ("SLURM", {"max_jobs": 3})


@pytest.mark.parametrize("text, message", [
    ("plugin: Bogus\n", "unknown plugin 'Bogus'"),
    ("plugin_args: {}\n", "must be a mapping with a 'plugin' key"),
    ("plugin: SLURM\nplugin_args: [1, 2]\n", "'plugin_args' must be a mapping"),
    ("plugin: SLURM\nsbatch_args: x\n", "unknown key(s) sbatch_args"),
    ("plugin: [SLURM\n", "not valid YAML"),
])
def test_bad_plugin_files_are_refused(tmp_path, text, message):
    path = tmp_path / "p.yml"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_plugin_config(path)


def test_missing_plugin_file(tmp_path):
    with pytest.raises(MissingInputError):
        load_plugin_config(tmp_path / "nope.yml")


def test_multiproc_flags_win_over_the_file():
    plugin, args = plugin_settings("MultiProc", {"n_procs": 8, "memory_gb": 32}, 2, 4.0, print)
    assert plugin == "MultiProc"
    assert args["n_procs"] == 2 and args["memory_gb"] == 4.0 and args["maxtasksperchild"] == 1
    assert args["status_callback"] is print


def test_cluster_plugin_args_pass_through(monkeypatch):
    monkeypatch.delenv("LOGNAME", raising=False)
    plugin, args = plugin_settings("SLURM", {"sbatch_args": "--mem=4G"}, 2, None)
    assert plugin == "SLURM" and args == {"sbatch_args": "--mem=4G"}
    import os
    assert os.environ["LOGNAME"]  # Nipype's SLURM plugin needs it


def test_cli_bad_plugin_file_exit_code(tmp_path, make_skeleton, capsys):
    bids = make_skeleton(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": "nii"})
    bad = tmp_path / "p.yml"
    bad.write_text("plugin: Bogus\n")
    args = [str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
            "--atlas-dir", str(tmp_path), "--plugin-config"]
    assert main(args + [str(bad)]) == EXIT_USAGE
    assert main(args + [str(tmp_path / "missing.yml")]) == EXIT_MISSING_INPUT
    err = capsys.readouterr().err
    assert "unknown plugin 'Bogus'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
