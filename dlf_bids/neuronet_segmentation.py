"""NeuroNet at the participant level (pure functions; :mod:`dlf_bids.interfaces.neuronet` wraps
them): one forward pass of a trained model over a raw T1w, every protocol's labels written on the
T1w's native grid, and for the protocol with the BIDS common tissue labels (1 GM, 2 WM, 3 CSF)
the three probability maps sMRIPrep/fMRIPrep read.

The T1w is put on the model's grid (:mod:`dlf_bids.model_grid`: its orientation and voxel size)
and each protocol's probabilities are brought back onto the native grid before the argmax (a
convex combination, so GM + WM + CSF stays <= 1).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nb
import numpy as np

from .errors import BadDataError
from .fusion import save_labels
from .model_grid import argmax_on_native, to_model_grid

#: BIDS common labels of the tissue protocol, in channel order 1..3 (the probseg ``label-``s)
TISSUE_LABELS = ("GM", "WM", "CSF")


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
    window = inference_window(image.shape[1:], info.config)
    with torch.inference_mode():
        preds = predict_volume(model, image, channel_values=info.channel_values, roi_size=window,
                               overlap=overlap, device=device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = NeuroNetResult(dsegs={}, provenance={
        "ModelFile": Path(model_file).name, "ModelSHA256": info.sha256,
        "Protocols": [p.name for p in info.protocols], "VoxelSizeOfModel": list(voxel_size),
        "Modalities": ["T1w"] + ([] if second is None else ["T2w" if t2w_file else "noise"])})
    # gzip releases the GIL: files are compressed in threads while the next protocol computes
    with ThreadPoolExecutor(max_workers=2) as writer:
        dsegs, probsegs = {}, {}
        for protocol in info.protocols:
            tissue = result.tissue_protocol is None and is_bids_tissue(protocol)
            keep = range(1, len(TISSUE_LABELS) + 1) if tissue else ()
            argmax, kept = argmax_on_native(preds.pop(protocol.name).probabilities, grid_img,
                                            native, keep)
            dsegs[protocol.name] = writer.submit(save_labels, protocol.channel_values[argmax],
                                                 t1w_file, out_dir / f"{protocol.name}_dseg.nii.gz")
            if tissue:
                result.tissue_protocol = protocol.name
                for probability, label in zip(kept, TISSUE_LABELS):
                    probsegs[label] = writer.submit(_save_probability, probability, t1w_file,
                                                    out_dir / f"label-{label}_probseg.nii.gz")
        result.dsegs = {name: future.result() for name, future in dsegs.items()}
        result.probsegs = {label: future.result() for label, future in probsegs.items()}
    return result


#: the most voxels run as one window: a 2 mm model's whole head (~130³ on its grid) fits
WHOLE_GRID_VOXELS = 160**3


def inference_window(grid_shape, config) -> tuple[int, int, int]:
    """The whole model grid as one window (each axis rounded up to the network's total stride;
    MONAI pads with the z-scored mean) when it has at most :data:`WHOLE_GRID_VOXELS`, else the
    training crop, slid with ``overlap``. The network is fully convolutional and batch norm uses
    its running statistics, so a voxel's output depends on its neighbourhood, not on the window
    around it; one window computes each voxel once where overlap 0.5 computes it ~8 times."""
    stride = int(np.prod(config.strides))
    whole = tuple(int(-(-n // stride) * stride) for n in grid_shape)
    if int(np.prod(whole)) <= WHOLE_GRID_VOXELS:
        return whole
    return tuple(int(c) for c in config.crop_size)


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
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of the model grid (mm)
    config: object = None  # the NeuroNetConfig (window size, memory)

    def window_voxels(self, t1w) -> tuple[int, int]:
        """Voxels of the model grid a T1w gives, and of the window it is run in (header only)."""
        from .model_grid import model_grid_shape

        grid = model_grid_shape(nb.load(str(t1w)), self.voxel_size)
        return int(np.prod(grid)), int(np.prod(inference_window(grid, self.config)))


@functools.lru_cache(maxsize=4)
def model_outputs(model_file: str) -> ModelOutputs:
    """Read a model file once per process (every subject's graph asks); one-line
    :class:`BadDataError` for anything but a usable dlf-bids NeuroNet model.

    The network is built (so weights that do not fit the configuration are refused here, before
    any work), with torch held to one thread: this process forks Nipype's workers later."""
    from .execution import torch_without_thread_pool
    from .models.neuronet_training import load_neuronet
    from .models.protocols import is_bids_tissue

    with torch_without_thread_pool():
        _, info = load_neuronet(model_file)
    tissue = next((p.name for p in info.protocols if is_bids_tissue(p)), None)
    return ModelOutputs(tissue, tuple(p.name for p in info.protocols if p.name != tissue),
                        {p.name: p.classes for p in info.protocols},
                        sum(p.n_classes for p in info.protocols), info.sha256,
                        tuple(info.modalities), model_voxel_size(info), info.config)
