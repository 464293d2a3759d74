"""NeuroNet at the participant level (pure functions; :mod:`dlf_bids.interfaces.neuronet` wraps
them): one forward pass of a trained model over a raw T1w, every protocol's labels written on the
T1w's native grid, and for the protocol with the BIDS common tissue labels (1 GM, 2 WM, 3 CSF)
the three probability maps sMRIPrep/fMRIPrep read.

**The model grid.** A network sees voxels, not millimetres: it must meet images in the orientation
and at the voxel size it was trained on. Training and inference therefore both resample the T1w
onto a RAS-aligned grid of the model's voxel size covering the image (:func:`to_model_grid`), and
inference brings each protocol's probabilities back onto the native grid before the argmax. When
flipping and permuting axes is enough (the native grid is that grid in another voxel order) this
is exact; otherwise it is nibabel's ``resample_to_output`` there and linear interpolation back (a
convex combination, so GM + WM + CSF stays <= 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output

from .errors import BadDataError
from .fusion import save_labels

#: BIDS common labels of the tissue protocol, in channel order 1..3 (the probseg ``label-``s)
TISSUE_LABELS = ("GM", "WM", "CSF")


def _canonical_spacing(img) -> np.ndarray | None:
    """The voxel size when the image's axes are already RAS-aligned (else None)."""
    aff = img.affine[:3, :3]
    diag = np.diag(aff)
    if np.allclose(aff - np.diag(diag), 0, atol=1e-4) and (diag > 0).all():
        return diag
    return None


def on_model_grid(img, voxel_size) -> bool:
    spacing = _canonical_spacing(img)
    return spacing is not None and np.allclose(spacing, voxel_size, rtol=0.01)


