#!/usr/bin/env python
"""ModAug: does one T1+T2 Deep Label Fusion model still work when a modality is missing?

fs-training has T1 only, so a **T2-like image is synthesized from each real T1** with the contrast
of the SPM12 ``avg152T1``/``avg152T2`` pair (``../shared/data/spm12``, one 2 mm grid):

1. the joint histogram of the pair over the brain (grey + white + csf priors > 0.5) gives the mean T2 value
   of each of 64 T1 quantile bins: a T1 → T2 intensity map ``g`` (WM bright → dark, CSF dark →
   bright);
2. a subject's T1 (FreeSurfer-normalised: white matter = 110) is scaled so its white matter
   matches avg152T1's (white-matter prior > 0.9), then mapped through ``g``;
3. a smooth random multiplicative bias field (±10 %) and 2 % Gaussian noise, seeded by the image,
   make the T2 more than a relabelled T1 (the noise differs between target and atlases).

The synthetic T2 is a voxelwise function of the real T1 plus noise: it carries **no anatomical
information the T1 lacks** and never sees the labels, so it cannot leak the truth. What the table
measures is how a model copes when one input channel is replaced by noise, i.e. ModAug's
purpose. Atlases: the same map applied to each atlas T1 already warped to the target (the map is
voxelwise, so this equals warping a T2 made in atlas space up to interpolation).

One held-out fold (``--fold``, default 01) of the leave-one-out protocol of ``loo_dlf.py``: two
models are trained on the other 4 subjects with T1w+T2w, one with ModAug (p = 0.5) and one without,
same seed and settings otherwise; each segments the held-out subject from T1+T2, T1 only (T2
channel = NaN → unit noise, as the participant workflow does) and T2 only.

    python benchmarks/modaug_dlf.py --from bench-out/loo-2mm --fold 01 --network small \\
        --patch-size 32 --epochs 12 --iterations 50 --threads 2
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
import loo_dlf as ld  # noqa: E402
import loo_multiatlas as lma  # noqa: E402

SPM_DIR = lma.PROJECT_ROOT.parent / "shared" / "data" / "spm12"
INPUTS = {"T1w+T2w": (True, True), "T1w only": (True, False), "T2w only": (False, True)}


# --- T2 synthesis -----------------------------------------------------------------------------

def t1_to_t2_map(spm_dir: Path = SPM_DIR, bins: int = 64) -> tuple[float, np.ndarray, np.ndarray]:
    """(avg152T1 white-matter mean, T1 bin centres, mean T2 per bin) from the SPM pair, over the
    brain (tissue priors grey + white + csf > 0.5) so the map has T2 contrast on brain tissue."""
    import nibabel as nb

    def load(name):
        return np.asanyarray(nb.load(str(spm_dir / f"{name}.nii")).dataobj).astype(np.float64)

    t1, t2, white = load("avg152T1"), load("avg152T2"), load("white")
    brain = (load("grey") + white + load("csf")) > 0.5
    wm_t1 = float(t1[white > 0.9].mean())
    edges = np.unique(np.quantile(t1[brain], np.linspace(0, 1, bins + 1)))  # ties merge bins
    which = np.clip(np.searchsorted(edges, t1[brain], side="right") - 1, 0, len(edges) - 2)
    filled = [b for b in range(len(edges) - 1) if np.any(which == b)]
    centres = np.array([t1[brain][which == b].mean() for b in filled])
    means = np.array([t2[brain][which == b].mean() for b in filled])
    return wm_t1, centres, means


def synthesize_t2(t1: np.ndarray, mapping, seed: int, t1_white_matter: float = 110.0) -> np.ndarray:
    """A T2-like image from a FreeSurfer-normalised T1 (white matter = 110): scaled so that its
    white matter matches avg152T1's, mapped through the T1 → T2 curve, times a smooth bias field,
    plus noise. Labels are never used; 0 stays 0."""
    from scipy.ndimage import zoom

    wm_t1, centres, means = mapping
    out = np.zeros(t1.shape, np.float32)
    head = t1 > 1.0
    t2 = np.interp(t1[head] * (wm_t1 / t1_white_matter), centres, means)
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.9, 1.1, size=(4, 4, 4))
    bias = zoom(coarse, [s / 4 for s in t1.shape], order=3)[tuple(slice(0, s) for s in t1.shape)]
    t2 = t2 * bias[head] + rng.normal(0.0, 0.02 * float(means.max()), size=t2.shape)
    out[head] = np.clip(t2, 0.0, None) * 1000.0
    return out


def _seed_of(*parts: str) -> int:
    return int.from_bytes(("-".join(parts)).encode()[:8].ljust(8, b"\0"), "little") % (2**31)


def _case_images(cache: Path, target: str, atlases: list[str], mapping):
    """Target (2, X, Y, Z) and atlases (N, 2, X, Y, Z) T1w+T2w, truth and atlas labels."""
    t1w, dseg = ld._library_files(cache, target)
    t1 = ld._load(t1w, np.float32)
    target_images = np.stack([t1, synthesize_t2(t1, mapping, _seed_of("target", target))])
    atlas_images, atlas_labels = [], []
    for a in atlases:
        reg_t1, reg_dseg = ld._registration_files(cache, target, a)
        at1 = ld._load(reg_t1, np.float32)
        atlas_images.append(np.stack([at1, synthesize_t2(at1, mapping, _seed_of("atlas", target, a))]))
        atlas_labels.append(ld._load(reg_dseg, np.int32))
    return target_images, ld._load(dseg, np.int32), np.stack(atlas_images), np.stack(atlas_labels)


# --- worker tasks -------------------------------------------------------------------------------

def train_task(cache: str, fold: str, subjects: list[str], network: str, settings: dict,
               threads: int, model_file: str) -> dict:
    ld._worker_setup(threads)
    from dlf_bids.cli.train import NETWORKS
    from dlf_bids.models.dlf import DLFConfig
    from dlf_bids.models.training import TrainingCase, TrainSettings, train_dlf
    from dlf_bids.utils.labels import read_label_table

    cache_p = Path(cache)
    mapping = t1_to_t2_map()
    table = read_label_table(cache_p / "library" / "dseg.tsv")
    cases = []
    for a in subjects:
        if a == fold:
            continue
        others = [b for b in subjects if b not in (fold, a)]
        img, truth, atl_img, atl_lab = _case_images(cache_p, a, others, mapping)
        cases.append(TrainingCase(target_images=img, target_labels=truth, atlas_images=atl_img,
                                  atlas_labels=atl_lab, case_id=a, atlas_ids=others))
    wv, ft = NETWORKS[network]
    config = DLFConfig(n_labels=len(table.labels) + 1, n_modalities=2, wv_channels=wv, ft_channels=ft)
    s = TrainSettings(**settings)
    start, cpu_start = time.perf_counter(), ld._cpu_seconds()
    result = train_dlf(cases, table, config, s, ["T1w", "T2w"], model_file, progress=False)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": ld._cpu_seconds() - cpu_start,
            "history": result.history, "best_epoch": result.best_epoch, "modaug": s.modaug,
            "maxrss_mb": lma._maxrss_mb(), "model_file": model_file,
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


def infer_task(cache: str, fold: str, subjects: list[str], model_file: str, threads: int,
               inputs: str) -> dict:
    ld._worker_setup(threads)
    from dlf_bids.models.inference import predict
    from dlf_bids.models.model_file import load_model

    cache_p = Path(cache)
    atlases = [b for b in subjects if b != fold]
    img, truth, atl_img, atl_lab = _case_images(cache_p, fold, atlases, t1_to_t2_map())
    for channel, present in enumerate(INPUTS[inputs]):
        if not present:  # a missing modality: NaN, which predict fills with unit noise
            img[channel] = np.nan
            atl_img[:, channel] = np.nan
    model, info = load_model(model_file, device="cpu")
    start, cpu_start = time.perf_counter(), ld._cpu_seconds()
    pred = predict(model, info, img, atl_img, atl_lab, device="cpu")
    return {"inputs": inputs, "seconds": time.perf_counter() - start,
            "cpu_seconds": ld._cpu_seconds() - cpu_start,
            "dice": lma.dice_per_label(truth, pred.labels.astype(np.int32)),
            "maxrss_mb": lma._maxrss_mb(),
            "finished": datetime.datetime.now().isoformat(timespec="seconds")}


# --- main -----------------------------------------------------------------------------------------

def markdown(state: dict) -> str:
    cfg = state["config"]
    s = cfg["settings"]
    lines = [f"ModAug, held-out subject {cfg['fold']} (atlases: the other {len(cfg['subjects']) - 1}), "
             f"registrations from {cfg['from']}; network {cfg['network']}, patch {s['patch_size'][0]}³, "
             f"{s['epochs']}×{s['iterations_per_epoch']} iterations, seed {s['seed']}; T2w synthesized "
             "from each T1w with the SPM avg152 T1→T2 contrast (see the script).", "",
             "| model | " + " | ".join(INPUTS) + " | training s (CPU) |",
             "|---|" + "---|" * (len(INPUTS) + 1)]
    for name in ("modaug", "no-modaug"):
        rec = state["models"].get(name)
        if not rec:
            continue
        cells = []
        for inputs in INPUTS:
            r = rec.get("infer", {}).get(inputs)
            cells.append("—" if r is None else f"{lma._mean_dice(r['dice']):.3f}")
        tr = rec["train"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {tr['seconds']:.0f} ({tr['cpu_seconds']:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from dlf_bids.cli.train import NETWORKS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="cache", type=Path, required=True, help="a loo_multiatlas.py output")
    p.add_argument("--out", type=Path, default=None, help="default: <from>/modaug-<fold>")
    p.add_argument("--fold", default="01", help="held-out subject")
    p.add_argument("--network", choices=sorted(NETWORKS), default="small")
    p.add_argument("--patch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--lr-step", type=int, default=8)
    # loss and learning-rate defaults: those of dlf-bids-train (TrainSettings)
    p.add_argument("--dice-loss", choices=["generalized", "mean"], default=ld.TS.dice_loss)
    p.add_argument("--loss-weighting", choices=["square", "simple", "uniform"],
                   default=ld.TS.gdl_weight)
    p.add_argument("--bce-weight", type=float, default=ld.TS.bce_weight)
    p.add_argument("--lr", type=float, default=ld.TS.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = p.parse_args(argv)
    if not SPM_DIR.is_dir():
        print(f"modaug_dlf: {SPM_DIR} not found (needs ../shared/data)", file=sys.stderr)
        return 66
    cache = args.cache.absolute()
    subjects = sorted(json.loads((cache / "results.json").read_text())["config"]["subjects"])
    out = (args.out or cache / f"modaug-{args.fold}").absolute()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"patch_size": [args.patch_size] * 3, "epochs": args.epochs,
                "iterations_per_epoch": args.iterations, "lr_step": args.lr_step,
                "val_fraction": 0.0, "validation": "none", "seed": args.seed, "device": "cpu",
                "gdl_weight": args.loss_weighting, "bce_weight": args.bce_weight, "lr": args.lr,
                "dice_loss": args.dice_loss}
    state = {"config": {"from": str(cache), "fold": args.fold, "subjects": subjects,
                        "network": args.network, "settings": settings, "threads": args.threads,
                        "machine": platform_line()}, "models": {}}
    ctx = multiprocessing.get_context("spawn")
    for name, modaug in (("modaug", True), ("no-modaug", False)):
        model_file = out / f"{name}.pt"
        rec = state["models"].setdefault(name, {})
        with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
            print(f"modaug_dlf: training {name}", flush=True)
            rec["train"] = pool.submit(train_task, str(cache), args.fold, subjects, args.network,
                                       {**settings, "modaug": modaug}, args.threads,
                                       str(model_file)).result()
        rec["infer"] = {}
        for inputs in INPUTS:
            with ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1) as pool:
                r = pool.submit(infer_task, str(cache), args.fold, subjects, str(model_file),
                                args.threads, inputs).result()
            rec["infer"][inputs] = r
            print(f"modaug_dlf: {name}, {inputs}: mean Dice {lma._mean_dice(r['dice']):.3f} "
                  f"({r['seconds']:.0f} s)", flush=True)
            lma._write_json(out / "results.json", state)
            (out / "results.md").write_text(markdown(state))
    state["complete"] = True
    lma._write_json(out / "results.json", state)
    (out / "results.md").write_text(markdown(state))
    print(markdown(state))
    return 0


def platform_line() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
