"""One HTML report per subject, ``OUTPUT_DIR/sub-<label>.html``, built from what is on disk.

A report reads only the status records (``logs/status/``), the derivatives and the figures in
``sub-<label>/figures/``; it never needs the work dir, so ``--reports-only`` can rebuild it at any
time, and a subject whose run failed still gets one that shows the error and what exists.
Figures of the label maps are drawn here (again only when their image is newer than the figure);
the registration check is drawn during the run, where the registered atlas exists.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import MissingInputError
from ..run_status import T2W_METHODS, RunStatus, read_statuses
from ..utils.derivatives import lut_path
from ..utils.files import write_text_atomic
from .citations import NOTICE, REFERENCES, methods_of, write_citations
from .layout import REGISTRATION_FIGURE, figure_path, report_path

LOG = logging.getLogger("dlf_bids")

METHOD_NAMES = {"mv": "majority voting", "jlf": "joint label fusion", "dlf": "Deep Label Fusion"}


@dataclass
class Figure:
    title: str
    src: str  # relative to the output dir, where the report is
    caption: str
    legend: list[tuple[str, str]] = field(default_factory=list)  # (label name, colour)


@dataclass
class ImageReport:
    record: RunStatus
    rows: list[tuple[str, str]]  # the summary table
    figures: list[Figure]
    notes: list[str]  # what could not be shown, and why


def raw_path(uri: str | None, bids_dir: Path) -> Path | None:
    """The file a ``bids:raw:<path>`` URI of a status record points at."""
    if not uri or not uri.startswith("bids:raw:"):
        return None
    return Path(bids_dir) / uri[len("bids:raw:"):]


def segmentations_of(output_dir: Path, record: RunStatus) -> dict[str, Path]:
    """Every ``<image>_seg-<method>_dseg.nii.gz`` written for this image, by method."""
    subject_dir = Path(output_dir) / record.participant_id
    pattern = rf"{re.escape(record.name)}_seg-([a-zA-Z0-9]+)_dseg\.nii\.gz"
    found = {}
    for path in sorted(subject_dir.glob(f"**/anat/{record.name}_seg-*_dseg.nii.gz")):
        match = re.fullmatch(pattern, path.name)
        if match:
            found[match.group(1)] = path
    return found


def t2w_note(record: RunStatus) -> str:
    """Which T2w the image had, and whether the run used it (and if not, why)."""
    if record.t2w is None:
        # the input checks drop a bad T2w with a warning that says so (cli.participant)
        dropped = [w for w in record.warnings if "T2w not used" in w]
        return f"none used: {dropped[0]}" if dropped else "none found for this T1w"
    users = record.t2w_used_by or (["dlf"] if record.t2w_used else [])  # older records: DLF's flag
    if users:
        return f"{record.t2w} (used by {', '.join(T2W_METHODS.get(u, u) for u in users)})"
    if "dlf" not in record.fusion:
        return (f"{record.t2w} (not used: no model of this run has a T2w channel; Deep Label "
                f"Fusion, DeepAtlas and NeuroNet models can, and this run fused with "
                f"{', '.join(record.fusion)})")
    return f"{record.t2w} (not used: the DLF model or the atlas library has no T2w channel)"


def summary_rows(record: RunStatus) -> list[tuple[str, str]]:
    """The report's table of what the run used, from the status record."""
    from ..registration import REGISTRATION_PRESETS

    rows = [("Status", record.status), ("T1w", record.t1w or "none"), ("T2w", t2w_note(record))]
    if record.status == "skipped":
        return rows
    preset = record.registration_preset
    rows += [("Atlases", ", ".join(record.atlases)),
             ("Fusion", ", ".join(f"{m} ({METHOD_NAMES.get(m, m)})" for m in record.fusion)),
             ("Registration", f"{preset} (ANTs {REGISTRATION_PRESETS.get(preset, '?')})"
              if record.registration != "deepatlas" else "DeepAtlas network after an ANTs affine")]
    if record.deepatlas_model:
        rows.append(("DeepAtlas model", f"{record.deepatlas_model['file']} "
                                        f"(sha256 {record.deepatlas_model['sha256']})"))
    if record.dlf_model:
        rows.append(("DLF model", f"{record.dlf_model['file']} "
                                  f"(sha256 {record.dlf_model['sha256']})"))
    rows.append(("Software", ", ".join([f"dlf-bids {record.version}"] + [
        f"{name} {version}" for name, version in (record.packages or {}).items()])))
    rows.append(("Run", f"{record.started} to {record.finished} ({record.elapsed_s} s)"))
    return rows


