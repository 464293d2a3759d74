"""Training of Deep Label Fusion (Xie et al. 2023) on targets with atlases already registered to them.

One training sample (:func:`make_sample`), in this order:

1. **atlas selection**: ``atlases_per_sample`` atlases of the case drawn *with replacement*
   (duplicates allowed, so N may exceed the number available) — :func:`select_atlases`;
2. **patch placement**: centred on a random foreground voxel of the target's labels, moved
   inside the image (an image smaller than the patch is zero-padded symmetrically, as at
   inference). When a rotation/scaling/elastic deformation may follow, a region with a margin
   around the patch is cropped (zero outside the image) so the resampled patch has no empty
   corners;
3. **coordinate maps** of that region in whole-target coordinates (``2*i/size - 1``, the values
   :func:`~dlf_bids.models.dlf.coordinate_maps` gives on the whole target, continued linearly
   outside it);
4. **spatial augmentation**, one resampling applied identically to every channel of the sample:
   target images, atlas images and coordinate maps (bilinear), target and atlas label maps
   (nearest). Either MONAI ``Rand3DElasticd`` (elastic + rotation + scaling, ``elastic_prob``) or
   ``RandAffined`` (rotation + scaling, ``affine_prob``) or none (centre crop); output = patch.
   The coordinate maps are deformed with the images, so they keep telling where in the target
   each voxel's content came from; at inference they are the plain grid. Then random flips
   (``flip_prob`` per axis, default off: a left-right flip would swap hemispheres while
   lateralised labels such as FreeSurfer's 2/41 keep their value), again on every channel;
5. **histogram shift** (MONAI ``RandHistogramShift``) with probability ``histogram_shift_prob``
   independently for the target and for each atlas (and each modality channel);
6. **ModAug** (:func:`modaug`): with probability ``modaug_prob`` one modality (T1 or T2, 50/50)
   is replaced by unit white noise in the target *and* every atlas of the sample. It comes
   before the normalisation, because at inference a missing modality is filled with unit noise
   in the raw image and then goes through the same per-patch normalisation;
7. **normalisation**: per patch, per channel z-score over voxels > 0
   (:func:`~dlf_bids.models.inference.normalise_patch`, the inference code);
8. **Gaussian noise** (``noise_prob``, standard deviation up to ``noise_std`` in z units),
   independently for the target and each atlas.

Loss (:func:`make_loss`): mean per-label soft Dice (MONAI ``DiceLoss``) + binary cross-entropy by
default, or the paper's MONAI ``GeneralizedDiceLoss``, over the deep-supervision outputs weighted by
``DLFConfig.deep_supervision_weights`` (:func:`~dlf_bids.models.dlf.deep_supervision_loss`); Adam +
StepLR (per epoch). Validation (cases split off by ``val_fraction``, never trained on): fixed
patches drawn once (no augmentation, the first atlases in order) — cheap — or, with
``validation="full"``, sliding-window :func:`~dlf_bids.models.inference.predict` on the whole
image with all atlases; the score is the mean foreground Dice of the decision
:func:`~dlf_bids.models.inference.predict` makes (background = ``1 - max`` foreground). Everything random derives from
``seed`` (torch initialisation, a numpy Generator, MONAI transforms' ``set_random_state``), so
the same seed gives the same model on CPU.

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss, GeneralizedDiceLoss
from monai.transforms import Rand3DElasticd, RandAffined, RandHistogramShift

from ..errors import BadDataError, UsageError
from ..utils.labels import LabelTable
from .dlf import DeepLabelFusion, DLFConfig, check_patch_size, deep_supervision_loss
from .inference import (
    centred_patch_start,
    label_distribution,
    labels_to_channels,
    normalise_patch,
    predict,
    random_voxel,
    region_coordinates,
    resolve_device,
)
from .model_file import NORMALISATION, ModelInfo, _labels_to_dicts, save_model
from .progress import training_progress

__all__ = [
    "TrainResult",
    "TrainSettings",
    "TrainingCase",
    "histogram_shift",
    "make_loss",
    "make_sample",
    "modaug",
    "select_atlases",
    "split_cases",
    "train_dlf",
]


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass
class TrainingCase:
    """A target with its atlases already registered to it (same grid).

    ``target_images`` ``(M, X, Y, Z)``, ``target_labels`` ``(X, Y, Z)`` label *values*,
    ``atlas_images`` ``(N, M, X, Y, Z)``, ``atlas_labels`` ``(N, X, Y, Z)`` label values."""

    target_images: np.ndarray
    target_labels: np.ndarray
    atlas_images: np.ndarray
    atlas_labels: np.ndarray
    case_id: str = ""
    atlas_ids: Sequence[str] | None = None


@dataclass
class TrainSettings:
    patch_size: tuple[int, int, int] = (48, 48, 48)
    atlases_per_sample: int = 4
    epochs: int = 20
    iterations_per_epoch: int = 100
    batch_size: int = 1
    lr: float = 5e-4
    weight_decay: float = 1e-4
    # "generalized": MONAI GeneralizedDiceLoss (the paper's), label weights gdl_weight; "mean":
    # MONAI DiceLoss, the mean of per-label soft Dice (a label absent from a patch's truth gives
    # ~no gradient there, where the generalized loss gives it the *largest* weight). The default
    # (mean Dice + binary cross-entropy) is what held-out Dice chose on fs-training (BENCHMARKS.md:
    # after 150 iterations 0.729 against 0.706 for the paper's squared generalized Dice, MV 0.715)
    dice_loss: str = "mean"
    gdl_weight: str = "square"  # MONAI GeneralizedDiceLoss w_type: square, simple or uniform
    bce_weight: float = 1.0  # per-channel binary cross-entropy added to the Dice loss
    lr_step: int = 10  # epochs between learning-rate decays
    gamma: float = 0.2
    val_fraction: float = 0.2
    validation: str = "patches"  # "patches", "full" or "none"
    val_patches: int = 4  # fixed patches per validation case ("patches")
    save_best: bool = True  # keep the weights of the best validation epoch
    modaug: bool = True
    modaug_prob: float = 0.5
    histogram_shift_prob: float = 0.5
    histogram_shift_points: tuple[int, int] = (5, 15)
    flip_prob: float = 0.0
    flip_axes: tuple[int, ...] = (0, 1, 2)
    affine_prob: float = 0.3
    elastic_prob: float = 0.1
    rotate_degrees: float = 10.0
    scale_range: float = 0.1
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (100.0, 200.0)
    noise_prob: float = 0.2
    noise_std: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        self.histogram_shift_points = tuple(int(p) for p in self.histogram_shift_points)
        self.elastic_sigma = tuple(float(v) for v in self.elastic_sigma)
        self.elastic_magnitude = tuple(float(v) for v in self.elastic_magnitude)
        for name in ("atlases_per_sample", "epochs", "iterations_per_epoch", "batch_size", "lr_step"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_fraction", "modaug_prob", "histogram_shift_prob", "flip_prob", "affine_prob",
                     "elastic_prob", "noise_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise UsageError(f"training setting {name} must lie in [0, 1], got {getattr(self, name)}")
        if self.affine_prob + self.elastic_prob > 1.0:
            raise UsageError("affine_prob + elastic_prob must not exceed 1")
        if self.dice_loss not in ("generalized", "mean"):
            raise UsageError(f"dice_loss must be generalized or mean, got {self.dice_loss!r}")
        if self.gdl_weight not in ("square", "simple", "uniform"):
            raise UsageError(f"gdl_weight must be square, simple or uniform, got {self.gdl_weight!r}")
        if self.bce_weight < 0:
            raise UsageError(f"bce_weight must be >= 0, got {self.bce_weight}")
        if self.validation not in ("patches", "full", "none"):
            raise UsageError(f"validation must be patches, full or none, got {self.validation!r}")

    @property
    def spatial_margin(self) -> int:
        """Voxels cropped around the patch so rotation/scaling/elastic leave no empty corners."""
        if self.affine_prob + self.elastic_prob <= 0:
            return 0
        half_diag = 0.5 * math.sqrt(3.0) * max(self.patch_size)
        shift = half_diag * (math.sin(math.radians(self.rotate_degrees)) + self.scale_range)
        return int(math.ceil(shift)) + (4 if self.elastic_prob > 0 else 1)


@dataclass
class TrainResult:
    history: list[dict]
    out_file: Path
    best_epoch: int | None = None
    model: DeepLabelFusion | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------
# prepared cases
# --------------------------------------------------------------------------------------------
@dataclass
class _Case:
    case_id: str
    images: np.ndarray  # (M, X, Y, Z) float32
    truth: np.ndarray  # (X, Y, Z) channel indices
    atlas_images: np.ndarray  # (A, M, X, Y, Z) float32
    atlas_idx: np.ndarray  # (A, X, Y, Z) channel indices
    foreground: np.ndarray  # flat indices of truth > 0 (all voxels when none)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]


def _prepare(case: TrainingCase, k: int, channel_values: np.ndarray, n_mod: int) -> _Case:
    cid = case.case_id or f"case {k}"
    img = np.asarray(case.target_images, dtype=np.float32)
    if img.ndim == 3 and n_mod == 1:
        img = img[None]
    if img.ndim != 4 or img.shape[0] != n_mod:
        raise BadDataError(f"{cid}: target images must be ({n_mod}, X, Y, Z), got {img.shape}")
    spatial = img.shape[1:]
    atl = np.asarray(case.atlas_images, dtype=np.float32)
    if atl.ndim == 4 and n_mod == 1:
        atl = atl[:, None]
    if atl.ndim != 5 or atl.shape[1] != n_mod or atl.shape[2:] != spatial or atl.shape[0] < 1:
        raise BadDataError(f"{cid}: atlas images must be (N>=1, {n_mod}, {spatial}), got {atl.shape}")
    lab = np.asarray(case.target_labels)
    if lab.shape != spatial:
        raise BadDataError(f"{cid}: target labels have shape {lab.shape}, images {spatial}")
    alab = np.asarray(case.atlas_labels)
    if alab.shape != (atl.shape[0], *spatial):
        raise BadDataError(f"{cid}: atlas labels must be ({atl.shape[0]}, {spatial}), got {alab.shape}")
    for name, arr in (("target images", img), ("atlas images", atl)):
        if not np.all(np.isfinite(arr)):
            raise BadDataError(f"{cid}: {name} contain NaN or infinite values")
    truth = labels_to_channels(lab, channel_values, f"{cid}: target labels")
    aidx = labels_to_channels(alab, channel_values, f"{cid}: atlas labels")
    fg = np.flatnonzero(truth)
    if fg.size == 0:
        fg = np.arange(truth.size)
    return _Case(cid, img, truth, atl, aidx, fg)


def split_cases(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Random split by case: ``round(val_fraction * n)`` validation cases (at least 1 when
    ``val_fraction > 0`` and ``n >= 2``), always at least one training case."""
    if n < 1:
        raise UsageError("no training cases")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    order = rng.permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


