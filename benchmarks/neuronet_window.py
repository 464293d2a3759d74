#!/usr/bin/env python
"""NeuroNet inference as one whole-grid window vs MONAI's sliding windows: time and agreement.

:func:`dlf_bids.neuronet_segmentation.neuronet_segment` runs the whole model grid as one window
when it fits (:data:`~dlf_bids.neuronet_segmentation.WHOLE_GRID_VOXELS`), else the training crop
slid with overlap 0.5. This runs one trained model on each given T1w both ways, each in a freshly
spawned process with ``--threads`` torch threads, and prints the wall time of each and, per
protocol, the Dice between the two label maps (mean over the labels present in either) and the
fraction of voxels whose label differs.

    python benchmarks/neuronet_window.py MODEL T1W [T1W ...] --out bench-out/neuronet-window
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nb
import numpy as np
from neuronet_loo import segment_task  # benchmarks/ is the script's folder

from dlf_bids.evaluation import mean_dice


def agreement(a: Path, b: Path) -> tuple[float, float]:
    x, y = (np.asanyarray(nb.load(p).dataobj) for p in (a, b))
    labels = sorted((set(np.unique(x)) | set(np.unique(y))) - {0})
    return mean_dice(x, y, labels), float(np.mean(x != y))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("t1w", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("bench-out/neuronet-window"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    for t1w in args.t1w:
        dirs, times = {}, {}
        for whole in (True, False):
            name = "whole-grid" if whole else "sliding"
            dirs[name] = args.out / t1w.name.split(".")[0] / name
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                times[name] = pool.submit(segment_task, str(t1w), str(args.model), str(dirs[name]),
                                          args.threads, whole).result()["wall_s"]
        print(f"{t1w.name}: whole grid {times['whole-grid']:.1f} s, sliding windows (overlap 0.5) "
              f"{times['sliding']:.1f} s ({times['sliding'] / times['whole-grid']:.1f}x)", flush=True)
        for dseg in sorted(dirs["whole-grid"].glob("*_dseg.nii.gz")):
            dice, changed = agreement(dseg, dirs["sliding"] / dseg.name)
            print(f"  {dseg.name}: Dice whole vs sliding {dice:.4f}, voxels differing {changed:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