def warp_rows(output_dir: Path, record: RunStatus) -> list[tuple[str, str]]:
    """DeepAtlas runs: each atlas warp's smallest Jacobian determinant, from the sidecars of the
    atlas -> T1w transforms (a value <= 0 means the warp folds space somewhere)."""
    if record.registration != "deepatlas" or record.status == "skipped":
        return []
    found = []
    pattern = f"**/anat/{record.name}_from-*_to-T1w_mode-image_xfm.json"
    for sidecar in sorted((output_dir / record.participant_id).glob(pattern)):
        try:
            value = float(json.loads(sidecar.read_text())["MinimumJacobianDeterminant"])
        except (ValueError, KeyError, TypeError):
            continue
        atlas = re.search(r"_from-([A-Za-z0-9]+)_", sidecar.name).group(1)
        found.append(f"{atlas} {value:.2f}{' (folds)' if value <= 0 else ''}")
    if not found:
        return []
    return [("DeepAtlas warps", "smallest Jacobian determinant per atlas (<= 0: the warp folds): "
             + ", ".join(found))]


def _fresh(figure: Path, *sources: Path) -> bool:
    """A figure newer than every image it shows is kept (``--reports-only`` stays fast)."""
    return figure.is_file() and all(figure.stat().st_mtime >= s.stat().st_mtime for s in sources)


def _draw(make, out: Path, sources: list[Path], what: str, notes: list[str]) -> bool:
    if _fresh(out, *sources):
        return True
    try:
        make(out)
    except Exception as err:  # noqa: BLE001 - one bad figure must not cost the subject's report
        LOG.warning("report: %s figure not made: %s", what, err)
        notes.append(f"{what}: figure not made ({type(err).__name__}: {err})")
        return False
    return True


def _legend(dseg: Path, method: str, output_dir: Path) -> list[tuple[str, str]]:
    """The look-up table's labels present in the label map, with their colours."""
    import nibabel as nb

    from ..errors import BadDataError
    from ..utils.labels import read_label_table

    try:
        table = read_label_table(lut_path(output_dir, method))
    except BadDataError:  # the figure says so already; the report goes on without a legend
        return []
    present = set(np.unique(np.asanyarray(nb.load(dseg).dataobj)).tolist())
    return [(lab.name, lab.color) for lab in table.labels if lab.index in present]


def segmentation_figures(output_dir: Path, record: RunStatus, t1w: Path,
                         notes: list[str]) -> list[Figure]:
    """One figure per label map written for this image, then DLF's uncertainty if written."""
    from ..utils.labels import read_label_table
    from .figures import plot_segmentation

    subject = record.participant_id[len("sub-"):]
    segmentations = segmentations_of(output_dir, record)
    figures = []
    for method, dseg in segmentations.items():
        out = figure_path(output_dir, subject, record.name, f"seg-{method}_dseg")
        if _draw(lambda o: plot_segmentation(
                t1w, dseg, read_label_table(lut_path(output_dir, method)), o, title=method),
                out, [dseg, t1w], f"{method} segmentation", notes):
            figures.append(Figure(
                f"Segmentation: {METHOD_NAMES.get(method, method)} ({method})",
                _rel(out, output_dir),
                f"{dseg.name} over the T1w; sagittal, coronal and axial slices.",
                _legend(dseg, method, output_dir)))
    return figures + uncertainty_figure(output_dir, record, t1w, segmentations.get("dlf"), notes)


def uncertainty_figure(output_dir: Path, record: RunStatus, t1w: Path, dseg: Path | None,
                       notes: list[str]) -> list[Figure]:
    from .figures import plot_uncertainty

    found = sorted(Path(output_dir, record.participant_id).glob(
        f"**/anat/{record.name}_seg-dlf_uncertainty.nii.gz"))
    if not found:
        return []
    out = figure_path(output_dir, record.participant_id[len("sub-"):], record.name,
                      "seg-dlf_uncertainty")
    if not _draw(lambda o: plot_uncertainty(t1w, found[0], o, mask=dseg), out, [found[0], t1w],
                 "DLF uncertainty", notes):
        return []
    return [Figure("Deep Label Fusion uncertainty", _rel(out, output_dir),
                   "Normalised entropy of the fused label distribution: 0 where the model is "
                   "certain, 1 where every label is equally likely.")]


