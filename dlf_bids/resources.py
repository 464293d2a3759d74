"""How much memory each node of a participant graph needs, from the sizes of its images.

Nipype's MultiProc schedules nodes by their ``mem_gb`` so that the nodes running together fit
``--mem-gb``; a node that alone needs more than the limit cannot fit at all, and the run is refused
before any work (exit 69) rather than killed by the kernel an hour later.

The figures are linear fits, ``base + bytes per voxel``, to peak RSS measured in fresh processes
on the fs-training subjects at 2 mm (0.62 M voxels) and 1 mm (4.87 M voxels), 4 atlases,
41 labels (BENCHMARKS.md, "Deep Label Fusion" and "Multi-atlas"), with a 25 % margin. Other
atlas and label counts scale the per-voxel part linearly: an assumption (each atlas and each
label adds one image-sized array), not a measurement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

MIB = 2**20
MARGIN = 1.25
FIT_ATLASES, FIT_LABELS = 4, 41  # the configuration the fits were measured in

# (base MiB, bytes per voxel at FIT_ATLASES/FIT_LABELS)
REGISTRATION = (300.0, 100.0)  # per voxel of fixed + moving image; 421 MiB at 2 mm, 1226 at 1 mm
MAJORITY_VOTE = (95.0, 40.0)  # 119 / 291 MiB; scales with atlases
JOINT_LABEL_FUSION = (474.0, 561.0)  # 806 / 3082 MiB; scales with atlases + labels
DEEP_LABEL_FUSION = (1395.0, 134.0)  # 1478 / 2049 MiB (torch and the model in the base); labels
# label volumes of one map: 74 / 310 MiB at 128^3 / 256^3 voxels measured without Nipype, whose
# ~150 MiB are added to the base
LABEL_VOLUMES = (190.0, 17.0)


def n_voxels(path: Path | str) -> int:
    """Voxels of a 3D image, from its header alone."""
    return int(np.prod(nb.load(str(path)).shape[:3]))


def _gb(base_mib: float, per_voxel: float, voxels: int, scale: float = 1.0) -> float:
    return MARGIN * (base_mib * MIB + per_voxel * scale * voxels) / 1e9


def registration_gb(target_voxels: int, atlas_voxels: int) -> float:
    return _gb(*REGISTRATION, target_voxels + atlas_voxels)


def fusion_gb(method: str, voxels: int, n_atlases: int, n_labels: int) -> float:
    """Peak memory of one fusion node on a target of ``voxels`` voxels."""
    if method == "mv":
        return _gb(*MAJORITY_VOTE, voxels, n_atlases / FIT_ATLASES)
    if method == "jlf":
        return _gb(*JOINT_LABEL_FUSION, voxels,
                   (n_atlases + n_labels) / (FIT_ATLASES + FIT_LABELS))
    if method == "dlf":
        # DLF runs a fixed number of atlases per forward pass (--atlas-batch): labels dominate
        return _gb(*DEEP_LABEL_FUSION, voxels, n_labels / FIT_LABELS)
    raise ValueError(f"unknown fusion method {method!r}")


def label_volumes_gb(voxels: int) -> float:
    return _gb(*LABEL_VOLUMES, voxels)


@dataclass(frozen=True)
class MemoryPlan:
    """The memory the nodes of one T1w's graph need, in GB."""

    registration: float
    fusion: dict[str, float]

    @property
    def largest(self) -> tuple[str, float]:
        needs = {"registration": self.registration, **{f"{m} fusion": gb
                                                        for m, gb in self.fusion.items()}}
        name = max(needs, key=needs.get)
        return name, needs[name]


def plan_memory(t1w: Path | str, atlas_t1ws, methods, n_labels: int) -> MemoryPlan:
    voxels = n_voxels(t1w)
    atlas_voxels = max(n_voxels(a) for a in atlas_t1ws)
    n_atlases = len(atlas_t1ws)
    return MemoryPlan(
        registration=registration_gb(voxels, atlas_voxels),
        fusion={m: fusion_gb(m, voxels, n_atlases, n_labels) for m in methods},
    )


def machine_memory_gb() -> float:
    """Physical memory of this machine (what MultiProc assumes without --mem-gb)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
