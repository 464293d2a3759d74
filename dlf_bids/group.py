"""Group level: a table of label volumes across participants, one per segmentation method."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nb
import numpy as np

from .errors import MissingInputError
from .utils.derivatives import lut_path
from .utils.files import write_text_atomic
from .utils.images import voxel_volume_mm3
from .utils.labels import LabelTable, read_label_table

ENTITY_COLUMNS = (("sub", "participant_id"), ("ses", "session_id"), ("task", "task_id"),
                  ("acq", "acq_id"), ("ce", "ce_id"), ("rec", "rec_id"), ("run", "run_id"),
                  ("echo", "echo_id"), ("part", "part_id"))


def label_volumes(dseg_file: Path | str, labels: LabelTable) -> dict[int, float]:
    """Volume (mm³) of every label of ``labels`` in a label map (0 for absent labels)."""
    img = nb.load(str(dseg_file))
    data = np.asanyarray(img.dataobj).astype(np.int64).ravel()
    counts = np.bincount(data[data > 0], minlength=max(labels.indices) + 1)
    vox = voxel_volume_mm3(img)
    return {idx: float(counts[idx]) * vox if idx < counts.size else 0.0 for idx in labels.indices}


def _entities_of(path: Path) -> dict[str, str]:
    found = dict(re.findall(r"(sub|ses|task|acq|ce|rec|run|echo|part)-([a-zA-Z0-9]+)", path.name))
    return {col: (f"{key}-{found[key]}" if key in found else "n/a") for key, col in ENTITY_COLUMNS}


def group_volumes(output_dir: Path | str, method: str) -> Path:
    """Write ``group_seg-<method>_volumes.tsv`` (+ JSON data dictionary); return the TSV path."""
    output_dir = Path(output_dir)
    lut = lut_path(output_dir, method)
    if not lut.is_file():
        raise MissingInputError(f"no {lut.name} in {output_dir}: run the participant level first")
    labels = read_label_table(lut)
    # native segmentations only: a space- copy (--output-spaces) would count the T1w twice, and
    # its voxel counts are template volumes, not the subject's
    files = sorted(f for f in output_dir.glob(f"sub-*/**/anat/sub-*_seg-{method}_dseg.nii.gz")
                   if "_space-" not in f.name)
    if not files:
        raise MissingInputError(f"no seg-{method} segmentations found in {output_dir}")

    rows = []
    for f in files:
        ents = _entities_of(f)
        vols = label_volumes(f, labels)
        rows.append([ents[col] for _, col in ENTITY_COLUMNS] + [f"{vols[i]:.1f}" for i in labels.indices]
                    + [f"{sum(vols.values()):.1f}"])
    header = [col for _, col in ENTITY_COLUMNS] + [lab.name for lab in labels.labels] + ["total_labelled"]
    tsv = output_dir / f"group_seg-{method}_volumes.tsv"
    write_text_atomic(tsv, "\n".join("\t".join(r) for r in [header] + rows) + "\n")

    dictionary = {col: {"Description": f"BIDS {col.split('_')[0]} entity of the segmented T1w"}
                  for _, col in ENTITY_COLUMNS}
    for lab in labels.labels:
        dictionary[lab.name] = {"Description": f"volume of label {lab.index} ({lab.name}) in seg-{method}",
                                "Units": "mm^3"}
    dictionary["total_labelled"] = {"Description": "sum of all label volumes", "Units": "mm^3"}
    write_text_atomic(tsv.with_suffix(".json"), json.dumps(dictionary, indent=2) + "\n")
    return tsv
