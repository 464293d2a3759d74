"""Joint, semi-supervised training of DeepAtlas (Xu & Niethammer 2019) on in-memory volumes.

Data: a list of labelled ``(image, labels)`` and a list of unlabelled images, all on one voxel
grid (e.g. affinely aligned), prepared by :func:`~.deepatlas_inference.prepare_volume`. One
step draws a (moving, target) pair: the moving image is a labelled one (the atlas role; one-shot:
always the single atlas), the target any *other* image, labelled or not. Our choice: with two
unlabelled images both sides of the anatomy loss would be ``F_S``'s predictions, which agree
trivially when ``F_S`` predicts background everywhere (the foreground Dice of two empty maps is
perfect), a collapse the loss would reward.

Each side's segmentation ``S`` is its manual one-hot labels when it has them, otherwise the
softmax of ``F_S`` on it. Losses (MONAI: ``LocalNormalizedCrossCorrelationLoss``,
``BendingEnergyLoss``, ``DiceLoss`` over the foreground labels on probabilities):

* **registration** (``F_S`` frozen): ``LNCC(warp(moving), target) + λ_r · bending(ddf)
  + λ_a · Dice(warp(S_moving), S_target)``; the warped one-hot is trilinear, so the anatomy term
  has a gradient with respect to the displacement;
* **segmentation** (``F_R`` frozen): ``λ_a · Dice(warp(S_moving), S_target)`` (the gradient
  reaches ``F_S`` through whichever side it predicted: the warped atlas labels act as realistic
  augmented training labels) ``+ λ_sp ·`` mean supervised ``Dice(F_S(x), labels)`` over the
  labelled sides of the pair.

**T1w + T2w** (``in_channels`` 2): an image whose T2w channel is zero everywhere has no T2w; the
networks get unit white noise there instead, and with ``modaug`` each step's pair goes through
DLF's ModAug (:func:`~dlf_bids.models.training.modaug`: with ``modaug_prob``, the T1w or the T2w
channel of both images replaced by noise, for pairs that have both), so one model registers with
or without a T2w. ModAug changes what the networks *see*; the similarity term still compares the
real images, on every channel both of them have (the T1w always, the T2w when both have one).

Phases alternate every ``phase_steps`` steps, registration first; each network has its own Adam.
Everything random derives from ``seed`` (initialisation under a forked torch RNG, pairs from a
numpy Generator), so the same seed gives the same weights on CPU.

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiceLoss, LocalNormalizedCrossCorrelationLoss

from ..errors import BadDataError, UsageError
from .deepatlas import DeepAtlas, DeepAtlasConfig, warp_image, warp_probabilities
from .deepatlas_inference import as_channels, pad, padding, prepare_volume
from .inference import labels_to_channels, resolve_device
from .progress import training_progress
from .training import modaug

__all__ = ["DEFAULT_GRID_MM", "DeepAtlasLosses", "DeepAtlasTrainResult", "DeepAtlasTrainSettings",
           "train_deepatlas"]

#: Voxel size (mm) of the networks' reference grid in the benchmarked recipe (with the settings
#: below); a 2 mm grid has 3.4x the voxels, so roughly that much more time per step
DEFAULT_GRID_MM = 3.0

REGISTRATION = "registration"
SEGMENTATION = "segmentation"


@dataclass
class DeepAtlasTrainSettings:
    # steps and lr_registration: the recipe of the leave-one-out benchmark (BENCHMARKS.md), which
    # met the targets on a DEFAULT_GRID_MM grid in ~40 min of 2-core CPU per model
    steps: int = 1000
    phase_steps: int = 20  # K: steps of one phase before switching networks
    lr_registration: float = 2e-3
    lr_segmentation: float = 1e-3
    modaug: bool = True  # only acts on two-channel (T1w + T2w) inputs
    modaug_prob: float = 0.5
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("steps", "phase_steps"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.modaug_prob <= 1.0:
            raise UsageError(f"modaug_prob must lie in [0, 1], got {self.modaug_prob}")


@dataclass
class DeepAtlasTrainResult:
    model: DeepAtlas = field(repr=False)
    history: list[dict]  # one entry per step: step, phase, loss and its terms (None when absent)


class DeepAtlasLosses:
    """The two phase losses of one pair (see the module docstring); each returns
    ``(total, terms)`` with the terms as floats for the history."""

    def __init__(self, config: DeepAtlasConfig):
        self.config = config
        # MONAI's variance floor (1e-5) is at the float rounding of a window's variance sum in a
        # flat background (z-scored voxels ~ -1), where NCC then blows up to many times 1; a
        # floor of 1e-3 per window voxel is far below the sums of textured windows (~1 per voxel)
        window = config.lncc_kernel**3
        self.similarity = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=config.lncc_kernel, smooth_dr=1e-3 * window)
        self.bending = BendingEnergyLoss()
        # background included: its channel gives every voxel a gradient. On the phantoms, 40
        # supervised steps at lr 1e-2 left a foreground-only loss at 0.82, this one at 0.60
        # (0.18 at lr 3e-2)
        self.dice = DiceLoss(include_background=True)

    def registration(self, model: DeepAtlas, moving, target, m_onehot=None, t_onehot=None, *,
                     inputs=None, channels=None):
        """``inputs``: what the networks see, ``(moving, target)`` (default: the images
        themselves; ModAug'ed copies in training); the similarity compares the images on
        ``channels`` (default: all), the mean over those channels."""
        c = self.config
        net_moving, net_target = inputs if inputs is not None else (moving, target)
        ddf = model.registration(net_moving, net_target)
        if channels is None:
            channels = range(moving.shape[1])
        warped = warp_image(moving, ddf)
        sim = torch.stack([self.similarity(warped[:, k:k + 1], target[:, k:k + 1])
                           for k in channels]).mean()
        with warnings.catch_warnings():  # MONAI 1.6's indexing, deprecated by torch: not ours to fix
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            bend = self.bending(ddf)
        with torch.no_grad():  # F_S frozen
            s_m, s_t = (oh if oh is not None else torch.softmax(model.segmentation(x), dim=1)
                        for x, oh in ((net_moving, m_onehot), (net_target, t_onehot)))
        anat = self.dice(warp_probabilities(s_m, ddf), s_t)
        total = sim + c.lambda_r * bend + c.lambda_a * anat
        return total, {"similarity": sim.item(), "bending": bend.item(), "anatomy": anat.item()}

    def segmentation(self, model: DeepAtlas, moving, target, m_onehot=None, t_onehot=None, *,
                     inputs=None):
        """``inputs`` as for :meth:`registration` (no similarity term here: only what the
        networks see matters)."""
        c = self.config
        if inputs is not None:
            moving, target = inputs
        with torch.no_grad():  # F_R frozen
            ddf = model.registration(moving, target)
        # F_S runs on labelled sides too: their prediction is what the supervised term trains
        l_m, l_t = model.segmentation(moving), model.segmentation(target)
        s_m, s_t = (oh if oh is not None else torch.softmax(lg, dim=1)
                    for lg, oh in ((l_m, m_onehot), (l_t, t_onehot)))
        anat = self.dice(warp_probabilities(s_m, ddf), s_t)
        sup = [self.dice(torch.softmax(lg, dim=1), oh) for lg, oh in ((l_m, m_onehot), (l_t, t_onehot))
               if oh is not None]
        total = c.lambda_a * anat
        terms = {"anatomy": anat.item(), "supervised": None}
        if sup:
            sup_mean = torch.stack(sup).mean()
            total = total + c.lambda_sp * sup_mean
            terms["supervised"] = sup_mean.item()
        return total, terms


def _stack_data(labelled, unlabelled, config: DeepAtlasConfig, rng: np.random.Generator):
    """Network inputs ``(N, C, ...)`` (labelled first), one-hot labels (``None`` per unlabelled
    image) and which channels each image has ``(N, C)`` bool, after checking that every volume
    shares one shape. A channel zero everywhere is a missing modality: unit white noise."""
    channel_values = config.labels if config.labels is not None else tuple(range(config.n_labels))
    images, onehots, present, shape = [], [], [], None
    items = [(img, lab, f"labelled image {k}") for k, (img, lab) in enumerate(labelled)]
    items += [(img, None, f"unlabelled image {k}") for k, img in enumerate(unlabelled)]
    for img, lab, what in items:
        arr = as_channels(img, config.in_channels, what)
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise BadDataError(f"{what} has shape {arr.shape[1:]}, the first image {shape}: all volumes "
                               "must share one voxel grid")
        if not arr[0].any():
            raise BadDataError(f"{what}: its first (T1w) channel is empty")
        has = [bool(arr[k].any()) for k in range(arr.shape[0])]
        volume = prepare_volume(arr, config.in_channels, config.size_divisor, what)
        for k in np.flatnonzero(~np.asarray(has)):
            volume[k] = torch.from_numpy(rng.standard_normal(tuple(volume.shape[1:]), dtype=np.float32))
        images.append(volume)
        present.append(has)
        if lab is None:
            onehots.append(None)
            continue
        lab = np.asarray(lab)
        if lab.shape != shape:
            raise BadDataError(f"labels of {what} have shape {lab.shape}, the image {shape}")
        idx = labels_to_channels(lab, channel_values, f"labels of {what}").astype(np.int64)
        idx = torch.from_numpy(pad(idx, padding(shape, config.size_divisor)))  # padding: background
        onehots.append(F.one_hot(idx, config.n_labels).movedim(-1, 0).float())
    return torch.stack(images), onehots, torch.tensor(present)


def _draw_pair(rng: np.random.Generator, n_labelled: int, n_total: int) -> tuple[int, int]:
    """A labelled moving image (the atlas) and any other image as the target."""
    moving = int(rng.integers(0, n_labelled))
    target = int(rng.integers(0, n_total - 1))
    return moving, target + (target >= moving)


def train_deepatlas(
    labelled: Sequence[tuple[np.ndarray, np.ndarray]],
    unlabelled: Sequence[np.ndarray],
    config: DeepAtlasConfig,
    settings: DeepAtlasTrainSettings,
    progress: bool = True,
) -> DeepAtlasTrainResult:
    """Train both networks jointly (see the module docstring). Label maps hold label *values*,
    mapped to channels through ``config.labels`` (channel indices when it is ``None``); images
    are ``(C, X, Y, Z)`` or 3D for one channel (a T2w channel of zeros: no T2w). At least one
    labelled image and two images in all."""
    s = settings
    if not labelled:
        raise UsageError("DeepAtlas needs at least one labelled image (the atlas)")
    if len(labelled) + len(unlabelled) < 2:
        raise UsageError("DeepAtlas needs at least two images (a moving and a target)")
    device = resolve_device(s.device)
    rng = np.random.default_rng(s.seed)
    images, onehots, present = _stack_data(labelled, unlabelled, config, rng)
    images = images.to(device)
    onehots = [None if oh is None else oh[None].to(device) for oh in onehots]
    use_modaug = bool(s.modaug and config.in_channels >= 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = DeepAtlas(config).to(device)
    losses = DeepAtlasLosses(config)
    opt_reg = torch.optim.Adam(model.registration.parameters(), lr=s.lr_registration)
    opt_seg = torch.optim.Adam(model.segmentation.parameters(), lr=s.lr_segmentation)

    history: list[dict] = []
    bar = training_progress(s.steps, "DeepAtlas training", "step", enabled=progress)
    model.train()
    try:
        for step in range(s.steps):
            phase = REGISTRATION if (step // s.phase_steps) % 2 == 0 else SEGMENTATION
            m, t = _draw_pair(rng, len(labelled), len(images))
            moving, target = images[m:m + 1], images[t:t + 1]
            inputs = None
            # DLF's ModAug on the pair (the target, and the moving image as its one "atlas"),
            # when both have every modality: an image without its T2w already teaches that case
            if use_modaug and bool(present[m].all() and present[t].all()):
                net_target, net_moving, _ = modaug(target[0], moving, rng, s.modaug_prob)
                inputs = (net_moving, net_target[None])
            channels = torch.nonzero(present[m] & present[t]).flatten().tolist()
            args = (model, moving, target, onehots[m], onehots[t])
            if phase == REGISTRATION:
                loss, terms = losses.registration(*args, inputs=inputs, channels=channels)
                optimiser = opt_reg
            else:
                loss, terms = losses.segmentation(*args, inputs=inputs)
                optimiser = opt_seg
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.append({"step": step, "phase": phase, "moving": m, "target": t, "loss": loss.item(),
                            **terms})
            bar.update(1)
            bar.set_postfix(phase=phase[:3], loss=f"{loss.item():.4f}", refresh=False)
    finally:
        bar.close()
    model.eval()
    return DeepAtlasTrainResult(model=model, history=history)
