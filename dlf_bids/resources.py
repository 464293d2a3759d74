"""How much memory each node of a participant graph needs, from the sizes of its images.

Nipype's MultiProc schedules nodes by their ``mem_gb`` so that the nodes running together fit
``--mem-gb``; a node that alone needs more than the limit cannot fit at all, and the run is refused
before any work (exit 69) rather than killed by the kernel an hour later.

The figures are linear fits, ``base + bytes per voxel``, to peak RSS measured in fresh processes
on the fs-training subjects at 2 mm (0.62 M voxels) and 1 mm (4.87 M voxels, brain-cropped), 4
atlases, 41 labels, and on a whole-head 256³ T1w (16.8 M voxels, 2 atlases; BENCHMARKS.md,
"Memory"), with a 25 % margin. JLF has two parts: one that follows the image grid and one that
follows the brain (its mask is the dilated union of the warped atlas labels), which is why a
whole-head image costs far less than its voxel count alone would say. Other atlas and label counts
scale the per-voxel part linearly: an assumption (each atlas and each label adds one array), not
a measurement.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from .utils.images import voxel_volume_mm3

MIB = 2**20
MARGIN = 1.25
FIT_ATLASES, FIT_LABELS = 4, 41  # the configuration the fits were measured in

# (base MiB, bytes per voxel at FIT_ATLASES/FIT_LABELS)
# registration: (base MiB, bytes per fixed voxel, bytes per moving voxel); 421 / 1226 / 3157 MiB
# at (fixed, moving) = (0.62, 0.62), (4.87, 4.87), (16.8, 4.93) M voxels: the deformation fields
# live on the fixed image's grid
REGISTRATION = (304.0, 170.0, 29.0)
MAJORITY_VOTE = (95.0, 40.0)  # 119 / 291 MiB; scales with atlases
DEEP_LABEL_FUSION = (1395.0, 134.0)  # 1478 / 2049 MiB (torch and the model in the base); labels
# JLF: (base MiB, bytes per grid voxel, bytes per brain voxel); 806 / 3082 / 5093 MiB at
# (grid, brain) = (0.62, 0.20), (4.87, 1.56), (16.8, 1.49) M voxels; the brain part scales with
# atlases + labels
JOINT_LABEL_FUSION = (479.0, 184.0, 1175.0)
BRAIN_MARGIN = 1.2  # the JLF mask is dilated beyond the labelled voxels
# DeepAtlas, its largest node (one atlas: torch, the networks on the small reference grid, antspyx
# resampling on the subject's grid): 657 / 860 / 1283 MiB at 0.62 / 4.87 / 16.8 M subject voxels
# (benchmarks/deepatlas_memory.py, without Nipype, whose ~150 MiB are added to the base)
DEEPATLAS = (810.0, 40.0)


@functools.lru_cache(maxsize=32)
def labelled_mm3(dseg: str) -> float:
    """Volume (mm³) of the labelled voxels of a label map (read once per file and process)."""
    img = nb.load(dseg)
    return float(np.count_nonzero(np.asanyarray(img.dataobj))) * voxel_volume_mm3(img)
# label volumes of one map: 74 / 310 MiB at 128^3 / 256^3 voxels measured without Nipype, whose
# ~150 MiB are added to the base
LABEL_VOLUMES = (190.0, 17.0)
# NeuroNet inference (--tissue-model): benchmarks/neuronet_memory.py (neuronet_segment in a fresh
# process, 1 thread; untrained small and paper networks, 1 and 2 mm model grids, 4 and 50 output
# channels, 1 and 2 mm images: BENCHMARKS.md). Base: torch, MONAI, the model; per native voxel: the
# image, labels, tissue maps and their writing; per model-grid voxel and channel: MONAI's
# accumulated probabilities; per window voxel and channel: the window's logits and softmax (the
# networks' own activations were not separable: small and paper measured the same)
# (base MiB, B per native voxel, B per grid voxel and channel, B per window voxel and channel)
NEURONET = (610.0, 39.0, 7.3, 0.5)


def n_voxels(path: Path | str) -> int:
    """Voxels of a 3D image, from its header alone."""
    return int(np.prod(nb.load(str(path)).shape[:3]))


def _gb(base_mib: float, per_voxel: float, voxels: int, scale: float = 1.0) -> float:
    return MARGIN * (base_mib * MIB + per_voxel * scale * voxels) / 1e9


def registration_gb(fixed_voxels: int, moving_voxels: int) -> float:
    """One registration; the fixed image is the subject for atlases, the template for
    --output-spaces."""
    base, per_fixed, per_moving = REGISTRATION
    return _gb(base, per_fixed, fixed_voxels) + _gb(0.0, per_moving, moving_voxels)


def deepatlas_gb(voxels: int) -> float:
    """One DeepAtlas node (subject alignment, one atlas's network pass and resampling, or the
    segmentation network) on a subject of ``voxels`` voxels; the reference grid is small and fixed."""
    return _gb(*DEEPATLAS, voxels)


def fusion_gb(method: str, voxels: int, n_atlases: int, n_labels: int,
              brain_voxels: int | None = None) -> float:
    """Peak memory of one fusion node on a target of ``voxels`` voxels, ``brain_voxels`` of them
    in the brain (default: all, the cautious choice)."""
    if method == "mv":
        return _gb(*MAJORITY_VOTE, voxels, n_atlases / FIT_ATLASES)
    if method == "jlf":
        base, per_voxel, per_brain_voxel = JOINT_LABEL_FUSION
        brain = voxels if brain_voxels is None else min(brain_voxels, voxels)
        scale = (n_atlases + n_labels) / (FIT_ATLASES + FIT_LABELS)
        return _gb(base, per_voxel, voxels) + _gb(0.0, per_brain_voxel, brain, scale)
    if method == "dlf":
        # DLF runs a fixed number of atlases per forward pass (--atlas-batch): labels dominate
        return _gb(*DEEP_LABEL_FUSION, voxels, n_labels / FIT_LABELS)
    raise ValueError(f"unknown fusion method {method!r}")


def neuronet_gb(native_voxels: int, grid_voxels: int, window_voxels: int, channels: int) -> float:
    """NeuroNet inference on a T1w of ``native_voxels`` voxels, ``grid_voxels`` on the model's
    grid, run in windows of ``window_voxels``; ``channels``: the output channels of all
    protocols together (:meth:`~dlf_bids.neuronet_segmentation.ModelOutputs.window_voxels`)."""
    base, per_native, per_grid_channel, per_window_channel = NEURONET
    return _gb(base, per_native, native_voxels) + _gb(
        0.0, channels * (per_grid_channel * grid_voxels + per_window_channel * window_voxels), 1)


def label_volumes_gb(voxels: int) -> float:
    return _gb(*LABEL_VOLUMES, voxels)


@dataclass(frozen=True)
class MemoryPlan:
    """The memory the nodes of one T1w's graph need, in GB."""

    registration: float
    fusion: dict[str, float]
    template_registration: float = 0.0  # T1w to the largest --output-spaces template (0: none)
    deepatlas: float = 0.0  # a DeepAtlas node, with --registration deepatlas (0: ANTs registers)
    neuronet: float = 0.0  # --tissue-model inference (0: none)

    @property
    def largest(self) -> tuple[str, float]:
        registration = ({"DeepAtlas registration": self.deepatlas} if self.deepatlas
                        else {"registration": self.registration})
        needs = {**registration, **{f"{m} fusion": gb for m, gb in self.fusion.items()}}
        if self.template_registration:
            needs["template registration"] = self.template_registration
        if self.neuronet:
            needs["NeuroNet"] = self.neuronet
        name = max(needs, key=needs.get)
        return name, needs[name]


