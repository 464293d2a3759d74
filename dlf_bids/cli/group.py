"""The group level: volume tables across participants, quality control and the group report."""

from __future__ import annotations

import sys

from ..config import Config
from ..errors import EXIT_OK, MissingInputError


def _warn(message: str) -> None:
    print(f"dlf-bids: warning: {message}", file=sys.stderr)


def measure_all(config: Config) -> tuple[dict, list[str]]:
    """Volumes of every method's label maps, and a note per method that has none."""
    from ..group import find_methods, measure_method

    methods = find_methods(config.output_dir)
    if not methods:
        raise MissingInputError(f"no segmentations in {config.output_dir}: run the participant "
                                "level first")
    measured, notes = {}, []
    for method in methods:
        try:
            measured[method] = measure_method(config.output_dir, method)
        except MissingInputError as err:  # e.g. every participant failed for this method
            _warn(f"{err}; no group table for {method}")
            notes.append(f"{method}: no segmentation found, so no tables or figures for it.")
    if not measured:
        raise MissingInputError(f"no segmentations in {config.output_dir}: run the participant "
                                "level first")
    return measured, notes


def run_group_level(config: Config) -> int:
    from ..group import method_labels, write_long_table, write_wide_table
    from ..group_figures import plot_volume_distributions
    from ..group_qc import (find_outliers, find_problems, method_agreement, write_agreement,
                            write_outliers)
    from ..group_report import GroupResults, write_group_report
    from ..utils.derivatives import write_bidsignore

    out = config.output_dir
    if not out.is_dir():
        raise MissingInputError(f"{out} does not exist: run the participant level first")
    measured, notes = measure_all(config)
    write_bidsignore(out)  # outputs of an older participant run may lack our newer entries
    tables = [write_wide_table(out, method, images) for method, images in measured.items()]
    tables.append(write_long_table(out, measured))
    outliers = find_outliers(measured)
    tables.append(write_outliers(out, outliers))
    labels = sorted({i for m in measured for i in method_labels(out, m).indices})
    agreement = method_agreement(measured, labels)
    tables.append(write_agreement(out, agreement))
    segmented = {i.segmentation.participant_id for images in measured.values() for i in images}
    problems = find_problems(config.bids_dir, out, segmented)
    figures = plot_volume_distributions(out, measured, outliers)
    report = write_group_report(out, GroupResults(measured, outliers, agreement, problems,
                                                  figures, tables, notes))
    for table in tables:
        print(f"group table: {table}")
    print(f"group report: {report} ({len(outliers)} volume(s) flagged, {len(problems)} "
          "image(s) or subject(s) without results)")
    return EXIT_OK