def registration_figure(output_dir: Path, record: RunStatus, notes: list[str]) -> list[Figure]:
    """The check drawn during the run (the registered atlas lives only in the work dir)."""
    subject = record.participant_id[len("sub-"):]
    out = figure_path(output_dir, subject, record.name, REGISTRATION_FIGURE)
    if not out.is_file():
        notes.append("atlas registration check: no figure (the first atlas's registration did "
                      "not finish in the run that wrote these outputs)")
        return []
    atlas = record.atlases[0] if record.atlases else "the first atlas"
    return [Figure(f"Atlas registration check ({atlas})", _rel(out, output_dir),
                   f"Atlas {atlas}'s T1w, in red the edges of the subject's T1w. Top: the atlas "
                   "resampled onto the subject's grid by world coordinates only (before "
                   "registration); bottom: after registration. The edges should follow the "
                   "atlas's anatomy after registration.")]


def image_report(output_dir: Path, bids_dir: Path, record: RunStatus) -> ImageReport:
    notes: list[str] = []
    figures: list[Figure] = []
    if record.status != "skipped":
        t1w = raw_path(record.t1w, bids_dir)
        if t1w is not None and t1w.is_file():
            figures += segmentation_figures(output_dir, record, t1w, notes)
        else:
            notes.append(f"segmentation figures: the T1w {t1w or record.t1w} is not there "
                         f"(the figures draw the labels over it)")
        figures += registration_figure(output_dir, record, notes)
    return ImageReport(record, summary_rows(record) + warp_rows(output_dir, record), figures, notes)


def _rel(path: Path, output_dir: Path) -> str:
    return Path(path).relative_to(output_dir).as_posix()


def _inline(text: str):
    """The methods text's Markdown (`code`, *emphasis*, links) as escaped HTML."""
    from markupsafe import Markup, escape

    html = str(escape(text))
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    html = re.sub(r"\*([^*]+)\*", r"<em>\1</em>", html)
    html = re.sub(r"(https://[^\s<]+[^\s<.,;)])", r'<a href="\1">\1</a>', html)
    return Markup(html)


def render_report(subject: str, images: list[ImageReport], records: list[RunStatus],
                  output_dir: Path) -> str:
    """The HTML text of one subject's report."""
    import jinja2

    template = (resources.files("dlf_bids.reports") / "report.html.j2").read_text()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["inline"] = _inline
    methods = methods_of(records)
    crash_links = {c: (Path(output_dir) / c).is_file() for i in images
                   for c in i.record.crash_files}
    return env.from_string(template).render(
        subject=subject, images=images, version=__version__,
        failed=[i for i in images if i.record.status == "failed"],
        methods=methods.paragraphs, references=[REFERENCES[k].text for k in methods.keys],
        crash_links=crash_links, notice=NOTICE)


def write_subject_report(output_dir: Path, bids_dir: Path, subject: str,
                         records: list[RunStatus]) -> Path:
    images = [image_report(Path(output_dir), Path(bids_dir), r) for r in records]
    html = render_report(subject, images, records, Path(output_dir))
    return write_text_atomic(report_path(output_dir, subject), html)


def write_reports(output_dir: Path | str, bids_dir: Path | str,
                  subjects=None) -> list[Path]:
    """``logs/CITATION.*`` and the report of each subject with status records (or of
    ``subjects``, labels without ``sub-``); :class:`MissingInputError` when there is none."""
    output_dir = Path(output_dir)
    records = read_statuses(output_dir)
    if not records:
        raise MissingInputError(f"no status records in {output_dir / 'logs' / 'status'}: "
                                "run the participant level first")
    write_citations(output_dir, records)
    by_subject: dict[str, list[RunStatus]] = {}
    for record in records:
        by_subject.setdefault(record.participant_id[len("sub-"):], []).append(record)
    wanted = sorted(by_subject if subjects is None else set(subjects) & set(by_subject))
    if not wanted:
        raise MissingInputError(f"no status records for sub-{', sub-'.join(sorted(subjects))} "
                                f"in {output_dir / 'logs' / 'status'}: run the participant level "
                                "first")
    return [write_subject_report(output_dir, bids_dir, s, by_subject[s]) for s in wanted]
