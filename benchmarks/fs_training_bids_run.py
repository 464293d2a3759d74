"""Acceptance run on real 1 mm data: fs-training as a BIDS dataset, through the dlf-bids CLI.

sub-01 and sub-02 of ../shared/data/fs-training become a raw BIDS dataset (whole-head T1.mgz as
T1w, FreeSurfer-conformed 256³ 1 mm); sub-03, sub-04 and sub-06 become the atlas library
(dlf-bids-fs2atlas, cropped to the brain). Then participant (MV + JLF) and group levels run, the
output is validated, and Dice against each subject's own aseg is printed with the wall times.

    python benchmarks/fs_training_bids_run.py --out bench-out/fs-bids [--preset quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fs-training"
TARGETS, ATLASES = ("01", "02"), ("03", "04", "06")
# aseg labels scored (../shared/data/README.md; tiny/absent structures left out)
EVAL_LABELS = [2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 31, 41, 42, 43,
               44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60, 63, 77, 251, 252, 253, 254, 255]


def make_bids(root: Path) -> Path:
    bids = root / "bids"
    (bids).mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({
        "Name": "fs-training as BIDS (dlf-bids acceptance run)", "BIDSVersion": "1.10.0",
        "DatasetType": "raw", "Authors": ["dlf-bids developers", "FreeSurfer training data"]}))
    (bids / "README").write_text("Two real T1w images (FreeSurfer T1.mgz, 1 mm) for an acceptance run.\n")
    for sub in TARGETS:
        anat = bids / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        img = nb.load(SHARED / f"sub-{sub}" / "T1.mgz")
        nb.save(nb.Nifti1Image(np.asanyarray(img.dataobj).astype(np.uint8), img.affine),
                anat / f"sub-{sub}_T1w.nii.gz")
        (anat / f"sub-{sub}_T1w.json").write_text("{}")
    return bids


def make_library(library: Path, atlases) -> Path:
    """The fs-training ``atlases`` as a brain-cropped 1 mm atlas library (made once, then reused)."""
    from dlf_bids.cli.fs2atlas import main as fs2atlas

    if not library.exists():
        fs2atlas([str(SHARED / f"sub-{a}") for a in atlases] + ["--library", str(library), "--brain-only"])
    return library


def main(argv=None) -> int:
    from dlf_bids.cli.run import main as dlf_bids
    from dlf_bids.evaluation import mean_dice
    from dlf_bids.utils.validator import validate_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/fs-bids"))
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--nprocs", type=int, default=2)
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"no {SHARED}: nothing to run", file=sys.stderr)
        return 66
    out = args.out.absolute()
    bids = make_bids(out)
    library = make_library(out / "atlases", ATLASES)
    deriv = out / "derivatives"
    t0 = time.time()
    code = dlf_bids([str(bids), str(deriv), "participant", "--atlas-dir", str(library), "--fusion",
                     "mv", "jlf", "--registration-preset", args.preset, "-w", str(out / "work"),
                     "--nprocs", str(args.nprocs)])
    participant_s = time.time() - t0
    code = code or dlf_bids([str(bids), str(deriv), "group"])
    result = validate_dataset(deriv)
    print(f"\nparticipant level: {participant_s:.0f} s (exit {code}); validator: "
          f"{len(result.errors)} errors, {len(result.warnings)} warnings")
    print("| subject | mv | jlf |\n|---|---|---|")
    for sub in TARGETS:
        truth = np.asanyarray(nb.load(SHARED / f"sub-{sub}" / "aseg.mgz").dataobj)
        row = [f"{mean_dice(np.asanyarray(nb.load(deriv / f'sub-{sub}/anat/sub-{sub}_seg-{m}_dseg.nii.gz').dataobj), truth, EVAL_LABELS):.3f}"
               for m in ("mv", "jlf")]
        print(f"| sub-{sub} | {' | '.join(row)} |")
    return code


if __name__ == "__main__":
    sys.exit(main())
