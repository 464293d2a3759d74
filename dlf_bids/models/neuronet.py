"""NeuroNet (Rajchl et al., MIDL 2018): one shared residual encoder, one thin decoder per protocol.

Implemented from the description in ``notes/methods.md``:

* **Input**: the raw T1w (optionally + T2w, channel order ``T1w, T2w``), no skull stripping or
  bias correction, z-scored over the whole volume per channel (:func:`zscore_volume`).
* **Encoder** (shared by every protocol): a 3×3×3 stem conv to ``stem_channels``, then one scale
  per entry of ``widths``/``strides``: a strided 3×3×3 conv when the scale changes the width or
  the resolution, then ``units_per_scale`` pre-activation residual units (MONAI SegResNet
  ``ResBlock``: norm → act → conv → norm → act → conv + identity). MONAI's ``ResidualUnit`` is
  post-activation (conv → norm → act), the paper's units are pre-activation, hence ``ResBlock``.
* **Decoders**, one per protocol: from the deepest scale up, trilinear upsampling, concatenation
  with the encoder features of that scale and one 3×3×3 conv + norm + act (MONAI
  ``Convolution``) at the scale's width; a 1×1×1 conv gives the protocol's logits. One conv per
  scale keeps the decoders thin, so most parameters sit in the shared encoder.
* **Normalisation layers**: batch norm (``norm="batch"``, the paper's). Instance norm
  (``"instance"``) re-normalises every crop, so a crop holding one bright structure looks the same
  whatever its brightness, while brightness is what tells tissues apart after the whole-volume
  z-score: on the blob phantoms of ``tests/test_neuronet.py`` (120 iterations, 2 seeds) held-out
  Dice was 0.52-0.79 with instance norm against 0.75-0.96 with batch norm. At inference batch norm
  uses its running averages, so a window's output does not depend on what else the window holds.

:func:`predict_volume` runs MONAI ``sliding_window_inference`` (default 128³ windows, overlap 0.5
= stride 64) with every protocol's softmax averaged over the windows, on the input's grid.

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.blocks import Convolution, UpSample
from monai.networks.blocks.segresnet_block import ResBlock
from torch import nn

from .config_dict import DictConfig

from .inference import resolve_device

__all__ = [
    "NORMALISATION",
    "NeuroNet",
    "NeuroNetConfig",
    "NeuroNetPrediction",
    "predict_volume",
    "zscore_volume",
]

#: The input normalisation stored in model files: per channel z-score over every voxel.
NORMALISATION = "volume-zscore"
_NORMS = {"instance": ("INSTANCE", {"affine": True}), "batch": ("BATCH", {})}
_ACT = ("RELU", {"inplace": True})


@dataclass
class NeuroNetConfig(DictConfig):
    """Hyper-parameters of :class:`NeuroNet` (JSON-serialisable via :meth:`to_dict`).

    ``protocol_classes``: protocol name → number of classes, background included, in decoder
    order. Defaults are the paper's encoder (stem 16; scales 16/32/64/128, strides 1/2/2/2, two
    residual units each) and 128³ crops."""

    protocol_classes: dict[str, int]
    in_channels: int = 1
    stem_channels: int = 16
    widths: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    units_per_scale: int = 2
    crop_size: tuple[int, int, int] = (128, 128, 128)
    norm: str = "batch"

    def __post_init__(self):
        self.protocol_classes = {str(k): int(v) for k, v in dict(self.protocol_classes).items()}
        self.widths = tuple(int(w) for w in self.widths)
        self.strides = tuple(int(s) for s in self.strides)
        self.crop_size = tuple(int(c) for c in self.crop_size)
        if not self.protocol_classes:
            raise ValueError("a NeuroNet needs at least one protocol")
        bad = {k: v for k, v in self.protocol_classes.items() if v < 2 or not k.isalnum()}
        if bad:
            raise ValueError(f"protocols need an alphanumeric name and >= 2 classes, got {bad}")
        if self.in_channels not in (1, 2):
            raise ValueError(f"in_channels must be 1 (T1w) or 2 (T1w, T2w), got {self.in_channels}")
        if len(self.widths) < 1 or len(self.widths) != len(self.strides):
            raise ValueError(f"widths {self.widths} and strides {self.strides} need the same length")
        if any(w < 1 for w in (*self.widths, self.stem_channels)) or any(s not in (1, 2) for s in self.strides):
            raise ValueError("widths must be positive and strides 1 or 2")
        if self.units_per_scale < 1:
            raise ValueError(f"units_per_scale must be >= 1, got {self.units_per_scale}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {', '.join(_NORMS)}, got {self.norm!r}")
        if len(self.crop_size) != 3 or any(c < 1 or c % self.size_divisor for c in self.crop_size):
            raise ValueError(f"crop_size {self.crop_size} must be 3 multiples of {self.size_divisor}")

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this so down- and upsampling round-trip exactly."""
        return math.prod(self.strides)


