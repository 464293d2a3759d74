#!/usr/bin/env python
"""Peak memory of the DeepAtlas nodes (subject alignment, one atlas pass, the segmentation
network) against the subject's voxel count: the numbers behind ``resources.DEEPATLAS``.

Each step runs in a freshly spawned process (its ``ru_maxrss`` is its own peak, imports
included, 1 thread); the Nipype node adds ~150 MiB of its own, as for the other fits.

    python benchmarks/deepatlas_memory.py MODEL.pt TARGET_T1W ATLAS_T1W ATLAS_DSEG [...]
        (one or more TARGET/ATLAS/DSEG triples)
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from thread_env import limit_threads


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def step(name: str, model: str, target: str, atlas_t1w: str, atlas_dseg: str, work: str) -> float:
    limit_threads(1)
    from dlf_bids.deepatlas_registration import (align_to_reference, model_reference,
                                                 register_atlas_deepatlas, segment_deepatlas)

    work_p = Path(work)
    reference = work_p / "reference.nii.gz"
    if name == "prepare":  # reference, subject and atlas alignments (reused by the other steps)
        _, alignment = model_reference(model, reference)
        align_to_reference(atlas_t1w, reference, work_p / "atlas", n_threads=1, transform_type=alignment)
        align_to_reference(target, reference, work_p / "target", n_threads=1, transform_type=alignment)
        return _peak_mib()
    from dlf_bids.deepatlas_registration import AlignedImage

    aligned = {w: AlignedImage(work_p / w / "to_reference_0GenericAffine.mat",
                               work_p / w / "on_reference.nii.gz") for w in ("atlas", "target")}
    if name == "register":
        register_atlas_deepatlas(target, aligned["target"], atlas_t1w, atlas_dseg, aligned["atlas"],
                                 model, reference, work_p / "pair", n_threads=1)
    elif name == "segment":
        segment_deepatlas(target, aligned["target"], model, work_p / "seg.nii.gz")
    return _peak_mib()


def main(argv=None) -> int:
    import nibabel as nb
    import numpy as np

    argv = sys.argv[1:] if argv is None else argv
    model, triples = argv[0], argv[1:]
    if len(triples) % 3:
        raise SystemExit("give TARGET ATLAS_T1W ATLAS_DSEG triples")
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for i in range(0, len(triples), 3):
        target, atlas_t1w, atlas_dseg = triples[i:i + 3]
        voxels = int(np.prod(nb.load(target).shape[:3]))
        with tempfile.TemporaryDirectory() as work:
            row = {"target": target, "voxels": voxels}
            for name in ("prepare", "register", "segment"):
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    row[f"{name}_mib"] = round(pool.submit(step, name, model, target, atlas_t1w,
                                                           atlas_dseg, work).result(), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
