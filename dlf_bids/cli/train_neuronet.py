"""``dlf-bids-train-neuronet``: train a NeuroNet model on the label maps of its teachers.

The teachers (multi-atlas fusion, Atropos, collapses, the images' own label maps; one protocol
spec each) run as Nipype workflows cached in the work dir, so a second training run on the same
images only trains. Training images are the atlas library's own atlases (each with the other
atlases as its library) and, with ``--bids-dir``, the T1w images of a BIDS dataset (with every
atlas). The network then learns every protocol at once (mean over protocols of cross-entropy +
``--dice-weight`` × Dice), seeded, and one model file holds the weights and what is needed to use
them: protocols with their classes and look-up tables, normalisation, voxel size, versions.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ..errors import DlfBidsError, UsageError

NETWORKS = {  # (stem, widths, strides): tiny for tests, paper = Rajchl et al.'s encoder
    "tiny": (4, (4, 8, 16), (1, 2, 2)),
    "small": (8, (8, 16, 32, 64), (1, 2, 2, 2)),
    "paper": (16, (16, 32, 64, 128), (1, 2, 2, 2)),
}
DEFAULT_PROTOCOLS = ("atropos", "structures")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlf-bids-train-neuronet", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: dlf-bids-train-neuronet my-atlases neuronet.pt -w work "
               "--protocols atropos structures library --iterations 2000\n\n"
               "exit codes: 0 success, 1 a teacher failed, 2 bad arguments, 64 usage error,\n"
               "65 bad input data, 66 missing input.")
    p.add_argument("atlas_dir", type=Path, help="atlas library: the teachers' atlases, and "
                                                "training images unless --no-atlas-images")
    p.add_argument("model_file", type=Path, help="where to write the trained model")
    p.add_argument("-w", "--work-dir", type=Path, default=Path("work"), help="teachers' cache")
    p.add_argument("--protocols", nargs="+", default=list(DEFAULT_PROTOCOLS), metavar="PROTOCOL",
                   help="built-in protocols (atropos, tissue, aseg, structures, library) or "
                        "protocol files (JSON/YAML); default: atropos structures")
    p.add_argument("--bids-dir", type=Path, help="also train on this BIDS dataset's T1w images")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="subjects of --bids-dir to use (default all)")
    p.add_argument("--no-atlas-images", action="store_true",
                   help="do not train on the atlases themselves (needs --bids-dir)")
    p.add_argument("--t2w", action="store_true",
                   help="a T1w + T2w network trained with ModAug (T2w rigidly registered to the "
                        "T1w; an image without T2w gets noise): it runs with or without a T2w")
    p.add_argument("--teacher-fusion", choices=["mv", "jlf"], default="jlf",
                   help="label fusion of the multi-atlas teacher (default jlf)")
    p.add_argument("--registration-preset", default="quick", help="fast, quick or accurate")
    p.add_argument("--network", choices=sorted(NETWORKS), default="small",
                   help="encoder size: tiny (tests), small (default), paper")
    p.add_argument("--crop-size", type=int, default=64, help="cubic crop edge (multiple of 8)")
    p.add_argument("--voxel-size", type=float, default=None,
                   help="grid the network works on, in mm (default: the images' median)")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's)")
    p.add_argument("--dice-weight", type=float, default=1.0,
                   help="soft Dice added to the cross-entropy (0: the paper's CE only)")
    p.add_argument("--foreground-ratio", type=float, default=0.5, metavar="P",
                   help="share of training crops centred on a labelled voxel, the rest placed "
                        "uniformly (default 0.5; on whole heads a uniform crop is mostly outside "
                        "the brain)")
    p.add_argument("--class-weights", choices=("inverse-sqrt", "none"), default="inverse-sqrt",
                   help="cross-entropy weight of each class: 1/sqrt(its share of the training "
                        "voxels) (default; without it a whole-head model never predicted the "
                        "ventricles, BENCHMARKS.md), or none (the paper's plain cross-entropy)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--nprocs", type=int, default=None, help="teacher nodes run in parallel")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training")
    p.add_argument("--seed", type=int, default=0)
    return p


def _case_id(text: str) -> str:
    """A Nipype-safe id (letters, digits, underscores)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def training_cases(library, bids_dir: Path | None, participants, use_atlases: bool,
                   with_t2w: bool = False, database_dir: Path | None = None):
    """Atlases (each registered with the others) and BIDS T1w images (with every atlas), the
    latter queried with pybids like the participant level's inputs (``database_dir``: where its
    index is kept); with ``with_t2w``, each with its T2w when it has one (the participant
    level's pairing: same session, same run if any)."""
    from ..utils.bids import check_bids_dir, collect_anatomicals, load_layout
    from ..workflows.teachers import TeacherCase

    cases = []
    if use_atlases:
        for atlas in library.atlases:
            others = tuple(a for a in library.atlases if a.atlas_id != atlas.atlas_id)
            cases.append(TeacherCase(f"atlas_{_case_id(atlas.atlas_id)}", atlas.t1w, others,
                                     atlas.dseg, atlas.t2w if with_t2w else None))
    if bids_dir is not None:
        layout = load_layout(check_bids_dir(bids_dir), database_dir)
        for anat in collect_anatomicals(layout, participants).anatomicals:
            cases.append(TeacherCase(f"bids_{_case_id(anat.t1w.name.split('.')[0])}", anat.t1w,
                                     library.atlases, t2w=anat.t2w if with_t2w else None))
    if not cases:
        raise UsageError("no training images: give --bids-dir or leave out --no-atlas-images")
    return cases