# --------------------------------------------------------------------------------------------
# augmentation building blocks (public so they can be tested on their own)
# --------------------------------------------------------------------------------------------
def select_atlases(n_available: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` atlas indices drawn uniformly *with replacement* from ``range(n_available)``."""
    if n_available < 1:
        raise BadDataError("a case needs at least one atlas")
    return rng.integers(0, n_available, size=int(n))


def modaug(target: torch.Tensor, atlases: torch.Tensor, rng: np.random.Generator, p: float = 0.5):
    """ModAug: with probability ``p`` replace one modality channel (uniformly chosen; T1 or T2
    50/50 for two modalities) by unit white noise in ``target`` ``(M, ...)`` and in *every* atlas
    ``(N, M, ...)``, each image with its own noise. Returns ``(target, atlases, channel or None)``
    (new tensors; the inputs are not modified). Needs ``M >= 2``, otherwise a no-op."""
    M = target.shape[0]
    if M < 2 or rng.random() >= p:
        return target, atlases, None
    c = int(rng.integers(0, M))
    target = target.clone()
    atlases = atlases.clone()
    target[c] = torch.from_numpy(rng.standard_normal(tuple(target.shape[1:]), dtype=np.float32))
    noise = rng.standard_normal((atlases.shape[0], *atlases.shape[2:]), dtype=np.float32)
    atlases[:, c] = torch.from_numpy(noise)
    return target, atlases, c


def histogram_shift(target: torch.Tensor, atlases: torch.Tensor, transform: RandHistogramShift,
                    rng: np.random.Generator, p: float = 0.5):
    """Apply ``transform`` (MONAI ``RandHistogramShift`` with ``prob=1``) with probability ``p``
    independently to the target and to each atlas, each modality channel with its own random
    curve. Returns new tensors."""
    def one(x: torch.Tensor) -> torch.Tensor:  # (M, ...)
        if rng.random() >= p:
            return x
        out = x.clone()
        for c in range(x.shape[0]):
            ch = x[c]
            if float(ch.max()) > float(ch.min()):
                out[c] = _tensor(transform(ch[None]))[0]
        return out

    return one(target), torch.stack([one(a) for a in atlases])


def _tensor(x) -> torch.Tensor:
    """MONAI MetaTensor (or anything array-like) -> plain torch.Tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _crop_zero(arr: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``arr[..., region]`` on the last 3 axes, zero where the region leaves the array."""
    spatial = arr.shape[-3:]
    out = np.zeros((*arr.shape[:-3], *size), dtype=arr.dtype)
    src, dst = [], []
    for s, n, full in zip(start, size, spatial):
        lo, hi = max(s, 0), min(s + n, full)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[(..., *dst)] = arr[(..., *src)]
    return out


class _Augmenter:
    """The seeded MONAI transforms of one training run."""

    def __init__(self, settings: TrainSettings, rng: np.random.Generator):
        s = settings
        rot = math.radians(s.rotate_degrees)
        common = dict(keys=("img", "lbl"), spatial_size=s.patch_size, prob=1.0,
                      rotate_range=(rot, rot, rot), scale_range=(s.scale_range,) * 3,
                      mode=("bilinear", "nearest"), padding_mode=("zeros", "zeros"))
        self.affine = RandAffined(**common)
        self.elastic = Rand3DElasticd(sigma_range=s.elastic_sigma, magnitude_range=s.elastic_magnitude,
                                      **common)
        self.hist = RandHistogramShift(num_control_points=s.histogram_shift_points, prob=1.0)
        for t in (self.affine, self.elastic, self.hist):
            t.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))


def make_sample(case: _Case, settings: TrainSettings, rng: np.random.Generator,
                augmenter: _Augmenter | None, centre: Sequence[int] | None = None,
                atlas_indices: Sequence[int] | None = None) -> dict:
    """One (augmented when ``augmenter`` is given) normalised training patch of ``case``:
    ``target (M,p)``, ``atlas_images (N,M,p)``, ``atlas_idx (N,p)`` long, ``truth (p)`` long,
    ``coords (3,p)``, plus ``modaug_channel``. See the module docstring for the order."""
    s = settings
    patch = s.patch_size
    shape = case.shape
    if atlas_indices is None:
        atlas_indices = select_atlases(case.atlas_images.shape[0], s.atlases_per_sample, rng)
    atlas_indices = np.asarray(atlas_indices, dtype=np.int64)
    if centre is None:
        centre = random_voxel(case.foreground, shape, rng)
    start = centred_patch_start(centre, patch, shape)
    spatial = None
    if augmenter is not None:
        u = rng.random()  # drawn before the crops (which use no randomness): same draw order
        spatial = augmenter.elastic if u < s.elastic_prob else (
            augmenter.affine if u < s.elastic_prob + s.affine_prob else None)
    # the margin only where a resampling follows; otherwise the patch itself is cropped (the
    # centre of the margin region: same values, without cropping and copying the margin)
    margin = s.spatial_margin if spatial is not None else 0
    rstart = [st - margin for st in start]
    rsize = [p + 2 * margin for p in patch]

    M = case.images.shape[0]
    N = len(atlas_indices)
    tgt = _crop_zero(case.images, rstart, rsize)
    # crop atlas by atlas (fancy indexing first would copy N whole images per sample)
    aimg = np.stack([_crop_zero(case.atlas_images[j], rstart, rsize) for j in atlas_indices])
    truth = _crop_zero(case.truth, rstart, rsize)
    aidx = np.stack([_crop_zero(case.atlas_idx[j], rstart, rsize) for j in atlas_indices])
    coords = region_coordinates(shape, rstart, rsize)

    img = torch.cat([torch.from_numpy(tgt), torch.from_numpy(aimg).reshape(N * M, *rsize), coords])
    lbl = torch.cat([torch.from_numpy(truth[None].astype(np.float32)),
                     torch.from_numpy(aidx.astype(np.float32))])

    if augmenter is not None:
        if spatial is not None:
            out = spatial({"img": img, "lbl": lbl})
            img, lbl = _tensor(out["img"]), _tensor(out["lbl"])
        if margin:
            crop = (slice(None), *(slice(margin, margin + p) for p in patch))
            if tuple(img.shape[1:]) != tuple(patch):
                img, lbl = img[crop], lbl[crop]
        for ax in s.flip_axes:
            if rng.random() < s.flip_prob:
                img, lbl = torch.flip(img, dims=(ax + 1,)), torch.flip(lbl, dims=(ax + 1,))
    img = img.float().contiguous()
    lbl = torch.round(lbl).long()

    target = img[:M]
    atlases = img[M:M + N * M].reshape(N, M, *patch)
    coords = img[M + N * M:]
    channel = None
    if augmenter is not None:
        target, atlases = histogram_shift(target, atlases, augmenter.hist, rng, s.histogram_shift_prob)
        if s.modaug:
            target, atlases, channel = modaug(target, atlases, rng, s.modaug_prob)
    target = normalise_patch(target)
    atlases = normalise_patch(atlases)
    if augmenter is not None and s.noise_prob > 0:
        def noisy(x):
            if rng.random() >= s.noise_prob:
                return x
            std = rng.uniform(0.0, s.noise_std)
            return x + std * torch.from_numpy(rng.standard_normal(tuple(x.shape), dtype=np.float32))
        target = noisy(target)
        atlases = torch.stack([noisy(a) for a in atlases])
    return {"target": target, "atlas_images": atlases, "atlas_idx": lbl[1:], "truth": lbl[0],
            "coords": coords.contiguous(), "modaug_channel": channel}


def make_loss(settings: TrainSettings):
    """Loss on probabilities ``(B, L, ...)`` vs one-hot: MONAI ``GeneralizedDiceLoss`` (background
    included, ``sigmoid=False`` since the network outputs probabilities, ``w_type=gdl_weight``)
    or, with ``dice_loss="mean"`` (the default), MONAI ``DiceLoss`` (mean over labels of 1 - soft
    Dice), plus ``bce_weight`` × binary cross-entropy when ``bce_weight > 0`` (default 1; not in
    the paper; it calibrates the sigmoid channels against each other, notably the background
    channel, which a Dice loss leaves nearly untrained)."""
    if settings.dice_loss == "mean":
        gdl = DiceLoss(include_background=True, sigmoid=False)
    else:
        gdl = GeneralizedDiceLoss(include_background=True, sigmoid=False, w_type=settings.gdl_weight)
    bce_weight = float(settings.bce_weight)

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = gdl(pred, target)
        if bce_weight > 0:
            out = out + bce_weight * torch.nn.functional.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target)
        return out

    return loss_fn


def _one_hot(idx: torch.Tensor, n_labels: int, dim: int) -> torch.Tensor:
    """float32 one-hot of label indices, the label axis inserted at ``dim``: the same values *and
    strides* as :func:`~dlf_bids.models.dlf.one_hot_labels` (label axis innermost in memory, so
    the model computes exactly the same), but scattered straight into float32 instead of going
    through an int64 ``F.one_hot`` and a conversion (about 2.5x faster on CPU: ~90 instead of
    ~220 ms for 4 atlases, 46 labels, 48³)."""
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_labels):
        raise ValueError(f"label indices must lie in [0, {n_labels - 1}]")
    out = torch.zeros((*idx.shape, n_labels), dtype=torch.float32, device=idx.device)
    out.scatter_(-1, idx.unsqueeze(-1), 1.0)
    return out.movedim(-1, dim if dim >= 0 else out.ndim + dim)


def _collate(samples: list[dict], n_labels: int, device) -> tuple:
    target = torch.stack([s["target"] for s in samples]).to(device)
    atl = torch.stack([s["atlas_images"] for s in samples]).to(device)
    # one-hot on the device: only the (uint8/int64) indices travel, not N*L float maps
    onehot = _one_hot(torch.stack([s["atlas_idx"] for s in samples]).to(device), n_labels, dim=2)
    coords = torch.stack([s["coords"] for s in samples]).to(device)
    truth = torch.stack([s["truth"] for s in samples])
    return target, atl, onehot, coords, truth.to(device)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _dice_counts(pred: np.ndarray, truth: np.ndarray, n_labels: int) -> np.ndarray:
    """Per label (foreground): [intersection, |pred|, |truth|]."""
    p = pred.ravel().astype(np.int64)
    t = truth.ravel().astype(np.int64)
    inter = np.bincount(p[p == t], minlength=n_labels)
    return np.stack([inter, np.bincount(p, minlength=n_labels), np.bincount(t, minlength=n_labels)])[:, 1:]


def _mean_dice(counts: np.ndarray) -> float | None:
    denom = counts[1] + counts[2]
    ok = denom > 0
    if not ok.any():
        return None
    return float(np.mean(2.0 * counts[0][ok] / denom[ok]))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train_dlf(
    cases: Sequence[TrainingCase],
    label_table: LabelTable,
    dlf_config: DLFConfig,
    settings: TrainSettings,
    modalities: Sequence[str],
    out_file,
    progress: bool = True,
) -> TrainResult:
    """Train a :class:`DeepLabelFusion` and save it with :func:`~.model_file.save_model`.

    Label values are mapped to channels through ``label_table`` (channel ``c > 0`` =
    ``label_table.labels[c-1]``); a value not in the table is a :class:`BadDataError`.
    ``dlf_config.n_labels`` must be ``len(label_table.labels) + 1`` and ``n_modalities``
    ``len(modalities)``. Returns the per-epoch history (``epoch``, ``loss``, ``val_dice``, ``lr``,
    ``seconds``) and the output path."""
    s = settings
    modalities = [str(m) for m in modalities]
    if not cases:
        raise UsageError("no training cases")
    if dlf_config.n_labels != len(label_table.labels) + 1:
        raise UsageError(
            f"the network has {dlf_config.n_labels} channels but the label table lists "
            f"{len(label_table.labels)} labels (+ background = {len(label_table.labels) + 1})"
        )
    if dlf_config.n_modalities != len(modalities):
        raise UsageError(f"the network takes {dlf_config.n_modalities} modalities, got {modalities}")
    try:
        check_patch_size(s.patch_size, dlf_config.size_divisor)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    channel_values = np.asarray((0, *label_table.indices), dtype=np.int64)
    config = dataclasses.replace(dlf_config, labels=tuple(int(v) for v in channel_values),
                                 modalities=tuple(modalities))
    M = config.n_modalities
    L = config.n_labels
    use_modaug = bool(s.modaug and M >= 2)
    run_settings = dataclasses.replace(s, modaug=use_modaug)
    device = resolve_device(s.device)

    prepared = [_prepare(c, k, channel_values, M) for k, c in enumerate(cases)]
    rng = np.random.default_rng(s.seed)
    train_ids, val_ids = split_cases(len(prepared), s.val_fraction if s.validation != "none" else 0.0, rng)
    train_cases = [prepared[i] for i in train_ids]
    val_cases = [prepared[i] for i in val_ids]
    augmenter = _Augmenter(run_settings, rng)

    # fixed validation patches, drawn once from their own generator
    val_rng = np.random.default_rng([s.seed, 1])
    val_batches = []
    if s.validation == "patches":
        for vc in val_cases:
            n_avail = vc.atlas_images.shape[0]
            atl = np.arange(s.atlases_per_sample) % n_avail
            for _ in range(s.val_patches):
                centre = random_voxel(vc.foreground, vc.shape, val_rng)
                val_batches.append(make_sample(vc, run_settings, val_rng, None, centre, atl))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = DeepLabelFusion(config).to(device)
    loss_fn = make_loss(s)
    optimiser = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=s.lr_step, gamma=s.gamma)

    info = ModelInfo(format_version=1, package_version="", dlf_config=config,
                     labels=_labels_to_dicts(label_table), modalities=modalities,
                     patch_size=s.patch_size, modaug=use_modaug)

    def validate() -> float | None:
        if not val_cases or s.validation == "none":
            return None
        counts = np.zeros((3, L - 1), dtype=np.int64)
        model.eval()
        with torch.no_grad():
            if s.validation == "patches":
                for smp in val_batches:
                    t, a, oh, co, tr = _collate([smp], L, device)
                    pred = label_distribution(model(t, a, oh, co)["output"], dim=1).argmax(dim=1)
                    counts += _dice_counts(pred.cpu().numpy(), tr.cpu().numpy(), L)
            else:
                for vc in val_cases:
                    res = predict(model, info, vc.images, vc.atlas_images, channel_values[vc.atlas_idx],
                                  device=device)
                    pred = labels_to_channels(res.labels, channel_values)
                    counts += _dice_counts(pred, vc.truth, L)
        model.train()
        return _mean_dice(counts)

    history: list[dict] = []
    best = (-1.0, None, None)  # dice, epoch, state
    total = s.epochs * s.iterations_per_epoch
    bar = training_progress(total, "DLF training", "it", enabled=progress)
    val_dice = None
    try:
        model.train()
        for epoch in range(s.epochs):
            t0 = time.monotonic()
            lr = optimiser.param_groups[0]["lr"]
            losses = []
            for _ in range(s.iterations_per_epoch):
                batch = []
                for _b in range(s.batch_size):
                    case = train_cases[int(rng.integers(0, len(train_cases)))]
                    batch.append(make_sample(case, run_settings, rng, augmenter))
                t, a, oh, co, tr = _collate(batch, L, device)
                truth_oh = _one_hot(tr, L, dim=1)
                out = model(t, a, oh, co)
                loss = deep_supervision_loss(out["deep_supervision"], truth_oh, loss_fn,
                                             config.deep_supervision_weights)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}",
                                val_dice="-" if val_dice is None else f"{val_dice:.3f}", refresh=False)
            scheduler.step()
            val_dice = validate()
            entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val_dice, "lr": lr,
                     "seconds": round(time.monotonic() - t0, 3)}
            history.append(entry)
            bar.set_postfix(epoch=epoch + 1, loss=f"{entry['loss']:.4f}",
                            val_dice="-" if val_dice is None else f"{val_dice:.3f}")
            if val_dice is not None and val_dice > best[0]:
                best = (val_dice, epoch + 1, copy.deepcopy(model.state_dict()))
    finally:
        bar.close()

    best_epoch = None
    if s.save_best and best[2] is not None:
        model.load_state_dict(best[2])
        best_epoch = best[1]
    model.eval()

    atlas_ids: list[str] = []
    for c in (cases[i] for i in train_ids):
        ids = list(c.atlas_ids) if c.atlas_ids is not None else []
        for a in [c.case_id, *ids]:
            if a and a not in atlas_ids:
                atlas_ids.append(str(a))
    train_meta = {k: (list(v) if isinstance(v, tuple) else v)
                  for k, v in dataclasses.asdict(run_settings).items()}
    train_meta.update({
        "training_cases": [prepared[i].case_id for i in train_ids],
        "validation_cases": [prepared[i].case_id for i in val_ids],
        "best_epoch": best_epoch,
        "history": history,
    })
    out_file = save_model(out_file, model, {
        "labels": label_table,
        "modalities": modalities,
        "patch_size": s.patch_size,
        "normalisation": NORMALISATION,
        "modaug": use_modaug,
        "training_atlases": atlas_ids,
        "train_settings": train_meta,
    })
    return TrainResult(history=history, out_file=Path(out_file), best_epoch=best_epoch, model=model)
