#!/usr/bin/env python
"""Held-out NeuroNet on fs-training: agreement with each teacher, tissue Dice, speed-up.

For each held-out subject of ``../shared/data/fs-training`` (5 FreeSurfer subjects), or with
``--test-subjects`` once for a held-out set (one training, each listed subject evaluated):

1. the other subjects are the atlas library (``dlf-bids-fs2atlas``: FreeSurfer's raw whole-head
   ``T1.mgz`` resampled to ``--voxel-size``, labels = aseg; with ``--brain-only`` cropped to the
   labels + 10 mm);
2. ``dlf-bids-train-neuronet`` trains a model on them (each with the others as its atlases) for
   the protocols ``atropos`` (N4 + Atropos in the multi-atlas brain mask), ``tissue`` (the aseg
   collapse below applied to the multi-atlas fusion), ``structures`` (the fused aseg labels) and
   ``library`` (each subject's own FreeSurfer aseg);
3. on the held-out subject, in the same process and one after the other: the teachers run from a
   fresh work dir (registrations, fusion, Atropos: their wall time) and NeuroNet segments it
   (:func:`dlf_bids.neuronet_segmentation.neuronet_segment`: model load, resampling, sliding
   window, writing; its wall time). The ratio teachers / NeuroNet is the speed-up.
4. Dice of NeuroNet's label map against each teacher's for the same protocol (mean over the
   classes present in either), and tissue Dice of NeuroNet's ``atropos`` and ``tissue`` outputs
   (and of the teachers themselves) against the held-out subject's own FreeSurfer aseg collapsed
   to GM/WM/CSF by :data:`dlf_bids.models.protocols.ASEG_TO_TISSUE`: GM = cerebral and cerebellar
   cortex + deep grey nuclei (thalamus, caudate, putamen, pallidum, hippocampus, amygdala,
   accumbens, ventral DC) + vessel + non-WM hypointensities; WM = cerebral and cerebellar WM,
   brain-stem, corpus callosum, WM hypointensities, optic chiasm; CSF = ventricles, CSF (24) and
   choroid plexus. FreeSurfer's CSF is the ventricles, Atropos's also the sulci: CSF Dice against
   FreeSurfer measures that difference as much as errors, so GM/WM are also reported alone.

5. the speed target's case: the held-out subject's whole-head 1 mm ``T1.mgz`` (256³, as NIfTI)
   segmented by :func:`neuronet_segment` in a freshly spawned process with ``--threads`` torch
   threads: wall time and peak RSS (the issue's target: under 30 s on 2 CPU cores), and the
   tissue Dice of its ``atropos`` and ``tissue`` outputs against the 1 mm aseg collapsed as above.

Results go to ``--out/results.json`` and ``results.md`` (rewritten after every fold).

    python benchmarks/neuronet_loo.py --out bench-out/neuronet-loo-2mm --voxel-size 2
    # one training on 02 03 04, evaluated on 01 and 06
    python benchmarks/neuronet_loo.py --out bench-out/neuronet-heldout --test-subjects 01 06
    # then only the speed ratio against teachers at another preset, same model and atlases
    python benchmarks/neuronet_loo.py --out bench-out/neuronet-heldout --folds 01 --preset quick \
        --ratio-only bench-out/neuronet-heldout/fold-01-06/neuronet.pt
    # end-to-end check only (minutes): 3 subjects at 3 mm, a tiny network, a few iterations
    python benchmarks/neuronet_loo.py --out bench-out/neuronet-loo-check --voxel-size 3 \\
        --subjects 01 02 03 --network tiny --crop-size 32 --iterations 5 --preset fast --fusion mv
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from thread_env import limit_threads

from dlf_bids.evaluation import dice_per_label, mean_dice

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fs-training"
SUBJECTS = ("01", "02", "03", "04", "06")
PROTOCOLS = ("atropos", "tissue", "structures", "library")


def mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def segment_task(t1w: str, model: str, out_dir: str, threads: int, whole_grid: bool = True) -> dict:
    """In a fresh process: :func:`neuronet_segment` on one image, wall time, peak RSS and the
    label maps written; ``whole_grid=False``: always the training crop, slid with overlap 0.5."""
    limit_threads(threads)
    import torch

    from dlf_bids import neuronet_segmentation

    torch.set_num_threads(threads)
    if not whole_grid:
        neuronet_segmentation.WHOLE_GRID_VOXELS = 0
    start = time.perf_counter()
    result = neuronet_segmentation.neuronet_segment(t1w, model, out_dir, overlap=0.5)
    return {"wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "dsegs": {name: str(path) for name, path in result.dsegs.items()}}


def tissue_dice(seg: np.ndarray, truth: np.ndarray) -> dict:
    """GM/WM/CSF Dice of a BIDS-tissue label map against the collapsed aseg, and GM+WM's mean."""
    d = dice_per_label(seg, truth, (1, 2, 3))
    return {"GM": round(d[1], 4), "WM": round(d[2], 4), "CSF": round(d[3], 4),
            "mean_GM_WM": round(mean([d[1], d[2]]), 4)}