class _Decoder(nn.Module):
    """Thin FCN decoder: per scale, upsample + concatenate the skip + one conv; 1×1×1 logits."""

    def __init__(self, cfg: NeuroNetConfig, n_classes: int):
        super().__init__()
        norm = _NORMS[cfg.norm]
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        channels = cfg.widths[-1]
        for level in range(len(cfg.widths) - 2, -1, -1):
            factor = cfg.strides[level + 1]
            # nontrainable trilinear upsampling, as in the paper's upsample-and-concatenate
            self.ups.append(nn.Identity() if factor == 1 else UpSample(
                3, scale_factor=factor, mode="nontrainable", interp_mode="trilinear", align_corners=False))
            self.convs.append(Convolution(3, channels + cfg.widths[level], cfg.widths[level],
                                          kernel_size=3, norm=norm, act=_ACT, adn_ordering="NA"))
            channels = cfg.widths[level]
        self.head = Convolution(3, channels, n_classes, kernel_size=1, conv_only=True)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, conv, skip in zip(self.ups, self.convs, reversed(features[:-1])):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class NeuroNet(nn.Module):
    """Shared residual encoder + one decoder per protocol; ``forward(x)`` returns
    ``{protocol: logits (B, classes, *spatial)}`` in ``config.protocol_classes`` order."""

    def __init__(self, config: NeuroNetConfig):
        super().__init__()
        if isinstance(config, dict):
            config = NeuroNetConfig.from_dict(config)
        self.config = config
        norm = _NORMS[config.norm]
        self.stem = Convolution(3, config.in_channels, config.stem_channels, kernel_size=3, conv_only=True)
        self.scales = nn.ModuleList()
        channels = config.stem_channels
        for width, stride in zip(config.widths, config.strides):
            layers: list[nn.Module] = []
            if stride != 1 or width != channels:
                layers.append(Convolution(3, channels, width, strides=stride, kernel_size=3, conv_only=True))
            layers += [ResBlock(3, width, norm=norm, act=_ACT) for _ in range(config.units_per_scale)]
            self.scales.append(nn.Sequential(*layers))
            channels = width
        self.decoders = nn.ModuleDict({name: _Decoder(config, n) for name, n in config.protocol_classes.items()})

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of every scale, finest first."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"input must be (B, {self.config.in_channels}, X, Y, Z), got {tuple(x.shape)}")
        div = self.config.size_divisor
        if any(s % div for s in x.shape[2:]):
            raise ValueError(f"every spatial size must be a multiple of {div}, got {tuple(x.shape[2:])}")
        feats = []
        x = self.stem(x)
        for scale in self.scales:
            x = scale(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encode(x)
        return {name: dec(feats) for name, dec in self.decoders.items()}


def zscore_volume(image, eps: float = 1e-6) -> np.ndarray:
    """Per channel z-score over the whole volume (every voxel, air included, as the paper does on
    raw whole-head T1s): ``(C, X, Y, Z)`` float32; a constant channel is only centred."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"expected (C, X, Y, Z), got shape {arr.shape}")
    mean = arr.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = arr.std(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
    std = np.where(std > eps, std, 1.0)
    return ((arr - mean) / std).astype(np.float32)


@dataclass
class NeuroNetPrediction:
    probabilities: np.ndarray  # (classes, X, Y, Z) float32, channel 0 = background
    labels: np.ndarray  # (X, Y, Z) int16: label values when channel_values were given, else channels


def predict_volume(
    model: NeuroNet,
    image,
    *,
    channel_values: dict[str, Sequence[int]] | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    device="cpu",
    progress: bool = False,
) -> dict[str, NeuroNetPrediction]:
    """Segment a raw image ``(C, X, Y, Z)`` (or ``(X, Y, Z)`` for one channel) with every decoder.

    The image is z-scored (:func:`zscore_volume`), then MONAI ``sliding_window_inference`` walks
    it with ``roi_size`` windows (default: the model's crop size) and ``overlap`` (0.5 = the
    paper's stride of half a window), averaging each protocol's softmax; an image smaller than a
    window is padded with 0 (the mean, after the z-score) and cropped back. ``channel_values``
    (protocol → label value per channel) turns the argmax into label values. ``device``: ``"cpu"``,
    ``"cuda[:N]"`` or ``"auto"``; the probabilities are accumulated on the CPU either way."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    roi = tuple(int(r) for r in (roi_size or model.config.crop_size))
    device = resolve_device(device)
    model = model.to(device).eval()

    def predictor(window: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.softmax(v, dim=1) for k, v in model(window).items()}

    inputs = torch.from_numpy(zscore_volume(arr)).unsqueeze(0)
    with torch.inference_mode():
        probs = sliding_window_inference(inputs, roi, sw_batch_size, predictor, overlap=overlap,
                                         mode="constant", sw_device=device,
                                         device=torch.device("cpu"), progress=progress)
    out = {}
    for name in model.config.protocol_classes:  # decoder order (MONAI returns the dict reordered)
        p = probs[name][0]
        arg = p.argmax(dim=0).numpy()
        if channel_values is not None:
            arg = np.asarray(channel_values[name], dtype=np.int64)[arg]
        out[name] = NeuroNetPrediction(probabilities=p.numpy(), labels=arg.astype(np.int16))
    return out
