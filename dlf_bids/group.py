"""Group level tables: label volumes across participants, wide per method and one long table."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingInputError
from .utils.derivatives import lut_path
from .utils.files import write_text_atomic
from .utils.labels import LabelTable, read_label_table
from .volumes import VolumeRow, format_volume, measure_volumes, totals_description

ENTITY_COLUMNS = (("sub", "participant_id"), ("ses", "session_id"), ("task", "task_id"),
                  ("acq", "acq_id"), ("ce", "ce_id"), ("rec", "rec_id"), ("run", "run_id"),
                  ("echo", "echo_id"), ("part", "part_id"))
LONG_COLUMNS = ("method", "index", "name", "volume_mm3")

# Native-geometry label maps only: a name with any other entity (space-, res-, desc-) is another
# kind of output, e.g. a label map resampled to a template, whose volumes are not the subject's.
_IMAGE_KEYS = "|".join(key for key, _ in ENTITY_COLUMNS[1:])
_NATIVE_DSEG = re.compile(rf"^(?P<image>sub-[a-zA-Z0-9]+(?:_(?:{_IMAGE_KEYS})-[a-zA-Z0-9]+)*)"
                          r"_seg-(?P<method>[a-zA-Z0-9]+)_dseg\.nii\.gz$")


@dataclass(frozen=True)
class Segmentation:
    """One method's label map of one T1w image."""

    path: Path
    method: str
    image: str  # the T1w's BIDS prefix, e.g. "sub-01_ses-pre_run-1"

    @property
    def entities(self) -> dict[str, str]:
        """Entity column -> value (``sub-01``, or ``n/a`` when the image has no such entity)."""
        found = dict(re.findall(r"(?:^|_)([a-z]+)-([a-zA-Z0-9]+)", self.image))
        return {col: (f"{key}-{found[key]}" if key in found else "n/a")
                for key, col in ENTITY_COLUMNS}

    @property
    def participant_id(self) -> str:
        return self.image.split("_")[0]


@dataclass(frozen=True)
class MeasuredImage:
    segmentation: Segmentation
    rows: tuple[VolumeRow, ...]  # per label, then the totals (see dlf_bids.volumes)


def find_methods(output_dir: Path) -> list[str]:
    """Methods with a look-up table at the output root (the participant level writes one each)."""
    return sorted(m.group(1) for p in Path(output_dir).glob("seg-*_dseg.tsv")
                  if (m := re.fullmatch(r"seg-([a-zA-Z0-9]+)_dseg\.tsv", p.name)))


def find_segmentations(output_dir: Path, method: str) -> list[Segmentation]:
    found = []
    for path in sorted(Path(output_dir).glob(f"sub-*/**/anat/sub-*_seg-{method}_dseg.nii.gz")):
        match = _NATIVE_DSEG.match(path.name)
        if match and match["method"] == method:
            found.append(Segmentation(path, method, match["image"]))
    return found


def method_labels(output_dir: Path, method: str) -> LabelTable:
    lut = lut_path(output_dir, method)
    if not lut.is_file():
        raise MissingInputError(f"no {lut.name} in {output_dir}: run the participant level first")
    return read_label_table(lut)


def measure_method(output_dir: Path, method: str) -> list[MeasuredImage]:
    """Volumes of every native label map of ``method``; :class:`MissingInputError` if none."""
    labels = method_labels(output_dir, method)
    segs = find_segmentations(output_dir, method)
    if not segs:
        raise MissingInputError(f"no seg-{method} segmentations found in {output_dir}")
    return [MeasuredImage(s, tuple(measure_volumes(s.path, labels))) for s in segs]


def write_table(path: Path, header, rows, dictionary: dict) -> Path:
    """A TSV (cells as given) and its JSON data dictionary beside it, each written atomically."""
    lines = ["\t".join(header)] + ["\t".join(str(cell) for cell in row) for row in rows]
    write_text_atomic(path.with_suffix(".json"), json.dumps(dictionary, indent=2) + "\n")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def entity_dictionary() -> dict:
    return {col: {"Description": f"BIDS {col.split('_')[0]} entity of the segmented T1w "
                                 "(n/a when the image has none)"}
            for _, col in ENTITY_COLUMNS}


def write_wide_table(output_dir: Path, method: str, measured: list[MeasuredImage]) -> Path:
    """``group_seg-<method>_volumes.tsv``: one row per T1w image, one column per label."""
    labels = method_labels(output_dir, method)
    rows = []
    for image in measured:
        per_label = [r for r in image.rows if r.index is not None]
        ents = image.segmentation.entities
        rows.append([ents[col] for _, col in ENTITY_COLUMNS]
                    + [f"{r.volume_mm3:.1f}" for r in per_label]
                    + [f"{sum(r.volume_mm3 for r in per_label):.1f}"])
    header = ([col for _, col in ENTITY_COLUMNS] + [lab.name for lab in labels.labels]
              + ["total_labelled"])
    dictionary = entity_dictionary()
    for lab in labels.labels:
        dictionary[lab.name] = {"Description": f"volume of label {lab.index} ({lab.name}) in "
                                               f"seg-{method}", "Units": "mm^3"}
    dictionary["total_labelled"] = {"Description": "sum of all label volumes", "Units": "mm^3"}
    return write_table(Path(output_dir) / f"group_seg-{method}_volumes.tsv", header, rows,
                       dictionary)


def long_rows(measured: list[MeasuredImage]) -> list[list[str]]:
    rows = []
    for image in measured:
        ents = [image.segmentation.entities[col] for _, col in ENTITY_COLUMNS]
        for r in image.rows:
            index = "n/a" if r.index is None else str(r.index)
            rows.append(ents + [image.segmentation.method, index, r.name,
                                format_volume(r.volume_mm3)])
    return rows


def write_long_table(output_dir: Path, measured: dict[str, list[MeasuredImage]]) -> Path:
    """``group_volumes.tsv``: one row per T1w image x method x label (and total)."""
    output_dir = Path(output_dir)
    rows = [row for method in sorted(measured) for row in long_rows(measured[method])]
    totals = {m: totals_description(method_labels(output_dir, m)) for m in sorted(measured)}
    # the methods of one run share the library's table: say its totals once, not per method
    said = (next(iter(totals.values())) if len(set(totals.values())) == 1
            else " ".join(f"{m}: {text}" for m, text in totals.items()))
    dictionary = {
        **entity_dictionary(),
        "method": {"Description": "segmentation method (seg- entity): mv majority voting, jlf "
                                  "joint label fusion, dlf Deep Label Fusion"},
        "index": {"Description": "label index in the method's look-up table "
                                 "(seg-<method>_dseg.tsv); n/a on the total rows"},
        "name": {"Description": f"label name from the look-up table, or a total row. {said}"},
        "volume_mm3": {"Description": "volume in the image's native geometry: voxel count "
                                      "times voxel volume", "Units": "mm^3"},
    }
    header = [col for _, col in ENTITY_COLUMNS] + list(LONG_COLUMNS)
    return write_table(output_dir / "group_volumes.tsv", header, rows, dictionary)
