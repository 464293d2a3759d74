"""Deep Label Fusion (Xie et al., Medical Image Analysis 83:102683, 2023), in plain PyTorch + MONAI.

Implemented from the description in ``notes/methods.md`` (the authors' code carries no licence and
was not consulted). Inputs are a target patch with ``M`` modalities and ``N`` atlases already
registered to it (images with the same ``M`` modalities + one-hot label maps with ``L`` labels,
background included).

Network
-------
* **Weighted-voting (WV) subnet**: MONAI :class:`~monai.networks.nets.DynUNet` with
  ``len(wv_channels)`` levels (default 3: 32, 64, 128), strides ``(1, 2, 2)``, 3×3×3 kernels,
  instance norm (affine) + leaky ReLU, transposed-conv upsampling, 1×1×1 output conv to ``L``
  channels, then a sigmoid. It runs once per target/atlas pair, the pairs stacked on the batch
  axis, on ``2*M + 3`` channels: target modalities, atlas modalities, 3 coordinate maps.
  DynUNet fits this subnet exactly, so a well-kept MONAI network is used as is.
* **Fusion**: ``V[j, l] = W[j, l] * onehot(atlas_j)[l]``; the initial segmentation is the *mean*
  over atlases (not normalised by the sum of weights), see :func:`fuse`.
* **Fine-tuning (FT) subnet**: :class:`~dlf_bids.models.unet.DeepSupervisionUNet`, a 4-level
  U-Net (32, 64, 128, 256) assembled from the same MONAI DynUNet blocks, on ``L + 3`` channels
  (initial segmentation + coordinate maps). DynUNet's own deep supervision does not fit (no head
  on the bottleneck, at most 2 extra heads for 4 levels, heads interpolated to full size and
  returned only in training mode), hence the compact class. Every head predicts a *residual*:
  ``out_k = sigmoid(head_k + g * avgpool_{2^s}(initial) + b)`` at its own scale ``1/2^s``
  (1/8, 1/4, 1/2, 1 for 4 levels); the full-resolution one is the final output. ``g``/``b`` are
  two learnable scalars (``vote_gain``/``vote_offset``; the paper's formula is ``g=1, b=0``).
* **Start** (``zero_init_heads``, default): the output layers of both subnets start at zero, so
  every weight map is 0.5, the initial segmentation is half the atlas vote fraction and the
  output is a calibrated majority vote; training moves away from there.
* **Label masking** (:func:`label_mask`): label ``l`` is allowed at a voxel when, in the 3×3×3
  neighbourhood of the voxel, the number of voxels carrying ``l`` in *at least one* atlas is
  ``>= mask_threshold * 27`` (i.e. the 3×3×3 mean of the union ``>= 0.2``: at least 6 voxels of
  27). With a 3×3×3 window and a threshold of 0.2 no mean can equal the threshold exactly
  (``k/27 != 0.2``), so ``>=`` and ``>`` give the same masks; the comparison is done on integer
  counts so it is exact. Voxels outside the patch count as *not* carrying the label
  (``avg_pool3d(..., count_include_pad=True)``, zero padding): at a patch border the mask can only
  be smaller than the mask of the whole image, never larger; at the image border it equals it. A
  single isolated labelled voxel (1/27) or a 2×2×2 block's outer neighbours (4/27) fall below
  0.2 and are masked out: the smoothing removes isolated atlas voxels, it does not dilate.
  The **background channel is never masked** (its mask is 1 everywhere, ``mask_background=False``)
  so that a voxel where every foreground label is masked out still has a well-defined argmax
  (background). Masking applies to ``"output"`` (= the full-resolution deep-supervision entry);
  the coarser deep-supervision outputs are left unmasked.

Patch sizes: every spatial dimension must be a multiple of ``2**(levels-1)`` of the deeper
subnet (8 for the default 4-level FT subnet) so that down- and upsampling round-trip exactly, and
a patch must not collapse to a single voxel at the bottleneck (``8×8×8``), which instance
normalisation cannot handle; :func:`check_patch_size` raises a :class:`ValueError` otherwise.

Memory over many atlases: :meth:`DeepLabelFusion.weighted_vote` (and ``forward`` with
``atlas_batch``) runs the WV subnet on chunks of ``atlas_batch`` atlases and accumulates the sum of
votes, so peak memory is bounded by the chunk size when run under ``torch.no_grad()``. The result
equals the unchunked one up to float rounding because every normalisation is per sample.

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from .config_dict import DictConfig
from .unet import DEFAULT_ACT, DEFAULT_NORM, DeepSupervisionUNet

__all__ = [
    "DLFConfig",
    "DeepLabelFusion",
    "check_patch_size",
    "coordinate_maps",
    "count_parameters",
    "crop_patch",
    "deep_supervision_loss",
    "fuse",
    "label_mask",
    "one_hot_labels",
    "patch_coordinates",
]


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class DLFConfig(DictConfig):
    """Hyper-parameters of :class:`DeepLabelFusion` (JSON-serialisable via :meth:`to_dict`).

    ``n_labels`` counts the background (channel 0). ``labels`` / ``modalities`` are optional
    metadata for checkpoints: the label value of each output channel and the modality names in
    channel order (e.g. ``("T1w", "T2w")``).
    """

    n_labels: int
    n_modalities: int = 2
    wv_channels: tuple[int, ...] = (32, 64, 128)
    ft_channels: tuple[int, ...] = (32, 64, 128, 256)
    mask_threshold: float = 0.2
    mask_kernel: int = 3
    use_label_mask: bool = True
    mask_background: bool = False
    deep_supervision_weights: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
    res_block: bool = False
    # start from the majority vote: zero output layers in both subnets, so every weight map is
    # 0.5 and the fine-tuning residual 0; training starts from the vote instead of from random
    # weights and residuals that drown it (the vote differences are ~0.1-0.5)
    zero_init_heads: bool = True
    # the fine-tuning output is sigmoid(residual + gain * initial + offset) with learnable scalars
    # gain/offset started here. The paper's sigmoid(residual + initial) (gain 1, offset 0) puts
    # every channel in [0.5, 0.73] before training, so the residual must first learn a large
    # global sharpening, which costs much of a short training; 12/-3 start with 0.95 where all
    # atlases agree (initial 0.5 at zero-initialised weights), 0.5 where half do, 0.05 where none
    vote_gain: float = 12.0
    vote_offset: float = -3.0
    dropout: float | None = None
    labels: tuple[int, ...] | None = None
    modalities: tuple[str, ...] | None = None
    version: int = field(default=1)

    def __post_init__(self):
        self.wv_channels = tuple(int(c) for c in self.wv_channels)
        self.ft_channels = tuple(int(c) for c in self.ft_channels)
        self.deep_supervision_weights = tuple(float(w) for w in self.deep_supervision_weights)
        if self.labels is not None:
            self.labels = tuple(int(v) for v in self.labels)
        if self.modalities is not None:
            self.modalities = tuple(str(m) for m in self.modalities)
        if int(self.n_labels) < 2:
            raise ValueError(f"n_labels must be >= 2 (background included), got {self.n_labels}")
        if int(self.n_modalities) < 1:
            raise ValueError(f"n_modalities must be >= 1, got {self.n_modalities}")
        for name in ("wv_channels", "ft_channels"):
            chans = getattr(self, name)
            if len(chans) < 2 or any(c < 1 for c in chans):
                raise ValueError(f"{name} needs >= 2 positive widths, got {chans}")
        if len(self.deep_supervision_weights) != len(self.ft_channels):
            raise ValueError(
                f"deep_supervision_weights has {len(self.deep_supervision_weights)} entries but the "
                f"fine-tuning subnet has {len(self.ft_channels)} levels (one output per level)"
            )
        if not 0.0 < float(self.mask_threshold) <= 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1], got {self.mask_threshold}")
        if self.mask_kernel < 1 or self.mask_kernel % 2 == 0:
            raise ValueError(f"mask_kernel must be odd and >= 1, got {self.mask_kernel}")
        if self.labels is not None and len(self.labels) != self.n_labels:
            raise ValueError(f"labels has {len(self.labels)} values, n_labels is {self.n_labels}")
        if self.modalities is not None and len(self.modalities) != self.n_modalities:
            raise ValueError(
                f"modalities has {len(self.modalities)} names, n_modalities is {self.n_modalities}"
            )

    @property
    def size_divisor(self) -> int:
        """Every patch dimension must be a multiple of this (8 for the default config)."""
        return 2 ** (max(len(self.wv_channels), len(self.ft_channels)) - 1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def check_patch_size(spatial_shape: Sequence[int], divisor: int = 8) -> None:
    """Raise :class:`ValueError` unless every dimension is a positive multiple of ``divisor``
    and the bottleneck (``shape / divisor``) has more than one voxel."""
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3:
        raise ValueError(f"expected a 3D spatial shape, got {shape}")
    bad = [s for s in shape if s <= 0 or s % divisor]
    if bad:
        raise ValueError(
            f"patch size {shape} is invalid: every spatial dimension must be a positive multiple "
            f"of {divisor} (the networks downsample by {divisor})"
        )
    if math.prod(s // divisor for s in shape) < 2:
        raise ValueError(
            f"patch size {shape} is too small: it leaves a single voxel at the bottleneck, which "
            f"instance normalisation cannot handle; use e.g. {2 * divisor} in one dimension"
        )


def coordinate_maps(
    shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Normalised voxel coordinates of a **whole** image: ``(3, X, Y, Z)``, channel ``a`` holds
    ``2 * i_a / shape[a] - 1`` (``-1`` at the first voxel, ``1 - 2/size`` at the last, so values
    lie in ``[-1, 1)``). Compute once per image and crop patches with :func:`crop_patch`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"expected a 3D shape of positive sizes, got {shape}")
    axes = [2.0 * torch.arange(s, dtype=torch.float64) / s - 1.0 for s in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grids, dim=0).to(dtype=dtype, device=device)


def crop_patch(x: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """``x[..., s0:s0+n0, s1:s1+n1, s2:s2+n2]`` on the last 3 axes, with bounds checking."""
    start = tuple(int(s) for s in start)
    size = tuple(int(n) for n in size)
    if len(start) != 3 or len(size) != 3:
        raise ValueError("start and size must have 3 entries")
    spatial = tuple(x.shape[-3:])
    for s, n, full in zip(start, size, spatial):
        if s < 0 or n < 1 or s + n > full:
            raise ValueError(f"patch start={start} size={size} does not fit in spatial shape {spatial}")
    return x[..., start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]


def patch_coordinates(
    image_shape: Sequence[int],
    start: Sequence[int],
    size: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Coordinate maps ``(3, *size)`` of the patch at ``start``, in whole-image coordinates."""
    return crop_patch(coordinate_maps(image_shape, dtype=dtype, device=device), start, size)


