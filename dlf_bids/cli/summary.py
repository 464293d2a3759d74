"""The end of a participant run: one line per image (ok, FAILED with the error, skipped) and
one status record per image in ``logs/status/`` for the reports and the group level."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..config import Config
from ..errors import EXIT_OK, EXIT_PROCESSING_FAILED
from ..run_status import (RunStatus, crash_files_of, crash_reason, package_versions,
                          write_status)
from ..utils.bids import bids_uri
from .participant import _say, expected_outputs


def summarise(config: Config, anatomicals, skipped, started: float, log_dir: Path,
              library, model_info=None, deepatlas_info=None) -> int:
    """Say, and record in ``logs/status/``, what happened to every selected image."""
    from ..workflows.base import t2w_users

    users = list(t2w_users(config, library))
    common = dict(fusion=list(config.fusion), atlases=[f"sub-{a.atlas_id}" for a in library.atlases],
                  registration_preset=config.registration_preset, registration=config.registration,
                  deepatlas_model={"file": config.deepatlas_model.name, "sha256": deepatlas_info.sha256}
                  if deepatlas_info is not None else None, version=__version__,
                  packages=package_versions(),
                  dlf_model={"file": config.dlf_model.name, "sha256": model_info.sha256}
                  if model_info is not None else None,
                  tissue_model=_tissue_model(config),
                  started=_iso(started), finished=_iso(time.time()),
                  elapsed_s=round(time.time() - started, 1))
    failed = []
    for anat in anatomicals:
        outs = expected_outputs(config, anat)
        missing = [m for m, p in outs.items() if not p.is_file() or p.stat().st_mtime < started - 2]
        crashes = crash_files_of(log_dir, f"{anat.name}_wf", since=started - 2) if missing else []
        reason = None
        if missing:
            failed.append(anat)
            reason = crash_reason(crashes[0]) if crashes else f"no {', '.join(missing)} output"
            where = crashes[0] if crashes else log_dir
            _say(f"FAILED  {anat.prefix}: {reason} (crash report: {where})")
        else:
            _say(f"ok      {anat.prefix}: {', '.join(p.name for p in outs.values())}")
        write_status(config.output_dir, RunStatus(
            name=anat.prefix, participant_id=f"sub-{anat.subject}",
            status="failed" if missing else "succeeded", reason=reason,
            t1w=bids_uri(anat.t1w, config.bids_dir, "raw"),
            t2w=bids_uri(anat.t2w, config.bids_dir, "raw") if anat.t2w else None,
            t2w_used=bool(anat.t2w) and "dlf" in users,
            t2w_used_by=users if anat.t2w else [], warnings=list(anat.warnings),
            outputs=[p.relative_to(config.output_dir).as_posix() for p in outs.values()
                     if p.is_file()],
            crash_files=[p.relative_to(config.output_dir).as_posix() for p in crashes], **common))
    for subject, reasons in _by_subject(skipped).items():
        _say(f"skipped sub-{subject}: {reasons}")
        write_status(config.output_dir, RunStatus(
            name=f"sub-{subject}", participant_id=f"sub-{subject}", status="skipped",
            reason=reasons, **common))
    _say(f"{len(anatomicals) - len(failed)} of {len(anatomicals)} T1w image(s) segmented in "
         f"{time.time() - started:.0f} s; outputs in {config.output_dir}")
    from ..reports.report import write_reports  # draws figures: matplotlib only when needed

    subjects = {a.subject for a in anatomicals} | {subject for subject, _ in skipped}
    for report in write_reports(config.output_dir, config.bids_dir, subjects):
        _say(f"report: {report}")
    return EXIT_PROCESSING_FAILED if failed else EXIT_OK


def _by_subject(skipped) -> dict[str, str]:
    """One line per skipped subject (a subject may have several unusable images)."""
    reasons: dict[str, list[str]] = {}
    for subject, reason in skipped:
        reasons.setdefault(subject, []).append(reason)
    return {subject: "; ".join(r) for subject, r in reasons.items()}


def _tissue_model(config: Config) -> dict | None:
    """The NeuroNet model of the run, for the status records and the methods text."""
    if config.tissue_model is None:
        return None
    from ..neuronet_segmentation import model_outputs

    outputs = model_outputs(str(config.tissue_model))
    return {"file": config.tissue_model.name, "sha256": outputs.sha256,
            "tissue_protocol": outputs.tissue_protocol, "protocols": list(outputs.other_protocols)}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
