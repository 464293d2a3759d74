"""Figures of the group report: volume distributions per label, small multiples, one box per method.

Matplotlib's object API (``Figure``) rather than ``pyplot``: no global backend or figure state,
so the group level works on headless nodes and inside other programs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .group import MeasuredImage
from .group_qc import Outlier
from .utils.files import atomic_open

FIGURE_DIR = "figures"
FIGURE_PREFIX = "group_volumes_"
PANELS_PER_FIGURE = 12  # a 3 x 4 grid stays readable on a laptop screen
COLUMNS = 4
OUTLIER_COLOR = "#d62728"


def measures(measured: dict[str, list[MeasuredImage]]) -> list[str]:
    """Label and total names in table order, leaving out those empty in every image."""
    names: dict[str, bool] = {}
    for images in measured.values():
        for image in images:
            for row in image.rows:
                names[row.name] = names.get(row.name, False) or row.volume_mm3 > 0
    return [name for name, seen in names.items() if seen]


def _by_name(images: list[MeasuredImage]) -> dict[str, list[tuple[str, float]]]:
    """Label or total name -> (image, volume) of every image."""
    found: dict[str, list[tuple[str, float]]] = {}
    for image in images:
        for row in image.rows:
            found.setdefault(row.name, []).append((image.segmentation.image, row.volume_mm3))
    return found


def _panel(ax, columns: dict[str, dict], name: str, flagged: set) -> None:
    rng = np.random.default_rng(0)  # the same jitter every time: figures are reproducible
    methods = sorted(columns)
    data = [columns[m].get(name, []) for m in methods]
    ax.boxplot([[v for _, v in d] or [np.nan] for d in data], showfliers=False, widths=0.5)
    for x, (method, points) in enumerate(zip(methods, data), start=1):
        volumes = np.array([v for _, v in points])
        jitter = x + rng.uniform(-0.15, 0.15, volumes.size)
        bad = np.array([(method, image, name) in flagged for image, _ in points], dtype=bool)
        ax.scatter(jitter[~bad], volumes[~bad], s=8, alpha=0.6, color="#1f77b4", linewidths=0)
        ax.scatter(jitter[bad], volumes[bad], s=24, marker="x", color=OUTLIER_COLOR)
    ax.set_xticks(range(1, len(methods) + 1), methods)
    ax.set_title(name if len(name) <= 28 else name[:27] + "…", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))


def plot_volume_distributions(output_dir: Path, measured: dict[str, list[MeasuredImage]],
                              outliers: list[Outlier]) -> list[Path]:
    """PNG small multiples of every label's volumes (12 labels a figure); paths returned.

    PNG, not SVG: a figure's size must not grow with the number of subjects."""
    folder = Path(output_dir) / FIGURE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    flagged = {(o.segmentation.method, o.segmentation.image, o.name) for o in outliers}
    names = measures(measured)
    columns = {method: _by_name(images) for method, images in measured.items()}
    written = []
    for start in range(0, len(names), PANELS_PER_FIGURE):
        chunk = names[start:start + PANELS_PER_FIGURE]
        rows = -(-len(chunk) // COLUMNS)
        fig = Figure(figsize=(3.2 * COLUMNS, 2.6 * rows), layout="constrained")
        axes = fig.subplots(rows, COLUMNS, squeeze=False).ravel()
        for ax, name in zip(axes, chunk):
            _panel(ax, columns, name, flagged)
        for ax in axes[len(chunk):]:
            ax.set_visible(False)
        fig.supylabel("volume (mm³)", fontsize=9)
        path = folder / f"{FIGURE_PREFIX}{start // PANELS_PER_FIGURE + 1:02d}.png"
        with atomic_open(path, binary=True) as fh:
            fig.savefig(fh, format="png", dpi=80, metadata={"Software": None})
        written.append(path)
    for stale in set(folder.glob(f"{FIGURE_PREFIX}*.png")) - set(written):
        stale.unlink()  # from an earlier group run with more labels
    return written
