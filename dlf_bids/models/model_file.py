"""Deep Label Fusion model files: one ``torch.save`` of a plain dict, safe to load with
``torch.load(weights_only=True)`` (only ints, floats, strings, lists, dicts and tensors).

Keys (``FORMAT_VERSION`` 1):

``format_version`` (int), ``package_version`` (``dlf_bids.__version__`` that wrote it),
``dlf_config`` (:meth:`DLFConfig.to_dict`), ``state_dict``, ``labels`` (list of dicts
``index``/``name``/``abbreviation``/``color``; network channel ``c > 0`` is ``labels[c-1]["index"]``,
channel 0 is background), ``modalities`` (e.g. ``["T1w", "T2w"]``, network channel order),
``patch_size`` (3 ints), ``normalisation`` (``"patch-zscore-nonzero"``), ``modaug`` (bool: trained
with ModAug, so a missing modality may be replaced by unit white noise), ``training_atlases``
(list of ids), ``train_settings`` (dict), ``created`` (ISO-8601 UTC timestamp).

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import BadDataError, UsageError
from ..utils.files import atomic_open
from ..utils.labels import Label, LabelTable
from .dlf import DeepLabelFusion, DLFConfig, check_patch_size

__all__ = [
    "FORMAT_VERSION",
    "NOISE",
    "NORMALISATION",
    "ModalityPlan",
    "ModelInfo",
    "check_model_fits",
    "check_header",
    "load_model",
    "load_weights",
    "model_hash",
    "read_payload",
    "save_model",
]

#: Newest model-file layout this version writes and reads.
FORMAT_VERSION = 1
#: The only input normalisation implemented: per patch, per channel z-score with mean and standard
#: deviation taken over the voxels > 0 (applied to every voxel of the patch).
NORMALISATION = "patch-zscore-nonzero"
#: Entry of a :class:`ModalityPlan` for a channel to be filled with unit white noise.
NOISE = "noise"

_REQUIRED = ("format_version", "dlf_config", "state_dict", "labels", "modalities", "patch_size")


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """Everything in a model file but the weights."""

    format_version: int
    package_version: str
    dlf_config: DLFConfig
    labels: list[dict]
    modalities: list[str]
    patch_size: tuple[int, int, int]
    normalisation: str = NORMALISATION
    modaug: bool = False
    training_atlases: list[str] = field(default_factory=list)
    train_settings: dict = field(default_factory=dict)
    created: str = ""
    path: str | None = None
    sha256: str | None = None

    @property
    def label_indices(self) -> tuple[int, ...]:
        """Label values of the foreground channels 1..L-1 (background excluded)."""
        return tuple(int(lab["index"]) for lab in self.labels)

    @property
    def channel_values(self) -> np.ndarray:
        """Label value of every network channel, ``[0, *label_indices]`` (int64)."""
        return np.asarray((0, *self.label_indices), dtype=np.int64)

    @property
    def n_labels(self) -> int:
        """Number of network channels, background included."""
        return len(self.labels) + 1

    def label_table(self) -> LabelTable:
        return LabelTable(tuple(
            Label(int(d["index"]), str(d.get("name", "")), str(d.get("abbreviation", "") or ""),
                  str(d.get("color", "") or ""))
            for d in self.labels
        ))


def _labels_to_dicts(labels) -> list[dict]:
    """LabelTable, sequence of :class:`Label` or of dicts -> list of plain dicts."""
    if isinstance(labels, LabelTable):
        labels = labels.labels
    out = []
    for lab in labels:
        if isinstance(lab, Label):
            d = {"index": lab.index, "name": lab.name, "abbreviation": lab.abbreviation, "color": lab.color}
        elif isinstance(lab, Mapping):
            d = {"index": lab["index"], "name": lab.get("name", ""),
                 "abbreviation": lab.get("abbreviation", "") or "", "color": lab.get("color", "") or ""}
        else:
            raise TypeError(f"cannot read a label from {lab!r}")
        d = {"index": int(d["index"]), "name": str(d["name"]), "abbreviation": str(d["abbreviation"]),
             "color": str(d["color"])}
        if d["index"] == 0:
            raise ValueError("label index 0 is the background and must not be listed")
        out.append(d)
    indices = [d["index"] for d in out]
    if len(set(indices)) != len(indices):
        raise ValueError("a label index is listed twice")
    return out


def _plain(obj):
    """Tuples -> lists, numpy scalars -> Python, Paths -> str, recursively (weights_only-safe)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a model file (plain types only)")


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------
def save_model(path, model: DeepLabelFusion, meta: Mapping) -> Path:
    """Write ``model`` and ``meta`` to ``path`` atomically (temporary file + ``os.replace``).

    ``meta`` needs ``labels`` (a :class:`LabelTable`, :class:`Label` objects or dicts; one per
    foreground channel, in channel order), ``modalities`` and ``patch_size``; optional keys:
    ``modaug`` (False), ``training_atlases`` ([]), ``train_settings`` ({}), ``normalisation``
    (:data:`NORMALISATION`), ``created`` (now). Raises :class:`ValueError` when the metadata does
    not match the network (number of labels / modalities, patch size)."""
    cfg = model.config
    labels = _labels_to_dicts(meta["labels"])
    if len(labels) + 1 != cfg.n_labels:
        raise ValueError(f"{len(labels)} labels + background but the network has {cfg.n_labels} channels")
    modalities = [str(m) for m in meta["modalities"]]
    if len(modalities) != cfg.n_modalities:
        raise ValueError(f"{len(modalities)} modalities but the network has {cfg.n_modalities}")
    patch_size = [int(s) for s in meta["patch_size"]]
    check_patch_size(patch_size, cfg.size_divisor)
    normalisation = str(meta.get("normalisation", NORMALISATION))
    if normalisation != NORMALISATION:
        raise ValueError(f"unknown normalisation {normalisation!r} (only {NORMALISATION!r})")
    created = meta.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    payload = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "dlf_config": _plain(cfg.to_dict()),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "labels": labels,
        "modalities": modalities,
        "patch_size": patch_size,
        "normalisation": normalisation,
        "modaug": bool(meta.get("modaug", False)),
        "training_atlases": [str(a) for a in meta.get("training_atlases", []) or []],
        "train_settings": _plain(dict(meta.get("train_settings", {}) or {})),
        "created": str(created),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as fh:
        torch.save(payload, fh)
    return path