def one_hot_labels(seg: torch.Tensor, n_labels: int, dim: int = 1, dtype=torch.float32) -> torch.Tensor:
    """One-hot encode an integer label-index map (values ``0..n_labels-1``), inserting the label
    axis at ``dim`` (e.g. ``(B, N, X, Y, Z) -> (B, N, L, X, Y, Z)`` with ``dim=2``)."""
    seg = seg.long()
    if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= n_labels):
        raise ValueError(f"label indices must lie in [0, {n_labels - 1}]")
    oh = F.one_hot(seg, n_labels).to(dtype)  # label axis last
    return oh.movedim(-1, dim if dim >= 0 else oh.ndim + dim)


def label_mask(
    atlas_onehot: torch.Tensor,
    threshold: float = 0.2,
    kernel_size: int = 3,
    mask_background: bool = False,
) -> torch.Tensor:
    """Label mask ``(B, L, X, Y, Z)`` from atlas one-hot maps ``(B, N, L, X, Y, Z)``.

    ``union[l] = any_j onehot_j[l] >= 0.5``; ``mask[l] = 1`` where the ``kernel_size³`` mean of
    ``union[l]`` is ``>= threshold``, computed exactly as an integer count
    ``count >= threshold * kernel_size³``. Zero padding (``count_include_pad=True``): voxels
    outside the tensor count as not carrying the label. Channel 0 (background) is all ones unless
    ``mask_background``. Returns the dtype of ``atlas_onehot`` (float) with values 0/1.
    """
    if atlas_onehot.ndim != 6:
        raise ValueError(f"atlas_onehot must be (B, N, L, X, Y, Z), got shape {tuple(atlas_onehot.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    dtype = atlas_onehot.dtype if atlas_onehot.is_floating_point() else torch.float32
    union = (atlas_onehot >= 0.5).any(dim=1).to(torch.float32)
    k3 = kernel_size**3
    mean = F.avg_pool3d(union, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    counts = torch.round(mean * k3)
    mask = counts >= threshold * k3 - 1e-6
    if not mask_background:
        mask[:, 0] = True
    return mask.to(dtype)


def fuse(weights: torch.Tensor, atlas_onehot: torch.Tensor) -> torch.Tensor:
    """Weighted vote: ``mean_j weights[:, j] * atlas_onehot[:, j]`` -> ``(B, L, X, Y, Z)``.

    The mean over atlases is *not* normalised by the sum of the weights (Xie et al.)."""
    if weights.shape != atlas_onehot.shape:
        raise ValueError(
            f"weights {tuple(weights.shape)} and atlas_onehot {tuple(atlas_onehot.shape)} must match"
        )
    if weights.ndim < 3:
        raise ValueError("expected (B, N, L, ...) tensors")
    return (weights * atlas_onehot).mean(dim=1)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _downsample_target(target: torch.Tensor, out_shape: Sequence[int], mode: str) -> torch.Tensor:
    full = tuple(target.shape[2:])
    out_shape = tuple(out_shape)
    if full == out_shape:
        return target
    factors = []
    for f, o in zip(full, out_shape):
        if o < 1 or f % o:
            raise ValueError(f"output size {out_shape} does not divide target size {full}")
        factors.append(f // o)
    if mode == "nearest":
        return target[..., :: factors[0], :: factors[1], :: factors[2]]
    if mode == "max":
        return F.max_pool3d(target, factors)
    if mode == "avg":
        return F.avg_pool3d(target, factors)
    raise ValueError(f"unknown downsampling mode {mode!r} (nearest, max, avg)")


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor],
    target_onehot: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weights: Sequence[float] = (0.1, 0.2, 0.5, 1.0),
    mode: str = "nearest",
) -> torch.Tensor:
    """``sum_k weights[k] * loss_fn(outputs[k], downsample(target_onehot))`` (not normalised).

    ``outputs`` are probabilities ordered coarse → fine (``DeepLabelFusion(...)["deep_supervision"]``),
    so ``loss_fn`` must not apply an activation (e.g. ``GeneralizedDiceLoss(sigmoid=False)``).
    The ``(B, L, X, Y, Z)`` one-hot target is brought to each output's size by integer factors:
    ``"nearest"`` (strided subsampling, stays one-hot; default), ``"max"`` (max-pool: a label
    present anywhere in the block) or ``"avg"`` (fractional occupancy).
    """
    if len(outputs) != len(weights):
        raise ValueError(f"{len(outputs)} outputs but {len(weights)} weights")
    if target_onehot.ndim != 5:
        raise ValueError("target_onehot must be (B, L, X, Y, Z)")
    total = None
    for out, w in zip(outputs, weights):
        if out.shape[:2] != target_onehot.shape[:2]:
            raise ValueError(f"output {tuple(out.shape)} and target {tuple(target_onehot.shape)} disagree")
        tgt = _downsample_target(target_onehot.to(out.dtype), out.shape[2:], mode)
        term = float(w) * loss_fn(out, tgt)
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class DeepLabelFusion(nn.Module):
    """Deep Label Fusion: weighted-voting subnet + fusion + fine-tuning subnet + label masking.

    ``forward(target (B,M,X,Y,Z), atlas_images (B,N,M,X,Y,Z), atlas_onehot (B,N,L,X,Y,Z),
    coords (B or 1,3,X,Y,Z))`` returns a dict:

    * ``"output"`` ``(B, L, X, Y, Z)``: final probabilities, label-masked;
    * ``"deep_supervision"``: ``len(ft_channels)`` tensors coarse → fine (sizes ``X/8 … X`` for
      4 levels), sigmoid-ed; the last one *is* ``"output"`` (masked), the others are unmasked;
    * ``"initial"`` ``(B, L, X, Y, Z)``: the weighted-voting fusion (mean over atlases);
    * ``"mask"`` ``(B, L, X, Y, Z)`` or ``None`` when masking is off.

    Any number of atlases ``N >= 1`` works. ``atlas_batch`` bounds the number of atlases the WV
    subnet sees at once; ``mask`` overrides the patch-level label mask (e.g. one computed on the
    whole image with :func:`label_mask` and cropped with :func:`crop_patch`).
    """

    def __init__(self, config: DLFConfig):
        super().__init__()
        if isinstance(config, dict):
            config = DLFConfig.from_dict(config)
        self.config = config
        L, M = config.n_labels, config.n_modalities
        n_wv = len(config.wv_channels)
        self.wv_net = DynUNet(
            spatial_dims=3,
            in_channels=2 * M + 3,
            out_channels=L,
            kernel_size=[3] * n_wv,
            strides=[1] + [2] * (n_wv - 1),
            upsample_kernel_size=[2] * (n_wv - 1),
            filters=list(config.wv_channels),
            dropout=config.dropout,
            norm_name=DEFAULT_NORM,
            act_name=DEFAULT_ACT,
            deep_supervision=False,
            res_block=config.res_block,
        )
        self.ft_net = DeepSupervisionUNet(
            spatial_dims=3,
            in_channels=L + 3,
            out_channels=L,
            channels=config.ft_channels,
            norm_name=DEFAULT_NORM,
            act_name=DEFAULT_ACT,
            dropout=config.dropout,
            res_block=config.res_block,
        )
        if config.zero_init_heads:
            for head in (self.wv_net.output_block, *self.ft_net.heads):
                for param in head.parameters():
                    nn.init.zeros_(param)
        self.vote_gain = nn.Parameter(torch.tensor(float(config.vote_gain)))
        self.vote_offset = nn.Parameter(torch.tensor(float(config.vote_offset)))

    # ---- input checks ------------------------------------------------------------------
    def _check_inputs(self, target, atlas_images, atlas_onehot, coords) -> torch.Tensor:
        cfg = self.config
        if target.ndim != 5:
            raise ValueError(f"target must be (B, M, X, Y, Z), got {tuple(target.shape)}")
        B, M = target.shape[:2]
        spatial = tuple(target.shape[2:])
        if M != cfg.n_modalities:
            raise ValueError(f"target has {M} modalities, config expects {cfg.n_modalities}")
        if atlas_images.ndim != 6 or atlas_images.shape[0] != B or atlas_images.shape[2] != M \
                or tuple(atlas_images.shape[3:]) != spatial:
            raise ValueError(
                f"atlas_images must be (B={B}, N, M={M}, {spatial}), got {tuple(atlas_images.shape)}"
            )
        N = atlas_images.shape[1]
        if N < 1:
            raise ValueError("at least one atlas is needed")
        expected = (B, N, cfg.n_labels, *spatial)
        if tuple(atlas_onehot.shape) != expected:
            raise ValueError(f"atlas_onehot must be {expected}, got {tuple(atlas_onehot.shape)}")
        if coords.ndim != 5 or coords.shape[1] != 3 or tuple(coords.shape[2:]) != spatial \
                or coords.shape[0] not in (1, B):
            raise ValueError(f"coords must be (B or 1, 3, {spatial}), got {tuple(coords.shape)}")
        check_patch_size(spatial, cfg.size_divisor)
        return coords.expand(B, *coords.shape[1:])

    # ---- weighted voting ---------------------------------------------------------------
    def weight_maps(self, target: torch.Tensor, atlas_images: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Sigmoid weight maps ``W`` ``(B, N, L, X, Y, Z)`` of the WV subnet, one pass per pair."""
        B, N = atlas_images.shape[:2]
        spatial = tuple(target.shape[2:])
        coords = coords.expand(B, *coords.shape[1:])
        t = target.unsqueeze(1).expand(B, N, *target.shape[1:])
        c = coords.unsqueeze(1).expand(B, N, *coords.shape[1:])
        x = torch.cat([t, atlas_images, c], dim=2).reshape(B * N, -1, *spatial)
        w = torch.sigmoid(self.wv_net(x))
        return w.reshape(B, N, self.config.n_labels, *spatial)

    def weighted_vote(
        self,
        target: torch.Tensor,
        atlas_images: torch.Tensor,
        atlas_onehot: torch.Tensor,
        coords: torch.Tensor,
        atlas_batch: int | None = None,
    ) -> torch.Tensor:
        """Initial segmentation ``(B, L, X, Y, Z)`` = ``fuse(W, atlas_onehot)``, running the WV
        subnet on at most ``atlas_batch`` atlases at a time (``None``: all at once) and
        accumulating the sum of votes; memory is bounded by the chunk under ``torch.no_grad()``."""
        coords = self._check_inputs(target, atlas_images, atlas_onehot, coords)
        N = atlas_images.shape[1]
        if atlas_batch is None or atlas_batch >= N:
            return fuse(self.weight_maps(target, atlas_images, coords), atlas_onehot)
        if atlas_batch < 1:
            raise ValueError(f"atlas_batch must be >= 1, got {atlas_batch}")
        total = None
        for start in range(0, N, atlas_batch):
            sl = slice(start, min(start + atlas_batch, N))
            w = self.weight_maps(target, atlas_images[:, sl], coords)
            votes = fuse(w, atlas_onehot[:, sl]) * (sl.stop - sl.start)  # the chunk's sum of votes
            total = votes if total is None else total + votes
        return total / N

    # ---- full model --------------------------------------------------------------------
    def forward(
        self,
        target: torch.Tensor,
        atlas_images: torch.Tensor,
        atlas_onehot: torch.Tensor,
        coords: torch.Tensor,
        *,
        atlas_batch: int | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict:
        cfg = self.config
        initial = self.weighted_vote(target, atlas_images, atlas_onehot, coords, atlas_batch)
        coords = coords.expand(target.shape[0], *coords.shape[1:])
        logits = self.ft_net(torch.cat([initial, coords], dim=1))

        spatial = tuple(initial.shape[2:])
        deep = []
        for lg in logits:
            factors = [s // o for s, o in zip(spatial, lg.shape[2:])]
            base = initial if all(f == 1 for f in factors) else F.avg_pool3d(initial, factors)
            deep.append(torch.sigmoid(lg + self.vote_gain * base + self.vote_offset))

        if mask is None and cfg.use_label_mask:
            mask = label_mask(atlas_onehot, cfg.mask_threshold, cfg.mask_kernel, cfg.mask_background)
        if mask is not None:
            if mask.shape[1:] != initial.shape[1:] or mask.shape[0] not in (1, initial.shape[0]):
                raise ValueError(f"mask must be (B, L, {spatial}), got {tuple(mask.shape)}")
            deep[-1] = deep[-1] * mask.to(deep[-1].dtype)
        return {"output": deep[-1], "deep_supervision": deep, "initial": initial, "mask": mask}
