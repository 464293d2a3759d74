"""What happened to each T1w image of a participant run, kept as one JSON record per image.

The participant level writes ``OUTPUT_DIR/logs/status/<image>.json`` when it ends: ``succeeded``,
``failed`` (with the error line of Nipype's crash report) or ``skipped`` (with the reason). The
end-of-run summary, the reports and the group level read these records, so a subject that failed
is named with its reason rather than silently missing from a table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .utils.files import write_text_atomic

STATUS_DIR = Path("logs") / "status"
STATUSES = ("succeeded", "failed", "skipped")


#: the methods that can read a subject's T2w (``RunStatus.t2w_used_by``), as reports name them
T2W_METHODS = {"dlf": "Deep Label Fusion", "deepatlas": "DeepAtlas", "neuronet": "NeuroNet"}


@dataclass
class RunStatus:
    """The record of one T1w image (or of a subject skipped before any image was chosen)."""

    name: str  # the image's BIDS prefix, e.g. "sub-01_ses-pre_run-1", or "sub-01" when skipped
    participant_id: str
    status: str
    reason: str | None = None
    t1w: str | None = None  # BIDS URIs into the raw dataset
    t2w: str | None = None
    t2w_used: bool = False  # by Deep Label Fusion (its second input)
    t2w_used_by: list[str] = field(default_factory=list)  # every method that read it: dlf, deepatlas, neuronet
    outputs: list[str] = field(default_factory=list)  # relative to the output dir
    crash_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fusion: list[str] = field(default_factory=list)
    atlases: list[str] = field(default_factory=list)
    registration_preset: str | None = None
    registration: str = "ants"  # the engine: ants or deepatlas
    dlf_model: dict | None = None  # {"file": name, "sha256": hex}
    deepatlas_model: dict | None = None  # the same, with --registration deepatlas
    started: str | None = None  # ISO 8601, UTC
    finished: str | None = None
    elapsed_s: float | None = None
    version: str | None = None
    packages: dict = field(default_factory=dict)  # {"nipype": "1.11.0", ...}: see package_versions
    tissue_model: dict | None = None  # NeuroNet: {"file": name, "sha256": hex, "protocols": [...]}

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")


# what the report and the methods text name, besides dlf-bids itself
KEY_PACKAGES = ("nipype", "niworkflows", "antspyx", "torch", "pybids", "nibabel", "nilearn")


def package_versions() -> dict[str, str]:
    """The installed versions of :data:`KEY_PACKAGES` (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in KEY_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def status_path(output_dir: Path | str, name: str) -> Path:
    return Path(output_dir) / STATUS_DIR / f"{name}.json"


def write_status(output_dir: Path | str, record: RunStatus) -> Path:
    path = status_path(output_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(record), indent=2) + "\n")
    return path


def read_statuses(output_dir: Path | str) -> list[RunStatus]:
    """Every record of the output dir, by name; unreadable records are skipped (a report
    must still be written when one record is damaged)."""
    known = {f.name for f in fields(RunStatus)}
    records = []
    for path in sorted((Path(output_dir) / STATUS_DIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            records.append(RunStatus(**{k: v for k, v in data.items() if k in known}))
        except (ValueError, TypeError):
            continue
    return records


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def crash_reason(crash_file: Path | str) -> str:
    """The error line of a Nipype crash report (``ValueError: ...``), else its last line."""
    lines = [line.strip() for line in Path(crash_file).read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return (errors or lines or ["(empty crash report)"])[-1]


def crash_files_of(log_dir: Path | str, workflow_name: str, since: float) -> list[Path]:
    """Nipype crash reports written since ``since`` by nodes of the sub-workflow ``workflow_name``.

    Reports are matched by their ``Node:`` line, which holds the node's full name.
    """
    found = []
    for path in sorted(Path(log_dir).glob("crash-*")):
        if path.stat().st_mtime < since:
            continue
        head = path.read_text(errors="replace")[:2000]
        if re.search(rf"^Node: .*\b{re.escape(workflow_name)}\b", head, re.MULTILINE):
            found.append(path)
    return found
