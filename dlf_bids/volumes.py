"""Label volumes of one segmentation: per label, plus total brain and labelled intracranial volume.

Totals are sums of labels chosen by their look-up-table names, so they mean what the atlas
library's labels allow and no more:

* ``total_brain``: every label except CSF, ventricles and choroid plexus (FreeSurfer's
  *BrainSegVolNotVent* convention) and except labels named as outside the skull;
* ``total_intracranial``: every label except those named as outside the skull. It is written only
  when the table has CSF or ventricle labels (without them it would just repeat ``total_brain``),
  and it is a true total intracranial volume (TIV) only if the atlases label *all* CSF inside the
  skull: aseg-style atlases label the ventricles and only part of the sulcal CSF, so there it
  underestimates TIV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from .utils.images import voxel_volume_mm3
from .utils.labels import LabelTable

TOTAL_BRAIN = "total_brain"
TOTAL_INTRACRANIAL = "total_intracranial"
VOLUME_COLUMNS = ("index", "name", "volume_mm3", "voxels")

# Names are matched word by word (split at '-', '_', spaces, CamelCase), so "Left-Inf-Lat-Vent"
# is a ventricle but "Ventral-DC" is not, and "Hair" is not "air".
_CSF_WORDS = re.compile(r"^(csf|vent|ventricles?|ventricular|choroid)$")
_EXTRACRANIAL_WORDS = re.compile(r"^(skull|scalp|skin|bone|muscle|fat|eyes?|air|extracranial)$")


@dataclass(frozen=True)
class VolumeRow:
    index: int | None  # None on the summary rows
    name: str
    volume_mm3: float
    voxels: int


def _words(name: str) -> list[str]:
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)  # CamelCase too: "4thVentricle"
    return [w for w in re.split(r"[-_\s.]+", name.lower()) if w]


def is_csf_label(name: str) -> bool:
    """CSF, a ventricle or choroid plexus, from the label's name."""
    return any(_CSF_WORDS.match(w) for w in _words(name))


def is_extracranial_label(name: str) -> bool:
    """A label named as lying outside the skull (skull, scalp, eyes, ...)."""
    # "Non-Brain" splits into two harmless words: look for it with the separators removed
    return ("nonbrain" in "".join(_words(name))
            or any(_EXTRACRANIAL_WORDS.match(w) for w in _words(name)))


def label_groups(labels: LabelTable) -> dict[str, tuple[int, ...]]:
    """The label indices summed into each total that this table allows (see the module text)."""
    inside = [lab for lab in labels.labels if not is_extracranial_label(lab.name)]
    brain = tuple(lab.index for lab in inside if not is_csf_label(lab.name))
    groups = {TOTAL_BRAIN: brain} if brain else {}
    if len(brain) < len(inside):  # some CSF/ventricle label: intracranial differs from brain
        groups[TOTAL_INTRACRANIAL] = tuple(lab.index for lab in inside)
    return groups


def label_voxels(dseg_file: Path | str, labels: LabelTable) -> tuple[dict[int, int], float]:
    """Voxel count of every label of ``labels`` (0 when absent) and the voxel volume in mm³.

    One ``np.bincount`` over the map rather than one comparison per label (aseg has ~45)."""
    img = nb.load(str(dseg_file))
    data = np.asanyarray(img.dataobj).astype(np.int64).ravel()
    counts = np.bincount(data[data > 0], minlength=max(labels.indices) + 1)
    return {idx: int(counts[idx]) for idx in labels.indices}, voxel_volume_mm3(img)


def label_volumes(dseg_file: Path | str, labels: LabelTable) -> dict[int, float]:
    """Volume (mm³) of every label of ``labels`` in a label map (0 for absent labels)."""
    counts, voxel_mm3 = label_voxels(dseg_file, labels)
    return {idx: n * voxel_mm3 for idx, n in counts.items()}


def measure_volumes(dseg_file: Path | str, labels: LabelTable) -> list[VolumeRow]:
    """One row per label of the table, in its order, then one per total it allows."""
    counts, voxel_mm3 = label_voxels(dseg_file, labels)
    rows = [VolumeRow(lab.index, lab.name, counts[lab.index] * voxel_mm3, counts[lab.index])
            for lab in labels.labels]
    for total, members in label_groups(labels).items():
        n = sum(counts[i] for i in members)
        rows.append(VolumeRow(None, total, n * voxel_mm3, n))
    return rows


def format_volume(volume_mm3: float) -> str:
    # three decimals keep single voxels of odd sizes exact (1.2 mm: 1.728 mm³)
    return f"{volume_mm3:.3f}"


def volumes_tsv(rows: list[VolumeRow]) -> str:
    """The per-image table (``index``, ``name``, ``volume_mm3``, ``voxels``) as TSV text."""
    lines = ["\t".join(VOLUME_COLUMNS)]
    for row in rows:
        index = "n/a" if row.index is None else str(row.index)
        lines.append(f"{index}\t{row.name}\t{format_volume(row.volume_mm3)}\t{row.voxels}")
    return "\n".join(lines) + "\n"


def totals_description(labels: LabelTable) -> str:
    """What ``total_brain`` and ``total_intracranial`` sum, for this table, in words."""
    groups = label_groups(labels)
    csf = [lab.name for lab in labels.labels if is_csf_label(lab.name)
           and not is_extracranial_label(lab.name)]
    outside = [lab.name for lab in labels.labels if is_extracranial_label(lab.name)]
    parts = []
    if TOTAL_BRAIN in groups:
        parts.append(f"'{TOTAL_BRAIN}' sums every label except CSF, ventricle and choroid plexus "
                     f"labels (FreeSurfer's BrainSegVolNotVent convention; here: "
                     f"{', '.join(csf) or 'none'}) and labels outside the skull"
                     f"{' (' + ', '.join(outside) + ')' if outside else ''}.")
    else:
        parts.append(f"No '{TOTAL_BRAIN}' row: the look-up table has no brain tissue label.")
    if TOTAL_INTRACRANIAL in groups:
        parts.append(f"'{TOTAL_INTRACRANIAL}' sums every label inside the skull, CSF and "
                     "ventricles included. It is the labelled intracranial volume: a true total "
                     "intracranial volume (TIV) only if the atlases label all CSF inside the "
                     "skull; atlases that label the ventricles but not all extra-cerebral "
                     "(sulcal) CSF, such as FreeSurfer's aseg, make it an underestimate.")
    else:
        parts.append(f"No '{TOTAL_INTRACRANIAL}' row: the look-up table has no CSF or ventricle "
                     "label, so no intracranial volume beyond the brain can be computed.")
    return " ".join(parts)


def volumes_dictionary(labels: LabelTable, method: str) -> dict:
    """The JSON data dictionary of a per-image volumes table."""
    return {
        "index": {"Description": f"label index in the segmentation (look-up table "
                                 f"seg-{method}_dseg.tsv at the dataset root); n/a on the "
                                 "summary rows"},
        "name": {"Description": "label name from the look-up table, or a summary row. "
                                + totals_description(labels)},
        "volume_mm3": {"Description": f"volume of the label in the seg-{method} segmentation: "
                                      "voxel count times the voxel volume of the image grid",
                       "Units": "mm^3"},
        "voxels": {"Description": "number of voxels with the label (summary rows: of all "
                                  "labels summed)"},
    }
