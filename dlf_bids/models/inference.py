"""Deep Label Fusion inference: sliding-window prediction over a whole target image.

Pipeline of :func:`predict`:

1. atlas label *values* are mapped to network channels (``info.channel_values``); a value the
   model does not know is refused (:class:`BadDataError`); all-NaN modality channels (a missing
   modality) are replaced by unit white noise (:func:`fill_missing_modality`, seeded by
   ``noise_seed``);
2. an image smaller than the patch is zero-padded symmetrically (the same placement training
   uses); coordinate maps are those of the *unpadded* target (``2*i/size - 1``), continued
   linearly into the padding, exactly as training computes them (:func:`region_coordinates`);
3. MONAI :func:`~monai.inferers.sliding_window_inference` (roi = ``info.patch_size``, ``overlap``,
   constant weights) walks the target; ``with_coord=True`` hands the predictor the window's
   location, so the predictor crops the atlas images and atlas label maps itself (no stacked
   float copy of all atlases: at 256³ with 20 T1+T2 atlases that copy alone would be ~5.6 GB) and
   one-hot encodes only the window's labels (never the whole image: > 10 GB at 256³ with 45
   labels);
4. inside each window: per-patch per-channel z-score over voxels > 0 (:func:`normalise_patch`,
   the training normalisation), one-hot atlas labels, coordinate maps, the network (its own
   patch-level label mask);
5. the windows are blended with a weight map that is 1 inside and ``1e-3`` on the outer
   ``border`` voxels of the window (the paper crops a few border voxels of each patch): where
   another window covers a voxel with its interior, that one decides; on the image border, where
   only window borders reach, those are averaged. This also hides the one-voxel shell where a
   patch-level label mask (zero padding) can be smaller than the whole-image mask;
6. the background probability is taken as ``1 - max`` foreground probability
   (:func:`label_distribution`; the Dice-trained background channel is nearly uninformative);
   ``labels`` = argmax → label values (channel 0 → 0); ``uncertainty`` = normalised entropy of
   the probabilities renormalised over the labels (:func:`normalised_entropy`).

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..errors import BadDataError, UsageError
from .dlf import DeepLabelFusion, one_hot_labels
from .model_file import ModelInfo

__all__ = [
    "Prediction",
    "centred_patch_start",
    "fill_missing_modality",
    "label_distribution",
    "labels_to_channels",
    "normalise_patch",
    "normalised_entropy",
    "pad_amounts",
    "predict",
    "random_voxel",
    "region_coordinates",
    "resolve_device",
]


# --------------------------------------------------------------------------------------------
# helpers shared with training
# --------------------------------------------------------------------------------------------
def resolve_device(name="auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
    :class:`UsageError` when CUDA is asked for but not available, or for anything else."""
    if isinstance(name, torch.device):
        name = str(name)
    name = str(name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        return dev
    raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")


def labels_to_channels(label_values: np.ndarray, channel_values: Sequence[int], what: str = "label map") -> np.ndarray:
    """Map label *values* to network channel indices (``channel_values[c]`` is the value of channel
    ``c``, ``channel_values[0] == 0``). Returns ``uint8`` (``int16`` for > 255 channels).
    :class:`BadDataError` listing the values that have no channel. Uses a look-up table (no sort
    of the whole array), so 20 atlases at 256³ map in about a second."""
    channel_values = np.asarray(channel_values, dtype=np.int64)
    dtype = np.uint8 if len(channel_values) <= 256 else np.int16
    arr = np.asarray(label_values)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise BadDataError(f"{what} holds non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise BadDataError(f"{what} has non-numeric type {arr.dtype}")

    def refuse(bad_values):
        bad = ", ".join(str(int(v)) for v in np.unique(bad_values)[:20])
        raise BadDataError(
            f"{what} holds label value(s) {bad} that are not in the label table "
            f"({len(channel_values) - 1} labels)"
        )

    if arr.size == 0:
        return np.zeros(arr.shape, dtype)
    if arr.ndim >= 4 and arr.size > 1 << 24:  # one image at a time: bounded temporary memory
        return np.stack([labels_to_channels(a, channel_values, what) for a in arr])
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        refuse(arr[arr < 0])
    top = max(hi, int(channel_values.max())) + 1
    if top <= 1 << 22:
        lut = np.full(top, -1, dtype=np.int32)
        lut[channel_values] = np.arange(len(channel_values), dtype=np.int32)
        out = lut[arr]
        if (out < 0).any():
            refuse(arr[out < 0])
        return out.astype(dtype)
    uniq, inverse = np.unique(arr, return_inverse=True)  # huge label values: sort instead
    order = np.argsort(channel_values)
    pos = np.clip(np.searchsorted(channel_values[order], uniq), 0, len(channel_values) - 1)
    found = channel_values[order][pos] == uniq
    if not found.all():
        refuse(uniq[~found])
    return order[pos].astype(dtype)[inverse.reshape(arr.shape)]


def normalise_patch(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel z-score of the last 3 axes, mean and standard deviation taken over the voxels
    ``> 0`` and applied to every voxel (``"patch-zscore-nonzero"``). A channel without voxels > 0
    is only shifted by 0 / scaled by 1; a constant one is divided by 1."""
    x = x.float()
    dims = (-3, -2, -1)
    pos = (x > 0).to(x.dtype)
    count = pos.sum(dim=dims, keepdim=True)
    safe = count.clamp_min(1.0)
    mean = (x * pos).sum(dim=dims, keepdim=True) / safe
    var = (((x - mean) ** 2) * pos).sum(dim=dims, keepdim=True) / safe
    std = var.sqrt()
    std = torch.where((count > 0) & (std > eps), std, torch.ones_like(std))
    mean = torch.where(count > 0, mean, torch.zeros_like(mean))
    return (x - mean) / std


def pad_amounts(shape: Sequence[int], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric zero padding ``(before, after)`` per axis that brings ``shape`` to at least
    ``patch`` (``before = diff // 2``, as MONAI does); the same placement training uses."""
    out = []
    for s, p in zip(shape, patch):
        diff = max(int(p) - int(s), 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def random_voxel(flat_indices: np.ndarray, shape: Sequence[int], rng: np.random.Generator) -> tuple[int, ...]:
    """A voxel drawn uniformly from ``flat_indices`` (C-order indices into ``shape``)."""
    return tuple(int(i) for i in np.unravel_index(int(flat_indices[rng.integers(0, flat_indices.size)]),
                                                  tuple(shape)))


def centred_patch_start(centre: Sequence[int], patch: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Start of a ``patch`` centred on ``centre``, moved inside ``shape``; on an axis shorter
    than the patch, ``-before`` of :func:`pad_amounts` (the image sits in the patch as padded
    for inference). Training patches of DLF and NeuroNet crops are placed this way."""
    return [int(np.clip(c - p // 2, 0, n - p)) if n >= p else -before
            for c, p, n, (before, _) in zip(centre, patch, shape, pad_amounts(shape, patch))]


def region_coordinates(image_shape: Sequence[int], start: Sequence[int], size: Sequence[int],
                       dtype=torch.float32, device=None) -> torch.Tensor:
    """Coordinate maps ``(3, *size)`` of the region at ``start`` (may lie partly or wholly outside
    the image) in whole-image coordinates ``2*i/image_shape - 1``. Inside the image this equals
    ``crop_patch(coordinate_maps(image_shape), start, size)``; outside it continues linearly."""
    axes = [
        (2.0 * torch.arange(int(s0), int(s0) + int(n), dtype=torch.float64) / int(full) - 1.0)
        for s0, n, full in zip(start, size, image_shape)
    ]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids, dim=0).to(dtype=dtype, device=device)


def fill_missing_modality(images, rng: np.random.Generator | int | None = None,
                          missing: Sequence[int] | None = None) -> np.ndarray:
    """Replace missing modality channels by unit white noise (float32).

    ``images``: an array ``(..., M, X, Y, Z)`` (a target ``(M, ...)`` or atlases ``(N, M, ...)``)
    or a sequence of per-modality arrays / ``None`` (then stacked on a new axis ``-4``). Missing
    channels are those given in ``missing``, else the ``None`` entries and the channels that are
    entirely NaN. Every image gets its own noise draw from ``rng`` (a Generator or a seed)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if isinstance(images, np.ndarray) or torch.is_tensor(images):
        arr = np.array(images, dtype=np.float32)  # copy
        none_channels: list[int] = []
    else:
        items = list(images)
        present = [np.asarray(a) for a in items if a is not None]
        if not present:
            raise BadDataError("every modality is missing: nothing to segment")
        shape = present[0].shape
        if any(a.shape != shape for a in present):
            raise BadDataError(f"modality images differ in shape: {[a.shape for a in present]}")
        none_channels = [i for i, a in enumerate(items) if a is None]
        arr = np.stack([np.full(shape, np.nan, np.float32) if a is None else np.asarray(a, np.float32)
                        for a in items], axis=-4)
    if arr.ndim < 4:
        raise ValueError(f"expected (..., M, X, Y, Z) images, got shape {arr.shape}")
    if missing is None:
        nan_channels = [c for c in range(arr.shape[-4]) if np.isnan(arr[..., c, :, :, :]).all()]
        missing = sorted(set(none_channels) | set(nan_channels))
    for c in missing:
        sub = arr[..., int(c), :, :, :]
        arr[..., int(c), :, :, :] = rng.standard_normal(sub.shape, dtype=np.float32)
    return arr


BACKGROUND_MODES = ("derived", "network")


def label_distribution(probabilities: torch.Tensor, background: str = "derived", dim: int = 0) -> torch.Tensor:
    """The per-voxel label probabilities used for the decision: the network's sigmoid outputs
    with, by default (``"derived"``), the background channel replaced by ``1 - max`` over the
    foreground channels; ``"network"`` keeps the network's own background channel.

    Why: the generalized Dice loss of the paper barely trains the background channel (its weight
    ``1/volume²`` is tiny and its Dice hardly changes with a few hundred false-positive voxels), so
    it saturates near 1 everywhere and a plain argmax over all channels erases small structures.
    The foreground channels are trained well, so "the most likely foreground label where its
    probability is >= 0.5, else background" is the robust reading — and it is exactly the argmax
    of this distribution. For a network with a well-calibrated background channel both agree
    almost everywhere."""
    if background not in BACKGROUND_MODES:
        raise UsageError(f"background must be one of {', '.join(BACKGROUND_MODES)}, got {background!r}")
    if background == "network":
        return probabilities
    p = probabilities.movedim(dim, 0)
    bg = 1.0 - p[1:].amax(dim=0, keepdim=True)
    return torch.cat([bg, p[1:]], dim=0).movedim(0, dim)


def normalised_entropy(probabilities: torch.Tensor | np.ndarray, dim: int = 0, eps: float = 1e-12,
                       chunk_voxels: int = 1 << 18):
    """Entropy of the label distribution along ``dim`` after renormalising to sum 1, divided by
    ``log(L)``: 0 where one label has all the mass, 1 for a uniform distribution (also where no
    label has any mass). Computed in float64 on chunks of ``chunk_voxels`` voxels, so a
    ``(45, 256, 256, 256)`` input needs no full-size temporaries: each chunk makes a few float64
    ``(L, chunk_voxels)`` temporaries, ~90 MB each for 42 labels (with 4 M-voxel chunks they were
    1.4 GB each and made DLF's 1 mm peak memory 7.5 GiB; BENCHMARKS.md)."""
    p_all = torch.as_tensor(probabilities).movedim(dim, 0)
    L = p_all.shape[0]
    spatial = tuple(p_all.shape[1:])
    flat = p_all.reshape(L, -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32)
    for lo in range(0, flat.shape[1], max(int(chunk_voxels), 1)):
        p = flat[:, lo: lo + chunk_voxels].to(torch.float64).clamp_min(0)
        total = p.sum(dim=0, keepdim=True)
        p = torch.where(total > eps, p / total.clamp_min(eps), torch.full_like(p, 1.0 / L))
        ent = -torch.special.xlogy(p, p).sum(dim=0) / math.log(L)
        out[lo: lo + p.shape[1]] = ent.clamp(0.0, 1.0) + 0.0  # + 0.0 turns -0.0 into 0.0
    return out.reshape(spatial)


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    labels: np.ndarray  # (X, Y, Z) int16 label values
    probabilities: np.ndarray  # (L, X, Y, Z) float32, network channel order (0 = background)
    uncertainty: np.ndarray  # (X, Y, Z) float32 in [0, 1]
    channel_values: np.ndarray  # (L,) label value of every probability channel


def _check_images(info: ModelInfo, target, atlas_images, atlas_labels):
    M = info.dlf_config.n_modalities
    target = np.asarray(target)
    atlas_images = np.asarray(atlas_images)
    atlas_labels = np.asarray(atlas_labels)
    if target.ndim == 3 and M == 1:
        target = target[None]
    if target.ndim != 4:
        raise BadDataError(f"target must be (modalities, X, Y, Z), got shape {target.shape}")
    if target.shape[0] != M:
        raise BadDataError(
            f"target has {target.shape[0]} modalities, the model expects {M} ({', '.join(info.modalities)}); "
            "fill a missing one with fill_missing_modality"
        )
    spatial = target.shape[1:]
    if atlas_images.ndim == 4 and M == 1:
        atlas_images = atlas_images[:, None]
    if atlas_images.ndim != 5 or atlas_images.shape[1] != M or atlas_images.shape[2:] != spatial:
        raise BadDataError(f"atlas images must be (N, {M}, {spatial}), got shape {atlas_images.shape}")
    N = atlas_images.shape[0]
    if N < 1:
        raise BadDataError("at least one atlas is needed")
    if atlas_labels.shape != (N, *spatial):
        raise BadDataError(f"atlas labels must be ({N}, {spatial}), got shape {atlas_labels.shape}")
    return target, atlas_images, atlas_labels


def _weight_map(patch: Sequence[int], border: int, low: float = 1e-3) -> torch.Tensor:
    w = torch.full(tuple(int(p) for p in patch), low, dtype=torch.float32)
    b = [min(int(border), (int(p) - 1) // 2) for p in patch]
    w[b[0]: int(patch[0]) - b[0], b[1]: int(patch[1]) - b[1], b[2]: int(patch[2]) - b[2]] = 1.0
    return w


def predict(
    model: DeepLabelFusion,
    info: ModelInfo,
    target_images,
    atlas_images,
    atlas_labels,
    device="cpu",
    atlas_batch: int | None = None,
    overlap: float = 0.5,
    noise_seed: int = 0,
    border: int = 2,
    sw_batch_size: int = 1,
    progress: bool = False,
    background: str = "derived",
    skip_empty_windows: bool = True,
) -> Prediction:
    """Segment a target with its registered atlases.

    ``target_images`` ``(M, X, Y, Z)``, ``atlas_images`` ``(N, M, X, Y, Z)``, ``atlas_labels``
    ``(N, X, Y, Z)`` label *values*; channels in ``info.modalities`` order. All-NaN channels
    (missing modality) become unit white noise drawn from ``noise_seed``. ``atlas_batch`` bounds
    the atlases the weighted-voting subnet sees at once. ``border`` voxels at each window face
    get a near-zero blending weight (0 = plain averaging). Deterministic on CPU.
    ``device`` ``"auto"`` picks CUDA when available; the model is moved there and set to eval.
    ``probabilities`` are the blended sigmoid outputs (label-masked), channel 0 replaced by
    ``1 - max(foreground)`` unless ``background="network"`` (see :func:`label_distribution`);
    ``labels`` is their argmax; ``uncertainty`` their normalised entropy.
    ``skip_empty_windows``: windows where no atlas carries a foreground label are not run
    through the network (their masked output is known: all foreground zero); exact, so it only
    saves time — it applies with label masking and the derived background."""
    if background not in BACKGROUND_MODES:
        raise UsageError(f"background must be one of {', '.join(BACKGROUND_MODES)}, got {background!r}")
    target, atl_img, atl_lab = _check_images(info, target_images, atlas_images, atlas_labels)
    channel_values = info.channel_values
    atl_idx = labels_to_channels(atl_lab, channel_values, "atlas label maps")

    rng = np.random.default_rng(noise_seed)
    target = np.asarray(target, dtype=np.float32)
    atl_img = np.asarray(atl_img, dtype=np.float32)
    if np.isnan(target).any():
        target = fill_missing_modality(target, rng)
    if np.isnan(atl_img).any():
        atl_img = fill_missing_modality(atl_img, rng)
    if np.isnan(target).any() or np.isnan(atl_img).any():
        raise BadDataError("images contain NaN values (only a whole missing modality may be NaN)")

    if channel_values.max() > np.iinfo(np.int16).max:
        raise BadDataError(f"label value {int(channel_values.max())} does not fit a 16-bit label image")
    dev = resolve_device(device)
    spatial = tuple(int(s) for s in target.shape[1:])
    patch = tuple(int(p) for p in info.patch_size)
    pads = pad_amounts(spatial, patch)
    if any(b or a for b, a in pads):
        width = [(0, 0)] + list(pads)
        target = np.pad(target, width)
        atl_img = np.pad(atl_img, [(0, 0)] + width)
        atl_idx = np.pad(atl_idx, width)
    offset = [b for b, _ in pads]
    L = info.n_labels

    model = model.to(dev)
    model.eval()
    # windows where every atlas says background need no forward pass (see the predictor); only
    # valid when the background channel is derived from the (masked) foreground channels
    skip_empty = skip_empty_windows and background == "derived" and model.config.use_label_mask

    def predictor(window: torch.Tensor, slices, *args, **kwargs) -> torch.Tensor:
        outs = []
        for b, sl in enumerate(slices):
            sp = tuple(sl[2:])  # spatial slices of this window (padded grid)
            window_idx = atl_idx[(slice(None), *sp)]
            if skip_empty and not window_idx.any():
                # no atlas votes for any label here: label masking zeroes every foreground
                # channel, and the background channel is derived from them, so the network's
                # answer is known without running it (exact, not an approximation)
                outs.append(torch.zeros((1, L, *patch), dtype=torch.float32, device=dev))
                continue
            tgt = window[b: b + 1].to(dev)  # (1, M, p)
            img = torch.from_numpy(np.ascontiguousarray(atl_img[(slice(None), slice(None), *sp)])).to(dev)
            idx = torch.from_numpy(np.ascontiguousarray(window_idx)).to(dev)
            onehot = one_hot_labels(idx.long().unsqueeze(0), L, dim=2)  # (1, N, L, p)
            start = [s.start - o for s, o in zip(sp, offset)]
            coords = region_coordinates(spatial, start, patch, device=dev).unsqueeze(0)
            out = model(normalise_patch(tgt), normalise_patch(img).unsqueeze(0), onehot, coords,
                        atlas_batch=atlas_batch)["output"]
            outs.append(out)
        return torch.cat(outs, dim=0)

    inputs = torch.from_numpy(np.ascontiguousarray(target)).unsqueeze(0)  # (1, M, *padded)
    weight = _weight_map(patch, border) if border > 0 else torch.ones(patch)
    with torch.inference_mode():
        probs = sliding_window_inference(
            inputs, patch, sw_batch_size, predictor, overlap=overlap, mode="constant",
            sw_device=dev, device=torch.device("cpu"), progress=progress, roi_weight_map=weight,
            with_coord=True,
        )
        crop = tuple(slice(b, b + s) for b, s in zip(offset, spatial))
        probs = probs[0][(slice(None), *crop)].clamp_(0.0, 1.0)  # in place: (L, X, Y, Z) is large
        if background == "derived":  # = label_distribution(probs), without a copy
            probs[0] = 1.0 - probs[1:].amax(dim=0)
        probs = probs.contiguous()
        arg = probs.argmax(dim=0).numpy()
        uncertainty = normalised_entropy(probs, dim=0).numpy()
    labels = channel_values.astype(np.int16)[arg]
    return Prediction(labels=labels, probabilities=probs.numpy().astype(np.float32, copy=False),
                      uncertainty=uncertainty, channel_values=channel_values.copy())
