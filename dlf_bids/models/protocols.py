"""NeuroNet protocols: which label set a decoder predicts and how its training label maps are made.

A protocol is data, not code (Rajchl et al. train one decoder per tool's output, "protocol"): a
name, its classes (a :class:`~dlf_bids.utils.labels.LabelTable`, index 0 = background, implicit)
and a *recipe* for its reference label maps, one of

* ``{"kind": "labels", "source": S}``: the label map of source ``S`` as it is; every value must
  be a class of the protocol (or 0);
* ``{"kind": "collapse", "source": S, "map": {"1": [3, 42, ...], "2": [...], "0": [...]}}``: the
  label map of ``S`` with each listed source value replaced by its class (``"0"``: to background).
  The map must cover every value met, so nothing is dropped silently (:func:`collapse_labels`);
* ``{"kind": "atropos", "map": {...}}``: ANTs Atropos classes (numbered by increasing mean T1
  intensity) mapped to the protocol's classes the same way.

Sources (:data:`SOURCES`): ``"multiatlas"``, the labels multi-atlas fusion with the atlas library
produces for a training subject; ``"reference"``, a label map that comes with the subject (e.g.
its FreeSurfer ``aseg``). A protocol file is JSON or YAML (:func:`load_protocol`); ``classes`` is
either a list of label rows (``index``, ``name``, optional ``abbreviation``, ``color``) or the
name of a BIDS ``dseg.tsv`` next to the file. :func:`builtin_protocol` gives the ones shipped:
``tissue`` (GM/WM/CSF collapsed from FreeSurfer aseg labels) and ``aseg`` (the aseg labels).

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..errors import BadDataError, MissingInputError
from ..utils.labels import Label, LabelTable, read_label_table
from .inference import labels_to_channels
from .model_file import _labels_to_dicts

__all__ = [
    "KINDS",
    "SOURCES",
    "LabelRecipe",
    "Protocol",
    "BUILTIN_PROTOCOLS",
    "builtin_protocol",
    "check_source_values",
    "is_bids_tissue",
    "resolve_protocol",
    "collapse_labels",
    "load_protocol",
]

KINDS = ("labels", "collapse", "atropos")
SOURCES = ("multiatlas", "reference", "atropos")
# the name becomes a ModuleDict key and, later, a BIDS ``desc-<name>`` entity: alphanumeric only
_NAME = re.compile(r"^[A-Za-z0-9]+$")


def collapse_labels(label_map, mapping: Mapping[int, Iterable[int]]) -> np.ndarray:
    """Replace label values by classes: ``mapping[c]`` lists the source values that become ``c``.

    Background (0) stays 0 unless listed. A source value listed under two classes is a
    :class:`ValueError`; a value met in ``label_map`` but listed nowhere is a
    :class:`BadDataError` naming it (a collapse must be total: a silently dropped label would
    teach the network that a structure is background). Returns ``int16``."""
    lut: dict[int, int] = {}
    for target, values in mapping.items():
        for v in values:
            v = int(v)
            if v in lut and lut[v] != int(target):
                raise ValueError(f"source label {v} is mapped to both {lut[v]} and {int(target)}")
            lut[v] = int(target)
    lut.setdefault(0, 0)
    arr = np.asarray(label_map)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise BadDataError("label map holds non-integer values")
        arr = arr.astype(np.int64)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int16)
    lo, hi = int(arr.min()), int(arr.max())
    if 0 <= min(lo, *lut) and max(hi, *lut) < 1 << 16:  # a dense look-up table: no sort
        dense = np.full(max(hi, *lut) + 1, -1, dtype=np.int32)
        dense[list(lut)] = list(lut.values())
        out = dense[arr]
        if (out < 0).any():
            _uncovered(np.unique(arr[out < 0]))
        return out.astype(np.int16)
    uniq, inverse = np.unique(arr, return_inverse=True)  # negative or huge values: sort instead
    _uncovered([u for u in uniq if int(u) not in lut])
    return np.asarray([lut[int(u)] for u in uniq], dtype=np.int16)[inverse.reshape(arr.shape)]


def _uncovered(values) -> None:
    if len(values):
        raise BadDataError(f"label value(s) {', '.join(str(int(v)) for v in values[:20])} "
                           "are not covered by the collapse")


@dataclass(frozen=True)
class LabelRecipe:
    """How a protocol's reference label maps are made (see the module docstring)."""

    kind: str
    source: str = "multiatlas"
    mapping: tuple[tuple[int, tuple[int, ...]], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown label recipe kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.source not in SOURCES:
            raise ValueError(f"unknown label source {self.source!r} (one of {', '.join(SOURCES)})")
        if (self.kind == "atropos") != (self.source == "atropos"):
            raise ValueError("the atropos kind, and only it, takes its labels from Atropos")
        if self.kind == "labels" and self.mapping:
            raise ValueError("a 'labels' recipe takes no map")
        if self.kind != "labels" and not self.mapping:
            raise ValueError(f"a {self.kind!r} recipe needs a map")

    @property
    def map_dict(self) -> dict[int, tuple[int, ...]]:
        return dict(self.mapping)

    @property
    def atropos_classes(self) -> int:
        """Classes Atropos is asked for: the largest class its map names (an ``atropos`` recipe
        says how many tissues it separates by mapping each of them)."""
        return max((v for _, vs in self.mapping for v in vs), default=0)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "source": self.source}
        if self.mapping:
            out["map"] = {str(t): list(v) for t, v in self.mapping}
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelRecipe:
        unknown = sorted(set(data) - {"kind", "source", "map"})
        if unknown:
            raise ValueError(f"unknown label recipe keys: {unknown}")
        kind = str(data.get("kind", ""))
        source = str(data.get("source", "atropos" if kind == "atropos" else "multiatlas"))
        raw = data.get("map") or {}
        if not isinstance(raw, Mapping):
            raise ValueError("a label recipe's map must be {class: [source values]}")
        mapping = tuple(sorted((int(t), tuple(sorted(int(v) for v in vals))) for t, vals in raw.items()))
        return cls(kind=kind, source=source, mapping=mapping)