def run_teachers(cases, protocols, work_dir: Path, preset: str, seed: int, fusion: str,
                 nprocs: int):
    """Run (or read back from the cache) every case's teachers: ``({case: {protocol: file}},
    {case: T2w on the T1w grid})`` (the second only for cases with a T2w)."""
    from ..execution import configure_nipype, plugin_settings
    from ..workflows.teachers import (collect_case_outputs, collect_teacher_labels,
                                      init_neuronet_teachers_wf)

    crash_dir = work_dir / "crash"
    crash_dir.mkdir(parents=True, exist_ok=True)
    configure_nipype(crash_dir)
    workflow = init_neuronet_teachers_wf(cases, protocols, work_dir, preset, seed, fusion)
    plugin, plugin_args = plugin_settings("MultiProc", None, nprocs, None)
    try:
        graph = workflow.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:
        raise DlfBidsError(f"a teacher workflow failed (crash reports in {crash_dir}): "
                           f"{str(exc).splitlines()[0]}") from None
    return (collect_teacher_labels(graph, protocols),
            collect_case_outputs(graph, "coregister_t2w", "t2w_on_t1w"))


def load_examples(cases, labels, protocols, voxel_size: float, t2ws=None, seed: int = 0):
    """Images and teacher label maps on the model grid (:func:`to_model_grid`). With ``t2ws``
    (``{case: T2w on its T1w grid}``, possibly empty) a second channel: the T2w, or unit white
    noise for a case without one (what ModAug and inference put in place of a missing T2w)."""
    import nibabel as nb
    import numpy as np

    from ..models.neuronet_training import NeuroNetExample
    from ..model_grid import to_model_grid

    size = (voxel_size,) * 3
    rng = np.random.default_rng(seed)
    examples = []
    for case in cases:
        image = np.asarray(to_model_grid(nb.load(str(case.t1w)), size, order=1).dataobj, np.float32)
        if t2ws is not None:
            t2w = t2ws.get(case.case_id)
            second = (np.asarray(to_model_grid(nb.load(str(t2w)), size, order=1).dataobj, np.float32)
                      if t2w is not None else rng.standard_normal(image.shape).astype(np.float32))
            image = np.stack([image, second])
        maps = {p.name: np.asarray(to_model_grid(nb.load(str(labels[case.case_id][p.name])), size,
                                                 order=0).dataobj).astype(np.int16)
                for p in protocols}
        examples.append(NeuroNetExample(image, maps, case.case_id))
    return examples


def median_voxel_size(cases) -> float:
    import nibabel as nb
    import numpy as np

    return float(np.median([nb.load(str(c.t1w)).header.get_zooms()[:3] for c in cases]))


