#!/usr/bin/env python
"""One registration, timed in one run: a DeepAtlas forward pass vs ``register_atlas`` (ANTs, fast).

Takes two FreeSurfer subjects of ``../shared/data/fs-training`` (``--moving``, ``--target``),
converts them the way ``loo_multiatlas.py`` does (brain-only crop, ``--voxel-size`` mm, default 2)
into a temporary library, then times with ``--threads`` threads (default 2), one after the other:

* ``deepatlas``: an *untrained* :class:`~dlf_bids.models.deepatlas.DeepAtlas` of the default size.
  The moving atlas is first resampled onto the target's grid through the scanner coordinates
  (FreeSurfer-conformed images are roughly aligned; DeepAtlas needs one grid and does no affine
  step), outside the timing. Timed: ``F_R`` + scaling and squaring alone (``network``), and
  :func:`~dlf_bids.models.deepatlas_inference.register` (normalisation, padding, ``F_R``, warping
  the image and the labels: ``helper``), each ``--repeats`` times (default 3, the fastest kept:
  the machine is shared) after one untimed warm-up call;
* ``ants``: :func:`dlf_bids.registration.register_atlas` with ``preset="fast"`` (affine + SyN,
  linear / genericLabel warps, files written), once, seed 0.

An untrained network costs what a trained one does (same operations), so the timing holds; its
output is the identity. Prints wall and CPU seconds (CPU well below wall x threads means the
run waited for cores) and the wall-time ratios ``ants / deepatlas``. Exit 66 when the data is
absent.

    python benchmarks/deepatlas_time.py --moving 01 --target 02 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from thread_env import limit_threads

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "fs-training"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--moving", default="01")
    p.add_argument("--target", default="02")
    p.add_argument("--voxel-size", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    subjects = [args.data / f"sub-{s}" for s in (args.moving, args.target)]
    missing = [str(d) for d in subjects if not (d / "T1.mgz").is_file() or not (d / "aseg.mgz").is_file()]
    if missing:
        print(f"no T1.mgz + aseg.mgz in {', '.join(missing)}: nothing to run", file=sys.stderr)
        return 66
    limit_threads(args.threads)

    import nibabel as nb
    import numpy as np
    import torch
    from nibabel.processing import resample_from_to

    from dlf_bids.models.deepatlas import DeepAtlas, DeepAtlasConfig
    from dlf_bids.models.deepatlas_inference import prepare_volume, register
    from dlf_bids.registration import register_atlas
    from dlf_bids.utils.freesurfer import convert_freesurfer_subject

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="deepatlas-time-") as tmp:
        tmp = Path(tmp)
        moving, target = (convert_freesurfer_subject(d / "T1.mgz", d / "aseg.mgz", tmp / "library", sid,
                                                     voxel_size=args.voxel_size, brain_only=True)
                          for d, sid in zip(subjects, (args.moving, args.target)))
        target_img = nb.load(str(target.t1w))
        target_t1 = np.asarray(target_img.dataobj, dtype=np.float32)
        moving_t1 = np.asarray(resample_from_to(nb.load(str(moving.t1w)), target_img, order=1).dataobj,
                               dtype=np.float32)
        moving_lab = np.asarray(resample_from_to(nb.load(str(moving.dseg)), target_img, order=0).dataobj,
                                dtype=np.int16)

        config = DeepAtlasConfig(n_labels=2)  # the label count does not touch F_R
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = DeepAtlas(config).eval()
        nets_in = [prepare_volume(a, 1, config.size_divisor)[None] for a in (moving_t1, target_t1)]

        def network():
            with torch.no_grad():
                model.registration(*nets_in)

        def helper():
            register(model, moving_t1, target_t1, moving_labels=moving_lab)

        def timed(fn) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - wall, time.process_time() - cpu

        times = {}
        for name, fn in (("network", network), ("helper", helper)):
            fn()  # warm-up: first-call allocations
            times[name] = min(timed(fn) for _ in range(max(1, args.repeats)))
        times["ants"] = timed(lambda: register_atlas(target.t1w, moving.t1w, moving.dseg, tmp / "ants",
                                                     preset="fast", seed=0, n_threads=args.threads))

    n_params = sum(p.numel() for p in model.registration.parameters())
    print(f"pair: sub-{args.moving} -> sub-{args.target}, {args.voxel_size:g} mm, grid {target_t1.shape} "
          f"(network input {tuple(nets_in[0].shape[2:])}), {args.threads} threads, torch {torch.__version__}")
    print(f"DeepAtlas F_R (default size, {n_params / 1e6:.2f} M parameters, "
          f"{config.integration_steps} squaring steps)")
    for label, key in (("  network forward (F_R + integration)", "network"),
                       ("  register() helper (+ normalise, pad, warp image and labels)", "helper"),
                       ("ANTs register_atlas, preset fast", "ants")):
        print(f"{label}: {times[key][0]:.2f} s wall, {times[key][1]:.2f} s CPU")
    print(f"ratio ants / deepatlas (wall): {times['ants'][0] / times['network'][0]:.1f}x (network), "
          f"{times['ants'][0] / times['helper'][0]:.1f}x (helper)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
