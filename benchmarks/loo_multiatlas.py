#!/usr/bin/env python
"""Leave-one-out multi-atlas segmentation benchmark on the FreeSurfer training subjects.

Each subject of ``../shared/data/fs-training`` (relative to the project root) is segmented with
the other subjects as atlases, using dlf-bids' own pure functions:

1. ``convert_freesurfer_subject`` turns every subject's ``T1.mgz`` + ``aseg.mgz`` into a NIfTI
   atlas (cropped to the labels + 10 mm, optionally resampled to ``--voxel-size``);
2. ``register_atlas`` registers every other subject to the target (one ITK thread per pair);
3. ``majority_vote`` and ``joint_label_fusion`` fuse the warped atlases;
4. Dice per aseg label against the target's own aseg (on the target's benchmark grid), plus an
   oracle bound: the target's true label wherever at least ``--oracle-fraction`` of the
   registered atlases carry it, the majority-vote label elsewhere.

Every registration and every fusion runs in a fresh worker process (at most ``--jobs`` at a time),
so each one's peak resident memory (``ru_maxrss``) is its own. Registrations and fusions are cached
in the output folder with their timings (a second run reuses them and says so in
``results.json``); ``results.json`` and ``results.md`` are rewritten after every finished task,
so an interrupted run leaves partial numbers.

    python benchmarks/loo_multiatlas.py --voxel-size 2 --preset quick --out bench-out/loo-2mm
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from thread_env import limit_threads

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "fs-training"
DEFAULT_SUBJECTS = ("01", "02", "03", "04", "06")

# Aseg labels scored in the mean Dice: those the data README lists, without vessel (30/62),
# 5th ventricle (72), 80-82 and optic chiasm (85), which are tiny or absent in some subjects.
EVAL_LABELS = (
    2, 41, 3, 42, 4, 43, 5, 44, 7, 46, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52,
    14, 15, 16, 17, 53, 18, 54, 24, 26, 58, 28, 60, 31, 63, 77, 251, 252, 253, 254, 255,
)
METHODS = ("mv", "jlf")


def _maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _source_hash(module) -> str:
    """Short sha256 of a module's source file: other people edit dlf_bids while benchmarks run."""
    import hashlib

    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:12]


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# --- scoring ------------------------------------------------------------------------------------

def dice_per_label(truth: np.ndarray, seg: np.ndarray, labels=EVAL_LABELS) -> dict[str, float | None]:
    """:func:`dlf_bids.evaluation.dice_per_label` keyed by label string, ``None`` where the label
    is in neither image (not scored): the JSON form of the results files."""
    from dlf_bids.evaluation import dice_per_label as dice

    return {str(lab): None if math.isnan(v) else v for lab, v in dice(seg, truth, labels).items()}


def oracle_segmentation(stack: np.ndarray, truth: np.ndarray, fallback: np.ndarray,
                        fraction: float) -> tuple[np.ndarray, int]:
    """True label where >= ``fraction`` of the atlases carry it, else ``fallback`` (the MV label).

    Returns the segmentation and the minimum number of agreeing atlases this means.
    """
    n_atlases = stack.shape[0]
    min_count = max(1, math.ceil(fraction * n_atlases - 1e-9))
    agree = (stack == truth[None]).sum(axis=0)
    return np.where(agree >= min_count, truth, fallback), min_count


# --- worker tasks (top-level functions: they run in spawned processes) ----------------------------