def train(args) -> Path:
    import numpy as np

    from ..models.inference import resolve_device
    from ..models.neuronet import NeuroNetConfig
    from ..models.neuronet_training import (NeuroNetTrainSettings, save_neuronet, settings_dict,
                                            train_neuronet)
    from ..models.protocols import check_source_values, resolve_protocol
    from ..utils.atlas_library import load_atlas_library
    from .parser import default_nprocs

    if args.no_atlas_images and args.bids_dir is None:
        raise UsageError("--no-atlas-images needs --bids-dir (there would be no training image)")
    library = load_atlas_library(args.atlas_dir)
    protocols = [resolve_protocol(w, library.labels) for w in args.protocols]
    for protocol in protocols:
        check_source_values(protocol, library.labels.indices)
    names = [p.name for p in protocols]
    if len(set(names)) != len(names):
        raise UsageError(f"protocol names must differ, got {', '.join(names)}")
    if args.bids_dir is not None and any(p.recipe.source == "reference" for p in protocols):
        raise UsageError("'reference' protocols (e.g. library) need a label map with every "
                         "training image: BIDS images have none")
    stem, widths, strides = NETWORKS[args.network]
    try:
        config = NeuroNetConfig({p.name: p.n_classes for p in protocols}, stem_channels=stem,
                                widths=widths, strides=strides, crop_size=(args.crop_size,) * 3,
                                in_channels=2 if args.t2w else 1)
        settings = NeuroNetTrainSettings(iterations=args.iterations, batch_size=args.batch_size,
                                         lr=args.lr, dice_weight=args.dice_weight, seed=args.seed,
                                         foreground_ratio=args.foreground_ratio,
                                         class_weights=args.class_weights,
                                         device=str(resolve_device(args.device)))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    cases = training_cases(library, args.bids_dir, args.participant_label,
                           not args.no_atlas_images, args.t2w, args.work_dir.absolute() / "bids_db")
    if args.t2w and not any(c.t2w for c in cases):
        raise UsageError("--t2w: none of the training images has a T2w")
    started = time.time()
    print(f"dlf-bids-train-neuronet: {len(cases)} training image(s), protocols "
          f"{', '.join(names)}; teachers ({args.registration_preset} registration, "
          f"{args.teacher_fusion}) cached in {args.work_dir}", flush=True)
    labels, t2ws = run_teachers(cases, protocols, args.work_dir.absolute(),
                                args.registration_preset, args.seed, args.teacher_fusion,
                                args.nprocs or default_nprocs())
    voxel_size = args.voxel_size or median_voxel_size(cases)
    examples = load_examples(cases, labels, protocols, voxel_size, t2ws if args.t2w else None,
                             args.seed)
    print(f"dlf-bids-train-neuronet: teachers ready in {time.time() - started:.0f} s; training "
          f"on a {voxel_size:g} mm grid", flush=True)
    result = train_neuronet(examples, protocols, config, settings, progress=True)
    k = max(1, min(10, len(result.history) // 2))  # windows that do not overlap
    first = float(np.mean([h["loss"] for h in result.history[:k]]))
    last = float(np.mean([h["loss"] for h in result.history[-k:]]))
    extra = {"voxel_size": [voxel_size] * 3, "teacher_fusion": args.teacher_fusion,
             "registration_preset": args.registration_preset, "network": args.network,
             "training_images": [c.case_id for c in cases],
             "atlases": [f"sub-{a.atlas_id}" for a in library.atlases]}
    modalities = ["T1w", "T2w"] if args.t2w else ["T1w"]
    out = save_neuronet(args.model_file, result.model, protocols, modalities, modaug=result.modaug,
                        train_settings={**settings_dict(settings, result.history), **extra})
    print(f"dlf-bids-train-neuronet: model written to {out} in {time.time() - started:.0f} s "
          f"(loss {first:.4f} -> {last:.4f}, mean of the first and last {k} iterations)")
    return out


def main(argv=None) -> int:
    from .train import run_command

    return run_command("dlf-bids-train-neuronet", build_parser, train, argv)


if __name__ == "__main__":
    sys.exit(main())
