#!/usr/bin/env python
"""Peak memory of NeuroNet inference against the estimate the participant level plans with.

Untrained model files (weights do not change the arithmetic or the memory) of the ``small`` and
``paper`` networks, at a 1 mm and a 2 mm model grid, with the built-in protocols ``atropos``
(4 channels) and ``aseg`` (FreeSurfer's structures), segment real T1w images with
:func:`dlf_bids.neuronet_segmentation.neuronet_segment`, each run in a freshly spawned process
with one torch thread; printed per case: native and model-grid voxels, the window, output
channels, peak RSS (``ru_maxrss``: imports, model and image included), and
:func:`dlf_bids.resources.neuronet_gb`'s estimate (without its margin) for the same case.

    python benchmarks/neuronet_memory.py --out bench-out/neuronet-memory
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from thread_env import limit_threads

import nibabel as nb
import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_model(path: Path, network: str, voxel_size: float, protocols) -> Path:
    import torch

    from dlf_bids.models.neuronet import NeuroNet, NeuroNetConfig
    from dlf_bids.models.neuronet_training import save_neuronet
    from dlf_bids.cli.train_neuronet import NETWORKS  # the trainer's network sizes
    from dlf_bids.models.protocols import builtin_protocol

    protos = [builtin_protocol(p) for p in protocols]
    stem, widths, strides = NETWORKS[network]
    torch.manual_seed(0)
    model = NeuroNet(NeuroNetConfig({p.name: p.n_classes for p in protos}, stem_channels=stem,
                                    widths=widths, strides=strides, crop_size=(64,) * 3))
    return save_neuronet(path, model, protos, ["T1w"],
                         train_settings={"voxel_size": [voxel_size] * 3})


def measure(t1w: str, model: str, out_dir: str) -> dict:
    limit_threads(1)
    import torch

    from dlf_bids.neuronet_segmentation import neuronet_segment

    torch.set_num_threads(1)
    neuronet_segment(t1w, model, out_dir)
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/neuronet-memory"))
    parser.add_argument("--cases", type=int, nargs="+", help="run only these rows (1-based)")
    args = parser.parse_args(argv)
    head = DATA / "fs-training" / "sub-01" / "T1.mgz"
    if not head.is_file():
        print(f"neuronet_memory: {head} not found", file=sys.stderr)
        return 66
    from dlf_bids.model_grid import to_model_grid
    from dlf_bids.resources import MARGIN, neuronet_gb
    from dlf_bids.neuronet_segmentation import inference_window, model_outputs

    args.out.mkdir(parents=True, exist_ok=True)
    images = {}
    mgz = nb.load(head)
    images["head-1mm"] = args.out / "head_1mm_T1w.nii.gz"
    nb.save(nb.Nifti1Image(np.asanyarray(mgz.dataobj), mgz.affine), images["head-1mm"])
    crop = to_model_grid(mgz, (2.0, 2.0, 2.0))  # a 2 mm whole head, RAS
    images["head-2mm"] = args.out / "head_2mm_T1w.nii.gz"
    nb.save(crop, images["head-2mm"])
    cases = [("small", 2.0, ("atropos",), "head-1mm"), ("small", 2.0, ("atropos", "aseg"), "head-1mm"),
             ("small", 2.0, ("atropos", "aseg"), "head-2mm"), ("paper", 2.0, ("atropos", "aseg"), "head-1mm"),
             ("small", 1.0, ("atropos", "aseg"), "head-1mm"), ("small", 1.0, ("atropos", "aseg"), "head-2mm")]
    ctx = multiprocessing.get_context("spawn")
    print("| network | model grid | protocols | image | native Mvox | grid Mvox | window | channels "
          "| peak MiB | estimate MiB |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    if args.cases:
        cases = [cases[i - 1] for i in args.cases]
    for network, voxel, protocols, image in cases:
        model = make_model(args.out / f"{network}-{voxel:g}mm-{'-'.join(protocols)}.pt", network, voxel,
                           protocols)
        outputs = model_outputs(str(model))
        native = nb.load(images[image])
        grid_shape = to_model_grid(native, (voxel,) * 3).shape
        window = inference_window(grid_shape, outputs.config)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            r = pool.submit(measure, str(images[image]), str(model), str(args.out / "seg")).result()
        estimate = (neuronet_gb(int(np.prod(native.shape)), int(np.prod(grid_shape)), int(np.prod(window)),
                                outputs.channels) * 1e9 / MARGIN / 2**20)
        print(f"| {network} | {voxel:g} mm | {'+'.join(protocols)} | {image} | "
              f"{np.prod(native.shape) / 1e6:.2f} | {np.prod(grid_shape) / 1e6:.2f} | "
              f"{'x'.join(map(str, window))} | {outputs.channels} | {r['peak_mib']:.0f} | {estimate:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
