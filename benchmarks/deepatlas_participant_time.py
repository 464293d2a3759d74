#!/usr/bin/env python
"""End-to-end ``dlf-bids participant`` time, ``--registration ants`` vs ``deepatlas``, one run.

One held-out subject of the ``loo_multiatlas.py`` 2 mm cache as the BIDS dataset, the other four
as the atlas library (symbolic links), the fold's DeepAtlas model from ``deepatlas_loo.py``. Each
engine runs the real command in a fresh work dir (``--nprocs 2``, JLF and MV), one after the
other; the script prints wall seconds and the mean Dice (40 aseg labels) of each output.

    python benchmarks/deepatlas_participant_time.py --from bench-out/loo-2mm \\
        --model bench-out/deepatlas-loo/fold-01/deepatlas_few-shot_joint.pt --fold 01
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loo_multiatlas as lma  # noqa: E402
from loo_dlf import _library_files  # noqa: E402


def make_inputs(cache: Path, out: Path, fold: str) -> tuple[Path, Path]:
    bids, library = out / "bids", out / "atlases"
    for root in (bids, library):
        shutil.rmtree(root, ignore_errors=True)
    anat = bids / f"sub-{fold}" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "fold", "BIDSVersion": "1.10.0"}))
    (anat / f"sub-{fold}_T1w.nii.gz").symlink_to(_library_files(cache, fold)[0].resolve())
    library.mkdir(parents=True)
    for name in ("dataset_description.json", "dseg.tsv"):
        shutil.copy(cache / "library" / name, library / name)
    for s in lma.DEFAULT_SUBJECTS:
        if s == fold:
            continue
        (library / f"sub-{s}" / "anat").mkdir(parents=True)
        for f in _library_files(cache, s):
            (library / f"sub-{s}" / "anat" / f.name).symlink_to(f.resolve())
    return bids, library


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="cache", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--fold", default="01")
    p.add_argument("--out", type=Path, default=Path("bench-out/deepatlas-participant"))
    args = p.parse_args(argv)
    cache, out = args.cache.absolute(), args.out.absolute()
    bids, library = make_inputs(cache, out, args.fold)
    truth = np.asanyarray(nb.load(str(_library_files(cache, args.fold)[1])).dataobj).astype(np.int32)
    rows = {}
    for engine in ("ants", "deepatlas"):
        for d in (f"work-{engine}", f"out-{engine}"):
            shutil.rmtree(out / d, ignore_errors=True)
        cmd = ["dlf-bids", str(bids), str(out / f"out-{engine}"), "participant", "--atlas-dir", str(library),
               "--fusion", "jlf", "mv", "--registration", engine, "-w", str(out / f"work-{engine}"),
               "--nprocs", "2", "--skip-bids-validation"]
        if engine == "deepatlas":
            cmd += ["--deepatlas-model", str(args.model.absolute())]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{engine} run failed: {proc.stderr[-2000:]}")
        dice = {}
        for method in ("jlf", "mv") + (("deepatlas",) if engine == "deepatlas" else ()):
            seg = out / f"out-{engine}" / f"sub-{args.fold}" / "anat" / f"sub-{args.fold}_seg-{method}_dseg.nii.gz"
            dice[method] = lma._mean_dice(lma.dice_per_label(
                truth, np.asanyarray(nb.load(str(seg)).dataobj).astype(np.int32)))
        rows[engine] = {"seconds": seconds, "dice": dice, "command": cmd}
        print(engine, f"{seconds:.0f} s", {k: round(v, 3) for k, v in dice.items()}, flush=True)
    print(f"ants / deepatlas wall time: {rows['ants']['seconds'] / rows['deepatlas']['seconds']:.1f}x")
    lma._write_json(out / "results.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
