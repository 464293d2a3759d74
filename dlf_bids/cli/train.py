"""``dlf-bids-train``: train a Deep Label Fusion model on an atlas library.

Each atlas in turn is the target; the others are registered to it with the same registration
node as the participant level (cached in the work dir, so a second run does not register again),
then the network learns to fuse them into the target's labels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import DlfBidsError, UsageError
from .environment import prepare_environment

NETWORKS = {  # widths of the weighted-voting (3 levels) and fine-tuning (4 levels) subnets
    "tiny": ((8, 16, 32), (8, 16, 32, 64)),
    "small": ((16, 32, 64), (16, 32, 64, 128)),
    "paper": ((32, 64, 128), (32, 64, 128, 256)),
}


def build_parser() -> argparse.ArgumentParser:
    # imports torch and monai, so not at module level: main prepares the environment first
    from ..models.training import TrainSettings

    p = argparse.ArgumentParser(
        prog="dlf-bids-train", description=__doc__.splitlines()[0],
        epilog="example: dlf-bids-train my-atlases dlf.pt -w work --epochs 20 --network paper")
    p.add_argument("atlas_dir", type=Path, help="atlas library (the format the participant level takes)")
    p.add_argument("model_file", type=Path, help="where to write the trained model")
    p.add_argument("-w", "--work-dir", type=Path, default=Path("work"), help="registrations cache")
    p.add_argument("--registration-preset", default="quick", help="fast, quick or accurate")
    p.add_argument("--network", choices=sorted(NETWORKS), default="small",
                   help="subnet widths: tiny (tests), small (default), paper (32..256)")
    p.add_argument("--patch-size", type=int, default=48, help="cubic patch edge, multiple of 8")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iterations", type=int, default=100, help="patches per epoch")
    p.add_argument("--lr-step", type=int, default=10, help="epochs between learning-rate decays")
    p.add_argument("--lr", type=float, default=TrainSettings.lr, help="Adam learning rate")
    p.add_argument("--dice-loss", choices=["generalized", "mean"], default=TrainSettings.dice_loss,
                   help="generalized Dice (one overlap over all labels, weighted by --loss-weighting; "
                        "the paper's) or the mean of per-label soft Dice")
    p.add_argument("--loss-weighting", choices=["square", "simple", "uniform"],
                   default=TrainSettings.gdl_weight,
                   help="generalized Dice label weights: 1/volume (simple), 1/volume² (square, "
                        "the paper's; starves large structures when small ones are many), none")
    p.add_argument("--bce-weight", type=float, default=TrainSettings.bce_weight,
                   help="binary cross-entropy added to the Dice loss")
    p.add_argument("--atlases-per-sample", type=int, default=4,
                   help="atlases drawn (with replacement) for each training patch")
    p.add_argument("--t1w-only", action="store_true", help="ignore the library's T2w images")
    p.add_argument("--no-modaug", action="store_true", help="train without modality augmentation")
    p.add_argument("--val-fraction", type=float, default=0.2, help="atlases held out for validation")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--nprocs", type=int, default=None, help="parallel registrations")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training (default: all available cores); on a shared "
                        "machine give it only the cores that are really free")
    p.add_argument("--seed", type=int, default=0)
    return p


def _load(path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj).astype(np.float32)


def collect_cases(exec_graph, library, use_t2w: bool):
    """Training cases from the finished registration graph (one per target atlas)."""
    from ..models.training import TrainingCase

    results = {}
    for node in exec_graph.nodes():
        target_id = next((p[len("target_"):-len("_wf")] for p in node.fullname.split(".")
                          if p.startswith("target_") and p.endswith("_wf")), None)
        if target_id is not None and node.name in ("register_atlases", "coregister_t2w"):
            results.setdefault(target_id, {})[node.name] = node.result.outputs
    cases = []
    for target in library.atlases:
        reg = results[target.atlas_id]["register_atlases"]
        others = [a.atlas_id for a in library.atlases if a.atlas_id != target.atlas_id]
        target_images = [_load(target.t1w)]
        atlas_images = [[_load(f) for f in reg.warped_t1w]]
        if use_t2w:
            target_images.append(_load(results[target.atlas_id]["coregister_t2w"].t2w_on_t1w))
            atlas_images.append([_load(f) for f in reg.warped_t2w])
        cases.append(TrainingCase(
            target_images=np.stack(target_images),
            target_labels=np.asanyarray(nb.load(str(target.dseg)).dataobj).astype(np.int32),
            atlas_images=np.stack([np.stack([mod[j] for mod in atlas_images])
                                   for j in range(len(others))]),
            atlas_labels=np.stack([np.asanyarray(nb.load(f).dataobj).astype(np.int32)
                                   for f in reg.warped_dseg]),
            case_id=target.atlas_id, atlas_ids=others))
    return cases


def train(args) -> Path:
    from ..models.dlf import DLFConfig
    from ..models.inference import resolve_device
    from ..models.training import TrainSettings, train_dlf
    from ..utils.atlas_library import load_atlas_library
    from ..workflows.training import init_dlf_training_registration_wf
    from ..execution import configure_nipype, plugin_settings
    from .parser import default_nprocs

    library = load_atlas_library(args.atlas_dir)
    if len(library.atlases) < 3:
        raise UsageError("training needs at least 3 atlases (each target keeps 2 others)")
    use_t2w = library.has_t2w and not args.t1w_only
    modalities = ["T1w", "T2w"] if use_t2w else ["T1w"]
    device = str(resolve_device(args.device))
    n_pairs = len(library.atlases) * (len(library.atlases) - 1)
    print(f"dlf-bids-train: {len(library.atlases)} atlases, {n_pairs} registrations "
          f"({args.registration_preset}), modalities {'+'.join(modalities)}, device {device}")

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    started = time.time()
    configure_nipype()
    workflow = init_dlf_training_registration_wf(library, args.work_dir.absolute(),
                                                 args.registration_preset, args.seed, use_t2w)
    plugin, plugin_args = plugin_settings("MultiProc", None, args.nprocs or default_nprocs(), None)
    exec_graph = workflow.run(plugin=plugin, plugin_args=plugin_args)
    cases = collect_cases(exec_graph, library, use_t2w)
    print(f"dlf-bids-train: registrations ready in {time.time() - started:.0f} s")

    wv, ft = NETWORKS[args.network]
    n_labels = len(library.labels.labels) + 1
    config = DLFConfig(n_labels=n_labels, n_modalities=len(modalities), wv_channels=wv,
                       ft_channels=ft)
    settings = TrainSettings(
        patch_size=(args.patch_size,) * 3, atlases_per_sample=args.atlases_per_sample,
        epochs=args.epochs, iterations_per_epoch=args.iterations, lr_step=args.lr_step,
        lr=args.lr, dice_loss=args.dice_loss, gdl_weight=args.loss_weighting,
        bce_weight=args.bce_weight,
        val_fraction=args.val_fraction, modaug=use_t2w and not args.no_modaug,
        seed=args.seed, device=device)
    result = train_dlf(cases, library.labels, config, settings, modalities, args.model_file,
                       progress=True)
    last = result.history[-1] if result.history else {}
    print(f"dlf-bids-train: model written to {result.out_file} in {time.time() - started:.0f} s "
          f"(last epoch: loss {last.get('loss', float('nan')):.4f}, "
          f"validation Dice {last.get('val_dice') or float('nan'):.3f})")
    return result.out_file


def run_command(prog: str, parser_factory, action, argv=None) -> int:
    """A training command's main: parse, run ``action(args)``, a :class:`DlfBidsError` as one
    line and its exit code."""
    prepare_environment()  # before the parser imports torch and monai (and so matplotlib)
    from .run import _setup_logging

    args = parser_factory().parse_args(argv)
    _setup_logging(0)
    try:
        action(args)
    except DlfBidsError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def main(argv=None) -> int:
    return run_command("dlf-bids-train", build_parser, train, argv)


if __name__ == "__main__":
    sys.exit(main())