def plan_memory(t1w: Path | str, atlas_t1ws, methods, n_labels: int,
                template_t1ws=(), atlas_dsegs=(), engine: str = "ants") -> MemoryPlan:
    """``template_t1ws``: the templates the T1w is registered to (``--output-spaces``);
    ``atlas_dsegs``: the atlases' label maps, whose labelled volume tells the brain's size
    (without them the whole image is taken as brain); ``engine``: ``--registration``."""
    voxels = n_voxels(t1w)
    brain_voxels = None
    if atlas_dsegs:
        target_voxel_mm3 = voxel_volume_mm3(nb.load(str(t1w)))
        brain_voxels = int(BRAIN_MARGIN * labelled_mm3(str(atlas_dsegs[0])) / target_voxel_mm3)
    atlas_voxels = max(n_voxels(a) for a in atlas_t1ws)
    n_atlases = len(atlas_t1ws)
    return MemoryPlan(
        registration=registration_gb(voxels, atlas_voxels),
        fusion={m: fusion_gb(m, voxels, n_atlases, n_labels, brain_voxels) for m in methods},
        # the subject moves onto the template
        template_registration=max((registration_gb(n_voxels(t), voxels) for t in template_t1ws),
                                  default=0.0),
        deepatlas=deepatlas_gb(voxels) if engine == "deepatlas" else 0.0,
    )


def plan_for_run(config, t1w: Path | str, library) -> MemoryPlan:
    """:func:`plan_memory` for one T1w of a run (its config and atlas library)."""
    from .templates import registration_targets

    templates = [s.t1w for s in registration_targets(config.output_spaces).values()]
    plan = plan_memory(t1w, [a.t1w for a in library.atlases], config.fusion,
                       len(library.labels.indices), templates,
                       atlas_dsegs=[a.dseg for a in library.atlases], engine=config.registration)
    if getattr(config, "tissue_model", None) is None:
        return plan
    from dataclasses import replace

    from .neuronet_segmentation import model_outputs

    outputs = model_outputs(str(config.tissue_model))
    return replace(plan, neuronet=neuronet_gb(n_voxels(t1w), *outputs.window_voxels(t1w),
                                              outputs.channels))


def machine_memory_gb() -> float:
    """Physical memory of this machine (what MultiProc assumes without --mem-gb)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
