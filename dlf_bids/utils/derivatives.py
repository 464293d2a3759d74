"""Dataset-level files of the output folder: description, .bidsignore, look-up tables."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from .labels import LabelTable, write_label_table

CODE_URL = "https://github.com/dlf-bids/dlf-bids"
# BIDS has no suffix for a voxelwise uncertainty map: ours is named *_uncertainty and ignored.
# The reports' figures are in sub-<label>/figures/: bids-validator-deno skips a folder below the
# root only for a pattern without the trailing slash ("figures/" leaves it NOT_INCLUDED).
BIDSIGNORE = ["logs/", "figures/", "sub-*/figures", "*.html", "group_*", ".dlf-bids-staging/", "*_volumes.tsv",
              "*_volumes.json", "*_uncertainty.nii.gz", "*_uncertainty.json"]


def write_dataset_description(output_dir: Path, bids_dir: Path, atlas_dir: Path | None) -> Path:
    """Write (or refresh) the derivative's ``dataset_description.json``."""
    links = {"raw": Path(bids_dir).absolute().as_uri()}
    if atlas_dir is not None:
        links["atlases"] = Path(atlas_dir).absolute().as_uri()
    generated_by = {"Name": "dlf-bids", "Version": __version__, "CodeURL": CODE_URL}
    container = os.environ.get("DLF_BIDS_CONTAINER")  # set by our container recipes
    if container:
        generated_by["Container"] = {"Type": container}
        if tag := os.environ.get("DLF_BIDS_CONTAINER_TAG"):
            generated_by["Container"]["Tag"] = tag
    desc = {
        "Name": "dlf-bids: multi-atlas and learned segmentations",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": links["raw"]}],
        "DatasetLinks": links,
    }
    path = Path(output_dir) / "dataset_description.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(desc, indent=2) + "\n")
    return path


README = """\
# dlf-bids derivatives

Segmentations written by dlf-bids {version} in each T1w image's native geometry.
`sub-<label>[_ses-<label>]_seg-<method>_dseg.nii.gz` holds the labels of one method
(`mv` majority voting, `jlf` joint label fusion); `seg-<method>_dseg.tsv` at the root is its
look-up table. Group tables (`group_seg-<method>_volumes.tsv`) list label volumes in mm^3.
"""


def write_readme(output_dir: Path) -> Path:
    path = Path(output_dir) / "README.md"
    path.write_text(README.format(version=__version__))
    return path


def write_bidsignore(output_dir: Path) -> Path:
    """Keep the lines already there (a user's), add ours."""
    path = Path(output_dir) / ".bidsignore"
    lines = path.read_text().splitlines() if path.exists() else []
    lines += [line for line in BIDSIGNORE if line not in lines]
    path.write_text("\n".join(lines) + "\n")
    return path


def lut_path(output_dir: Path, method: str) -> Path:
    return Path(output_dir) / f"seg-{method}_dseg.tsv"


def write_method_luts(output_dir: Path, methods, labels: LabelTable) -> list[Path]:
    """One root look-up table per segmentation method (``seg-<method>_dseg.tsv``)."""
    return [write_label_table(labels, lut_path(output_dir, m)) for m in methods]
