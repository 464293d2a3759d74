#!/usr/bin/env python
"""Leave-one-subject-out Deep Label Fusion on the FreeSurfer training subjects.

Reuses the cache of ``loo_multiatlas.py`` (``--from``: its ``library/`` and every atlas→target
registration under ``registrations/target-XX_atlas-YY/``), so no registration is run. For each
held-out subject ``t`` (a *fold*):

1. training cases: every other subject ``a`` as target, with the remaining subjects (≠ t, ≠ a)
   already registered to it in the cache (T1w only: fs-training has no T2w); ``--val-fraction``
   of them are held out for validation inside :func:`~dlf_bids.models.training.train_dlf`;
2. ``train_dlf`` with the network / patch / epoch settings of the command line;
3. :func:`~dlf_bids.models.inference.predict` on ``t`` with its registered atlases (all other
   subjects, the same atlas set as MV/JLF);
4. Dice per aseg label against ``t``'s own labels with ``loo_multiatlas``'s label set and Dice
   function (imported, not copied).

Training and inference of a fold run each in a freshly spawned worker process (one at a time,
``--threads`` torch threads), so each one's ``ru_maxrss`` is its own peak, as in
``loo_multiatlas.py``. The MV and JLF rows of the table are read from the ``results.json`` of the
``--from`` folder (the same registrations, so the comparison is fair), restricted to the folds
run here. Outputs (``--out``, default ``<from>/dlf-<settings>``): ``fold-XX/`` (model, segmentation,
``train.json``, ``infer.json``; reused by a later run with the same settings unless ``--retrain``),
``results-dlf.json`` and ``results-dlf.md``.

    python benchmarks/loo_dlf.py --from bench-out/loo-2mm --network small --patch-size 48 \\
        --epochs 20 --iterations 100
    python benchmarks/loo_dlf.py --from bench-out/loo-2mm --folds 01 --network tiny \\
        --patch-size 32 --epochs 2 --iterations 10          # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from thread_env import limit_threads  # noqa: E402
import loo_multiatlas as lma  # noqa: E402  (EVAL_LABELS, dice_per_label, _mean_dice, _stats, ...)

from dlf_bids.models.training import TrainSettings as TS  # noqa: E402  (defaults of the flags)

METHODS = ("mv", "jlf", "dlf")


# --- cache layout ---------------------------------------------------------------------------------

def _library_files(cache: Path, subject: str) -> tuple[Path, Path]:
    anat = cache / "library" / f"sub-{subject}" / "anat"
    return anat / f"sub-{subject}_T1w.nii.gz", anat / f"sub-{subject}_dseg.nii.gz"


def _registration_files(cache: Path, target: str, atlas: str) -> tuple[Path, Path]:
    """Warped atlas T1w and labels of one cached registration (``timing.json`` marks it complete;
    its absolute paths are used when they exist, else the files next to it: a moved cache)."""
    reg_dir = cache / "registrations" / f"target-{target}_atlas-{atlas}"
    timing = reg_dir / "timing.json"
    if not timing.is_file():
        raise FileNotFoundError(f"registration atlas {atlas} -> target {target} missing in the cache "
                                f"({timing} does not exist): run loo_multiatlas.py on {cache} first")
    rec = json.loads(timing.read_text())
    out = []
    for key in ("t1w", "dseg"):
        path = Path(rec[key])
        out.append(path if path.is_file() else reg_dir / path.name)
    return out[0], out[1]


def _load(path, dtype) -> np.ndarray:
    import nibabel as nb

    return np.asanyarray(nb.load(str(path)).dataobj).astype(dtype)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_setup(threads: int):
    limit_threads(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


# --- worker tasks (top-level: they run in spawned processes) ------------------------------------

def train_task(cache: str, fold: str, subjects: list[str], network: str, settings: dict,
               threads: int, model_file: str) -> dict:
    torch = _worker_setup(threads)
    import dlf_bids.models.training
    from dlf_bids.cli.train import NETWORKS
    from dlf_bids.models.dlf import DLFConfig
    from dlf_bids.models.training import TrainingCase, TrainSettings, train_dlf
    from dlf_bids.utils.labels import read_label_table

    cache_p = Path(cache)
    table = read_label_table(cache_p / "library" / "dseg.tsv")
    start = time.perf_counter()
    cases = []
    for a in subjects:
        if a == fold:
            continue
        others = [b for b in subjects if b not in (fold, a)]
        t1w, dseg = _library_files(cache_p, a)
        regs = [_registration_files(cache_p, a, b) for b in others]
        cases.append(TrainingCase(
            target_images=_load(t1w, np.float32)[None],
            target_labels=_load(dseg, np.int32),
            atlas_images=np.stack([_load(r[0], np.float32)[None] for r in regs]),
            atlas_labels=np.stack([_load(r[1], np.int32) for r in regs]),
            case_id=a, atlas_ids=others))
    load_seconds = time.perf_counter() - start

    wv, ft = NETWORKS[network]
    config = DLFConfig(n_labels=len(table.labels) + 1, n_modalities=1, wv_channels=wv, ft_channels=ft)
    s = TrainSettings(**settings)
    rss_before = lma._maxrss_mb()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result = train_dlf(cases, table, config, s, ["T1w"], model_file, progress=False)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    iterations = s.epochs * s.iterations_per_epoch
    from dlf_bids.models.model_file import load_model

    _, info = load_model(model_file, device=None)
    ts = info.train_settings
    epoch_seconds = sum(h["seconds"] for h in result.history)
    return {
        "fold": fold,
        "network": network,
        "settings": settings,
        "training_cases": ts.get("training_cases"),
        "validation_cases": ts.get("validation_cases"),
        "atlases_per_case": {c.case_id: list(c.atlas_ids) for c in cases},
        "image_shapes": {c.case_id: list(c.target_labels.shape) for c in cases},
        "load_seconds": load_seconds,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "iterations": iterations,
        # wall time of the epochs (samples + forward/backward + validation) per iteration
        "seconds_per_iteration": epoch_seconds / iterations,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "threads": threads,
        "maxrss_mb": lma._maxrss_mb(),
        "maxrss_mb_before_training": rss_before,
        "torch_version": torch.__version__,
        "source_sha256": {"dlf_bids/models/training.py": lma._source_hash(dlf_bids.models.training)},
        "model_file": str(model_file),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def infer_task(cache: str, fold: str, subjects: list[str], model_file: str, threads: int,
               device: str, seg_file: str) -> dict:
    _worker_setup(threads)
    import dlf_bids.models.inference
    from dlf_bids.fusion import save_labels
    from dlf_bids.models.inference import predict
    from dlf_bids.models.model_file import load_model

    cache_p = Path(cache)
    atlas_ids = [b for b in subjects if b != fold]
    t1w, dseg = _library_files(cache_p, fold)
    regs = [_registration_files(cache_p, fold, b) for b in atlas_ids]
    target = _load(t1w, np.float32)[None]
    truth = _load(dseg, np.int32)
    atlas_images = np.stack([_load(r[0], np.float32)[None] for r in regs])
    atlas_labels = np.stack([_load(r[1], np.int32) for r in regs])
    from dlf_bids.models.inference import resolve_device

    device = str(resolve_device(device))
    model, info = load_model(model_file, device=device)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    pred = predict(model, info, target, atlas_images, atlas_labels, device=device)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_start
    seg = pred.labels.astype(np.int32)
    if seg.shape != truth.shape:
        raise RuntimeError(f"DLF segmentation has shape {seg.shape}, truth {truth.shape}")
    save_labels(seg, dseg, seg_file)
    return {
        "method": "dlf",
        "fold": fold,
        "atlases": atlas_ids,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "device": device,
        "threads": threads,
        "dice": lma.dice_per_label(truth, seg),
        "voxel_accuracy_in_truth_foreground": float(np.mean(seg[truth > 0] == truth[truth > 0])),
        "maxrss_mb": lma._maxrss_mb(),
        "source_sha256": {"dlf_bids/models/inference.py": lma._source_hash(dlf_bids.models.inference)},
        "segmentation": str(seg_file),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# --- summary --------------------------------------------------------------------------------------

def _fmt(stats, key="mean", digits=3) -> str:
    return lma._fmt(stats, key, digits)


def _wall_cpu(seconds, cpu) -> str:
    s = lma._stats(seconds)
    if s.get("n", 0) == 0:
        return "—"
    return f"{s['mean']:.1f} ± {s['std']:.1f} (CPU {_fmt(lma._stats(cpu), digits=1)})"


def summarize(state: dict) -> dict:
    folds = state["config"]["folds"]
    baseline = state["baseline"]
    rows: dict[str, dict] = {m: {} for m in (*METHODS, "oracle")}
    for f in folds:
        for m in ("mv", "jlf"):
            rec = baseline["fusions"].get(f"{f}:{m}")
            if rec is not None:
                rows[m][f] = rec
                if m == "mv" and "oracle" in rec:
                    rows["oracle"][f] = rec["oracle"]
        if f in state["folds"] and "infer" in state["folds"][f]:
            rows["dlf"][f] = state["folds"][f]["infer"]
    summary = {"methods": {}, "per_label": {}}
    for m, recs in rows.items():
        if not recs:
            continue
        per_subject = {s: lma._mean_dice(r["dice"]) for s, r in sorted(recs.items())}
        entry = {"subjects": sorted(recs), "mean_dice_per_subject": per_subject,
                 "mean_dice": lma._stats(per_subject.values())}
        if m != "oracle":
            entry["fusion_seconds_per_subject"] = lma._stats(r["seconds"] for r in recs.values())
            entry["fusion_cpu_seconds_per_subject"] = lma._stats(r.get("cpu_seconds") for r in recs.values())
            entry["peak_rss_mb"] = max(r["maxrss_mb"] for r in recs.values())
        if m == "dlf":
            trains = [state["folds"][f]["train"] for f in recs]
            entry["training_seconds_per_fold"] = lma._stats(t["seconds"] for t in trains)
            entry["training_cpu_seconds_per_fold"] = lma._stats(t["cpu_seconds"] for t in trains)
            entry["seconds_per_iteration"] = lma._stats(t["seconds_per_iteration"] for t in trains)
            entry["training_peak_rss_mb"] = max(t["maxrss_mb"] for t in trains)
        summary["methods"][m] = entry
        summary["per_label"][m] = {str(lab): lma._stats(r["dice"][str(lab)] for r in recs.values())
                                   for lab in lma.EVAL_LABELS}
    return summary


def markdown(state: dict, summary: dict) -> str:
    from dlf_bids.utils.freesurfer import freesurfer_label_table

    names = {lab.index: lab.name for lab in freesurfer_label_table().labels}
    cfg = state["config"]
    base = state["baseline"]
    reg = base.get("summary", {}).get("registration", {})
    reg_s = reg.get("seconds_per_pair", {})
    reg_txt = "—" if reg_s.get("n", 0) == 0 else (
        f"{reg_s['mean']:.1f} ± {reg_s['std']:.1f} (CPU {_fmt(reg.get('cpu_seconds_per_pair'), digits=1)})")
    reg_rss = reg.get("peak_rss_mb") or float("nan")
    s = cfg["settings"]
    bcfg = base.get("config", {})
    lines = [
        f"LOO DLF, folds {' '.join(cfg['folds'])} of subjects {' '.join(cfg['subjects'])}, voxel size "
        f"{bcfg.get('voxel_size_label', '?')}, registrations from {cfg['from']} "
        f"(preset {bcfg.get('preset', '?')}; a fold's DLF trains on the pairs among the other "
        f"{len(cfg['subjects']) - 1} subjects, never the held-out one; DLF, MV and JLF fuse the "
        f"{len(cfg['subjects']) - 1} atlases of their target); network {cfg['network']}, patch "
        f"{s['patch_size'][0]}³, {s['epochs']} epochs × {s['iterations_per_epoch']} iterations, "
        f"{s['atlases_per_sample']} atlases/sample, val fraction {s['val_fraction']}, seed {s['seed']}, "
        f"device {cfg['device']}, {cfg['threads']} torch thread(s).",
        "",
        f"MV, JLF and oracle rows are read from {cfg['from']}/results.json (same registrations), "
        "restricted to these folds; DLF's fusion column is inference (predict) only, its training "
        "is in the last columns.",
        "",
        "| method | subjects | mean Dice | std over subjects | registration s/pair (wall ± std, CPU) "
        "| fusion s/subject (wall ± std, CPU) | peak RSS fusion (MiB) | peak RSS registration (MiB) "
        "| training s/fold (wall ± std, CPU) | s/iteration | peak RSS training (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in (*METHODS, "oracle"):
        e = summary["methods"].get(m)
        if e is None:
            continue
        dice = e["mean_dice"]
        if m == "oracle":
            mins = "/".join(str(n) for n in sorted({r["min_atlases"] for r in (
                base["fusions"][f"{f}:mv"]["oracle"] for f in e["subjects"])}))
            label = f"oracle({bcfg.get('oracle_fraction', 0.1):.0%}, ≥{mins} atlas)"
            lines.append(f"| {label} | {dice['n']} | {_fmt(dice)} | {_fmt(dice, 'std')} "
                         "| — | — | — | — | — | — | — |")
            continue
        fus = e["fusion_seconds_per_subject"]
        row = (f"| {m} | {dice['n']} | {_fmt(dice)} | {_fmt(dice, 'std')} | {reg_txt} "
               f"| {fus['mean']:.1f} ± {fus['std']:.1f} (CPU {_fmt(e['fusion_cpu_seconds_per_subject'], digits=1)}) "
               f"| {e['peak_rss_mb']:.0f} | {reg_rss:.0f} ")
        if m == "dlf":
            tr = e["training_seconds_per_fold"]
            row += (f"| {tr['mean']:.0f} ± {tr['std']:.0f} (CPU {_fmt(e['training_cpu_seconds_per_fold'], digits=0)}) "
                    f"| {_fmt(e['seconds_per_iteration'], digits=2)} | {e['training_peak_rss_mb']:.0f} |")
        else:
            row += "| — | — | — |"
        lines.append(row)
    present = [m for m in (*METHODS, "oracle") if m in summary["methods"]]
    lines += ["", "Per-subject mean Dice:", "",
              "| subject | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for f in cfg["folds"]:
        cells = []
        for m in present:
            v = summary["methods"][m]["mean_dice_per_subject"].get(f)
            cells.append("—" if v is None else f"{v:.3f}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "DLF folds:", "",
              "| fold | training cases | validation | best epoch | last loss | last val Dice "
              "| train s (CPU) | s/iteration | infer s (CPU) | cached |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for f in cfg["folds"]:
        rec = state["folds"].get(f)
        if not rec or "train" not in rec:
            continue
        t = rec["train"]
        last = t["history"][-1] if t["history"] else {}
        vd = last.get("val_dice")
        inf = rec.get("infer")
        lines.append(
            f"| {f} | {' '.join(t['training_cases'] or [])} | {' '.join(t['validation_cases'] or []) or '—'} "
            f"| {t['best_epoch'] or '—'} | {last.get('loss', float('nan')):.4f} "
            f"| {'—' if vd is None else f'{vd:.3f}'} | {t['seconds']:.0f} ({t['cpu_seconds']:.0f}) "
            f"| {t['seconds_per_iteration']:.2f} "
            f"| {'—' if not inf else '%.1f (%.1f)' % (inf['seconds'], inf['cpu_seconds'])} "
            f"| {'yes' if t.get('cached') else 'no'} |")
    lines += ["", f"Main process peak RSS {state.get('main_process_peak_rss_mb', float('nan')):.0f} MiB; "
              f"wall time so far {state.get('wall_seconds', 0):.0f} s."]
    if present:
        lines += ["", "Per-label Dice (mean over subjects):", "",
                  "| label | name | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
        for lab in lma.EVAL_LABELS:
            cells = [_fmt(summary["per_label"][m][str(lab)]) for m in present]
            lines.append(f"| {lab} | {names.get(lab, '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv=None):
    from dlf_bids.cli.train import NETWORKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="cache", type=Path, required=True,
                   help="output folder of loo_multiatlas.py (library/, registrations/, results.json)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder; None: <from>/dlf-<network>-p<patch>-e<epochs>x<iterations>-n<atlases>-s<seed>")
    p.add_argument("--folds", nargs="+", default=None, help="held-out subjects to run; None: all cached subjects")
    p.add_argument("--network", choices=sorted(NETWORKS), default="small",
                   help="subnet widths (dlf_bids.cli.train.NETWORKS)")
    p.add_argument("--patch-size", type=int, default=48, help="cubic patch edge, multiple of 8")
    p.add_argument("--epochs", type=int, default=20, help="training epochs")
    p.add_argument("--iterations", type=int, default=100, help="patches per epoch")
    p.add_argument("--lr-step", type=int, default=10, help="epochs between learning-rate decays")
    p.add_argument("--atlases-per-sample", type=int, default=4,
                   help="atlases drawn (with replacement) for each training patch")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="training cases held out for validation (of the 4 per fold)")
    # loss and learning-rate defaults: those of dlf-bids-train (TrainSettings)
    p.add_argument("--loss-weighting", choices=["square", "simple", "uniform"], default=TS.gdl_weight,
                   help="generalized Dice label weights: 1/volume² (paper), 1/volume, none")
    p.add_argument("--bce-weight", type=float, default=TS.bce_weight,
                   help="binary cross-entropy added to the loss")
    p.add_argument("--dice-loss", choices=["generalized", "mean"], default=TS.dice_loss,
                   help="generalized Dice (paper) or the mean of per-label Dice")
    p.add_argument("--lr", type=float, default=TS.lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--retrain", action="store_true", help="ignore cached folds with the same settings")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = args.cache.resolve()
    results_file = cache / "results.json"
    if not results_file.is_file() or not (cache / "registrations").is_dir():
        print(f"{cache} holds no loo_multiatlas.py run (results.json, registrations/); "
              "run loo_multiatlas.py first", file=sys.stderr)
        return 2
    baseline = json.loads(results_file.read_text())
    subjects = [str(s) for s in baseline["config"]["subjects"]]
    folds = [str(f) for f in (args.folds or subjects)]
    bad = [f for f in folds if f not in subjects]
    if bad:
        print(f"--folds {' '.join(bad)}: not among the cached subjects {' '.join(subjects)}", file=sys.stderr)
        return 2
    if len(subjects) < 3:
        print("need at least 3 subjects (each training case needs an atlas)", file=sys.stderr)
        return 2
    try:  # every registration the folds need, before any work
        for t in folds:
            for a in subjects:
                for b in subjects:
                    if a != b and b != t:  # t's atlases (a == t) and the training cases (a != t)
                        _registration_files(cache, a, b)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2

    settings = {"patch_size": [args.patch_size] * 3, "atlases_per_sample": args.atlases_per_sample,
                "epochs": args.epochs, "iterations_per_epoch": args.iterations, "lr_step": args.lr_step,
                "val_fraction": args.val_fraction, "modaug": False, "seed": args.seed,
                "device": args.device, "gdl_weight": args.loss_weighting,
                "bce_weight": args.bce_weight, "lr": args.lr, "dice_loss": args.dice_loss}
    loss_tag = "" if (args.loss_weighting, args.bce_weight, args.lr, args.dice_loss) == (
        TS.gdl_weight, TS.bce_weight, TS.lr, TS.dice_loss) else (
        f"-{args.dice_loss}-{args.loss_weighting}-bce{args.bce_weight:g}-lr{args.lr:g}")
    tag = (f"dlf-{args.network}-p{args.patch_size}-e{args.epochs}x{args.iterations}"
           f"-n{args.atlases_per_sample}-s{args.seed}{loss_tag}")
    out = (args.out or cache / tag).resolve()
    out.mkdir(parents=True, exist_ok=True)
    limit_threads(args.threads)  # inherited by workers

    state = {
        "config": {"from": str(cache), "out": str(out), "subjects": subjects, "folds": folds,
                   "network": args.network, "settings": settings, "device": args.device,
                   "threads": args.threads, "eval_labels": list(lma.EVAL_LABELS),
                   "modalities": ["T1w"]},
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "baseline": {"config": baseline.get("config", {}), "fusions": baseline.get("fusions", {}),
                     "summary": {"registration": baseline.get("summary", {}).get("registration", {})}},
        "folds": {},
    }
    run_start = time.perf_counter()

    def save_state():
        summary = summarize(state)
        state["summary"] = summary
        state["wall_seconds"] = time.perf_counter() - run_start
        state["main_process_peak_rss_mb"] = lma._maxrss_mb()
        lma._write_json(out / "results-dlf.json", state)
        (out / "results-dlf.md").write_text(markdown(state, summary))

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for fold in folds:
            fdir = out / f"fold-{fold}"
            fdir.mkdir(exist_ok=True)
            model_file = fdir / "model.pt"
            train_json, infer_json = fdir / "train.json", fdir / "infer.json"
            seg_file = fdir / f"sub-{fold}_dlf_dseg.nii.gz"
            rec = {}
            if not args.retrain and train_json.is_file() and model_file.is_file():
                old = json.loads(train_json.read_text())
                if old.get("settings") == settings and old.get("network") == args.network:
                    rec["train"] = {**old, "cached": True}
            if "train" not in rec:
                print(f"fold {fold}: training ({args.network}, {args.epochs}×{args.iterations} iterations)",
                      flush=True)
                train = pool.submit(train_task, str(cache), fold, subjects, args.network, settings,
                                    args.threads, str(model_file)).result()
                lma._write_json(train_json, train)
                rec["train"] = {**train, "cached": False}
                infer_json.unlink(missing_ok=True)
            t = rec["train"]
            print(f"fold {fold}: trained in {t['seconds']:.0f} s (CPU {t['cpu_seconds']:.0f} s, "
                  f"{t['seconds_per_iteration']:.2f} s/iteration), peak {t['maxrss_mb']:.0f} MiB"
                  f"{' [cached]' if t.get('cached') else ''}", flush=True)
            if infer_json.is_file() and seg_file.is_file() and not args.retrain:
                rec["infer"] = {**json.loads(infer_json.read_text()), "cached": True}
            else:
                infer = pool.submit(infer_task, str(cache), fold, subjects, str(model_file),
                                    args.threads, args.device, str(seg_file)).result()
                lma._write_json(infer_json, infer)
                rec["infer"] = {**infer, "cached": False}
            i = rec["infer"]
            print(f"fold {fold}: predicted in {i['seconds']:.1f} s (CPU {i['cpu_seconds']:.1f} s), "
                  f"mean Dice {lma._mean_dice(i['dice']):.4f}, peak {i['maxrss_mb']:.0f} MiB", flush=True)
            state["folds"][fold] = rec
            save_state()
    save_state()
    print()
    print((out / "results-dlf.md").read_text())
    print(f"wall time {state['wall_seconds']:.0f} s; results in {out / 'results-dlf.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