def model_hash(path) -> str:
    """SHA-256 (hex) of the model file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_header(payload, where: str, kind: str, required, newest: int,
                 is_kind=lambda payload: True) -> int:
    """The checks every model file passes before its content is read: a dict of ``kind``
    (``is_kind``), with the ``required`` keys, a format version this dlf-bids reads (at most
    ``newest``). Returns the version; refusals are one-line :class:`BadDataError`."""
    if not isinstance(payload, Mapping) or not is_kind(payload):
        raise BadDataError(f"{where} is not a {kind} model")
    missing = [k for k in required if k not in payload]
    if missing:
        raise BadDataError(f"{where} is not a {kind} model (missing {', '.join(missing)})")
    version = payload["format_version"]
    if not isinstance(version, int) or version < 1:
        raise BadDataError(f"{where} has an invalid format_version {version!r}")
    if version > newest:
        raise BadDataError(
            f"{where} has format version {version}, this dlf-bids ({__version__}) reads up to "
            f"{newest}: upgrade dlf-bids (the file was written by "
            f"{payload.get('package_version', 'a newer version')})"
        )
    return version


def read_model_info(payload: Mapping, path=None) -> ModelInfo:
    """Validate a loaded model-file dict and return its metadata."""
    where = f"model file {path}" if path is not None else "model file"
    version = check_header(payload, where, "dlf-bids", _REQUIRED, FORMAT_VERSION)
    try:
        config = DLFConfig.from_dict(dict(payload["dlf_config"]))
        labels = _labels_to_dicts(payload["labels"])
    except (TypeError, ValueError, KeyError) as exc:
        raise BadDataError(f"{where} has invalid metadata: {exc}") from None
    normalisation = str(payload.get("normalisation", NORMALISATION))
    if normalisation != NORMALISATION:
        raise BadDataError(f"{where} uses normalisation {normalisation!r}; only {NORMALISATION!r} is supported")
    if len(labels) + 1 != config.n_labels:
        raise BadDataError(f"{where} lists {len(labels)} labels but its network has {config.n_labels - 1}")
    modalities = [str(m) for m in payload["modalities"]]
    if len(modalities) != config.n_modalities:
        raise BadDataError(f"{where} lists {len(modalities)} modalities but its network has {config.n_modalities}")
    patch = tuple(int(s) for s in payload["patch_size"])
    try:
        check_patch_size(patch, config.size_divisor)
    except ValueError as exc:
        raise BadDataError(f"{where}: {exc}") from None
    return ModelInfo(
        format_version=version,
        package_version=str(payload.get("package_version", "")),
        dlf_config=config,
        labels=labels,
        modalities=modalities,
        patch_size=patch,  # type: ignore[arg-type]
        normalisation=normalisation,
        modaug=bool(payload.get("modaug", False)),
        training_atlases=[str(a) for a in payload.get("training_atlases", []) or []],
        train_settings=dict(payload.get("train_settings", {}) or {}),
        created=str(payload.get("created", "")),
        path=str(path) if path is not None else None,
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _refusal(path: Path, exc: pickle.UnpicklingError) -> BadDataError:
    """One line for torch's multi-line weights_only refusal, whose advice to load the file without
    weights_only (that is, to run its code) must not reach our users."""
    text = str(exc)
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
    if found:  # the pickle names a function or class to import and call: crafted or foreign code
        return BadDataError(f"model file {path} is refused: it would run or import Python code "
                            f"({found.group(1)}) when loaded (dlf-bids model files are data: "
                            "tensors and plain values only)")
    # other opcodes torch does not allow (random bytes, newer pickle protocols)
    detail = text.partition("WeightsUnpickler error:")[2].strip().split("\n")[0].strip()
    return BadDataError(f"model file {path} cannot be read as a dlf-bids model: not tensors and "
                        f"plain values only ({detail or 'unsupported pickle content'})")


def read_payload(path: Path) -> dict:
    """The plain dict of a model file (any dlf-bids model type), or a one-line refusal:
    :class:`UsageError` (no such file) / :class:`BadDataError` (unreadable, or holding code)."""
    if not path.is_file():
        raise UsageError(f"model file {path} does not exist")
    try:
        # weights_only: a model file is data; a pickle that would import or call anything (the
        # way a crafted file runs code on load) is refused before any of it executes
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
            raise _refusal(path, exc) from None
        raise BadDataError(f"model file {path} cannot be read as a dlf-bids model: "
                           f"{_first_line(exc)}") from None


def load_weights(model: torch.nn.Module, state_dict, path: Path) -> None:
    """``model.load_state_dict(strict=True)``, a mismatch as a one-line :class:`BadDataError`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BadDataError(f"model file {path}: weights do not match its configuration "
                           f"({_first_line(exc)})") from None


