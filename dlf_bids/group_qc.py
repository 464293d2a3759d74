"""Group quality control: volume outliers, agreement between methods, images without results."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from .evaluation import dice_per_label
from .group import ENTITY_COLUMNS, MeasuredImage, Segmentation, entity_dictionary, write_table
from .run_status import read_statuses
from .volumes import format_volume

# Iglewicz & Hoaglin (1993): |modified z| > 3.5 flags an outlier; 1.4826 x MAD estimates the
# standard deviation of normal data, 1.2533 x mean absolute deviation when the MAD is 0.
Z_THRESHOLD = 3.5
MAD_TO_SD = 1.4826
MEANAD_TO_SD = 1.2533
# Below this many images the median and MAD are too unstable to call anything an outlier.
MIN_IMAGES_FOR_OUTLIERS = 5


@dataclass(frozen=True)
class Outlier:
    segmentation: Segmentation
    index: int | None
    name: str
    volume_mm3: float
    median_mm3: float
    z: float


@dataclass(frozen=True)
class Agreement:
    image: Segmentation  # the first method's map; the image's entities
    method_a: str
    method_b: str
    mean_dice: float  # over labels present in either map; NaN when none is
    lowest_dice: float
    lowest_label: str
    n_labels: int


@dataclass(frozen=True)
class Problem:
    participant_id: str
    image: str  # the image's BIDS prefix, or the subject when no image was chosen
    status: str  # failed, skipped or missing
    reason: str
    crash_files: tuple[str, ...] = ()  # Nipype crash reports, relative to the output dir


def robust_z(values) -> np.ndarray:
    """(x - median) / (1.4826 MAD); the mean absolute deviation stands in for a zero MAD (more
    than half the values equal), and all values equal give z = 0."""
    values = np.asarray(values, dtype=float)
    median = np.median(values)
    deviation = np.abs(values - median)
    spread = MAD_TO_SD * np.median(deviation)
    if spread == 0:
        spread = MEANAD_TO_SD * np.mean(deviation)
    if spread == 0:
        return np.zeros_like(values)
    return (values - median) / spread


def find_outliers(measured: dict[str, list[MeasuredImage]]) -> list[Outlier]:
    """Every (image, method, label) whose volume has |robust z| > 3.5 among the images of its
    method, largest |z| first. Methods with fewer than :data:`MIN_IMAGES_FOR_OUTLIERS` images
    are left out."""
    found = []
    for images in measured.values():
        if len(images) >= MIN_IMAGES_FOR_OUTLIERS:
            found += _method_outliers(images)
    return sorted(found, key=lambda o: (-abs(o.z), o.segmentation.image,
                                        o.segmentation.method, o.name))


def _method_outliers(images: list[MeasuredImage]) -> list[Outlier]:
    found = []
    for k, row in enumerate(images[0].rows):  # one method: every image has the same rows
        volumes = np.array([image.rows[k].volume_mm3 for image in images])
        median = float(np.median(volumes))
        for image, volume, z in zip(images, volumes, robust_z(volumes)):
            if abs(z) > Z_THRESHOLD:
                found.append(Outlier(image.segmentation, row.index, row.name, float(volume),
                                     median, float(z)))
    return found


def write_outliers(output_dir: Path, outliers: list[Outlier]) -> Path:
    header = [col for _, col in ENTITY_COLUMNS] + ["method", "index", "name", "volume_mm3",
                                                   "median_mm3", "robust_z"]
    rows = [[o.segmentation.entities[col] for _, col in ENTITY_COLUMNS]
            + [o.segmentation.method, "n/a" if o.index is None else o.index, o.name,
               format_volume(o.volume_mm3), format_volume(o.median_mm3), f"{o.z:.2f}"]
            for o in outliers]
    dictionary = {
        **entity_dictionary(),
        "method": {"Description": "segmentation method (seg- entity)"},
        "index": {"Description": "label index (n/a on total rows, see group_volumes.json)"},
        "name": {"Description": "label name, or a total row of group_volumes.tsv"},
        "volume_mm3": {"Description": "this image's volume of the label", "Units": "mm^3"},
        "median_mm3": {"Description": "median volume of the label over all images of the "
                                      "method", "Units": "mm^3"},
        "robust_z": {"Description": f"(volume - median) / ({MAD_TO_SD} x median absolute "
                                    f"deviation), over all images of the method ({MEANAD_TO_SD} x "
                                    "mean absolute deviation where the MAD is 0); rows are the "
                                    f"labels with |robust_z| > {Z_THRESHOLD}, computed only for "
                                    f"methods with at least {MIN_IMAGES_FOR_OUTLIERS} images"},
    }
    return write_table(Path(output_dir) / "group_outliers.tsv", header, rows, dictionary)


def _load_labels(path: Path) -> np.ndarray:
    return np.asanyarray(nb.load(str(path)).dataobj)


def method_agreement(measured: dict[str, list[MeasuredImage]], labels) -> list[Agreement]:
    """Dice between the label maps of every pair of methods, per image with two or more.

    ``labels``: the label indices to compare (the look-up table's)."""
    by_image: dict[str, dict[str, Segmentation]] = {}
    for method in sorted(measured):
        for image in measured[method]:
            by_image.setdefault(image.segmentation.image, {})[method] = image.segmentation
    names = {r.index: r.name for images in measured.values() for r in images[0].rows}
    found = []
    for image in sorted(by_image):
        segs = by_image[image]
        if len(segs) < 2:
            continue
        maps = {m: _load_labels(s.path) for m, s in segs.items()}
        found += [_pair_agreement(segs[a], a, b, maps[a], maps[b], labels, names)
                  for a, b in itertools.combinations(sorted(segs), 2)]
    return found


def _pair_agreement(seg: Segmentation, a: str, b: str, map_a, map_b, labels,
                    names: dict) -> Agreement:
    nothing = Agreement(seg, a, b, float("nan"), float("nan"), "n/a", 0)
    if map_a.shape != map_b.shape:  # not the same grid: no voxelwise agreement
        return nothing
    scores = {k: v for k, v in dice_per_label(map_a, map_b, labels).items() if not np.isnan(v)}
    if not scores:  # neither map holds a label
        return nothing
    lowest = min(scores, key=scores.get)
    return Agreement(seg, a, b, float(np.mean(list(scores.values()))), scores[lowest],
                     names.get(lowest, str(lowest)), len(scores))


def write_agreement(output_dir: Path, agreement: list[Agreement]) -> Path:
    header = [col for _, col in ENTITY_COLUMNS] + ["method_a", "method_b", "mean_dice",
                                                   "lowest_dice", "lowest_dice_label", "labels"]
    rows = [[a.image.entities[col] for _, col in ENTITY_COLUMNS]
            + [a.method_a, a.method_b, _dice(a.mean_dice), _dice(a.lowest_dice), a.lowest_label,
               a.n_labels] for a in agreement]
    dictionary = {
        **entity_dictionary(),
        "method_a": {"Description": "first segmentation method of the pair"},
        "method_b": {"Description": "second segmentation method of the pair"},
        "mean_dice": {"Description": "mean Dice overlap between the two label maps of the image, "
                                     "over the labels present in either (n/a: maps on different "
                                     "grids); agreement is a QC signal, not accuracy"},
        "lowest_dice": {"Description": "Dice of the label on which the two methods agree least"},
        "lowest_dice_label": {"Description": "name of that label"},
        "labels": {"Description": "number of labels present in either map (averaged over)"},
    }
    return write_table(Path(output_dir) / "group_method_agreement.tsv", header, rows, dictionary)


def _dice(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.4f}"


def find_problems(bids_dir: Path, output_dir: Path, segmented: set[str]) -> list[Problem]:
    """Images that failed or were skipped (from the status records, with their reasons), and
    subjects of the BIDS dataset with no segmentation and no record (``missing``).

    ``segmented``: the participant ids with at least one label map in the output."""
    problems, recorded = [], set()
    for record in read_statuses(output_dir):
        recorded.add(record.participant_id)
        if record.status in ("failed", "skipped"):
            crashes = tuple(f for f in record.crash_files if (Path(output_dir) / f).is_file())
            problems.append(Problem(record.participant_id, record.name, record.status,
                                    record.reason or "no reason recorded", crashes))
        elif gone := [f for f in record.outputs if not (Path(output_dir) / f).is_file()]:
            problems.append(Problem(record.participant_id, record.name, "missing",
                                    f"succeeded, but its outputs are gone: {', '.join(gone)}"))
    for subject in sorted(p.name for p in Path(bids_dir).glob("sub-*") if p.is_dir()):
        if subject not in segmented and subject not in recorded:
            problems.append(Problem(subject, subject, "missing",
                                    "in the BIDS dataset, but no segmentation and no status record "
                                    "(not processed, or its run ended before recording one)"))
    order = {"failed": 0, "skipped": 1, "missing": 2}
    return sorted(problems, key=lambda p: (order[p.status], p.image))
