"""The atlas library: a BIDS-Derivatives-style folder of images and label maps.

Layout (other tools and the tests rely on it; keep it exactly)::

    library/
      dataset_description.json        DatasetType: derivative
      dseg.tsv                        look-up table (index, name[, abbreviation, color])
      sub-<id>/anat/sub-<id>_T1w.nii.gz
      sub-<id>/anat/sub-<id>_T2w.nii.gz     optional
      sub-<id>/anat/sub-<id>_dseg.nii.gz    label map on the T1w grid
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from ..errors import BadDataError, MissingInputError
from .files import write_text_atomic
from .labels import LabelTable, read_label_table, write_label_table

MIN_ATLASES = 2


@dataclass(frozen=True)
class Atlas:
    atlas_id: str  # without the sub- prefix
    t1w: Path
    dseg: Path
    t2w: Path | None = None


@dataclass(frozen=True)
class AtlasLibrary:
    root: Path
    atlases: tuple[Atlas, ...]
    labels: LabelTable

    @property
    def has_t2w(self) -> bool:
        return all(a.t2w is not None for a in self.atlases)


def _same_grid(a: nb.spatialimages.SpatialImage, b: nb.spatialimages.SpatialImage) -> bool:
    return a.shape[:3] == b.shape[:3] and np.allclose(a.affine, b.affine, atol=1e-4)


def check_atlas(atlas: Atlas, labels: LabelTable) -> None:
    """Raise :class:`BadDataError` unless the label map matches the T1w grid and the look-up table."""
    t1w = nb.load(atlas.t1w)
    dseg = nb.load(atlas.dseg)
    if not _same_grid(t1w, dseg):
        raise BadDataError(
            f"atlas sub-{atlas.atlas_id}: label map is not on the T1w grid "
            f"(shape {dseg.shape} vs {t1w.shape}, or different affine)"
        )
    data = np.asanyarray(dseg.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.equal(np.mod(data, 1), 0)):
            raise BadDataError(f"atlas sub-{atlas.atlas_id}: label map holds non-integer values")
    present = set(np.unique(data).astype(int).tolist()) - {0}
    unknown = sorted(present - set(labels.indices))
    if unknown:
        raise BadDataError(
            f"atlas sub-{atlas.atlas_id}: labels {unknown[:10]} are not in the library's dseg.tsv"
        )
    if atlas.t2w is not None:
        t2w = nb.load(atlas.t2w)
        if len(t2w.shape) != 3:
            raise BadDataError(f"atlas sub-{atlas.atlas_id}: T2w is not a 3D image")


def load_atlas_library(root: Path | str, check_images: bool = True) -> AtlasLibrary:
    """Find and check every atlas of the library at ``root``."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise MissingInputError(f"atlas library {root} does not exist")
    desc = root / "dataset_description.json"
    if not desc.is_file():
        raise BadDataError(f"atlas library {root} has no dataset_description.json")
    try:
        dataset_type = json.loads(desc.read_text()).get("DatasetType")
    except json.JSONDecodeError as err:
        raise BadDataError(f"{desc} is not valid JSON ({err})")
    if dataset_type != "derivative":
        raise BadDataError(f"{desc} must say \"DatasetType\": \"derivative\"")
    labels = read_label_table(root / "dseg.tsv")

    atlases = []
    for subdir in sorted(root.glob("sub-*")):
        if not subdir.is_dir():
            continue
        atlas_id = subdir.name[4:]
        anat = subdir / "anat"
        t1w = anat / f"sub-{atlas_id}_T1w.nii.gz"
        dseg = anat / f"sub-{atlas_id}_dseg.nii.gz"
        t2w = anat / f"sub-{atlas_id}_T2w.nii.gz"
        if not t1w.is_file() or not dseg.is_file():
            raise BadDataError(f"atlas {subdir.name} needs both {t1w.name} and {dseg.name}")
        atlases.append(Atlas(atlas_id, t1w, dseg, t2w if t2w.is_file() else None))
    if len(atlases) < MIN_ATLASES:
        raise BadDataError(
            f"atlas library {root} has {len(atlases)} atlas(es); at least {MIN_ATLASES} are needed"
        )
    if check_images:
        for atlas in atlases:
            check_atlas(atlas, labels)
    return AtlasLibrary(root, tuple(atlases), labels)


def write_library_description(root: Path | str, name: str, labels: LabelTable,
                              source: str | None = None) -> None:
    """Create the library's root files (``dataset_description.json`` and ``dseg.tsv``)."""
    from .. import __version__

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    desc = {
        "Name": name,
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "dlf-bids", "Version": __version__}],
    }
    if source:
        desc["SourceDatasets"] = [{"URL": source}]
    write_text_atomic(root / "dataset_description.json", json.dumps(desc, indent=2) + "\n")
    write_label_table(labels, root / "dseg.tsv")


def write_atlas(root: Path | str, atlas_id: str, t1w: nb.Nifti1Image, dseg: nb.Nifti1Image,
                t2w: nb.Nifti1Image | None = None) -> Atlas:
    """Write one atlas into a library (images as given; the label map cast to int16)."""
    anat = Path(root) / f"sub-{atlas_id}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    paths = {"T1w": anat / f"sub-{atlas_id}_T1w.nii.gz", "dseg": anat / f"sub-{atlas_id}_dseg.nii.gz"}
    nb.save(t1w, paths["T1w"])
    labels = nb.Nifti1Image(np.asanyarray(dseg.dataobj).astype(np.int16), dseg.affine, dseg.header)
    labels.set_data_dtype(np.int16)
    nb.save(labels, paths["dseg"])
    t2w_path = None
    if t2w is not None:
        t2w_path = anat / f"sub-{atlas_id}_T2w.nii.gz"
        nb.save(t2w, t2w_path)
    return Atlas(atlas_id, paths["T1w"], paths["dseg"], t2w_path)
