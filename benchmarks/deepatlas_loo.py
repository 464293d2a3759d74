#!/usr/bin/env python
"""DeepAtlas vs ANTs on the FreeSurfer training subjects, leave one subject out.

Reuses the 2 mm cache of ``loo_multiatlas.py`` (``--from``): its ``library/`` (the 5 subjects,
brain-cropped, 2 mm) and its ANTs ``quick`` registrations (every atlas → target pair, seeded and
single-threaded, so bit-for-bit what a rerun gives: this script reruns ``--ants-timing-fold``'s
pairs, checks the labels are identical and takes the per-pair time from them, in this run).
For each held-out subject ``t`` (a *fold*), for each setting:

* ``few-shot``: the 4 other subjects labelled, ``t`` unlabelled (the study being segmented);
* ``one-shot``: one other subject labelled (the first), the other 3 and ``t`` unlabelled;

and each loss (``joint``: the trainer's anatomy weight, 2; ``no-anatomy``: anatomy weight 0,
i.e. registration trained on similarity + bending alone and segmentation on the labelled images
alone), a model is trained with the real command (``dlf-bids-train-deepatlas``, in a
subprocess) and evaluated in a spawned worker (1 torch / ITK thread). Every fold gets few-shot
joint (the main table); the ``--ablation-folds`` also get the other three (few-shot no-anatomy,
one-shot joint and no-anatomy). Evaluation:

* every atlas → ``t`` pair warped by :func:`register_atlas_deepatlas` (time per pair, Dice of
  the warped labels vs ``t``'s aseg, smallest Jacobian determinant and share of folded voxels
  on the model's grid), twice: with the
  participant level's instance optimisation (``--refine-steps``, its default) and with the
  network's warp alone (0 steps); the affine pre-alignment alone (what the network adds), and
  the ANTs quick labels of the cache (same pairs);
* the segmentation network alone (:func:`segment_deepatlas`);
* majority voting of the (refined) DeepAtlas-warped atlases; and, with ``--dlf-models`` (the fold models of
  ``loo_dlf.py``), Deep Label Fusion on the DeepAtlas-warped atlases and on the ANTs-warped ones,
  same model, same run.

Dice: the 40 aseg labels and the Dice function of ``loo_multiatlas.py`` (imported). Outputs:
``--out``/``results.json`` and ``results.md``; models and warps per fold under ``fold-XX/``.

    python benchmarks/deepatlas_loo.py --from bench-out/loo-2mm \\
        --dlf-models bench-out/loo-2mm/dlf-small-p32-e20x60-n4-s0 --out bench-out/deepatlas-loo
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from thread_env import limit_threads  # noqa: E402
import loo_multiatlas as lma  # noqa: E402  (EVAL_LABELS, dice_per_label, _mean_dice, _stats, ...)
from loo_dlf import _library_files, _registration_files  # noqa: E402

from dlf_bids.deepatlas_registration import REFINE_STEPS  # noqa: E402
from dlf_bids.models.deepatlas import DEFAULT_LAMBDA_A  # noqa: E402
from dlf_bids.models.deepatlas_training import DEFAULT_GRID_MM, DeepAtlasTrainSettings  # noqa: E402

SETTINGS = ("few-shot", "one-shot")
LOSSES = {"joint": DEFAULT_LAMBDA_A, "no-anatomy": 0.0}  # anatomy loss weight


def _load(path, dtype=np.int32) -> np.ndarray:
    import nibabel as nb

    return np.asanyarray(nb.load(str(path)).dataobj).astype(dtype)


def _single_thread():
    limit_threads(1)
    import torch

    torch.set_num_threads(1)
    return torch


def make_bids(root: Path, cache: Path, subjects) -> Path:
    """A BIDS dataset of the subjects' T1w (symbolic links into the cache): the unlabelled images."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "unlabelled",
                                                               "BIDSVersion": "1.10.0"}))
    for s in subjects:
        anat = root / f"sub-{s}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        link = anat / f"sub-{s}_T1w.nii.gz"
        if not link.exists():
            link.symlink_to(_library_files(cache, s)[0].resolve())
    return root


