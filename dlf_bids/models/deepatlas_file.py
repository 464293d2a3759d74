"""DeepAtlas model files: one ``torch.save`` of a plain dict, loaded with
``torch.load(weights_only=True)`` (only ints, floats, strings, lists, dicts and tensors), written
atomically. Same conventions as the Deep Label Fusion files of :mod:`.model_file`, with their
own format version and a ``model_type`` so neither loader takes the other's file.

Keys (``DEEPATLAS_FORMAT_VERSION`` 1): ``format_version``, ``model_type`` (``"deepatlas"``),
``package_version``, ``deepatlas_config`` (:meth:`DeepAtlasConfig.to_dict`, whose ``labels`` are
the channel values), ``state_dict`` (both networks), ``labels`` (dicts ``index``/``name``/
``abbreviation``/``color`` of channels 1..L-1), ``modalities``, ``volume_shape`` (the training
grid), ``voxel_size`` (mm, or None), ``normalisation`` (``"volume-zscore-nonzero"``),
``train_settings`` (dict, e.g. with the loss history), ``created`` (ISO-8601 UTC), and, for
models the registration engine can use, ``reference`` = ``{"image": tensor (X, Y, Z) float32,
"affine": 4×4 list (RAS mm, nibabel's)}``: the grid every image is affinely aligned to
(:mod:`dlf_bids.deepatlas_registration`), and ``alignment``: the antspyx transform type of that
pre-alignment (absent: ``"Affine"``, what the first models used).

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import BadDataError
from ..utils.files import atomic_open
from .deepatlas import DeepAtlas, DeepAtlasConfig
from .deepatlas_inference import NORMALISATION
from .model_file import (_labels_to_dicts, _plain, check_header, load_weights, model_hash,
                         read_payload)

__all__ = ["DEEPATLAS_FORMAT_VERSION", "DeepAtlasInfo", "load_deepatlas", "read_deepatlas_info",
           "save_deepatlas"]

#: Newest DeepAtlas file layout this version writes and reads.
DEEPATLAS_FORMAT_VERSION = 1
MODEL_TYPE = "deepatlas"
_REQUIRED = ("format_version", "model_type", "deepatlas_config", "state_dict", "labels", "modalities")


@dataclass
class DeepAtlasInfo:
    """Everything in a DeepAtlas file but the weights."""

    format_version: int
    package_version: str
    config: DeepAtlasConfig
    labels: list[dict]
    modalities: list[str]
    volume_shape: tuple[int, ...] | None = None
    voxel_size: float | None = None
    normalisation: str = NORMALISATION
    train_settings: dict = field(default_factory=dict)
    created: str = ""
    path: str | None = None
    sha256: str | None = None
    reference_image: np.ndarray | None = field(default=None, repr=False)
    reference_affine: np.ndarray | None = None
    alignment: str = "Affine"  # antspyx transform type of the pre-alignment to the reference

    def write_reference(self, out_file) -> Path:
        """The reference grid as a NIfTI file; :class:`BadDataError` when the model has none."""
        import nibabel as nb

        if self.reference_image is None:
            raise BadDataError(f"DeepAtlas model {self.path} has no reference grid: train it with "
                               "dlf-bids-train-deepatlas to use it for registration")
        img = nb.Nifti1Image(self.reference_image.astype(np.float32), self.reference_affine)
        img.set_qform(self.reference_affine, 1)
        img.set_sform(self.reference_affine, 1)
        with atomic_open(Path(out_file), binary=True) as fh:
            fh.write(img.to_bytes())
        return Path(out_file)


def _label_dicts(config: DeepAtlasConfig, labels) -> list[dict]:
    """The file's label list: ``labels`` (LabelTable / Labels / dicts) checked against the
    config's channel values, or, without names, one bare entry per channel value."""
    if labels is None:
        if config.labels is None:
            raise ValueError("the model's config lists no label values and no labels were given")
        labels = [{"index": v} for v in config.labels[1:]]
    out = _labels_to_dicts(labels)
    values = (0, *(d["index"] for d in out))
    if config.labels is not None and values != config.labels:
        raise ValueError(f"labels {values[1:]} do not match the network's channels {config.labels[1:]}")
    if len(values) != config.n_labels:
        raise ValueError(f"{len(out)} labels + background but the network has {config.n_labels} channels")
    return out