@dataclass(frozen=True)
class Protocol:
    """One decoder's label set: ``name``, ``classes`` (network channel ``c > 0`` is
    ``classes.labels[c-1]``, channel 0 background) and the ``recipe`` of its label maps."""

    name: str
    classes: LabelTable
    recipe: LabelRecipe
    description: str = ""

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"protocol name {self.name!r} must be alphanumeric (it becomes a BIDS desc label)")
        if not self.classes.labels:
            raise ValueError(f"protocol {self.name} has no classes")
        _labels_to_dicts(self.classes)  # refuses index 0 and repeated indices
        known = {0, *self.classes.indices}
        bad = sorted(t for t, _ in self.recipe.mapping if t not in known)
        if bad:
            raise ValueError(f"protocol {self.name}: the map names classes {bad} it does not have")

    @property
    def n_classes(self) -> int:
        """Network channels, background included."""
        return len(self.classes.labels) + 1

    @property
    def channel_values(self) -> np.ndarray:
        """Label value of every network channel, ``[0, *class indices]``."""
        return np.asarray((0, *self.classes.indices), dtype=np.int64)

    def make_label_map(self, source_map) -> np.ndarray:
        """The protocol's label map (class values, ``int16``) from its source's label map."""
        if self.recipe.kind == "labels":
            # only to refuse values outside the classes (BadDataError), with a look-up table
            labels_to_channels(source_map, self.channel_values, f"protocol {self.name}: label map")
            return np.asarray(source_map).astype(np.int16)
        return collapse_labels(source_map, self.recipe.map_dict)

    def to_dict(self) -> dict:
        """Plain JSON-compatible dict, classes inlined (a self-contained copy, e.g. in a model file)."""
        return {"name": self.name, "description": self.description,
                "classes": _labels_to_dicts(self.classes), "labels": self.recipe.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping, folder: Path | None = None) -> Protocol:
        """Inverse of :meth:`to_dict`; ``classes`` may also name a ``dseg.tsv`` in ``folder``.
        :class:`BadDataError` for anything malformed."""
        try:
            unknown = sorted(set(data) - {"name", "description", "classes", "labels"})
            if unknown:
                raise ValueError(f"unknown protocol keys: {unknown}")
            classes = data["classes"]
            if isinstance(classes, str):
                table = read_label_table((folder or Path.cwd()) / classes)
            else:
                table = _table_from_rows(classes)
            return cls(name=str(data["name"]), classes=table, recipe=LabelRecipe.from_dict(data["labels"]),
                       description=str(data.get("description", "")))
        except (KeyError, TypeError, ValueError) as exc:
            what = data.get("name", "?") if isinstance(data, Mapping) else "?"
            raise BadDataError(f"protocol {what}: invalid specification ({exc})") from None


