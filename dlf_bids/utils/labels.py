"""Label look-up tables (BIDS ``dseg.tsv``: ``index``, ``name``, optional ``abbreviation``, ``color``)."""

from __future__ import annotations

import colorsys
import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadDataError
from .files import write_text_atomic


@dataclass(frozen=True)
class Label:
    index: int
    name: str
    abbreviation: str = ""
    color: str = ""


@dataclass(frozen=True)
class LabelTable:
    """An ordered set of labels; index 0 is background and never listed."""

    labels: tuple[Label, ...]

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(lab.index for lab in self.labels)

    def name_of(self, index: int) -> str:
        for lab in self.labels:
            if lab.index == index:
                return lab.name
        raise KeyError(index)

    def subset(self, indices) -> "LabelTable":
        keep = set(int(i) for i in indices)
        return LabelTable(tuple(lab for lab in self.labels if lab.index in keep))


def read_label_table(path: Path | str) -> LabelTable:
    """Read a BIDS dseg look-up table; raise :class:`BadDataError` with the reason if malformed."""
    path = Path(path)
    if not path.is_file():
        raise BadDataError(f"label table {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if not reader.fieldnames or not {"index", "name"} <= set(reader.fieldnames):
            raise BadDataError(f"label table {path} needs tab-separated 'index' and 'name' columns")
        labels = []
        for lineno, row in enumerate(reader, start=2):
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                raise BadDataError(f"{path}:{lineno}: index {row['index']!r} is not an integer")
            if index == 0:
                continue  # background is implicit
            labels.append(
                Label(index, row["name"].strip(), (row.get("abbreviation") or "").strip(),
                      (row.get("color") or "").strip())
            )
    indices = [lab.index for lab in labels]
    if len(set(indices)) != len(indices):
        raise BadDataError(f"label table {path} lists an index twice")
    if not labels:
        raise BadDataError(f"label table {path} has no labels")
    return LabelTable(tuple(labels))


def _default_color(i: int, n: int) -> str:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95)
    return "#{:02x}{:02x}{:02x}".format(int(r * 255), int(g * 255), int(b * 255))


def write_label_table(table: LabelTable, path: Path | str) -> Path:
    """Write ``table`` as a BIDS dseg TSV (colours filled in when missing, so viewers can show it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(table.labels)
    lines = ["index\tname\tabbreviation\tcolor"]
    for i, lab in enumerate(table.labels):
        abbr = lab.abbreviation or lab.name
        color = lab.color or _default_color(i, n)
        lines.append(f"{lab.index}\t{lab.name}\t{abbr}\t{color}")
    write_text_atomic(path, "\n".join(lines) + "\n")  # the root LUTs of an output folder
    return path