def time_whole_head(args, held_out: str, model: Path, fold: Path) -> dict:
    """:func:`segment_task` on the subject's 1 mm whole head, and the tissue Dice of its
    tissue protocols against the 1 mm aseg."""
    from concurrent.futures import ProcessPoolExecutor

    from dlf_bids.models.protocols import ASEG_TO_TISSUE, collapse_labels

    mgz = nb.load(DATA / f"sub-{held_out}" / "T1.mgz")
    t1w = fold / f"sub-{held_out}_1mm_T1w.nii.gz"
    nb.save(nb.Nifti1Image(np.asanyarray(mgz.dataobj), mgz.affine), t1w)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        run = pool.submit(segment_task, str(t1w), str(model), str(fold / f"neuronet-1mm-{held_out}"),
                          args.threads).result()
    truth = collapse_labels(np.asanyarray(nb.load(DATA / f"sub-{held_out}" / "aseg.mgz").dataobj),
                            ASEG_TO_TISSUE)
    dsegs = run.pop("dsegs")
    run["tissue_vs_freesurfer"] = {
        name: tissue_dice(np.asanyarray(nb.load(dsegs[name]).dataobj), truth)
        for name in ("atropos", "tissue") if name in dsegs}
    return run


def fold_library(all_dir: Path, fold_dir: Path, atlas_ids) -> Path:
    """A library of some converted subjects (root files copied, atlases linked)."""
    lib = fold_dir / "library"
    if lib.exists():
        shutil.rmtree(lib)
    lib.mkdir(parents=True)
    for name in ("dataset_description.json", "dseg.tsv"):
        shutil.copy(all_dir / name, lib / name)
    for a in atlas_ids:
        (lib / f"sub-{a}").symlink_to(all_dir / f"sub-{a}", target_is_directory=True)
    return lib


def teachers_then_neuronet(args, all_dir: Path, library, protocols, subject: str, model: Path,
                           fold: Path, preset: str):
    """In this process, one after the other: the held-out subject's teachers from an empty work
    dir (what NeuroNet replaces) and :func:`neuronet_segment`. Returns (teacher label maps,
    NeuroNet's result, teachers' seconds, NeuroNet's seconds)."""
    from dlf_bids.cli.train_neuronet import run_teachers
    from dlf_bids.neuronet_segmentation import neuronet_segment
    from dlf_bids.workflows.teachers import TeacherCase

    t1w = all_dir / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
    aseg_file = all_dir / f"sub-{subject}" / "anat" / f"sub-{subject}_dseg.nii.gz"
    case = TeacherCase("heldout", t1w, library.atlases, aseg_file)
    test_work = fold / f"test-work-{subject}-{preset}"
    shutil.rmtree(test_work, ignore_errors=True)
    t0 = time.perf_counter()
    teacher_files = run_teachers([case], protocols, test_work, preset, args.seed, args.fusion,
                                 args.nprocs)[0]["heldout"]
    teachers_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = neuronet_segment(t1w, model, fold / f"neuronet-out-{subject}", device=args.device)
    return teacher_files, result, teachers_s, time.perf_counter() - t0


