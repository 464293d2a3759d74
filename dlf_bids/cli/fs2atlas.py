"""``dlf-bids-fs2atlas``: add FreeSurfer subjects (T1.mgz + aseg.mgz) to an atlas library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import EXIT_OK, DlfBidsError, UsageError
from ..utils.freesurfer import (
    BRAIN_MARGIN_MM,
    atlas_id_from_folder,
    check_atlas_id,
    convert_freesurfer_subject,
    find_freesurfer_files,
)
from .environment import prepare_environment

PROG = "dlf-bids-fs2atlas"

DESCRIPTION = """\
Convert FreeSurfer subjects into atlases of a dlf-bids atlas library: T1.mgz becomes
sub-<id>_T1w.nii.gz and aseg.mgz the label map sub-<id>_dseg.nii.gz on the same grid
(same world coordinates). The library (dataset_description.json, and dseg.tsv with the
FreeSurfer aseg labels) is created if needed. Each FS_SUBJECT_DIR is searched for
mri/T1.mgz and mri/aseg.mgz first, then T1.mgz and aseg.mgz.
"""

EPILOG = f"""examples:
  # two recon-all subjects, atlas ids 'bert' and 'ernie'
  {PROG} $SUBJECTS_DIR/bert $SUBJECTS_DIR/ernie --library atlases/

  # small, fast 3 mm test atlases cropped to the brain (atlas ids '01' and '02')
  {PROG} fs/sub-01 fs/sub-02 --library atlases-3mm/ --voxel-size 3 --brain-only

  # files with other names
  {PROG} --t1 sample_T1.mgz --aseg sample_aseg.mgz --atlas-id sample --library atlases/
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`UsageError` (exit code 64, one line)."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (also used to render the documentation)."""
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("subject_dirs", nargs="*", type=Path, metavar="FS_SUBJECT_DIR",
                        help="FreeSurfer subject folder (with mri/T1.mgz and mri/aseg.mgz, "
                             "or T1.mgz and aseg.mgz directly in it)")
    parser.add_argument("--library", required=True, type=Path, metavar="LIBRARY_DIR",
                        help="atlas library to add to (created if it does not exist)")
    parser.add_argument("--atlas-id", metavar="ID",
                        help="atlas id (letters and digits; only with a single subject). "
                             "Default: the subject folder's name without 'sub-' and "
                             "non-alphanumeric characters")
    parser.add_argument("--t1", type=Path, metavar="FILE",
                        help="T1 image to use instead of searching FS_SUBJECT_DIR (needs --aseg)")
    parser.add_argument("--aseg", type=Path, metavar="FILE",
                        help="aseg label map on the T1 grid (needs --t1)")
    parser.add_argument("--voxel-size", type=float, metavar="MM",
                        help="resample to isotropic voxels of MM mm over the same field of view "
                             "(T1: anti-aliased linear, or cubic spline when upsampling; "
                             "labels: nearest neighbour)")
    parser.add_argument("--brain-only", action="store_true",
                        help=f"crop to the labelled brain plus {BRAIN_MARGIN_MM:g} mm")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace atlases that already exist in the library")
    return parser


def _plan(args) -> list[tuple[Path, Path, str]]:
    """``(t1, aseg, atlas_id)`` per atlas to write, after checking the arguments fit together."""
    if args.voxel_size is not None and not args.voxel_size > 0:
        raise UsageError(f"--voxel-size must be positive, not {args.voxel_size:g}")
    if (args.t1 is None) != (args.aseg is None):
        raise UsageError("--t1 and --aseg go together")
    if args.t1 is not None:
        if len(args.subject_dirs) > 1:
            raise UsageError("--t1/--aseg name one subject: give at most one FS_SUBJECT_DIR")
        folder = args.subject_dirs[0] if args.subject_dirs else args.t1.parent
        atlas_id = check_atlas_id(args.atlas_id) if args.atlas_id else atlas_id_from_folder(folder)
        return [(args.t1, args.aseg, atlas_id)]
    if not args.subject_dirs:
        raise UsageError("give at least one FS_SUBJECT_DIR, or --t1 and --aseg")
    if args.atlas_id and len(args.subject_dirs) > 1:
        raise UsageError("--atlas-id needs a single FS_SUBJECT_DIR")
    jobs = []
    for folder in args.subject_dirs:
        atlas_id = check_atlas_id(args.atlas_id) if args.atlas_id else atlas_id_from_folder(folder)
        jobs.append((*find_freesurfer_files(folder), atlas_id))
    _check_unique_ids(jobs)
    return jobs


def _check_unique_ids(jobs) -> None:
    seen = {}
    for t1, _, atlas_id in jobs:
        if atlas_id in seen:
            raise UsageError(f"{seen[atlas_id]} and {t1} would both become atlas sub-{atlas_id}")
        seen[atlas_id] = t1


def _refuse_existing(jobs, library: Path, overwrite: bool) -> None:
    """Fail before converting anything, rather than after half of a multi-subject run."""
    if overwrite:
        return
    for _, _, atlas_id in jobs:
        if (library / f"sub-{atlas_id}").exists():
            raise UsageError(
                f"atlas sub-{atlas_id} already exists in {library} (--overwrite replaces it)"
            )


def _describe(atlas) -> str:
    """One line saying what was written, read back from the files (header only for the grid)."""
    dseg = nb.load(atlas.dseg)
    shape = "x".join(str(n) for n in dseg.shape[:3])
    zooms = "x".join(f"{z:g}" for z in dseg.header.get_zooms()[:3])
    # bincount, not np.unique: no sort of millions of voxels; labels were checked non-negative.
    n_labels = int(np.count_nonzero(np.bincount(np.asanyarray(dseg.dataobj).ravel())[1:]))
    where = atlas.t1w.parent.parent
    return f"sub-{atlas.atlas_id}: {where} ({shape} voxels of {zooms} mm, {n_labels} labels)"


def main(argv=None) -> int:
    """Run the command; return the exit code (0, or that of the :class:`DlfBidsError`)."""
    prepare_environment()
    try:
        args = build_parser().parse_args(argv)
        jobs = _plan(args)
        _refuse_existing(jobs, args.library, args.overwrite)
        for t1, aseg, atlas_id in jobs:
            atlas = convert_freesurfer_subject(t1, aseg, args.library, atlas_id,
                                               voxel_size=args.voxel_size,
                                               brain_only=args.brain_only,
                                               overwrite=args.overwrite)
            print(_describe(atlas))
    except DlfBidsError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
