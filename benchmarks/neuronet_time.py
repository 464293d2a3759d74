#!/usr/bin/env python
"""CPU inference time and peak memory of NeuroNet on a 1 mm 256³ whole-head T1.

An untrained NeuroNet of the paper's encoder size (stem 16; scales 16/32/64/128, strides
1/2/2/2, two residual units per scale) with two decoders, ``tissue`` (4 classes) and ``aseg``
(40 classes, an aseg-like label set), segments ``../shared/data/fs-training/sub-01/T1.mgz`` with
:func:`dlf_bids.models.neuronet.predict_volume`: 128³ windows at overlap 0.5 (stride 64, the
paper's) and at overlap 0.25. Weights do not change the arithmetic, so an untrained network times
the same as a trained one. Each overlap runs in its own freshly spawned process with
``--threads`` torch threads; printed: wall and CPU seconds of the prediction (z-score, windows,
argmax), and the process's peak RSS (``ru_maxrss``, imports and the loaded image included).
The issue's target is under 30 s on 2 CPU cores. Exits 66 when the shared data is absent.

    python benchmarks/neuronet_time.py --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from thread_env import limit_threads

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T1 = DATA / "fs-training" / "sub-01" / "T1.mgz"
EXIT_MISSING_INPUT = 66


def predict_task(threads: int, overlap: float, roi: int) -> dict:
    limit_threads(threads)  # before torch/numpy load their thread pools
    import nibabel as nb
    import numpy as np
    import torch

    from dlf_bids.models.neuronet import NeuroNet, NeuroNetConfig, predict_volume

    torch.set_num_threads(threads)
    image = np.asarray(nb.load(T1).dataobj, dtype=np.float32)
    torch.manual_seed(0)
    model = NeuroNet(NeuroNetConfig({"tissue": 4, "aseg": 40}, crop_size=(roi,) * 3)).eval()
    start, cpu = time.perf_counter(), time.process_time()
    pred = predict_volume(model, image, overlap=overlap)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"overlap": overlap, "wall_s": wall, "cpu_s": cpu, "shape": list(image.shape),
            "outputs": {k: list(v.probabilities.shape) for k, v in pred.items()},
            "parameters": sum(p.numel() for p in model.parameters()),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--roi", type=int, default=128)
    args = parser.parse_args(argv)
    if not T1.is_file():
        print(f"neuronet_time: {T1} not found (the shared data lives in ../shared/data)", file=sys.stderr)
        return EXIT_MISSING_INPUT
    ctx = multiprocessing.get_context("spawn")  # a fresh process per run: its own peak RSS
    for overlap in args.overlaps:
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            r = pool.submit(predict_task, args.threads, overlap, args.roi).result()
        print(f"overlap {r['overlap']:.2f} (stride {round(args.roi * (1 - r['overlap']))}): "
              f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"[{args.threads} threads, image {r['shape']}, {r['parameters']:,} parameters, "
              f"outputs {r['outputs']}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
