"""Shared fixtures: the real test data folder, BIDS skeletons from a compact spec, the demo data."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

# ITK fixes its default thread count at the first ITK call of a process, from this variable, and
# forked workers inherit it: a test calling antspyx here before any registration set it left every
# later in-process or forked registration multi-threaded, hence not repeatable (the same-seed
# tests failed in CI order). One thread from the start, as registrations ask for by default.
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")

import nibabel as nb
import numpy as np
import pytest
import torch

# Tests train and run networks in this process, then run Nipype graphs whose MultiProc workers are
# forked from it. Once torch has run a multi-threaded op here, a forked worker running torch hangs
# in the inherited OpenMP pool (dlf_bids.execution.torch_without_thread_pool); with one thread here
# no pool is ever started (workers inherit the one thread unless a node sets its own count: the
# tests' tiny networks do not mind).
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

DEFAULT_DESCRIPTION = {"Name": "dlf-bids test skeleton", "BIDSVersion": "1.10.0",
                       "DatasetType": "raw"}


def tiny_nifti(shape=(8, 8, 8), voxel_size=2.0, seed=0, dtype=np.int16) -> nb.Nifti1Image:
    """A small, valid 3D image with non-zero content (passes ``check_anatomical``)."""
    rng = np.random.default_rng(seed)
    data = (rng.random(shape) * 1000 + 1).astype(dtype)
    affine = np.diag([voxel_size, voxel_size, voxel_size, 1.0])
    img = nb.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_skeleton(root: Path, spec, description: dict | None | bool = None) -> Path:
    """Write a BIDS skeleton under ``root``.

    ``spec`` is an iterable of relative paths (empty files, like bids-examples) or a mapping
    ``relative path -> content`` where content is:

    * ``None`` or ``""``: an empty file;
    * ``"nii"``: a tiny real NIfTI image (8x8x8, non-zero);
    * a :class:`nibabel.Nifti1Image` or a numpy array: that image (array: 2 mm identity grid);
    * a ``dict`` or ``list``: JSON;
    * any other ``str`` or ``bytes``: written as is.

    ``dataset_description.json`` is added unless the spec has one or ``description is False``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    items = spec.items() if isinstance(spec, dict) else ((p, None) for p in spec)
    for rel, content in items:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None or content == "":
            path.write_bytes(b"")
        elif isinstance(content, str) and content == "nii":
            nb.save(tiny_nifti(seed=zlib.crc32(str(rel).encode())), path)
        elif isinstance(content, nb.Nifti1Image):
            nb.save(content, path)
        elif isinstance(content, np.ndarray):
            nb.save(nb.Nifti1Image(content, np.diag([2.0, 2.0, 2.0, 1.0])), path)
        elif isinstance(content, (dict, list)):
            path.write_text(json.dumps(content))
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(str(content))
    desc = root / "dataset_description.json"
    if description is not False and not desc.exists():
        desc.write_text(json.dumps(description or DEFAULT_DESCRIPTION))
    return root


def listing(root: Path) -> list[tuple[str, int]]:
    """Every path under ``root`` with its size (directories as -1)."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size if p.is_file() else -1)
                  for p in root.rglob("*"))


def the_error_line(err: str) -> str:
    """The single ``dlf-bids: error:`` line of stderr (and no traceback anywhere)."""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    assert errors[0].startswith("dlf-bids: error: "), err
    return errors[0]


def blob_phantom(seed: int, shape=(24, 24, 24), jitter: int = 1, radius_jitter: float = 0.5):
    """A synthetic 'head' (label 0) with two blobs (labels 2 and 41), T1w + T2w contrast.

    Blob centres move by up to ``jitter`` voxels and radii grow by up to ``radius_jitter``, so
    phantoms of different seeds differ the way registered atlases do. Returns (images (2, ...),
    labels)."""
    rng = np.random.default_rng(seed)
    shape = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float32)
    centre = np.array(shape, np.float32) / 2

    def ball(c, r):
        return ((g - np.asarray(c, np.float32)[:, None, None, None]) ** 2).sum(0) <= r * r

    head = ball(centre, min(shape) * 0.45)
    lab = np.zeros(shape, np.int16)
    off = rng.integers(-jitter, jitter + 1, 3)
    r = min(shape) / 6
    lab[ball(centre * np.array([1, 0.6, 1]) + off, r + radius_jitter * rng.random())] = 2
    lab[ball(centre * np.array([1, 1.4, 1]) + off, r + radius_jitter * rng.random())] = 41
    t1 = np.where(head, 50.0, 0.0) + np.where(lab == 2, 60, 0) + np.where(lab == 41, 110, 0)
    t2 = np.where(head, 120.0, 0.0) - np.where(lab == 2, 50, 0) - np.where(lab == 41, 90, 0)
    img = np.stack([t1, t2]).astype(np.float32)
    img += head * rng.normal(0, 3, img.shape).astype(np.float32)
    return img, lab


def assert_valid_bids(path: Path) -> None:
    """No bids-validator-deno errors in ``path``; the test skips where the validator is absent."""
    from dlf_bids.utils.validator import validate_dataset, validator_available

    if not validator_available():
        pytest.skip("bids-validator-deno not installed")
    result = validate_dataset(path)
    assert not result.errors, result.summary(20)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the project (real data, never copied into the repository)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bids_examples(shared_data) -> Path:
    path = shared_data / "bids-examples"
    if not path.is_dir():
        pytest.skip(f"bids-examples not found in {shared_data}")
    return path


@pytest.fixture
def make_skeleton():
    """``make_skeleton(root, spec, description=None) -> root``: see :func:`write_skeleton`."""
    return write_skeleton


@pytest.fixture
def nifti():
    """``nifti(shape=..., voxel_size=..., seed=...)``: a tiny valid image (see :func:`tiny_nifti`)."""
    return tiny_nifti


@pytest.fixture
def cli(tmp_path, capsys):
    """``cli(args) -> (exit code, stdout, stderr)`` through ``dlf-bids``'s ``main``; ``-w``
    defaults to a temporary folder."""
    from dlf_bids.cli.run import main

    def run(args, work=True):
        args = [str(a) for a in args]
        if work and "-w" not in args:
            args += ["-w", str(tmp_path / "work")]
        code = main(args)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A real small BIDS dataset + atlas library (2 subjects, 3 atlases, 3 mm), made once."""
    from dlf_bids.utils.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), n_subjects=2, n_atlases=3,
                          voxel_size=3.0)
