"""``dlf-bids-train-deepatlas``: train DeepAtlas (joint registration + segmentation networks) on an
atlas library (the labelled images) and, optionally, the T1w images of a BIDS dataset (unlabelled).

Every image is aligned affinely (antspyx) to a reference grid (a T1w at ``--voxel-size`` mm,
cropped to the head; by default the first atlas), the same way the participant level aligns
subjects and atlases, so the networks learn the deformable part only (with ``--t2w``, each T2w
follows its T1w's alignment after a rigid T2w -> T1w registration). The alignments run as a
Nipype graph cached in the work dir. The model file holds the reference grid, the networks, the
label table and the training history; give it to ``dlf-bids --registration deepatlas``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import UsageError

#: widths of the registration and segmentation U-Nets (levels = len)
NETWORKS = {
    "tiny": ((8, 16, 16, 32), (8, 16, 32, 64)),  # tests
    "small": ((16, 32, 32, 64), (16, 32, 64, 128)),
    "paper": ((16, 32, 32, 64, 64), (16, 32, 64, 128, 256)),
}


def build_parser() -> argparse.ArgumentParser:
    from ..models.deepatlas import DEFAULT_LAMBDA_A, DEFAULT_LAMBDA_R, DEFAULT_LAMBDA_SP
    from ..models.deepatlas_training import DEFAULT_GRID_MM, DeepAtlasTrainSettings

    defaults = DeepAtlasTrainSettings()
    p = argparse.ArgumentParser(
        prog="dlf-bids-train-deepatlas", description=__doc__.splitlines()[0],
        epilog="example: dlf-bids-train-deepatlas my-atlases deepatlas.pt --unlabelled /data/ds001 "
               "-w work\n  then: dlf-bids /data/ds001 out participant --atlas-dir my-atlases "
               "--registration deepatlas --deepatlas-model deepatlas.pt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("atlas_dir", type=Path, help="atlas library: the labelled images")
    p.add_argument("model_file", type=Path, help="where to write the trained model")
    p.add_argument("--unlabelled", type=Path, metavar="BIDS_DIR",
                   help="a BIDS dataset whose T1w images join training without labels "
                        "(typically the study you will segment)")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="subjects of --unlabelled to use (default: all)")
    p.add_argument("--atlases", nargs="+", metavar="ID",
                   help="use only these atlases of the library as labelled images "
                        "(one id: one-shot training)")
    p.add_argument("--t2w", action="store_true",
                   help="train a T1w + T2w model with ModAug (the atlases' T2w and those of "
                        "--unlabelled; an image without one gets noise), which then registers "
                        "with or without T2w images")
    p.add_argument("--reference", type=Path, metavar="IMAGE",
                   help="T1w defining the networks' grid (default: the first atlas's T1w)")
    p.add_argument("--voxel-size", type=float, default=DEFAULT_GRID_MM,
                   help=f"grid voxel size in mm (default {DEFAULT_GRID_MM:g}, the benchmarked grid; "
                        "2 has 3.4x the voxels)")
    p.add_argument("--network", choices=sorted(NETWORKS), default="small",
                   help="U-Net widths: tiny (tests), small (default), paper (5 levels)")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help=f"training steps, one pair each (default {defaults.steps})")
    p.add_argument("--phase-steps", type=int, default=defaults.phase_steps,
                   help="steps of one phase before the other network trains")
    p.add_argument("--lr-registration", type=float, default=defaults.lr_registration,
                   help=f"registration network's Adam learning rate (default {defaults.lr_registration:g})")
    p.add_argument("--lr-segmentation", type=float, default=defaults.lr_segmentation,
                   help=f"segmentation network's Adam learning rate (default {defaults.lr_segmentation:g})")
    p.add_argument("--lambda-anatomy", type=float, default=DEFAULT_LAMBDA_A,
                   help=f"anatomy loss weight (default {DEFAULT_LAMBDA_A:g}; 0: registration and "
                        "segmentation trained apart)")
    p.add_argument("--lambda-supervised", type=float, default=DEFAULT_LAMBDA_SP,
                   help=f"supervised Dice weight (default {DEFAULT_LAMBDA_SP:g})")
    p.add_argument("--lambda-bending", type=float, default=DEFAULT_LAMBDA_R,
                   help=f"bending energy weight, displacements in voxels (default {DEFAULT_LAMBDA_R:.4g})")
    p.add_argument("-w", "--work-dir", type=Path, default=Path("work"), help="alignments cache")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--nprocs", type=int, default=None, help="parallel alignments")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training")
    p.add_argument("--seed", type=int, default=0)
    return p


def _load(path, dtype=np.float32) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj).astype(dtype)


def _unlabelled_images(args) -> list[tuple[Path, Path | None]]:
    """``(T1w, T2w or None)`` of every image of ``--unlabelled`` (T2w only with ``--t2w``)."""
    from ..utils.bids import check_bids_dir, collect_anatomicals, load_layout

    if args.unlabelled is None:
        if args.participant_label:
            raise UsageError("--participant-label selects subjects of --unlabelled, which is not given")
        return []
    bids_dir = check_bids_dir(args.unlabelled.absolute())
    layout = load_layout(bids_dir, args.work_dir.absolute() / "bids_db_unlabelled")
    return [(a.t1w, a.t2w if args.t2w else None)
            for a in collect_anatomicals(layout, args.participant_label).anatomicals]


def _network_image(aligned, with_t2w: bool) -> np.ndarray:
    """One aligned image as the trainer takes it: the T1w, or T1w + T2w channels with zeros for
    a missing T2w (the trainer's sign for "no T2w": noise goes there)."""
    t1w = _load(aligned.on_reference)
    if not with_t2w:
        return t1w
    t2w = _load(aligned.t2w_on_reference) if aligned.t2w_on_reference else np.zeros_like(t1w)
    return np.stack([t1w, t2w])


def _labelled_atlases(args, library):
    if not args.atlases:
        return list(library.atlases)
    wanted = [a.removeprefix("sub-") for a in args.atlases]
    by_id = {a.atlas_id: a for a in library.atlases}
    missing = [a for a in wanted if a not in by_id]
    if missing:
        raise UsageError(f"atlas(es) {', '.join(missing)} not in {library.root} "
                         f"(it has {', '.join(sorted(by_id))})")
    return [by_id[a] for a in wanted]


def train(args) -> Path:
    from ..deepatlas_registration import ALIGNMENT
    from ..execution import configure_nipype, plugin_settings
    from ..models.deepatlas import DeepAtlasConfig
    from ..models.deepatlas_file import save_deepatlas
    from ..models.deepatlas_training import DeepAtlasTrainSettings, train_deepatlas
    from ..models.inference import resolve_device
    from ..utils.atlas_library import load_atlas_library
    from ..utils.files import check_writable_dir
    from ..workflows.training import init_deepatlas_alignment_wf
    from .parser import default_nprocs

    if args.voxel_size <= 0:
        raise UsageError(f"--voxel-size must be > 0, got {args.voxel_size}")
    library = load_atlas_library(args.atlas_dir)
    atlases = _labelled_atlases(args, library)
    unlabelled = _unlabelled_images(args)
    labelled = [(a.t1w, a.dseg, a.t2w if args.t2w else None) for a in atlases]
    with_t2w = sum(t2w is not None for *_, t2w in labelled + unlabelled)
    if args.t2w and not with_t2w:
        raise UsageError("--t2w: none of the training images has a T2w")
    if len(atlases) + len(unlabelled) < 2:
        raise UsageError("DeepAtlas needs at least two images: add atlases or --unlabelled T1w images")
    work_dir = args.work_dir.absolute()
    check_writable_dir(work_dir, "work directory")
    check_writable_dir(args.model_file.absolute().parent, "model folder")
    device = str(resolve_device(args.device))
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    print(f"dlf-bids-train-deepatlas: {len(atlases)} labelled, {len(unlabelled)} unlabelled images"
          f"{f' ({with_t2w} with a T2w)' if args.t2w else ''}, {args.voxel_size:g} mm grid, "
          f"device {device}")

    started = time.time()
    reference_source = args.reference or atlases[0].t1w
    if not Path(reference_source).is_file():
        raise UsageError(f"reference image {reference_source} does not exist")
    configure_nipype()
    workflow = init_deepatlas_alignment_wf(labelled, unlabelled, Path(reference_source).absolute(),
                                           args.voxel_size, work_dir, args.seed)
    plugin, plugin_args = plugin_settings("MultiProc", None, args.nprocs or default_nprocs(), None)
    results = {n.name: n.result.outputs for n in workflow.run(plugin=plugin, plugin_args=plugin_args).nodes()}
    reference = results["make_reference"].out_file
    labelled_data = [(_network_image(results[f"align_labelled{k}"], args.t2w),
                      _load(results[f"align_labelled{k}"].labels_on_reference, np.int32))
                     for k in range(len(labelled))]
    unlabelled_data = [_network_image(results[f"align_unlabelled{k}"], args.t2w)
                       for k in range(len(unlabelled))]
    print(f"dlf-bids-train-deepatlas: images aligned to the reference in {time.time() - started:.0f} s")
    if args.threads is not None:
        # only now: torch's thread pool must not exist in this process when Nipype forks workers
        import torch

        torch.set_num_threads(args.threads)

    reg_channels, seg_channels = NETWORKS[args.network]
    labels = (0, *library.labels.indices)
    config = DeepAtlasConfig(n_labels=len(labels), labels=labels,
                             in_channels=2 if args.t2w else 1,
                             modalities=("T1w", "T2w") if args.t2w else ("T1w",),
                             reg_channels=reg_channels, seg_channels=seg_channels,
                             lambda_a=args.lambda_anatomy, lambda_sp=args.lambda_supervised,
                             lambda_r=args.lambda_bending)
    settings = DeepAtlasTrainSettings(steps=args.steps, phase_steps=args.phase_steps,
                                      lr_registration=args.lr_registration,
                                      lr_segmentation=args.lr_segmentation, seed=args.seed, device=device)
    result = train_deepatlas(labelled_data, unlabelled_data, config, settings, progress=True)
    ref_img = nb.load(str(reference))
    save_deepatlas(args.model_file, result.model, {
        "labels": library.labels.labels, "voxel_size": args.voxel_size, "alignment": ALIGNMENT,
        "volume_shape": ref_img.shape, "reference": (ref_img.get_fdata(dtype=np.float32), ref_img.affine),
        "train_settings": {"steps": args.steps, "phase_steps": args.phase_steps, "seed": args.seed,
                           "lr_registration": args.lr_registration,
                           "lr_segmentation": args.lr_segmentation,
                           "atlases": [a.atlas_id for a in atlases], "n_unlabelled": len(unlabelled),
                           "modaug": args.t2w, "n_with_t2w": with_t2w,
                           "history": result.history},
    })
    last = {}
    for entry in result.history:  # last value of each phase's loss
        last[entry["phase"]] = entry["loss"]
    print(f"dlf-bids-train-deepatlas: model written to {args.model_file} in {time.time() - started:.0f} s "
          f"(last losses: {', '.join(f'{k} {v:.4f}' for k, v in last.items())})")
    return args.model_file


def main(argv=None) -> int:
    from .train import run_command

    return run_command("dlf-bids-train-deepatlas", build_parser, train, argv)


if __name__ == "__main__":
    sys.exit(main())