def _table_from_rows(rows) -> LabelTable:
    return LabelTable(tuple(Label(d["index"], d["name"], d["abbreviation"], d["color"])
                            for d in _labels_to_dicts(rows)))


def load_protocol(path) -> Protocol:
    """Read a protocol from a JSON or YAML file (YAML reads both)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BadDataError(f"protocol file {path} cannot be read: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        raise BadDataError(f"protocol file {path} does not hold a protocol (a mapping)")
    return Protocol.from_dict(data, folder=path.parent)


# --------------------------------------------------------------------------------------------
# built-in protocols
# --------------------------------------------------------------------------------------------
# BIDS common derivative labels for tissue classes
TISSUE_CLASSES = [
    {"index": 1, "name": "Gray Matter", "abbreviation": "GM", "color": "#808080"},
    {"index": 2, "name": "White Matter", "abbreviation": "WM", "color": "#f5f5f5"},
    {"index": 3, "name": "Cerebrospinal Fluid", "abbreviation": "CSF", "color": "#3c3c96"},
]
# FreeSurfer aseg -> tissue. Every value of dlf_bids/data/freesurfer_aseg.tsv is listed, so a
# new aseg value is an error, not a silent background.
ASEG_TO_TISSUE = {
    # GM: cerebral cortex 3/42, cerebellum cortex 8/47, and the deep grey nuclei: thalamus 10/49,
    # caudate 11/50, putamen 12/51, pallidum 13/52, hippocampus 17/53, amygdala 18/54,
    # accumbens 26/58, ventral DC 28/60; non-WM hypointensities 80 (lesions in grey matter);
    # vessel 30/62 (FreeSurfer puts them in the basal ganglia, where a tissue model sees grey)
    1: [3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58, 28, 60, 80, 30, 62],
    # WM: cerebral WM 2/41, cerebellar WM 7/46, brain-stem 16, corpus callosum 251-255,
    # WM hypointensities 77, optic chiasm 85 (a fibre tract)
    2: [2, 41, 7, 46, 16, 251, 252, 253, 254, 255, 77, 85],
    # CSF: lateral 4/43, inferior lateral 5/44, 3rd 14, 4th 15 and 5th 72 ventricles, CSF 24, and
    # choroid plexus 31/63 (inside the ventricles, mostly CSF at 1 mm)
    3: [4, 43, 5, 44, 14, 15, 72, 24, 31, 63],
}


def _aseg_rows() -> list[dict]:
    resource = importlib.resources.files("dlf_bids.data").joinpath("freesurfer_aseg.tsv")
    with importlib.resources.as_file(resource) as path:
        return _labels_to_dicts(read_label_table(path))


# Atropos classes ranked by mean T1w intensity (1 darkest) -> BIDS common labels: on a T1w the
# darkest brain class is CSF, then GM, then WM
ATROPOS_TO_TISSUE = {3: [1], 1: [2], 2: [3]}
#: built-in protocol names; "structures" and "library" take their classes from the atlas library
BUILTIN_PROTOCOLS = ("atropos", "tissue", "aseg", "structures", "library")


def builtin_protocol(name: str, library_labels: LabelTable | None = None) -> Protocol:
    """``"atropos"``: GM 1, WM 2, CSF 3 from a 3-class Atropos segmentation inside the atlases'
    brain mask (:data:`ATROPOS_TO_TISSUE`); ``"tissue"``: GM 1, WM 2, CSF 3 collapsed from
    FreeSurfer aseg labels of the multi-atlas fusion (:data:`ASEG_TO_TISSUE`); ``"aseg"``: the
    FreeSurfer aseg structure labels of the multi-atlas fusion; ``"structures"``: the labels of
    ``library_labels`` (an atlas library's table) from multi-atlas fusion; ``"library"``: the same
    labels as they come with the image itself (an atlas's own label map)."""
    if name in ("structures", "library") and library_labels is None:
        raise ValueError(f"protocol {name!r} takes its classes from an atlas library")
    lib_rows = (lambda: _labels_to_dicts(library_labels))
    specs = {
        "atropos": lambda: {"name": "atropos", "classes": TISSUE_CLASSES,
                            "description": "GM/WM/CSF from ANTs Atropos (N4, k-means, MRF) in the "
                                           "multi-atlas brain mask",
                            "labels": {"kind": "atropos", "source": "atropos",
                                       "map": {str(k): v for k, v in ATROPOS_TO_TISSUE.items()}}},
        "tissue": lambda: {"name": "tissue", "classes": TISSUE_CLASSES,
                           "description": "GM/WM/CSF collapsed from multi-atlas FreeSurfer aseg labels",
                           "labels": {"kind": "collapse", "source": "multiatlas",
                                      "map": {str(k): v for k, v in ASEG_TO_TISSUE.items()}}},
        "aseg": lambda: {"name": "aseg", "classes": _aseg_rows(),
                         "description": "FreeSurfer aseg structures from multi-atlas label fusion",
                         "labels": {"kind": "labels", "source": "multiatlas"}},
        "structures": lambda: {"name": "structures", "classes": lib_rows(),
                               "description": "the atlas library's labels from multi-atlas label fusion",
                               "labels": {"kind": "labels", "source": "multiatlas"}},
        "library": lambda: {"name": "library", "classes": lib_rows(),
                            "description": "the label maps that come with the training images",
                            "labels": {"kind": "labels", "source": "reference"}},
    }
    if name not in specs:
        raise ValueError(f"no built-in protocol {name!r} (built-in: {', '.join(sorted(specs))})")
    return Protocol.from_dict(specs[name]())


def resolve_protocol(word: str, library_labels: LabelTable | None = None) -> Protocol:
    """A built-in protocol's name (:data:`BUILTIN_PROTOCOLS`) or a protocol file (JSON/YAML):
    adding a protocol is writing such a file. :class:`BadDataError` for an unknown name."""
    if word in BUILTIN_PROTOCOLS:
        try:
            return builtin_protocol(word, library_labels)
        except ValueError as exc:
            raise BadDataError(str(exc)) from None
    path = Path(word)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise MissingInputError(f"protocol file {path} does not exist")
        return load_protocol(path)
    raise BadDataError(f"unknown protocol {word!r}: neither built-in ({', '.join(BUILTIN_PROTOCOLS)}) "
                       "nor a protocol file")


def is_bids_tissue(protocol: Protocol) -> bool:
    """Whether the protocol's classes are exactly the BIDS common tissue labels 1 GM, 2 WM, 3 CSF
    (what sMRIPrep/fMRIPrep read as ``_dseg`` + ``label-*_probseg``)."""
    return [(lab.index, lab.abbreviation) for lab in protocol.classes.labels] == \
        [(1, "GM"), (2, "WM"), (3, "CSF")]


def check_source_values(protocol: Protocol, library_indices) -> None:
    """Refuse, before any teacher runs, a protocol that cannot take every value its source can
    produce: the atlas library's labels (``multiatlas``, ``reference``) or the Atropos classes
    (1 to :attr:`LabelRecipe.atropos_classes`, so a gap in the map is refused). A ``labels``
    protocol must list them as classes, a collapse must map them (one line,
    :class:`BadDataError`, naming the first missing values)."""
    if protocol.recipe.source == "atropos":
        values = set(range(1, protocol.recipe.atropos_classes + 1))
    else:
        values = {int(v) for v in library_indices} - {0}
    if protocol.recipe.kind == "labels":
        missing = values - set(protocol.classes.indices)
        how = "has no class for"
    else:
        missing = values - {v for _, vs in protocol.recipe.mapping for v in vs}
        how = "does not map"
    if missing:
        shown = ", ".join(str(v) for v in sorted(missing)[:20])
        raise BadDataError(f"protocol {protocol.name} {how} {protocol.recipe.source} label(s) {shown}")