def time_against_teachers(args, all_dir: Path, model: Path) -> None:
    """``--ratio-only``: the speed ratio alone, teachers at ``--preset``, for each ``--folds``
    subject, with the trained fold's library and ``MODEL``."""
    from dlf_bids.models.protocols import resolve_protocol
    from dlf_bids.utils.atlas_library import load_atlas_library

    fold = model.parent
    library = load_atlas_library(fold / "library")
    protocols = [resolve_protocol(p, library.labels) for p in PROTOCOLS]
    for subject in args.folds or args.subjects:
        _, _, teachers_s, neuronet_s = teachers_then_neuronet(
            args, all_dir, library, protocols, subject, model, fold, args.preset)
        print(f"sub-{subject}: teachers ({args.preset}) {teachers_s:.1f} s, NeuroNet "
              f"{neuronet_s:.1f} s, ratio {teachers_s / neuronet_s:.1f}x", flush=True)


def run_fold(args, all_dir: Path, held_out: list[str]) -> list[dict]:
    """Train on the subjects not in ``held_out``; a result row per held-out subject."""
    from dlf_bids.cli.train_neuronet import main as train_main
    from dlf_bids.models.protocols import ASEG_TO_TISSUE, collapse_labels, resolve_protocol
    from dlf_bids.utils.atlas_library import load_atlas_library

    fold = args.out / f"fold-{'-'.join(held_out)}"
    others = [s for s in args.subjects if s not in held_out]
    lib = fold_library(all_dir, fold, others)
    model = fold / "neuronet.pt"
    t0 = time.perf_counter()
    code = train_main([str(lib), str(model), "-w", str(fold / "train-work"), "--protocols",
                       *PROTOCOLS, "--teacher-fusion", args.fusion, "--registration-preset",
                       args.preset, "--network", args.network, "--crop-size", str(args.crop_size),
                       "--iterations", str(args.iterations), "--nprocs", str(args.nprocs),
                       "--threads", str(args.threads), "--seed", str(args.seed),
                       "--foreground-ratio", str(args.foreground_ratio),
                       "--class-weights", args.class_weights])
    if code:
        raise SystemExit(f"training without sub-{', sub-'.join(held_out)} failed (exit {code})")
    train_s = time.perf_counter() - t0

    library = load_atlas_library(lib)
    protocols = [resolve_protocol(p, library.labels) for p in PROTOCOLS]
    rows = []
    for subject in held_out:
        aseg_file = all_dir / f"sub-{subject}" / "anat" / f"sub-{subject}_dseg.nii.gz"
        teacher_files, result, teachers_s, neuronet_s = teachers_then_neuronet(
            args, all_dir, library, protocols, subject, model, fold, args.preset)
        whole_head = time_whole_head(args, subject, model, fold)

        truth = collapse_labels(np.asanyarray(nb.load(aseg_file).dataobj), ASEG_TO_TISSUE)
        row = {"held_out": subject, "trained_on": others, "train_s": round(train_s, 1),
               "teachers_s": round(teachers_s, 1), "neuronet_s": round(neuronet_s, 1),
               "speedup": round(teachers_s / neuronet_s, 2), "whole_head_1mm": whole_head,
               "agreement": {}, "tissue_vs_freesurfer": {}}
        for p in protocols:
            ours = np.asanyarray(nb.load(result.dsegs[p.name]).dataobj)
            teacher = np.asanyarray(nb.load(teacher_files[p.name]).dataobj)
            present = sorted((set(np.unique(ours)) | set(np.unique(teacher))) - {0})
            row["agreement"][p.name] = round(mean_dice(ours, teacher, present), 4)
            if p.name in ("atropos", "tissue"):
                for who, seg in (("neuronet", ours), ("teacher", teacher)):
                    row["tissue_vs_freesurfer"][f"{p.name}_{who}"] = tissue_dice(seg, truth)
        rows.append(row)
    return rows


