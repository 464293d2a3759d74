"""Security and environment guarantees: model files are data, outputs are never written through
planted symbolic links, unwritable output/work dirs are refused up front, a run needs no network
and no writable home.

We run as root here and in CI: permission bits do not stop root, so read-only folders are made
with ``chattr +i`` (ext4) or by putting a regular file where a parent folder should be.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nb
import numpy as np
import pytest
import torch

from dlf_bids.cli.run import main
from dlf_bids.errors import EXIT_BAD_DATA, EXIT_CANT_WRITE, BadDataError, CannotWriteError
from dlf_bids.interfaces.bids import STAGING_DIRNAME, DerivativesDataSink
from dlf_bids.models.dlf import DeepLabelFusion, DLFConfig
from dlf_bids.models.model_file import FORMAT_VERSION, load_model, save_model
from dlf_bids.utils.files import atomic_open, check_writable_dir, write_text_atomic
from dlf_bids.utils.labels import Label, LabelTable
from conftest import listing, the_error_line

# --- model files are data, never code -----------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``exec``: the way a crafted model file runs code on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _crafted(path: Path, marker: Path, how: str) -> Path:
    payload = {"format_version": FORMAT_VERSION, "labels": [], "state_dict": _RunsCode(marker)}
    if how == "torch.save":  # a zip archive, as save_model writes (pickle protocol 2: GLOBAL)
        torch.save(payload, path)
    else:  # a bare pickle stream, which torch.load also accepts
        path.write_bytes(pickle.dumps(payload, protocol=int(how.split()[-1])))
    return path


CRAFTED = ["torch.save", "pickle protocol 2", "pickle protocol 5"]


@pytest.mark.parametrize("how", CRAFTED)
@pytest.mark.parametrize("force_no_weights_only", [False, True])
def test_crafted_model_is_refused_not_run(tmp_path, monkeypatch, how, force_no_weights_only):
    marker = tmp_path / "code-ran"
    model = _crafted(tmp_path / "model.pt", marker, how)
    # the file really is an exploit: a plain unpickling runs its code
    if how == "torch.save":
        torch.load(model, weights_only=False)
    else:
        pickle.loads(model.read_bytes())
    assert marker.read_text() == "code ran"
    marker.unlink()
    if force_no_weights_only:  # torch's switch to load without weights_only must not reach us
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(BadDataError) as exc:
        load_model(model)
    message = str(exc.value)
    assert "\n" not in message and "\x1b" not in message, message
    assert str(model) in message
    assert "weights_only" not in message  # torch's advice to load it as code is not passed on
    if how == "pickle protocol 5":  # torch stops at protocol 5's first opcode, before any global
        assert "cannot be read" in message and "not tensors and plain values only" in message
    else:
        assert "refused" in message and "run or import Python code (exec)" in message
    assert exc.value.exit_code == EXIT_BAD_DATA
    assert not marker.exists()


@pytest.fixture
def participant_args(demo_data, tmp_path):
    """``participant_args(model) -> argv`` for a DLF run on the demo data, outputs under tmp."""

    def argv(model: Path) -> list[str]:
        return [str(demo_data.bids_dir), str(tmp_path / "out"), "participant", "--atlas-dir",
                str(demo_data.atlas_dir), "--dlf-model", str(model), "--skip-bids-validation",
                "-w", str(tmp_path / "work")]

    return argv


def _refused_by_the_cli(argv, capsys, tmp_path) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == EXIT_BAD_DATA == 65, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    return the_error_line(err)


@pytest.mark.parametrize("how", CRAFTED)
def test_cli_refuses_a_crafted_model(participant_args, tmp_path, capsys, how):
    marker = tmp_path / "code-ran"
    model = _crafted(tmp_path / "model.pt", marker, how)
    line = _refused_by_the_cli(participant_args(model), capsys, tmp_path)
    assert str(model) in line and ("refused" in line or how == "pickle protocol 5")
    assert not marker.exists()


def _tiny_model_file(path: Path, labels: LabelTable) -> Path:
    config = DLFConfig(n_labels=len(labels.labels) + 1, n_modalities=1, wv_channels=(4, 8, 16),
                       ft_channels=(4, 8, 16, 32))
    return save_model(path, DeepLabelFusion(config), {"labels": labels, "modalities": ["T1w"],
                                                      "patch_size": (16, 16, 16)})


def test_cli_refuses_a_model_of_a_newer_format(participant_args, tmp_path, capsys, demo_data):
    from dlf_bids.utils.labels import read_label_table

    path = _tiny_model_file(tmp_path / "m.pt", read_label_table(demo_data.atlas_dir / "dseg.tsv"))
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    line = _refused_by_the_cli(participant_args(path), capsys, tmp_path)
    assert f"format version {FORMAT_VERSION + 1}" in line and "upgrade dlf-bids" in line


def test_cli_refuses_a_model_for_other_labels(participant_args, tmp_path, capsys):
    other = LabelTable((Label(17, "Left-Hippocampus"), Label(53, "Right-Hippocampus")))
    path = _tiny_model_file(tmp_path / "m.pt", other)
    line = _refused_by_the_cli(participant_args(path), capsys, tmp_path)
    assert "does not know label(s) 1, 2, 3, 4, 5, 6" in line


# --- nothing is written through a symbolic link -------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the output dir whose files must never change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def _plant(link: Path, target: Path, content: bytes = b"precious\n") -> Path:
    target.write_bytes(content)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return target


def test_sink_replaces_a_link_at_the_output_name(tmp_path, outside):
    src = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    src.parent.mkdir(parents=True)
    img = nb.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4))
    nb.save(img, src)
    seg = tmp_path / "seg.nii.gz"
    nb.save(img, seg)
    out = tmp_path / "out"
    final = out / "sub-01" / "anat" / "sub-01_seg-mv_dseg.nii.gz"
    sidecar = final.with_name("sub-01_seg-mv_dseg.json")
    victims = [_plant(final, outside / "victim.nii.gz"), _plant(sidecar, outside / "victim.json")]
    DerivativesDataSink(base_directory=str(out), source_file=str(src), in_file=str(seg),
                        segmentation="mv", suffix="dseg", meta_dict={"Description": "x"}).run()
    assert [v.read_bytes() for v in victims] == [b"precious\n"] * 2
    for path in (final, sidecar):
        assert path.is_file() and not path.is_symlink()
    assert np.array_equal(np.asanyarray(nb.load(final).dataobj), np.asanyarray(img.dataobj))
    assert json.loads(sidecar.read_text())["Description"] == "x"
    assert not list((out / STAGING_DIRNAME).iterdir())


def test_dataset_level_files_replace_planted_links(tmp_path, outside):
    from dlf_bids.group import measure_method, write_wide_table
    from dlf_bids.utils.derivatives import (write_bidsignore, write_dataset_description,
                                            write_method_luts, write_readme)

    out = tmp_path / "out"
    names = ["dataset_description.json", "README.md", "seg-mv_dseg.tsv",
             "group_seg-mv_volumes.tsv", "group_seg-mv_volumes.json"]
    victims = [_plant(out / name, outside / name) for name in names]
    # a user's .bidsignore lines are kept, but a linked file is neither read nor written
    victims.append(_plant(out / ".bidsignore", outside / "bidsignore", b"secret\n"))
    labels = LabelTable((Label(1, "A"), Label(2, "B")))
    write_dataset_description(out, tmp_path / "bids", None)
    write_readme(out)
    write_bidsignore(out)
    write_method_luts(out, ["mv"], labels)
    seg = np.zeros((4, 4, 4), np.int16)
    seg[:2] = 1
    (out / "sub-01" / "anat").mkdir(parents=True)
    nb.save(nb.Nifti1Image(seg, np.eye(4)), out / "sub-01" / "anat" / "sub-01_seg-mv_dseg.nii.gz")
    write_wide_table(out, "mv", measure_method(out, "mv"))
    assert [v.read_bytes() for v in victims[:-1]] == [b"precious\n"] * len(names)
    assert victims[-1].read_bytes() == b"secret\n"
    for name in names + [".bidsignore"]:
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert (out / ".bidsignore").read_text().startswith("logs/\n")
    assert (out / "group_seg-mv_volumes.tsv").read_text().splitlines()[1].startswith("sub-01\t")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bidsignore_keeps_a_users_lines(tmp_path):
    from dlf_bids.utils.derivatives import BIDSIGNORE, write_bidsignore

    (tmp_path / ".bidsignore").write_text("mine/\nlogs/\n")
    write_bidsignore(tmp_path)
    write_bidsignore(tmp_path)  # a second run adds nothing
    assert (tmp_path / ".bidsignore").read_text().splitlines() == ["mine/", *BIDSIGNORE]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "table.tsv"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_open(path) as fh:
            fh.write("half a ")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]  # no temporary file left


# --- output and work dirs that cannot be written ------------------------------------------------


@pytest.fixture
def raw(tmp_path, make_skeleton) -> Path:
    return make_skeleton(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": "nii"})


@pytest.fixture
def immutable(tmp_path):
    """``immutable(folder)``: make ``folder`` unwritable even for root (``chattr +i``), undone at
    teardown; skips where chattr is missing or the filesystem does not support it."""
    frozen = []

    def freeze(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        chattr = shutil.which("chattr")
        if chattr is None:
            pytest.skip("chattr not available")
        done = subprocess.run([chattr, "+i", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i not supported here: {done.stderr.strip()}")
        frozen.append(folder)
        return folder

    yield freeze
    for folder in frozen:
        subprocess.run([shutil.which("chattr"), "-i", str(folder)], check=True)


def _cannot_write(argv, capsys) -> str:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == EXIT_CANT_WRITE == 73, err
    return the_error_line(err)


@pytest.mark.parametrize("level", ["participant", "group"])
def test_output_dir_below_a_regular_file(raw, tmp_path, capsys, level):
    (tmp_path / "a-file").write_text("not a folder\n")
    out = tmp_path / "a-file" / "out"
    line = _cannot_write([raw, out, level, "-w", tmp_path / "work"], capsys)
    assert f"output_dir {out}" in line and "Not a directory" in line
    assert not (tmp_path / "work").exists()


def test_work_dir_below_a_regular_file(raw, tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a folder\n")
    line = _cannot_write([raw, tmp_path / "out", "participant", "-w", tmp_path / "a-file" / "w"],
                         capsys)
    assert f"work dir {tmp_path / 'a-file' / 'w'}" in line
    assert not (tmp_path / "out").exists()  # the output dir probe left nothing behind


def test_read_only_output_dir(raw, tmp_path, capsys, immutable):
    out = immutable(tmp_path / "out")
    for level in ("participant", "group"):
        line = _cannot_write([raw, out, level, "-w", tmp_path / "work"], capsys)
        assert f"output_dir {out}" in line and "Operation not permitted" in line
    assert listing(out) == []


def test_read_only_work_dir_and_its_parent(raw, tmp_path, capsys, immutable):
    parent = immutable(tmp_path / "ro")
    for work in (parent, parent / "work"):  # the dir itself, or a dir that cannot be created
        line = _cannot_write([raw, tmp_path / "out", "participant", "-w", work], capsys)
        assert f"work dir {work}" in line
    assert not (tmp_path / "out").exists()


def test_probe_leaves_no_trace(tmp_path):
    check_writable_dir(tmp_path / "new" / "deeper", "output_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists").mkdir()
    check_writable_dir(tmp_path / "exists", "output_dir")
    assert list((tmp_path / "exists").iterdir()) == []
    (tmp_path / "exists" / "file").write_text("x")
    with pytest.raises(CannotWriteError, match=r"^cannot write to work dir .*/file: Not a directory$"):
        check_writable_dir(tmp_path / "exists" / "file", "work dir")


def test_probe_tolerates_a_concurrent_run_making_the_folder(tmp_path, monkeypatch):
    """Array jobs start together: another run may create the output dir between our look and our
    mkdir. That is no error, and the folder, not being ours, stays."""
    real_mkdir = Path.mkdir

    def someone_else_was_first(self, *args, **kwargs):
        os.mkdir(self)  # the other run
        return real_mkdir(self, *args, **kwargs)  # now raises FileExistsError

    monkeypatch.setattr(Path, "mkdir", someone_else_was_first)
    check_writable_dir(tmp_path / "out", "output_dir")
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []


# --- no network, no writable home ---------------------------------------------------------------

def _fresh_environment(monkeypatch, home: str) -> None:
    for name in ("NIPYPE_NO_ET", "TEMPLATEFLOW_AUTOUPDATE", "TEMPLATEFLOW_HOME", "MPLCONFIGDIR",
                 "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        # setenv first so that teardown also removes what prepare_environment sets (delenv of
        # an unset variable records nothing to undo)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", home)


def test_prepare_environment_with_a_writable_home(tmp_path, monkeypatch):
    from dlf_bids.cli.environment import prepare_environment

    _fresh_environment(monkeypatch, str(tmp_path / "home"))
    monkeypatch.setenv("TEMPLATEFLOW_AUTOUPDATE", "1")  # the user's choice wins
    prepare_environment()
    assert os.environ["NIPYPE_NO_ET"] == "1" and os.environ["TEMPLATEFLOW_AUTOUPDATE"] == "1"
    # the caches stay where the libraries put them, and the probe created nothing there
    assert "MPLCONFIGDIR" not in os.environ and "TEMPLATEFLOW_HOME" not in os.environ
    assert not (tmp_path / "home").exists()


def test_prepare_environment_with_an_unwritable_home(tmp_path, monkeypatch):
    from dlf_bids.cli.environment import prepare_environment

    _fresh_environment(monkeypatch, "/dev/null/home")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))  # set by the user: kept
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    prepare_environment()
    assert os.environ["TEMPLATEFLOW_HOME"] == str(tmp_path / "tf")
    mpl = Path(os.environ["MPLCONFIGDIR"])
    assert mpl.parent.parent == tmp_path and mpl.parent.name.startswith("dlf-bids-cache-")
    assert os.environ["TEMPLATEFLOW_AUTOUPDATE"] == "0" and os.environ["NIPYPE_NO_ET"] == "1"


def test_prefilled_templateflow_home_in_a_read_only_home_is_kept(tmp_path, monkeypatch):
    """Singularity binds a read-only home: templates filled in there beforehand must stay
    visible (moving TEMPLATEFLOW_HOME to a temporary folder would hide them)."""
    import dlf_bids.cli.environment as environment

    home = tmp_path / "home"
    _fresh_environment(monkeypatch, str(home))
    prefilled = home / ".cache" / "templateflow" / "tpl-MNI152NLin2009cAsym"
    prefilled.mkdir(parents=True)
    (prefilled / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz").write_bytes(b"x")
    monkeypatch.setattr(environment, "_usable", lambda folder: False)  # as if read-only
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    environment.prepare_environment()
    assert "TEMPLATEFLOW_HOME" not in os.environ  # templateflow's default: the filled folder
    assert Path(os.environ["MPLCONFIGDIR"]).parent.name.startswith("dlf-bids-cache-")


NETWORK_GUARD = textwrap.dedent('''\
    """Test harness: every Internet connection attempt is logged and fails (Unix sockets work)."""
    import os
    import socket

    _LOG = os.environ["DLF_BIDS_TEST_NETWORK_LOG"]
    _INET = (socket.AF_INET, socket.AF_INET6)


    def _refuse(what):
        with open(_LOG, "a") as fh:
            fh.write(f"{os.getpid()} {what}\\n")
        raise OSError(f"network blocked by the dlf-bids test: {what}")


    def _guard(method):
        def guarded(self, address, *args):
            if self.family in _INET:
                _refuse(f"{method.__name__} {address!r}")
            return method(self, address, *args)
        return guarded


    socket.socket.connect = _guard(socket.socket.connect)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)
    _getaddrinfo = socket.getaddrinfo


    def getaddrinfo(host, port, family=0, *args, **kwargs):
        if family in (0, *_INET):
            _refuse(f"getaddrinfo {host!r}")
        return _getaddrinfo(host, port, family, *args, **kwargs)


    def create_connection(address, *args, **kwargs):
        _refuse(f"create_connection {address!r}")


    socket.getaddrinfo = getaddrinfo
    socket.create_connection = create_connection
    ''')


@pytest.mark.slow
def test_participant_run_needs_no_network_and_no_writable_home(demo_data, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NETWORK_GUARD)
    log = tmp_path / "network.log"
    log.touch()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NIPYPE_", "TEMPLATEFLOW_", "XDG_", "MPLCONFIGDIR"))}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "DLF_BIDS_TEST_NETWORK_LOG": str(log),
        # below a character device: cannot be created, not even by root (a read-only home)
        "HOME": "/dev/null/home",
        "TMPDIR": str(scratch),
    })
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dlf_bids.cli.run", str(demo_data.bids_dir), str(out), "participant",
         "--atlas-dir", str(demo_data.atlas_dir), "-w", str(tmp_path / "work"),
         "--participant-label", "01", "--fusion", "mv", "--registration-preset", "fast",
         "--nprocs", "2", "--skip-bids-validation"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "sub-01" / "anat" / "sub-01_seg-mv_dseg.nii.gz").is_file()
    assert log.read_text() == "", "network access attempted:\n" + log.read_text()
    assert "Traceback" not in proc.stderr
    assert "temporary cache directory" not in proc.stderr  # matplotlib's complaint was avoided
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("dlf-bids-cache-")]