def save_deepatlas(path, model: DeepAtlas, meta: Mapping | None = None) -> Path:
    """Write ``model`` to ``path`` atomically. ``meta`` (all optional): ``labels`` (names for the
    channels; bare values from the config otherwise), ``modalities`` (default: the config's, or
    ``T1w``/``T2w`` by channel count), ``volume_shape``, ``voxel_size``, ``train_settings``,
    ``created``. :class:`ValueError` when the metadata does not match the network."""
    meta = dict(meta or {})
    cfg = model.config
    labels = _label_dicts(cfg, meta.get("labels"))
    modalities = meta.get("modalities") or cfg.modalities or ("T1w", "T2w")[:cfg.in_channels]
    modalities = [str(m) for m in modalities]
    if len(modalities) != cfg.in_channels:
        raise ValueError(f"{len(modalities)} modalities but the network takes {cfg.in_channels} channels")
    shape = meta.get("volume_shape")
    voxel = meta.get("voxel_size")
    payload = {
        "format_version": DEEPATLAS_FORMAT_VERSION,
        "model_type": MODEL_TYPE,
        "package_version": __version__,
        "deepatlas_config": _plain(cfg.to_dict()),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "labels": labels,
        "modalities": modalities,
        "volume_shape": None if shape is None else [int(n) for n in shape],
        "voxel_size": None if voxel is None else float(voxel),
        "normalisation": NORMALISATION,
        "train_settings": _plain(dict(meta.get("train_settings") or {})),
        "created": str(meta.get("created")
                       or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")),
    }
    if meta.get("alignment"):
        payload["alignment"] = str(meta["alignment"])
    if meta.get("reference") is not None:
        image, affine = meta["reference"]
        payload["reference"] = {"image": torch.as_tensor(np.asarray(image, dtype=np.float32)),
                                "affine": np.asarray(affine, dtype=float).tolist()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as fh:
        torch.save(payload, fh)
    return path


def _read_info(payload, path: Path) -> DeepAtlasInfo:
    where = f"model file {path}"
    version = check_header(payload, where, "DeepAtlas", _REQUIRED, DEEPATLAS_FORMAT_VERSION,
                           lambda payload: payload.get("model_type") == MODEL_TYPE)
    if payload.get("normalisation", NORMALISATION) != NORMALISATION:
        raise BadDataError(f"{where} uses normalisation {payload['normalisation']!r}; only {NORMALISATION!r}")
    try:
        config = DeepAtlasConfig.from_dict(dict(payload["deepatlas_config"]))
        labels = _label_dicts(config, payload["labels"])
        modalities = [str(m) for m in payload["modalities"]]
        if len(modalities) != config.in_channels:
            raise ValueError(f"{len(modalities)} modalities for {config.in_channels} input channels")
        shape = payload.get("volume_shape")
        voxel = payload.get("voxel_size")
        ref = payload.get("reference")
        ref_image = ref_affine = None
        if ref is not None:
            ref_image = np.asarray(ref["image"].numpy(), dtype=np.float32)
            ref_affine = np.asarray(ref["affine"], dtype=float)
            if ref_image.ndim != 3 or ref_affine.shape != (4, 4):
                raise ValueError("reference must be a 3D image with a 4x4 affine")
        return DeepAtlasInfo(
            format_version=version, package_version=str(payload.get("package_version", "")), config=config,
            labels=labels, modalities=modalities, volume_shape=None if shape is None else tuple(int(n) for n in shape),
            voxel_size=None if voxel is None else float(voxel),
            train_settings=dict(payload.get("train_settings") or {}), created=str(payload.get("created", "")),
            path=str(path), reference_image=ref_image, reference_affine=ref_affine,
            alignment=str(payload.get("alignment") or "Affine"),
        )
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BadDataError(f"{where} has invalid metadata: {exc}") from None


def read_deepatlas_info(path) -> DeepAtlasInfo:
    """The metadata of a DeepAtlas file, checked, without building the networks (a command that
    only checks a model must not start torch's thread pools before Nipype forks its workers)."""
    path = Path(path)
    info = _read_info(read_payload(path), path)
    info.sha256 = model_hash(path)
    return info


def load_deepatlas(path, device="cpu") -> tuple[DeepAtlas, DeepAtlasInfo]:
    """``(DeepAtlas in eval mode on device, DeepAtlasInfo)``. One-line refusals:
    :class:`UsageError` (no such file), :class:`BadDataError` (not a DeepAtlas model, content
    other than plain data, newer format, weights not matching the configuration)."""
    path = Path(path)
    payload = read_payload(path)
    info = _read_info(payload, path)
    model = DeepAtlas(info.config)
    load_weights(model, payload["state_dict"], path)
    model = model.to(device).eval()
    info.sha256 = model_hash(path)
    return model, info