def load_model(path, device="cpu") -> tuple[DeepLabelFusion, ModelInfo]:
    """Load a model file: ``(DeepLabelFusion in eval mode on device, ModelInfo)``.

    Refusals are one-line :class:`UsageError` (no such file) / :class:`BadDataError` (not a model,
    content other than plain data, newer format, weights not matching the configuration)."""
    path = Path(path)
    payload = read_payload(path)
    info = read_model_info(payload, path)
    model = DeepLabelFusion(info.dlf_config)
    load_weights(model, payload["state_dict"], path)
    if device is not None:
        model = model.to(device)
    model.eval()
    info.sha256 = model_hash(path)
    return model, info


# --------------------------------------------------------------------------------------------
# does a model fit a library / a subject?
# --------------------------------------------------------------------------------------------
class ModalityPlan(list):
    """What to feed each input modality of the model, in channel order: the modality name (e.g.
    ``"T1w"``) or :data:`NOISE` (a channel of unit white noise, in the target and every atlas).
    A plain ``list[str]`` with two extra attributes: ``warnings`` (one-line messages to show the
    user) and ``noise_channels`` (channel indices filled with noise)."""

    def __init__(self, items: Iterable[str] = (), warnings: Sequence[str] = ()):
        super().__init__(items)
        self.warnings: list[str] = list(warnings)

    @property
    def noise_channels(self) -> list[int]:
        return [i for i, m in enumerate(self) if m == NOISE]


def check_model_fits(
    info: ModelInfo,
    library_label_indices: Iterable[int],
    available_modalities: Iterable[str],
    force: bool = False,
) -> ModalityPlan:
    """Check that a model can segment with an atlas library and a subject's images.

    * **Labels**: every label of the library (0 ignored) must be a label of the model, otherwise
      :class:`BadDataError` naming the missing ones (the network has no output for them; not
      overridable). Model labels the library lacks are allowed, with a warning: label masking keeps
      them out of every result.
    * **Modalities**: every model modality should be available. A missing one is replaced by unit
      white noise (the paper's T1-only / T2-only use) when the model was trained with ModAug, or,
      with a warning, when ``force`` is set; otherwise :class:`BadDataError`. At least one model
      modality must be available (all-noise input is refused even with ``force``). Extra available
      modalities are ignored.

    Returns the :class:`ModalityPlan` (a ``list[str]``, one entry per model channel)."""
    lib = sorted({int(i) for i in library_label_indices} - {0})
    known = set(info.label_indices)
    unknown = [i for i in lib if i not in known]
    if unknown:
        raise BadDataError(
            f"the model does not know label(s) {', '.join(map(str, unknown))} of the atlas library "
            f"(model labels: {', '.join(map(str, info.label_indices))}); use a model trained with "
            "these labels or an atlas library with the model's labels"
        )
    warnings: list[str] = []
    unused = [i for i in info.label_indices if i not in set(lib)]
    if unused:
        warnings.append(
            f"model label(s) {', '.join(map(str, unused))} are not in the atlas library and will "
            "never be produced"
        )

    available = {str(m) for m in available_modalities}
    missing = [m for m in info.modalities if m not in available]
    if len(missing) == len(info.modalities):
        raise BadDataError(
            f"none of the model's modalities ({', '.join(info.modalities)}) is available "
            f"(have: {', '.join(sorted(available)) or 'none'})"
        )
    if missing:
        if info.modaug:
            pass  # the network was trained to see noise in place of a modality
        elif force:
            warnings.append(
                f"model expects {', '.join(info.modalities)} but {', '.join(missing)} is missing; "
                "--force: feeding unit white noise instead although the model was not trained with "
                "ModAug (results may be poor)"
            )
        else:
            raise BadDataError(
                f"model expects {', '.join(info.modalities)} but {', '.join(missing)} is missing and "
                "the model was not trained with ModAug; provide it, use a model for the available "
                "modalities, or --force to feed noise instead"
            )
    plan = [m if m in available else NOISE for m in info.modalities]
    return ModalityPlan(plan, warnings)
