"""``dlf-bids-demo OUTDIR``: build a small dataset from real anatomy, segment it, show the result.

The dataset and atlas library come from the MNI152 2009a template that nilearn ships (see
:mod:`dlf_bids.utils.demo_data`), so the demo needs no download and no data of your own. With
``dlf`` among the fusion methods (the default) the demo first trains a small Deep Label Fusion
model on its own atlas library (``dlf-bids-train``: the atlases registered to each other, then a
short training run) and segments the subjects with it next to JLF and majority voting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from .environment import prepare_environment


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlf-bids-demo",
        description="Make a demo BIDS dataset and atlas library, then run dlf-bids' participant "
                    "and group levels on it and report Dice against the known truth.",
    )
    parser.add_argument("out_dir", type=Path, help="folder for the demo data and results")
    parser.add_argument("--subjects", type=int, default=3, help="number of subjects (default 3)")
    parser.add_argument("--atlases", type=int, default=4, help="number of atlases (default 4)")
    parser.add_argument("--voxel-size", type=float, default=2.0, help="mm (default 2)")
    parser.add_argument("--fusion", nargs="+", default=["dlf", "jlf", "mv"],
                        help="fusion methods (default: dlf jlf mv; dlf trains a model first)")
    parser.add_argument("--dlf-epochs", type=int, default=8, help="DLF training epochs (default 8)")
    parser.add_argument("--dlf-iterations", type=int, default=40,
                        help="DLF training patches per epoch (default 40)")
    parser.add_argument("--registration-preset", default="fast",
                        help="registration preset (default fast: seconds per atlas)")
    parser.add_argument("--nprocs", type=int, default=None, help="parallel processes")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def report_dice(output_dir: Path, truth_dir: Path, methods) -> dict[str, float]:
    """Mean Dice of each method's segmentations against the demo's truth."""
    from ..evaluation import mean_dice

    means = {}
    for method in methods:
        scores = []
        for seg_file in sorted(output_dir.glob(f"sub-*/anat/*_seg-{method}_dseg.nii.gz")):
            subject = seg_file.name.split("_")[0]
            truth = np.asanyarray(nb.load(truth_dir / f"{subject}_dseg.nii.gz").dataobj)
            seg = np.asanyarray(nb.load(seg_file).dataobj)
            scores.append(mean_dice(seg, truth, [v for v in np.unique(truth) if v]))
        means[method] = float(np.mean(scores)) if scores else float("nan")
    return means


def train_demo_model(atlas_dir: Path, out: Path, args) -> int:
    """A tiny DLF model trained on the demo's atlas library (minutes on a laptop CPU)."""
    from .train import main as train_main

    return train_main([str(atlas_dir), str(out / "dlf-demo.pt"), "-w", str(out / "work-train"),
                       "--network", "tiny", "--patch-size", "32", "--epochs", str(args.dlf_epochs),
                       "--iterations", str(args.dlf_iterations),
                       "--lr-step", str(max(1, (3 * args.dlf_epochs) // 4)), "--val-fraction", "0",
                       "--registration-preset", args.registration_preset, "--seed", str(args.seed),
                       "--device", "cpu", *(["--nprocs", str(args.nprocs)] if args.nprocs else [])])


def main(argv=None) -> int:
    prepare_environment()  # before the imports below can pull in matplotlib or nipype
    from ..utils.demo_data import make_demo_data
    from .run import main as dlf_bids_main

    args = build_parser().parse_args(argv)
    out = args.out_dir.absolute()
    started = time.time()
    print(f"dlf-bids-demo: making {args.subjects} subjects and {args.atlases} atlases in {out}")
    data = make_demo_data(out / "data", n_subjects=args.subjects, n_atlases=args.atlases,
                          seed=args.seed, voxel_size=args.voxel_size)
    results = out / "derivatives"
    common = [str(data.bids_dir), str(results)]
    participant = common + ["participant", "--atlas-dir", str(data.atlas_dir), "-w", str(out / "work"),
                            "--fusion", *args.fusion, "--registration-preset",
                            args.registration_preset, "--seed", str(args.seed)]
    if args.nprocs:
        participant += ["--nprocs", str(args.nprocs)]
    if "dlf" in args.fusion:
        print("dlf-bids-demo: training a tiny DLF model on the demo atlas library")
        code = train_demo_model(data.atlas_dir, out, args)
        if code != 0:
            print(f"dlf-bids-demo: DLF training failed (exit {code})", file=sys.stderr)
            return code
        participant += ["--dlf-model", str(out / "dlf-demo.pt"), "--device", "cpu"]
    code = dlf_bids_main(participant)
    if code != 0:
        print(f"dlf-bids-demo: participant level failed (exit {code})", file=sys.stderr)
        return code
    code = dlf_bids_main(common + ["group"])
    if code != 0:
        return code
    for method, dice in report_dice(results, data.truth_dir, args.fusion).items():
        print(f"dlf-bids-demo: mean Dice vs truth, {method}: {dice:.3f}")
    print(f"dlf-bids-demo: done in {time.time() - started:.0f} s")
    print(f"  input dataset : {data.bids_dir}")
    print(f"  atlas library : {data.atlas_dir}")
    print(f"  results       : {results}")
    print(f"  group report  : {results / 'group_report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
