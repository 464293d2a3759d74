"""The report's figures: label maps, DLF uncertainty and the atlas-registration check.

Each figure is one SVG with a row of slices per plane (sagittal, coronal, axial), drawn with
nilearn and stacked with niworkflows, as sMRIPrep's reportlets are. Functions take image paths and
an output path and write the SVG atomically, so a report never links to half a figure.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are made on headless nodes

import nibabel as nb  # noqa: E402
import numpy as np  # noqa: E402

from ..utils.files import write_text_atomic  # noqa: E402
from ..utils.labels import LabelTable  # noqa: E402

PLANES = ("x", "y", "z")
N_CUTS = 7
ROW_INCHES = (2.0 * N_CUTS, 2.2)
DPI = 150  # sharp at a report's width, a few hundred kB per figure


def _svg_of(display) -> str:
    """One nilearn display as SVG text, the same bytes for the same images.

    niworkflows' ``extract_svg`` stamps the date and random element ids into every figure; a
    rerun must give byte-identical outputs, so the date is left out and the ids' salt fixed."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "dlf-bids"}):
        display.frame_axes.figure.savefig(buffer, format="svg", dpi=DPI, facecolor="k",
                                          edgecolor="k", metadata={"Date": None})
    display.close()
    svg = buffer.getvalue()
    return svg[svg.find("<svg "):]


def _rows_to_svg(rows, out_file: Path) -> Path:
    """Stack nilearn displays (one per plane) into one SVG at ``out_file`` (niworkflows' layout)."""
    from niworkflows.viz.utils import compose_view
    from svgutils.transform import fromstring

    svgs = [fromstring(_svg_of(display)) for display in rows]
    with tempfile.TemporaryDirectory() as tmp:
        composed = Path(compose_view(svgs, None, out_file=Path(tmp) / "figure.svg")).read_text()
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out_file, composed)


def _row_figure():
    """One row of slices: the same size for every plane, so the stacked rows line up without the
    black bands that nilearn's per-plane default sizes leave."""
    import matplotlib.pyplot as plt

    return plt.figure(figsize=ROW_INCHES, facecolor="k")


def _cuts(img: nb.Nifti1Image) -> dict[str, list[float]]:
    """Equally spaced cuts through the non-zero part of ``img`` (niworkflows' rule)."""
    from niworkflows.viz.utils import cuts_from_bbox

    # sorted: an image stored in another voxel order (LIA) would otherwise run right to left
    return {plane: sorted(cuts) for plane, cuts in cuts_from_bbox(img, cuts=N_CUTS).items()}


def _label_colormap(table: LabelTable):
    """A colormap where value k (1..n) is the colour of the k-th label of ``table``."""
    from matplotlib.colors import ListedColormap

    from ..utils.labels import _default_color

    n = len(table.labels)
    return ListedColormap([lab.color or _default_color(i, n) for i, lab in enumerate(table.labels)])


def consecutive_labels(data: np.ndarray, table: LabelTable) -> np.ndarray:
    """Label values replaced by their rank in ``table`` (1..n); unknown values become 0.

    Label indices are sparse (FreeSurfer's go up to 2035): a colormap indexed by rank gives every
    label its own look-up-table colour."""
    out = np.zeros(data.shape, np.int16)
    for rank, index in enumerate(table.indices, start=1):
        out[data == index] = rank
    return out


def plot_segmentation(t1w: Path | str, dseg: Path | str, table: LabelTable, out_file: Path | str,
                      title: str | None = None) -> Path:
    """The label map over the T1w, in the look-up table's colours, three planes."""
    from nilearn.plotting import plot_roi

    seg = nb.load(dseg)
    ranks = nb.Nifti1Image(consecutive_labels(np.asanyarray(seg.dataobj), table), seg.affine)
    cuts = _cuts(ranks)
    rows = [plot_roi(ranks, bg_img=str(t1w), figure=_row_figure(), display_mode=plane,
                     cut_coords=cuts[plane], cmap=_label_colormap(table), vmin=0.5,
                     vmax=len(table.labels) + 0.5, threshold=0.5, alpha=0.6, colorbar=False,
                     draw_cross=False, black_bg=True, title=title if plane == PLANES[0] else None)
            for plane in PLANES]
    return _rows_to_svg(rows, Path(out_file))


def plot_uncertainty(t1w: Path | str, uncertainty: Path | str, out_file: Path | str,
                     mask: Path | str | None = None) -> Path:
    """DLF's voxelwise uncertainty (0 certain .. 1 uniform) over the T1w, three planes; the cuts
    span ``mask`` (the label map: uncertainty is zero wherever the atlases agree)."""
    from nilearn.plotting import plot_stat_map

    unc = nb.load(uncertainty)
    cuts = _cuts(nb.load(mask) if mask else unc)
    rows = [plot_stat_map(unc, bg_img=str(t1w), figure=_row_figure(), display_mode=plane,
                          cut_coords=cuts[plane], cmap="inferno", vmin=0, vmax=1,
                          threshold=0.02, colorbar=True, draw_cross=False, black_bg=True, dim=0,
                          title="uncertainty (0-1)" if plane == PLANES[0] else None)
            for plane in PLANES]
    return _rows_to_svg(rows, Path(out_file))


def plot_registration_check(subject_t1w: Path | str, atlas_t1w: Path | str,
                            warped_atlas_t1w: Path | str, out_file: Path | str,
                            atlas_name: str = "atlas") -> Path:
    """The atlas before registration (resampled onto the subject grid by world coordinates only)
    and after (registered), each with the subject's T1w edges in red: where they line up, the
    registration worked."""
    from nilearn.image import resample_to_img
    from nilearn.plotting import plot_anat

    subject = nb.load(subject_t1w)
    before = resample_to_img(nb.load(atlas_t1w), subject, interpolation="continuous",
                             force_resample=True, copy_header=True)
    after = nb.load(warped_atlas_t1w)
    cuts = _cuts(_foreground(subject))
    rows = []
    for label, img in ((f"{atlas_name} before registration", before),
                       (f"{atlas_name} after registration", after)):
        for plane in PLANES:
            display = plot_anat(img, figure=_row_figure(), display_mode=plane,
                                cut_coords=cuts[plane], colorbar=False, draw_cross=False,
                                black_bg=True, dim=0, title=label if plane == PLANES[0] else None)
            display.add_edges(subject, color="r")
            rows.append(display)
    return _rows_to_svg(rows, Path(out_file))


def _foreground(img: nb.Nifti1Image) -> nb.Nifti1Image:
    """Voxels above a fifth of the robust maximum: the head, for choosing cuts."""
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    return nb.Nifti1Image((data > 0.2 * np.percentile(data, 99)).astype(np.uint8), img.affine)