def register_task(target_t1w: str, atlas_t1w: str, atlas_dseg: str, out_dir: str,
                  preset: str, seed: int) -> dict:
    limit_threads(1)
    import dlf_bids.registration
    from dlf_bids.registration import register_atlas

    start, cpu_start = time.perf_counter(), _cpu_seconds()
    warped = register_atlas(target_t1w, atlas_t1w, atlas_dseg, out_dir, preset=preset,
                            seed=seed, n_threads=1)
    seconds = time.perf_counter() - start
    record = {
        "seconds": seconds,
        # CPU time well below wall time means the task waited for a core (shared machine).
        "cpu_seconds": _cpu_seconds() - cpu_start,
        "maxrss_mb": _maxrss_mb(),
        "preset": preset,
        "seed": seed,
        "source_sha256": {"dlf_bids/registration.py": _source_hash(dlf_bids.registration)},
        "t1w": str(warped.t1w),
        "dseg": str(warped.dseg),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    # Written last: its presence marks a complete, reusable registration.
    _write_json(Path(out_dir) / "timing.json", record)
    return record


def fusion_task(method: str, target_t1w: str, truth_dseg: str, warped_t1ws: list[str],
                warped_dsegs: list[str], out_file: str, oracle_fraction: float,
                atlas_ids: list[str]) -> dict:
    limit_threads(1)
    import nibabel as nb

    import dlf_bids.fusion
    from dlf_bids.fusion import joint_label_fusion, load_label_stack, majority_vote, save_labels

    truth = np.asanyarray(nb.load(truth_dseg).dataobj).astype(np.int32)
    record = {"method": method, "atlases": list(atlas_ids),
              "source_sha256": {"dlf_bids/fusion.py": _source_hash(dlf_bids.fusion)}}
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    if method == "mv":
        stack, _ = load_label_stack(warped_dsegs)
        seg = majority_vote(stack)
    elif method == "jlf":
        seg = joint_label_fusion(target_t1w, warped_t1ws, warped_dsegs, n_threads=1)
    else:
        raise ValueError(method)
    record["seconds"] = time.perf_counter() - start
    record["cpu_seconds"] = _cpu_seconds() - cpu_start
    if seg.shape != truth.shape:
        raise RuntimeError(f"{method} segmentation has shape {seg.shape}, truth {truth.shape}")
    save_labels(seg, truth_dseg, out_file)
    record["dice"] = dice_per_label(truth, seg)
    record["voxel_accuracy_in_truth_foreground"] = float(np.mean(seg[truth > 0] == truth[truth > 0]))
    if method == "mv":
        oracle, min_count = oracle_segmentation(stack, truth, seg, oracle_fraction)
        record["oracle"] = {
            "fraction": oracle_fraction,
            "min_atlases": min_count,
            "n_atlases": int(stack.shape[0]),
            "dice": dice_per_label(truth, oracle),
            # Share of the truth's foreground voxels where the oracle may pick the true label.
            "coverage_in_truth_foreground": float(np.mean(
                (stack == truth[None]).sum(axis=0)[truth > 0] >= min_count)),
        }
    record["maxrss_mb"] = _maxrss_mb()
    record["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    _write_json(Path(out_file).with_suffix("").with_suffix(".json"), record)
    return record


# --- summary --------------------------------------------------------------------------------------

def _mean_dice(dice: dict) -> float:
    values = [v for v in dice.values() if v is not None]
    return float(np.mean(values)) if values else float("nan")


def _stats(values) -> dict:
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"n": 0}
    arr = np.asarray(values)
    return {"n": len(values), "mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def summarize(state: dict) -> dict:
    regs = state["registrations"]
    fusions = state["fusions"]
    summary = {"registration": {
        "pairs_done": len(regs),
        "pairs_total": state["pairs_total"],
        "pairs_computed_this_run": sum(1 for r in regs.values() if not r.get("cached")),
        "seconds_per_pair": _stats(r["seconds"] for r in regs.values()),
        "cpu_seconds_per_pair": _stats(r.get("cpu_seconds") for r in regs.values()),
        "peak_rss_mb": max((r["maxrss_mb"] for r in regs.values()), default=None),
    }, "methods": {}, "per_label": {}}
    rows = {m: {} for m in METHODS}
    rows["oracle"] = {}
    for key, rec in fusions.items():
        subject, method = key.split(":")
        rows[method][subject] = rec
        if method == "mv" and "oracle" in rec:
            rows["oracle"][subject] = rec["oracle"]
    for method, recs in rows.items():
        if not recs:
            continue
        per_subject = {s: _mean_dice(r["dice"]) for s, r in sorted(recs.items())}
        entry = {"subjects": sorted(recs), "mean_dice_per_subject": per_subject,
                 "mean_dice": _stats(per_subject.values())}
        if method != "oracle":
            entry["fusion_seconds_per_subject"] = _stats(r["seconds"] for r in recs.values())
            entry["fusion_cpu_seconds_per_subject"] = _stats(r.get("cpu_seconds")
                                                            for r in recs.values())
            entry["peak_rss_mb"] = max(r["maxrss_mb"] for r in recs.values())
            entry["computed_this_run"] = sum(1 for r in recs.values() if not r.get("cached"))
            entry["voxel_accuracy_in_truth_foreground"] = _stats(
                r["voxel_accuracy_in_truth_foreground"] for r in recs.values())
        else:
            entry["min_atlases"] = "/".join(str(n) for n in sorted({r["min_atlases"] for r in recs.values()}))
            entry["coverage_in_truth_foreground"] = _stats(
                r["coverage_in_truth_foreground"] for r in recs.values())
        summary["methods"][method] = entry
        summary["per_label"][method] = {
            str(lab): _stats(r["dice"][str(lab)] for r in recs.values()) for lab in EVAL_LABELS
        }
    return summary


def _fmt(stats: dict, key="mean", digits=3) -> str:
    return "—" if not stats or stats.get("n", 0) == 0 else f"{stats[key]:.{digits}f}"


def markdown(state: dict, summary: dict) -> str:
    from dlf_bids.utils.freesurfer import freesurfer_label_table

    names = {lab.index: lab.name for lab in freesurfer_label_table().labels}
    reg = summary["registration"]
    reg_s = reg["seconds_per_pair"]
    reg_txt = "—" if reg_s.get("n", 0) == 0 else (
        f"{reg_s['mean']:.1f} ± {reg_s['std']:.1f} (CPU {_fmt(reg['cpu_seconds_per_pair'], digits=1)})")
    cfg = state["config"]
    lines = [
        f"LOO multi-atlas, {len(cfg['subjects'])} subjects, voxel size "
        f"{cfg['voxel_size_label']}, preset {cfg['preset']}; registrations "
        f"{reg['pairs_done']}/{reg['pairs_total']} ({reg['pairs_computed_this_run']} computed "
        f"this run); peak RSS per registration worker "
        f"{reg['peak_rss_mb'] or float('nan'):.0f} MiB",
        "",
        "| method | subjects | mean Dice | std over subjects | registration s/pair (wall ± std, CPU) "
        "| fusion s/subject (wall ± std, CPU) | peak RSS fusion (MiB) | peak RSS registration (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in (*METHODS, "oracle"):
        entry = summary["methods"].get(method)
        if entry is None:
            continue
        dice = entry["mean_dice"]
        if method == "oracle":
            label = f"oracle({cfg['oracle_fraction']:.0%}, ≥{entry['min_atlases']} atlas)"
            lines.append(f"| {label} | {dice['n']} | {_fmt(dice)} | {_fmt(dice, 'std')} "
                         "| — | — | — | — |")
            continue
        fus = entry["fusion_seconds_per_subject"]
        lines.append(
            f"| {method} | {dice['n']} | {_fmt(dice)} | {_fmt(dice, 'std')} | {reg_txt} "
            f"| {fus['mean']:.1f} ± {fus['std']:.1f} "
            f"(CPU {_fmt(entry['fusion_cpu_seconds_per_subject'], digits=1)}) "
            f"| {entry['peak_rss_mb']:.0f} "
            f"| {reg['peak_rss_mb'] or float('nan'):.0f} |"
        )
    lines += ["", "Per-subject mean Dice:", "",
              "| subject | " + " | ".join(m for m in (*METHODS, "oracle")
                                       if m in summary["methods"]) + " |",
              "|---|" + "---|" * sum(m in summary["methods"] for m in (*METHODS, "oracle"))]
    for subject in cfg["subjects"]:
        cells = []
        for m in (*METHODS, "oracle"):
            if m in summary["methods"]:
                v = summary["methods"][m]["mean_dice_per_subject"].get(subject)
                cells.append("—" if v is None else f"{v:.3f}")
        lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    lines += ["", f"Main process peak RSS {state.get('main_process_peak_rss_mb', float('nan')):.0f} MiB; "
              f"largest finished worker (RUSAGE_CHILDREN) {state.get('children_peak_rss_mb', float('nan')):.0f} MiB; "
              f"{cfg['jobs']} workers at a time, 1 thread each; wall time so far "
              f"{state.get('wall_seconds', 0):.0f} s."]
    present = [m for m in (*METHODS, "oracle") if m in summary["per_label"]]
    if present:
        lines += ["", "Per-label Dice (mean over subjects):", "",
                  "| label | name | " + " | ".join(present) + " |",
                  "|---|---|" + "---|" * len(present)]
        for lab in EVAL_LABELS:
            cells = [_fmt(summary["per_label"][m][str(lab)]) for m in present]
            lines.append(f"| {lab} | {names.get(lab, '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voxel-size", type=float, default=2.0,
                   help="isotropic voxel size (mm) of the cropped images; 1 keeps the native grid")
    p.add_argument("--preset", default="quick", help="registration preset (fast, quick, accurate)")
    p.add_argument("--out", type=Path, required=True, help="output (and cache) folder")
    p.add_argument("--subjects", nargs="+", default=list(DEFAULT_SUBJECTS))
    p.add_argument("--targets", nargs="+", default=None,
                   help="register to and fuse only these held-out subjects (default: every subject); "
                        "e.g. one target for a timing run")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="fs-training folder")
    p.add_argument("--skip-jlf", action="store_true", help="majority vote only")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="registration seed")
    p.add_argument("--oracle-fraction", type=float, default=0.10)
    p.add_argument("--redo-fusion", action="store_true",
                   help="recompute the fusions even if cached (registrations stay cached)")
    return p.parse_args(argv)


def convert_task(subject_dir: str, library: str, subject: str, voxel_size: float | None) -> dict:
    import dlf_bids.utils.freesurfer
    from dlf_bids.utils.freesurfer import convert_freesurfer_subject

    start = time.perf_counter()
    atlas = convert_freesurfer_subject(Path(subject_dir) / "T1.mgz", Path(subject_dir) / "aseg.mgz",
                                       library, subject, voxel_size=voxel_size, brain_only=True,
                                       overwrite=True)
    return {"t1w": str(atlas.t1w), "dseg": str(atlas.dseg),
            "seconds": time.perf_counter() - start, "maxrss_mb": _maxrss_mb(),
            "source_sha256": {"dlf_bids/utils/freesurfer.py": _source_hash(dlf_bids.utils.freesurfer)}}


def prepare_library(args, out: Path, native: bool, pool) -> tuple[dict, dict]:
    """Convert the subjects into a cropped NIfTI library (in workers: keeps the main process small,
    which matters because a spawned worker's ru_maxrss starts at its parent's RSS at fork time)."""
    library = out / "library"
    atlases, futures, conversions = {}, {}, {}
    for subject in args.subjects:
        t1w = library / f"sub-{subject}" / "anat" / f"sub-{subject}_T1w.nii.gz"
        dseg = library / f"sub-{subject}" / "anat" / f"sub-{subject}_dseg.nii.gz"
        if t1w.is_file() and dseg.is_file():
            atlases[subject] = (str(t1w), str(dseg))
        else:
            futures[subject] = pool.submit(convert_task, str(args.data / f"sub-{subject}"),
                                           str(library), subject, None if native else args.voxel_size)
            if not (library / "dataset_description.json").is_file():
                futures[subject].result()  # the first one writes the library's root files alone
    for subject, fut in futures.items():
        rec = fut.result()
        print(f"converted sub-{subject} in {rec['seconds']:.1f} s (peak {rec['maxrss_mb']:.0f} MiB)",
              flush=True)
        atlases[subject] = (rec["t1w"], rec["dseg"])
        conversions[subject] = rec
    return atlases, conversions


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"fs-training data not found at {args.data}; nothing to benchmark (skipped)")
        return 0
    if len(args.subjects) < 2:
        print("need at least 2 subjects for leave-one-out", file=sys.stderr)
        return 2
    if args.targets and not set(args.targets) <= set(args.subjects):
        print(f"--targets {args.targets} must be among --subjects {args.subjects}", file=sys.stderr)
        return 2
    if not 1 <= args.jobs <= 2:
        print("--jobs must be 1 or 2 (the benchmark machine is shared)", file=sys.stderr)
        return 2
    limit_threads(1)  # inherited by the spawned workers

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    # fs-training is FreeSurfer-conformed 1 mm: --voxel-size 1 keeps the native grid (no resampling)
    native = abs(args.voxel_size - 1.0) < 1e-6
    methods = ("mv",) if args.skip_jlf else METHODS
    if "jlf" in methods and len(args.subjects) < 3:
        # antspyx's joint_label_fusion indexes label_list[1]: it needs at least 2 atlases.
        print("joint label fusion needs at least 2 atlases (3 subjects); running MV only")
        methods = ("mv",)
    config = {"voxel_size_mm": args.voxel_size,
              "voxel_size_label": "1 mm (native grid)" if native else f"{args.voxel_size:g} mm",
              "preset": args.preset, "seed": args.seed, "subjects": list(args.subjects),
              "methods": list(methods), "oracle_fraction": args.oracle_fraction,
              "eval_labels": list(EVAL_LABELS), "brain_only": True, "jobs": args.jobs,
              "threads_per_task": 1, "data": str(args.data)}
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        for key in ("voxel_size_mm", "preset", "seed"):
            if old.get(key) != config[key]:
                print(f"{out} holds a run with {key}={old.get(key)!r}, not {config[key]!r}; "
                      "use another --out", file=sys.stderr)
                return 2
    _write_json(cfg_file, {k: config[k] for k in ("voxel_size_mm", "preset", "seed")})

    targets = list(args.targets or args.subjects)  # held-out subjects registered to and fused
    run_start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    # One fresh process per task: each task's ru_maxrss is its own peak.
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1)
    atlases, conversions = prepare_library(args, out, native, pool)
    state = {
        "config": config,
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "conversions": conversions, "registrations": {}, "fusions": {},
        "pairs_total": len(targets) * (len(args.subjects) - 1),
    }

    def save_state(final=False):
        summary = summarize(state)
        state["summary"] = summary
        state["wall_seconds"] = time.perf_counter() - run_start
        state["complete"] = final
        state["main_process_peak_rss_mb"] = _maxrss_mb(resource.RUSAGE_SELF)
        # Largest single finished (reaped) worker, not a sum: concurrent workers add up.
        state["children_peak_rss_mb"] = _maxrss_mb(resource.RUSAGE_CHILDREN)
        _write_json(out / "results.json", state)
        (out / "results.md").write_text(markdown(state, summary))

    # Work list: registrations in target order; a target's fusions become ready once its
    # registrations are done and are then run before further registrations (partial results).
    pending_regs = []
    for target in targets:
        for atlas in args.subjects:
            if atlas == target:
                continue
            reg_dir = out / "registrations" / f"target-{target}_atlas-{atlas}"
            timing = reg_dir / "timing.json"
            if timing.is_file():
                rec = json.loads(timing.read_text())
                rec["cached"] = True
                state["registrations"][f"{target}:{atlas}"] = rec
            else:
                pending_regs.append((target, atlas, reg_dir))
    fusion_dir = out / "fusion"
    fusion_dir.mkdir(exist_ok=True)
    fusion_started = set()
    ready_fusions = []

    def queue_ready_fusions():
        for target in targets:
            if target in fusion_started:
                continue
            keys = [f"{target}:{a}" for a in args.subjects if a != target]
            if not all(k in state["registrations"] for k in keys):
                continue
            fusion_started.add(target)
            regs = [state["registrations"][k] for k in keys]
            for method in methods:
                seg_file = fusion_dir / f"sub-{target}_{method}_dseg.nii.gz"
                rec_file = fusion_dir / f"sub-{target}_{method}_dseg.json"
                atlas_ids = [a for a in args.subjects if a != target]
                if rec_file.is_file() and seg_file.is_file() and not args.redo_fusion:
                    rec = json.loads(rec_file.read_text())
                    if rec.get("atlases") == atlas_ids:  # same atlas set, else recompute
                        rec["cached"] = True
                        state["fusions"][f"{target}:{method}"] = rec
                        continue
                ready_fusions.append(((target, method), fusion_task, (
                    method, atlases[target][0], atlases[target][1],
                    [r["t1w"] for r in regs], [r["dseg"] for r in regs], str(seg_file),
                    args.oracle_fraction, atlas_ids)))

    queue_ready_fusions()
    save_state()
    running = {}
    with pool:
        while pending_regs or ready_fusions or running:
            while len(running) < args.jobs and (ready_fusions or pending_regs):
                if ready_fusions:
                    key, fn, fargs = ready_fusions.pop(0)
                    running[pool.submit(fn, *fargs)] = ("fusion", key)
                else:
                    target, atlas, reg_dir = pending_regs.pop(0)
                    fut = pool.submit(register_task, atlases[target][0], atlases[atlas][0],
                                      atlases[atlas][1], str(reg_dir), args.preset, args.seed)
                    running[fut] = ("registration", (target, atlas))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                kind, key = running.pop(fut)
                rec = fut.result()  # a failure ends the run; finished work stays cached
                rec["cached"] = False
                if kind == "registration":
                    state["registrations"][":".join(key)] = rec
                    print(f"registered atlas {key[1]} -> target {key[0]}: {rec['seconds']:.1f} s "
                          f"(CPU {rec['cpu_seconds']:.1f} s), "
                          f"peak {rec['maxrss_mb']:.0f} MiB", flush=True)
                else:
                    state["fusions"][":".join(key)] = rec
                    print(f"fused sub-{key[0]} with {key[1]}: {rec['seconds']:.1f} s "
                          f"(CPU {rec['cpu_seconds']:.1f} s), mean Dice "
                          f"{_mean_dice(rec['dice']):.4f}, peak {rec['maxrss_mb']:.0f} MiB",
                          flush=True)
            queue_ready_fusions()
            save_state()
    save_state(final=True)
    print()
    print((out / "results.md").read_text())
    print(f"wall time {state['wall_seconds']:.0f} s; results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
