"""Where the reports and their figures go in the output dir (nipreps' layout)."""

from __future__ import annotations

from pathlib import Path

REGISTRATION_FIGURE = "desc-atlasreg_T1w"  # the atlas before/after registration


def figure_path(output_dir: Path | str, subject: str, prefix: str, what: str) -> Path:
    """``sub-<subject>/figures/<prefix>_<what>.svg``, e.g. ``..._seg-jlf_dseg.svg``."""
    return Path(output_dir) / f"sub-{subject}" / "figures" / f"{prefix}_{what}.svg"


def report_path(output_dir: Path | str, subject: str) -> Path:
    return Path(output_dir) / f"sub-{subject}.html"
