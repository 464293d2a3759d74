#!/usr/bin/env python
"""Fusion cost on one subject, measured in one run: DLF inference vs joint label fusion.

Reads one target and its registered atlases from a ``loo_multiatlas.py`` cache (``--from``; the
1 mm cache is the issue's setting: a 157×156×199 brain, 4 atlases), then runs, one after the
other and each in its own freshly spawned process with ``--threads`` threads:

* ``jlf``: :func:`dlf_bids.fusion.joint_label_fusion` (antspyx, mm radii as in the participant
  workflow) with ``n_threads=--threads``;
* ``dlf``: :func:`dlf_bids.models.inference.predict` with the given model (``--model``), once per
  ``--overlaps`` value, ``torch.set_num_threads(--threads)``.

It prints wall and CPU seconds, peak RSS (``ru_maxrss`` of the task's process, imports included)
and, for information, Dice against the subject's aseg (40 labels, as in ``loo_multiatlas.py``).
The timing needs no particular model; a model trained at another voxel size gives timings that
hold but Dice values that do not mean much (say so when quoting them).

    python benchmarks/dlf_vs_jlf_time.py --from bench-out/loo-1mm --subject 01 \\
        --model bench-out/loo-2mm/dlf-small-p32-e12x50-n4-s0/fold-01/model.pt --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from thread_env import limit_threads  # noqa: E402
import loo_dlf as ld  # noqa: E402
import loo_multiatlas as lma  # noqa: E402


def _inputs(cache: Path, subject: str):
    subjects = json.loads((cache / "results.json").read_text())["config"]["subjects"]
    atlases = [a for a in subjects if a != subject]
    t1w, dseg = ld._library_files(cache, subject)
    regs = [ld._registration_files(cache, subject, a) for a in atlases]
    return t1w, dseg, atlases, regs


def _threads_env(threads: int) -> None:
    limit_threads(threads)


def jlf_task(cache: str, subject: str, threads: int) -> dict:
    _threads_env(threads)
    from dlf_bids.fusion import joint_label_fusion

    t1w, dseg, atlases, regs = _inputs(Path(cache), subject)
    start, cpu = time.perf_counter(), ld._cpu_seconds()
    seg = joint_label_fusion(str(t1w), [str(r[0]) for r in regs], [str(r[1]) for r in regs],
                             n_threads=threads)
    return _record("jlf", start, cpu, seg, dseg, atlases, threads)


def dlf_task(cache: str, subject: str, threads: int, model_file: str, overlap: float) -> dict:
    ld._worker_setup(threads)
    from dlf_bids.models.inference import predict
    from dlf_bids.models.model_file import load_model

    t1w, dseg, atlases, regs = _inputs(Path(cache), subject)
    target = ld._load(t1w, np.float32)[None]
    atlas_images = np.stack([ld._load(r[0], np.float32)[None] for r in regs])
    atlas_labels = np.stack([ld._load(r[1], np.int32) for r in regs])
    model, info = load_model(model_file, device="cpu")
    start, cpu = time.perf_counter(), ld._cpu_seconds()
    pred = predict(model, info, target, atlas_images, atlas_labels, device="cpu", overlap=overlap)
    rec = _record("dlf", start, cpu, pred.labels.astype(np.int32), dseg, atlases, threads)
    rec.update(overlap=overlap, patch_size=list(info.patch_size), model_file=model_file)
    return rec


def _record(method, start, cpu_start, seg, dseg, atlases, threads) -> dict:
    seconds, cpu = time.perf_counter() - start, ld._cpu_seconds() - cpu_start
    truth = ld._load(dseg, np.int32)
    return {"method": method, "seconds": seconds, "cpu_seconds": cpu, "threads": threads,
            "atlases": atlases, "shape": list(truth.shape), "maxrss_mb": lma._maxrss_mb(),
            "mean_dice": lma._mean_dice(lma.dice_per_label(truth, seg)),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="cache", type=Path, required=True, help="a loo_multiatlas.py output")
    p.add_argument("--subject", default="01")
    p.add_argument("--model", type=Path, required=True, help="a DLF model file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overlaps", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--skip-jlf", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default <from>/timing-sub-XX.json)")
    args = p.parse_args(argv)
    cache = args.cache.absolute()
    out = args.out or cache / f"timing-sub-{args.subject}.json"
    ctx = multiprocessing.get_context("spawn")
    jobs = [] if args.skip_jlf else [(jlf_task, (str(cache), args.subject, args.threads))]
    jobs += [(dlf_task, (str(cache), args.subject, args.threads, str(args.model.absolute()), o))
             for o in args.overlaps]
    results = []
    for fn, fn_args in jobs:
        with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
            rec = pool.submit(fn, *fn_args).result()
        results.append(rec)
        label = rec["method"] + (f" (overlap {rec['overlap']})" if "overlap" in rec else "")
        print(f"{label}: {rec['seconds']:.1f} s wall, {rec['cpu_seconds']:.1f} s CPU, "
              f"peak RSS {rec['maxrss_mb']:.0f} MiB, mean Dice {rec['mean_dice']:.3f}", flush=True)
        lma._write_json(out, {"subject": args.subject, "cache": str(cache), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