def train(cache: Path, fold_dir: Path, fold: str, subjects, setting: str, loss: str, args) -> dict:
    """One model with the real training command; reused when its model file exists."""
    others = [s for s in subjects if s != fold]
    labelled = others if setting == "few-shot" else others[:1]
    unlabelled = [s for s in subjects if s not in labelled]
    model = fold_dir / f"deepatlas_{setting}_{loss}.pt"
    record = fold_dir / f"train_{setting}_{loss}.json"
    if model.is_file() and record.is_file():
        return json.loads(record.read_text())
    bids = make_bids(fold_dir / f"unlabelled_{setting}", cache, unlabelled)
    cmd = [sys.executable, "-m", "dlf_bids.cli.train_deepatlas", str(cache / "library"), str(model),
           "--atlases", *labelled, "--unlabelled", str(bids), "--voxel-size", str(args.voxel_size),
           "--network", args.network, "--steps", str(args.steps), "--phase-steps", str(args.phase_steps),
           "--lr-registration", str(args.lr_registration), "--lambda-anatomy", str(LOSSES[loss]),
           "-w", str(fold_dir / f"work_{setting}"), "--threads", str(args.threads), "--nprocs", "2",
           "--seed", str(args.seed)]
    if args.lambda_bending is not None:
        cmd += ["--lambda-bending", str(args.lambda_bending)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rec = {"fold": fold, "setting": setting, "loss": loss, "labelled": labelled,
           "unlabelled": unlabelled, "seconds": time.perf_counter() - start, "command": cmd,
           "log_tail": proc.stdout[-400:]}
    record.write_text(json.dumps(rec, indent=1))
    return rec


def evaluate_task(cache: str, fold_dir: str, fold: str, subjects: list[str], model: str,
                  dlf_model: str | None, refine_steps: int) -> dict:
    """Warp every atlas onto the held-out subject and score; runs in a spawned worker."""
    _single_thread()
    import ants

    from dlf_bids.deepatlas_registration import (align_to_reference, model_reference,
                                                 register_atlas_deepatlas, segment_deepatlas)
    from dlf_bids.fusion import majority_vote

    cache_p, out = Path(cache), Path(fold_dir) / Path(model).stem
    out.mkdir(parents=True, exist_ok=True)
    t1w, dseg = _library_files(cache_p, fold)
    truth = _load(dseg)
    reference, alignment = model_reference(model, out / "reference.nii.gz")
    t0 = time.perf_counter()
    target = align_to_reference(t1w, reference, out / "target", seed=0, n_threads=1,
                                transform_type=alignment)
    target_align_s = time.perf_counter() - t0
    pairs, warped_t1ws, warped_dsegs = {}, [], []
    for atlas_id in (s for s in subjects if s != fold):
        a_t1w, a_dseg = _library_files(cache_p, atlas_id)
        t0 = time.perf_counter()
        atlas = align_to_reference(a_t1w, reference, out / f"atlas-{atlas_id}", seed=0, n_threads=1,
                                   transform_type=alignment)
        align_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        network = register_atlas_deepatlas(t1w, target, a_t1w, a_dseg, atlas, model, reference,
                                           out / f"pair-{atlas_id}-network", n_threads=1,
                                           refine_steps=0)
        network_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warp = register_atlas_deepatlas(t1w, target, a_t1w, a_dseg, atlas, model, reference,
                                        out / f"pair-{atlas_id}", n_threads=1, refine_steps=refine_steps)
        pair_s = time.perf_counter() - t0
        affine_only = ants.apply_transforms(ants.image_read(str(t1w)), ants.image_read(str(a_dseg)),
                                            [str(target.transform), str(atlas.transform)],
                                            whichtoinvert=[True, False], interpolator="genericLabel")
        ants_dseg = _registration_files(cache_p, fold, atlas_id)[1]
        pairs[atlas_id] = {
            "atlas_alignment_s": align_s, "pair_s": pair_s, "min_jacobian": warp.min_jacobian,
            "folded_fraction": warp.folded_fraction, "folded_fraction_network": network.folded_fraction,
            "dice_deepatlas": lma.dice_per_label(truth, _load(warp.dseg)),
            "pair_s_network": network_s, "min_jacobian_network": network.min_jacobian,
            "dice_deepatlas_network": lma.dice_per_label(truth, _load(network.dseg)),
            "dice_affine": lma.dice_per_label(truth, affine_only.numpy().astype(np.int32)),
            "dice_ants_quick": lma.dice_per_label(truth, _load(ants_dseg)),
        }
        warped_t1ws.append(warp.t1w)
        warped_dsegs.append(warp.dseg)
    t0 = time.perf_counter()
    seg = segment_deepatlas(t1w, target, model, out / "segmentation_network.nii.gz")
    segment_s = time.perf_counter() - t0
    stack = np.stack([_load(p) for p in warped_dsegs])
    result = {
        "fold": fold, "model": model, "refine_steps": refine_steps, "target_alignment_s": target_align_s,
        "pairs": pairs,
        "segment_s": segment_s, "dice_segmentation_net": lma.dice_per_label(truth, _load(seg)),
        "dice_mv_deepatlas": lma.dice_per_label(truth, majority_vote(stack)),
        "maxrss_mb": lma._maxrss_mb(),
    }
    if dlf_model:
        result.update(_dlf_both(cache_p, fold, subjects, dlf_model, t1w, truth, warped_t1ws, warped_dsegs))
    return result


def _dlf_both(cache: Path, fold, subjects, dlf_model, t1w, truth, warped_t1ws, warped_dsegs) -> dict:
    """DLF (the fold's model from loo_dlf.py) on DeepAtlas- and on ANTs-warped atlases."""
    from dlf_bids.models.inference import predict
    from dlf_bids.models.model_file import load_model

    model, info = load_model(dlf_model)
    target = _load(t1w, np.float32)[None]
    ants_regs = [_registration_files(cache, fold, b) for b in subjects if b != fold]
    out = {}
    for name, t1ws, dsegs in (("deepatlas", warped_t1ws, warped_dsegs),
                              ("ants_quick", [r[0] for r in ants_regs], [r[1] for r in ants_regs])):
        images = np.stack([_load(p, np.float32)[None] for p in t1ws])
        labels = np.stack([_load(p) for p in dsegs])
        pred = predict(model, info, target, images, labels, device="cpu")
        out[f"dice_dlf_{name}"] = lma.dice_per_label(truth, pred.labels.astype(np.int32))
    return out


def ants_timing_task(cache: str, out_dir: str, fold: str, atlas_id: str) -> dict:
    """Rerun one cached ANTs quick registration: its time, and whether it gives the same labels."""
    limit_threads(1)
    from dlf_bids.registration import register_atlas

    cache_p = Path(cache)
    t1w, _ = _library_files(cache_p, fold)
    a_t1w, a_dseg = _library_files(cache_p, atlas_id)
    start = time.perf_counter()
    warped = register_atlas(t1w, a_t1w, a_dseg, Path(out_dir) / f"ants-{fold}-{atlas_id}",
                            preset="quick", seed=0, n_threads=1)
    seconds = time.perf_counter() - start
    cached = _registration_files(cache_p, fold, atlas_id)[1]
    return {"fold": fold, "atlas": atlas_id, "seconds": seconds,
            "identical_to_cache": bool(np.array_equal(_load(warped.dseg), _load(cached)))}


def _mean(d) -> float:
    return lma._mean_dice(d)


def _folded_percent(pairs, key) -> str:
    """Mean share of folded voxels over the pairs, in %; "—" for results older than the column."""
    values = [p[key] for p in pairs if key in p]
    return f"{100 * np.mean(values):.3f}" if values else "—"


def summarize(results: list[dict], trainings: list[dict], ants_runs: list[dict]) -> str:
    lines = ["| fold | setting / loss | train s | DeepAtlas pair Dice (network alone) | affine only | "
             "ANTs quick pair Dice | seg net | MV on DeepAtlas | DLF on DeepAtlas | DLF on ANTs | "
             "s/pair (network alone; + atlas align) | min Jac (network alone) | "
             "folded voxels, % (network alone) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    train_s = {(t["fold"], f"{t['setting']}_{t['loss']}"): t["seconds"] for t in trainings}
    for r in results:
        key = Path(r["model"]).stem.removeprefix("deepatlas_")
        pairs = r["pairs"].values()
        col = lambda k: np.mean([_mean(p[k]) for p in pairs])  # noqa: E731
        dlf_da = f"{_mean(r['dice_dlf_deepatlas']):.3f}" if "dice_dlf_deepatlas" in r else "—"
        dlf_ants = f"{_mean(r['dice_dlf_ants_quick']):.3f}" if "dice_dlf_ants_quick" in r else "—"
        pair_s = np.mean([p["pair_s"] for p in pairs])
        network_s = np.mean([p["pair_s_network"] for p in pairs])
        align_s = np.mean([p["atlas_alignment_s"] for p in pairs])
        lines.append(
            f"| {r['fold']} | {key} | {train_s.get((r['fold'], key), float('nan')):.0f} | "
            f"{col('dice_deepatlas'):.3f} ({col('dice_deepatlas_network'):.3f}) | {col('dice_affine'):.3f} | "
            f"{col('dice_ants_quick'):.3f} | "
            f"{_mean(r['dice_segmentation_net']):.3f} | {_mean(r['dice_mv_deepatlas']):.3f} | {dlf_da} | "
            f"{dlf_ants} | {pair_s:.2f} ({network_s:.2f}; +{align_s:.2f}) | "
            f"{min(p['min_jacobian'] for p in pairs):.3f} ({min(p['min_jacobian_network'] for p in pairs):.3f}) | "
            f"{_folded_percent(pairs, 'folded_fraction')} ({_folded_percent(pairs, 'folded_fraction_network')}) |")
    if ants_runs:
        ants_s = np.mean([a["seconds"] for a in ants_runs])
        lines += ["", f"ANTs quick, {len(ants_runs)} pairs rerun in this run (1 thread): "
                      f"{ants_s:.1f} s/pair; identical to the cached labels: "
                      f"{all(a['identical_to_cache'] for a in ants_runs)}"]
        fold = ants_runs[0]["fold"]
        for r in results:
            if r["fold"] == fold:
                pairs = list(r["pairs"].values())
                per_pair = np.mean([p["pair_s"] for p in pairs])
                with_align = per_pair + np.mean([p["atlas_alignment_s"] for p in pairs])
                lines.append(f"- {Path(r['model']).stem}: ANTs quick ÷ DeepAtlas per pair = "
                             f"{ants_s / per_pair:.1f}× (atlas aligned once per run), "
                             f"{ants_s / with_align:.1f}× (alignment counted per pair)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="cache", type=Path, required=True, help="loo_multiatlas.py output")
    p.add_argument("--dlf-models", type=Path, help="loo_dlf.py output (fold-XX/model.pt)")
    p.add_argument("--out", type=Path, default=Path("bench-out/deepatlas-loo"))
    p.add_argument("--folds", nargs="+", default=list(lma.DEFAULT_SUBJECTS))
    p.add_argument("--ablation-folds", nargs="*", default=["01"],
                   help="folds that also get the ablation models: few-shot without the anatomy "
                        "loss, one-shot joint and without")
    p.add_argument("--ants-timing-fold", default="01", help="fold whose ANTs pairs are rerun and timed")
    trainer = DeepAtlasTrainSettings()  # the trainer's defaults: the recipe of the tables
    p.add_argument("--voxel-size", type=float, default=DEFAULT_GRID_MM)
    p.add_argument("--network", default="small")
    p.add_argument("--steps", type=int, default=trainer.steps)
    p.add_argument("--phase-steps", type=int, default=trainer.phase_steps)
    p.add_argument("--lr-registration", type=float, default=trainer.lr_registration)
    p.add_argument("--lambda-bending", type=float, default=None,
                   help="bending energy weight (default: the trainer's)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for training")
    p.add_argument("--refine-steps", type=int, default=REFINE_STEPS,
                   help="instance-optimisation steps per pair (default: the participant level's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    subjects = list(lma.DEFAULT_SUBJECTS)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache.absolute()
    started = datetime.datetime.now(datetime.timezone.utc)
    ctx = multiprocessing.get_context("spawn")
    trainings, results, ants_runs = [], [], []
    runs = [(fold, "few-shot", "joint") for fold in args.folds]  # the main table first
    ablations = [(fold, setting, loss) for fold in args.ablation_folds
                 for setting, loss in (("few-shot", "no-anatomy"), ("one-shot", "joint"),
                                       ("one-shot", "no-anatomy"))]

    def save():  # after every step, so an interrupted run keeps what it measured
        state = {"args": {k: str(v) for k, v in vars(args).items()}, "started": started.isoformat(),
                 "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "machine": {"nproc": os.cpu_count(), "platform": platform.platform()},
                 "trainings": trainings, "results": results, "ants_timing": ants_runs}
        lma._write_json(args.out / "results.json", state)
        (args.out / "results.md").write_text(summarize(results, trainings, ants_runs) + "\n")

    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        for fold, setting, loss in runs + [("ants", None, None)] + ablations:
            if fold == "ants":  # the time ratio needs the ANTs side of the same run
                for atlas_id in (s for s in subjects if args.ants_timing_fold and s != args.ants_timing_fold):
                    ants_runs.append(pool.submit(ants_timing_task, str(cache), str(args.out.absolute()),
                                                 args.ants_timing_fold, atlas_id).result())
                    print("ANTs", ants_runs[-1], flush=True)
                    save()
                continue
            fold_dir = (args.out / f"fold-{fold}").absolute()
            fold_dir.mkdir(parents=True, exist_ok=True)
            trainings.append(train(cache, fold_dir, fold, subjects, setting, loss, args))
            print("trained", fold, setting, loss, f"{trainings[-1]['seconds']:.0f} s", flush=True)
            dlf = None
            if args.dlf_models and (setting, loss) == ("few-shot", "joint"):
                dlf = str((args.dlf_models / f"fold-{fold}" / "model.pt").absolute())
            model = str(fold_dir / f"deepatlas_{setting}_{loss}.pt")
            results.append(pool.submit(evaluate_task, str(cache), str(fold_dir), fold, subjects,
                                       model, dlf, args.refine_steps).result())
            print(summarize(results[-1:], trainings, []), flush=True)
            save()
    print(summarize(results, trainings, ants_runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