def write_results(out: Path, args, rows) -> None:
    summary = {
        "agreement": {p: round(mean(r["agreement"][p] for r in rows), 4) for p in PROTOCOLS},
        "speedup": round(mean(r["speedup"] for r in rows), 2),
        "neuronet_s": round(mean(r["neuronet_s"] for r in rows), 1),
        "teachers_s": round(mean(r["teachers_s"] for r in rows), 1),
        "whole_head_1mm_s": round(mean(r["whole_head_1mm"]["wall_s"] for r in rows), 1),
    }
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps(
        {"settings": settings, "folds": rows, "summary": summary,
         "complete": len(rows) == len(args.test_subjects or args.folds or args.subjects)},
        indent=2))
    lines = ["| held out | " + " | ".join(f"Dice vs {p} teacher" for p in PROTOCOLS)
             + " | tissue GM/WM/CSF vs FS (NeuroNet atropos) | teachers s | NeuroNet s | ratio"
             " | 1 mm whole head s (peak GiB) | 1 mm tissue GM/WM/CSF vs FS (tissue decoder) |",
             "|---" * (len(PROTOCOLS) + 7) + "|"]
    for r in rows:
        t = r["tissue_vs_freesurfer"].get("atropos_neuronet", {})
        lines.append(f"| sub-{r['held_out']} | " + " | ".join(f"{r['agreement'][p]:.3f}" for p in PROTOCOLS)
                     + f" | {t.get('GM', float('nan')):.3f}/{t.get('WM', float('nan')):.3f}/"
                       f"{t.get('CSF', float('nan')):.3f} | {r['teachers_s']:.0f} | "
                       f"{r['neuronet_s']:.1f} | {r['speedup']:.1f}x | "
                       f"{r['whole_head_1mm']['wall_s']:.1f} ({r['whole_head_1mm']['peak_rss_gib']:.1f}) | "
                     + "/".join(f"{r['whole_head_1mm']['tissue_vs_freesurfer']['tissue'][k]:.3f}"
                                for k in ("GM", "WM", "CSF")) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/neuronet-loo"))
    parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS))
    parser.add_argument("--folds", nargs="+", help="held-out subjects (default: every subject)")
    parser.add_argument("--test-subjects", nargs="+",
                        help="one training on the other subjects, evaluated on each of these")
    parser.add_argument("--voxel-size", type=float, default=2.0, help="grid of the library (mm)")
    parser.add_argument("--brain-only", action="store_true",
                        help="library images cropped to the brain (default: whole heads)")
    parser.add_argument("--foreground-ratio", type=float, default=0.5)
    parser.add_argument("--class-weights", choices=["inverse-sqrt", "none"], default="inverse-sqrt",
                        help="the training's cross-entropy class weights (none: runs before 2026-12-04)")
    parser.add_argument("--preset", default="quick", help="registration preset of the teachers")
    parser.add_argument("--fusion", choices=["mv", "jlf"], default="jlf")
    parser.add_argument("--network", default="small", help="tiny, small or paper")
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--whole-head-only", type=Path, metavar="MODEL",
                        help="only time MODEL on the --folds subjects' 1 mm whole heads")
    parser.add_argument("--ratio-only", type=Path, metavar="MODEL",
                        help="only the teachers (--preset) vs NeuroNet time of the --folds "
                             "subjects, with MODEL and its fold's library")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"neuronet_loo: {DATA} not found (the shared data lives in ../shared/data)",
              file=sys.stderr)
        return 66
    if len(args.subjects) < 3:
        print("neuronet_loo: at least 3 subjects (each fold trains on >= 2)", file=sys.stderr)
        return 64
    from dlf_bids.cli.fs2atlas import main as fs2atlas

    args.out = args.out.absolute()
    if args.whole_head_only:
        for subject in args.folds or args.subjects:
            where = args.out / "whole-head" / f"sub-{subject}"
            where.mkdir(parents=True, exist_ok=True)
            print(f"sub-{subject}: {time_whole_head(args, subject, args.whole_head_only, where)}", flush=True)
        return 0
    all_dir = args.out / "all-subjects"
    if args.ratio_only:
        time_against_teachers(args, all_dir, args.ratio_only.absolute())
        return 0
    missing = [s for s in args.subjects if not (all_dir / f"sub-{s}").is_dir()]
    if missing:
        code = fs2atlas([str(DATA / f"sub-{s}") for s in missing]
                        + ["--library", str(all_dir), "--voxel-size", str(args.voxel_size)]
                        + (["--brain-only"] if args.brain_only else []))
        if code:
            return code
    rows = []
    held_out_sets = [args.test_subjects] if args.test_subjects else [[s] for s in args.folds or args.subjects]
    for held_out in held_out_sets:
        rows.extend(run_fold(args, all_dir, held_out))
        write_results(args.out, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
