"""Writing derivatives: niworkflows' DerivativesDataSink with our own path patterns.

niworkflows builds output names from its own pybids patterns and silently drops an entity they do
not know: ``seg-jlf`` on a dseg would vanish and the file would overwrite the tissue ``dseg``. We
give the sink a pattern set that knows ``seg`` and ``atlas`` and places them in BIDS order, and we
stage every file in a hidden folder and rename it into place, so a crash never leaves a
half-written file under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from niworkflows.interfaces.bids import BIDS_DERIV_ENTITIES
from niworkflows.interfaces.bids import DerivativesDataSink as _NiworkflowsDataSink

STAGING_DIRNAME = ".dlf-bids-staging"

# pybids entity definitions: niworkflows' list plus BIDS' ``seg`` (named ``segmentation`` in pybids)
ENTITIES = [e for e in BIDS_DERIV_ENTITIES if e["name"] != "segmentation"] + [
    {"name": "segmentation", "pattern": "[_/\\\\]+seg-([a-zA-Z0-9]+)"},
]

_PREFIX = (
    "sub-{subject}[/ses-{session}]/{datatype<anat>|anat}/sub-{subject}[_ses-{session}][_task-{task}]"
    "[_acq-{acquisition}][_ce-{ceagent}][_rec-{reconstruction}][_run-{run}][_echo-{echo}]"
    "[_part-{part}]"
)
PATH_PATTERNS = [
    # images: segmentations, probabilities, masks, reference images (BIDS entity order)
    _PREFIX + "[_space-{space}][_atlas-{atlas}][_seg-{segmentation}][_res-{resolution}]"
    "[_label-{label}][_desc-{desc}]_{suffix<dseg|probseg|mask|uncertainty|T1w|T2w>}"
    "{extension<.nii|.nii.gz|.json>|.nii.gz}",
    # transforms between the subject and atlases or templates
    _PREFIX + "_from-{from}_to-{to}_mode-{mode<image|points>|image}_{suffix<xfm>|xfm}"
    "{extension<.txt|.h5|.nii.gz|.json>}",
    # per-subject tables
    _PREFIX + "[_space-{space}][_seg-{segmentation}][_desc-{desc}]_{suffix<volumes>}"
    "{extension<.tsv|.json>|.tsv}",
]


class DerivativesDataSink(_NiworkflowsDataSink):
    """Store a derivative under ``base_directory`` with dlf-bids' path patterns, atomically."""

    out_path_base = ""
    _config_entities = frozenset(e["name"] for e in ENTITIES)
    _config_entities_dict = ENTITIES
    _file_patterns = tuple(PATH_PATTERNS)
    # For a space-/res- output, niworkflows reads template_description.json from the TemplateFlow
    # home of the moment it was imported (trying DataLad when the file is absent) and overwrites
    # the sidecar's "Resolution" with it. With no "standard spaces" it never looks there; our own
    # "Resolution" is put back (see _run_interface).
    _standard_spaces = frozenset()

    def _run_interface(self, runtime):
        final_root = Path(self.inputs.base_directory).absolute()
        staging = final_root / STAGING_DIRNAME / uuid.uuid4().hex
        self.inputs.base_directory = str(staging)
        resolution = self._given_resolution()
        try:
            runtime = super()._run_interface(runtime)
            staged = [Path(p) for p in self._results["out_file"]]
            meta = self._results.get("out_meta")
            staged_meta = [Path(p) for p in ([meta] if isinstance(meta, str) else meta or [])]
            if resolution is not None:
                for sidecar in staged_meta:
                    _set_json_key(sidecar, "Resolution", resolution)
            finals = []
            # sidecars first: a NIfTI under its final name always has its JSON beside it
            for path in staged_meta + staged:
                dest = final_root / path.relative_to(staging)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
                finals.append(str(dest))
            n_meta = len(staged_meta)
            self._results["out_file"] = finals[n_meta:]
            if staged_meta:
                self._results["out_meta"] = finals[0] if isinstance(meta, str) else finals[:n_meta]
        finally:
            self.inputs.base_directory = str(final_root)
            shutil.rmtree(staging, ignore_errors=True)
        return runtime

    def _given_resolution(self):
        """The sidecar's "Resolution" as we passed it (meta_dict or a keyword), if any."""
        from nipype.interfaces.base import isdefined

        meta = self.inputs.meta_dict if isdefined(self.inputs.meta_dict) else {}
        return self._metadata.get("Resolution", meta.get("Resolution"))


def _set_json_key(path: Path, key: str, value) -> None:
    content = json.loads(path.read_text())
    content[key] = value
    path.write_text(json.dumps(content, sort_keys=True, indent=2))


def derivative_path(output_dir: Path | str, entities: dict) -> Path:
    """Where the sink puts a file with these entities (same patterns, for summaries and tests)."""
    from bids.layout.writing import build_path

    rel = build_path({"extension": ".nii.gz", **entities}, path_patterns=PATH_PATTERNS)
    if rel is None:
        raise ValueError(f"no output pattern matches {entities}")
    return Path(output_dir) / rel