def reorients_onto_model_grid(img, voxel_size) -> bool:
    """Whether flipping and permuting the axes puts ``img`` on the model grid (from its header:
    the affine ``as_closest_canonical`` would give, without reading the voxels)."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    affine = img.affine @ inv_ornt_aff(io_orientation(img.affine), img.shape[:3])
    return on_model_grid(nb.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine), voxel_size)


def to_model_grid(img, voxel_size, order: int = 1):
    """``img`` (3D) on the RAS grid of ``voxel_size`` (mm) covering it: by flipping and permuting
    its axes when that is enough (exact, no interpolation: e.g. FreeSurfer's LIA at the model's
    voxel size), else resampled (``order=1`` for images, ``order=0`` for label maps)."""
    data = np.asanyarray(img.dataobj)
    # float for interpolation (an int16 image would be truncated); labels keep their integers
    img = nb.Nifti1Image(data.astype(np.float32) if order else data, img.affine)
    if reorients_onto_model_grid(img, voxel_size):
        return nb.as_closest_canonical(img)
    return resample_to_output(img, voxel_sizes=tuple(float(v) for v in voxel_size), order=order,
                              mode="constant", cval=0.0)


def _to_native(probs: np.ndarray, model_img, native) -> np.ndarray:
    """(C, ...) probabilities on the model grid -> (C, native shape): the inverse flips and
    permutations when the model grid is the native one reoriented, else linear per channel."""
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    if reorients_onto_model_grid(native, _spacing(model_img)):
        back = ornt_transform(io_orientation(model_img.affine), io_orientation(native.affine))
        return np.stack([apply_orientation(channel, back) for channel in probs])
    out = np.empty((probs.shape[0], *native.shape[:3]), np.float32)
    ref = (native.shape[:3], native.affine)
    for c, channel in enumerate(probs):
        moved = resample_from_to(nb.Nifti1Image(channel, model_img.affine), ref, order=1,
                                 mode="constant", cval=1.0 if c == 0 else 0.0)
        out[c] = np.asanyarray(moved.dataobj)
    return out


def _spacing(img) -> np.ndarray:
    return np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))


@dataclass
class NeuroNetResult:
    dsegs: dict[str, Path]  # protocol -> label map on the native grid (int16)
    tissue_protocol: str | None = None  # the protocol with BIDS tissue labels, if any
    probsegs: dict[str, Path] = field(default_factory=dict)  # GM/WM/CSF -> float32 map
    provenance: dict = field(default_factory=dict)


def _save_probability(data: np.ndarray, reference, out_file: Path) -> Path:
    ref = nb.load(str(reference))
    img = nb.Nifti1Image(np.clip(data, 0.0, 1.0).astype(np.float32), ref.affine)
    img.set_qform(ref.affine, code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.affine, code=int(ref.header["sform_code"]) or 1)
    img.header.set_xyzt_units("mm")
    nb.save(img, str(out_file))
    return out_file


def neuronet_segment(t1w_file, model_file, out_dir, device: str = "cpu",
                     overlap: float = 0.5, seed: int = 0, t2w_file=None) -> NeuroNetResult:
    """Segment a raw T1w with every protocol of a NeuroNet model file (see the module docstring).

    A T1w + T2w model takes ``t2w_file`` (already on the T1w grid) as its second channel; without
    one it runs only when it was trained with ModAug (the T2w channel is then unit white noise,
    as in training), otherwise :class:`BadDataError`. A T1w model ignores ``t2w_file``."""
    import torch

    from .models.neuronet import predict_volume
    from .models.neuronet_training import load_neuronet
    from .models.protocols import is_bids_tissue

    model, info = load_neuronet(model_file, device="cpu")
    voxel_size = model_voxel_size(info)
    native = nb.load(str(t1w_file))
    grid_img = to_model_grid(native, voxel_size)
    image = np.asarray(grid_img.dataobj, dtype=np.float32)[None]
    second = None
    if info.config.in_channels == 2 and t2w_file is not None:
        t2w = nb.load(str(t2w_file))
        if t2w.shape[:3] != native.shape[:3] or not np.allclose(t2w.affine, native.affine, atol=1e-4):
            raise BadDataError(f"{t2w_file} is not on the grid of {t1w_file}")
        second = np.asarray(to_model_grid(t2w, voxel_size).dataobj, dtype=np.float32)
    elif info.config.in_channels == 2:
        if not info.modaug:
            raise BadDataError(f"model {Path(model_file).name} needs a T2w and was not trained "
                               "with ModAug: it cannot run on the T1w alone")
        second = np.random.default_rng(seed).standard_normal(image.shape[1:]).astype(np.float32)
    if second is not None:
        image = np.concatenate([image, second[None]])
    with torch.inference_mode():
        preds = predict_volume(model, image, channel_values=info.channel_values, overlap=overlap,
                               device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = NeuroNetResult(dsegs={}, provenance={
        "ModelFile": Path(model_file).name, "ModelSHA256": info.sha256,
        "Protocols": [p.name for p in info.protocols], "VoxelSizeOfModel": list(voxel_size),
        "Modalities": ["T1w"] + ([] if second is None else ["T2w" if t2w_file else "noise"])})
    for protocol in info.protocols:
        probs = _to_native(preds[protocol.name].probabilities, grid_img, native)
        labels = protocol.channel_values[np.argmax(probs, axis=0)]
        result.dsegs[protocol.name] = save_labels(labels, t1w_file,
                                                  out_dir / f"{protocol.name}_dseg.nii.gz")
        if result.tissue_protocol is None and is_bids_tissue(protocol):
            result.tissue_protocol = protocol.name
            for channel, label in enumerate(TISSUE_LABELS, start=1):
                result.probsegs[label] = _save_probability(
                    probs[channel], t1w_file, out_dir / f"label-{label}_probseg.nii.gz")
    return result


def model_voxel_size(info) -> tuple[float, float, float]:
    """The voxel size (mm) the model was trained at (``train_settings["voxel_size"]``)."""
    size = (info.train_settings or {}).get("voxel_size")
    if not size or len(size) != 3 or any(float(s) <= 0 for s in size):
        raise BadDataError(f"model file {info.path} does not say at which voxel size it was "
                           "trained (train_settings.voxel_size): not a dlf-bids-train-neuronet model")
    return tuple(float(s) for s in size)


@dataclass(frozen=True)
class ModelOutputs:
    """What a model writes at the participant level (known before any work)."""

    tissue_protocol: str | None  # written as the BIDS tissue dseg + GM/WM/CSF probsegs
    other_protocols: tuple[str, ...]  # written as seg-<protocol> dsegs
    luts: dict  # protocol -> LabelTable
    channels: int  # output channels of all protocols (memory)
    sha256: str
    modalities: tuple[str, ...] = ("T1w",)  # the network's input channels


@functools.lru_cache(maxsize=4)
def model_outputs(model_file: str) -> ModelOutputs:
    """Read a model file once per process (every subject's graph asks); one-line
    :class:`BadDataError` for anything but a usable dlf-bids NeuroNet model."""
    from .models.neuronet_training import load_neuronet
    from .models.protocols import is_bids_tissue

    _, info = load_neuronet(model_file)
    model_voxel_size(info)
    tissue = next((p.name for p in info.protocols if is_bids_tissue(p)), None)
    return ModelOutputs(tissue, tuple(p.name for p in info.protocols if p.name != tissue),
                        {p.name: p.classes for p in info.protocols},
                        sum(p.n_classes for p in info.protocols), info.sha256,
                        tuple(info.modalities))
