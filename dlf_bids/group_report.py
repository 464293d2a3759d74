"""The group report: one self-contained HTML page (its figures beside it under ``figures/``)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .group import MeasuredImage
from .group_qc import (MIN_IMAGES_FOR_OUTLIERS, Z_THRESHOLD, Agreement, Outlier, Problem)
from .utils.files import write_text_atomic
from .volumes import format_volume

REPORT_NAME = "group_report.html"
# Long tables stay readable in a browser; the TSVs beside the report hold every row.
MOST_ROWS = 100

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 80em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.failed { color: #b00020; } .skipped { color: #8a6d00; } .missing { color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
"""


@dataclass
class GroupResults:
    """Everything the group level found, for the report."""

    measured: dict[str, list[MeasuredImage]]  # method -> its images' volumes
    outliers: list[Outlier]
    agreement: list[Agreement]
    problems: list[Problem]
    figures: list[Path]
    tables: list[Path]  # the group TSVs, linked from the report
    notes: list[str] = field(default_factory=list)  # e.g. a method without segmentations


def _e(value) -> str:
    return html.escape(str(value), quote=True)


class _Markup(str):
    """A table cell that is already HTML (built from escaped parts): not escaped again."""


def _cell(value, numeric: bool) -> str:
    text = value if isinstance(value, _Markup) else _e(value)
    return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"


def _table(header, rows, numeric=()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c, i in numeric) for i, c in enumerate(row))
                   + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _shown(rows: list, what: str, tsv: str) -> tuple[list, str]:
    """The first :data:`MOST_ROWS` rows, and a sentence saying where the rest are."""
    if len(rows) <= MOST_ROWS:
        return rows, ""
    return rows[:MOST_ROWS], (f"<p>The first {MOST_ROWS} of {len(rows)} {what}; all are in "
                              f'<a href="{_e(tsv)}">{_e(tsv)}</a>.</p>\n')


def _summary(results: GroupResults) -> str:
    segs = [i.segmentation for per_method in results.measured.values() for i in per_method]
    n_images = len({s.image for s in segs})
    n_subjects = len({s.participant_id for s in segs})
    per_method = ", ".join(f"{_e(m)} ({len(results.measured[m])})"
                           for m in sorted(results.measured))
    counts = {s: sum(p.status == s for p in results.problems) for s in ("failed", "skipped",
                                                                        "missing")}
    problems = ", ".join(f'<span class="{s}">{n} {s}</span>' for s, n in counts.items())
    notes = "".join(f"<p>{_e(n)}</p>\n" for n in results.notes)
    return (f"<p>{n_images} T1w image(s) of {n_subjects} participant(s) segmented; "
            f"methods (images): {per_method}.</p>\n"
            f'<p>Without results: {problems} (<a href="#problems">details</a>).</p>\n{notes}')


def _problems(results: GroupResults) -> str:
    if not results.problems:
        return "<p>None: every subject of the dataset has results.</p>\n"
    rows = [(p.participant_id, p.image, p.status, p.reason,
             _Markup(" ".join(f'<a href="{_e(f)}">{_e(Path(f).name)}</a>' for f in p.crash_files)))
            for p in results.problems]
    return _table(("participant", "image", "status", "reason", "crash report"), rows)


def _outliers(results: GroupResults) -> str:
    text = (f"<p>Robust z = (volume &minus; median) / (1.4826 &times; MAD) per label and method "
            f"over all images; |z| &gt; {Z_THRESHOLD} is flagged (red crosses in the figures). "
            "An outlier is a volume to look at, not necessarily an error.</p>\n")
    few = [m for m, images in sorted(results.measured.items())
           if len(images) < MIN_IMAGES_FOR_OUTLIERS]
    if few:
        text += (f"<p>Not computed for {_e(', '.join(few))}: fewer than "
                 f"{MIN_IMAGES_FOR_OUTLIERS} images.</p>\n")
    if not results.outliers:
        checked = len(few) < len(results.measured)  # else there was nothing to flag from
        return text + ("<p>No volume is flagged.</p>\n" if checked else "")
    rows = [(o.segmentation.image, o.segmentation.method, o.name, format_volume(o.volume_mm3),
             format_volume(o.median_mm3), f"{o.z:.2f}") for o in results.outliers]
    rows, more = _shown(rows, "flagged volumes", "group_outliers.tsv")
    return text + _table(("image", "method", "label", "volume (mm³)", "median (mm³)",
                          "robust z"), rows, numeric=(3, 4, 5)) + more


def _agreement(results: GroupResults) -> str:
    if not results.agreement:
        return "<p>Not computed: no image was segmented by two or more methods.</p>\n"
    text = ("<p>Dice overlap between the label maps of each pair of methods, mean over the "
            "labels present in either, lowest agreement first. Low agreement marks images where "
            "at least one method struggled; it does not say which.</p>\n")
    # maps on different grids (no Dice) last: nothing to rank them by
    ordered = sorted(results.agreement, key=lambda a: (
        np.inf if np.isnan(a.mean_dice) else a.mean_dice, a.image.image))
    rows = [(a.image.image, f"{a.method_a} / {a.method_b}",
             "n/a" if np.isnan(a.mean_dice) else f"{a.mean_dice:.3f}",
             a.lowest_label if np.isnan(a.lowest_dice) else f"{a.lowest_label} "
                                                            f"({a.lowest_dice:.3f})")
            for a in ordered]
    rows, more = _shown(rows, "pairs", "group_method_agreement.tsv")
    return text + _table(("image", "methods", "mean Dice", "lowest label (Dice)"), rows,
                         numeric=(2,)) + more


def _figures(results: GroupResults, output_dir: Path) -> str:
    text = ("<p>Label volumes per method (boxes: quartiles; whiskers: 1.5 IQR; dots: images; "
            "red crosses: flagged outliers). Labels empty in every image are left out.</p>\n")
    for path in results.figures:
        rel = path.relative_to(output_dir).as_posix()
        text += f'<figure><img src="{_e(rel)}" alt="label volumes, {_e(path.stem)}"></figure>\n'
    return text


def _tables(results: GroupResults, output_dir: Path) -> str:
    items = "".join(f'<li><a href="{_e(p.relative_to(output_dir).as_posix())}">{_e(p.name)}</a> '
                    f"(data dictionary: {_e(p.with_suffix('.json').name)})</li>\n"
                    for p in results.tables)
    return f"<ul>\n{items}</ul>\n"


def write_group_report(output_dir: Path, results: GroupResults) -> Path:
    """Write ``group_report.html``; every figure and table it links to must already exist."""
    output_dir = Path(output_dir)
    sections = [("summary", "Summary", _summary(results)),
                ("problems", "Failed, skipped and missing", _problems(results)),
                ("outliers", "Volume outliers", _outliers(results)),
                ("agreement", "Agreement between methods", _agreement(results)),
                ("volumes", "Volume distributions", _figures(results, output_dir)),
                ("tables", "Tables", _tables(results, output_dir))]
    body = "".join(f'<h2 id="{sid}">{title}</h2>\n{content}' for sid, title, content in sections)
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>dlf-bids group report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>dlf-bids group report</h1>\n<p>dlf-bids {_e(__version__)}</p>\n{body}"
            "</body>\n</html>\n")
    return write_text_atomic(output_dir / REPORT_NAME, page)
