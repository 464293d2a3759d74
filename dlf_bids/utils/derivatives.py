"""Dataset-level files of the output folder: description, .bidsignore, look-up tables.

All written with :func:`~dlf_bids.utils.files.write_text_atomic`: complete or not there, and
never through a symbolic link planted at their name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import __version__
from .files import write_text_atomic
from .labels import LabelTable, write_label_table

CODE_URL = "https://github.com/dlf-bids/dlf-bids"
# BIDS has no suffix for a voxelwise uncertainty map: ours is named *_uncertainty and ignored,
# nor for transforms (BIDS has none yet; fMRIPrep ignores its *_xfm.* the same way).
# "figures", not "figures/": bids-validator-deno matches a folder below the root (the reports'
# sub-<label>/figures/) only with a pattern without the trailing slash.
BIDSIGNORE = ["logs/", "figures", "*.html", "group_*", ".dlf-bids-staging/", "*_volumes.tsv",
              "*_volumes.json", "*_uncertainty.nii.gz", "*_uncertainty.json", "*_xfm.*"]


def write_dataset_description(output_dir: Path, bids_dir: Path, atlas_dir: Path | None,
                              templateflow_home: Path | None = None) -> Path:
    """Write (or refresh) the derivative's ``dataset_description.json``.

    ``templateflow_home`` (with --output-spaces) is linked as ``templateflow``, which the
    template-space sidecars' ``SpatialReference`` BIDS URIs name.
    """
    links = {"raw": Path(bids_dir).absolute().as_uri()}
    if atlas_dir is not None:
        links["atlases"] = Path(atlas_dir).absolute().as_uri()
    if templateflow_home is not None:
        links["templateflow"] = Path(templateflow_home).absolute().as_uri()
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
    write_text_atomic(path, json.dumps(desc, indent=2) + "\n")
    return path


README = """\
# dlf-bids derivatives

Segmentations written by dlf-bids {version} in each T1w image's native geometry.
`sub-<label>[_ses-<label>]_seg-<method>_dseg.nii.gz` holds the labels of one method
(`mv` majority voting, `jlf` joint label fusion); `seg-<method>_dseg.tsv` at the root is its
look-up table. `sub-<label>[_ses-<label>]_seg-<method>_volumes.tsv` lists each label's volume in
mm^3 (with a data dictionary in the `.json` beside it). The group level writes `group_*.tsv`
tables (volumes, outliers, agreement between methods) and `group_report.html`.
With `--output-spaces`, `space-<template>[_res-<N>]` files hold the same labels on a TemplateFlow
template's grid, and `from-T1w_to-<template>` / `from-<template>_to-T1w` `_xfm.h5` files are the
ANTs composite transforms between the T1w and the template.
With `--tissue-model`, NeuroNet writes `sub-<label>[_ses-<label>]_dseg.nii.gz` (1 GM, 2 WM,
3 CSF; look-up table `dseg.tsv`) with `label-GM/WM/CSF_probseg.nii.gz` (float32 probabilities),
and a `seg-<protocol>_dseg.nii.gz` per other protocol of its model.
"""


def write_readme(output_dir: Path) -> Path:
    path = Path(output_dir) / "README.md"
    write_text_atomic(path, README.format(version=__version__))
    return path


def write_bidsignore(output_dir: Path) -> Path:
    """Keep the lines already there (a user's), add ours."""
    path = Path(output_dir) / ".bidsignore"
    # not through a link: a run as root would copy any file it points to into the output
    lines = path.read_text().splitlines() if path.is_file() and not path.is_symlink() else []
    lines += [line for line in BIDSIGNORE if line not in lines]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def lut_path(output_dir: Path, method: str) -> Path:
    return Path(output_dir) / f"seg-{method}_dseg.tsv"


def write_method_luts(output_dir: Path, methods, labels: LabelTable) -> list[Path]:
    """One root look-up table per segmentation method (``seg-<method>_dseg.tsv``)."""
    return [write_label_table(labels, lut_path(output_dir, m)) for m in methods]
