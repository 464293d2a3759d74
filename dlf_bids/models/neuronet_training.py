"""NeuroNet training on in-memory examples, and NeuroNet model files.

Training (:func:`train_neuronet`): every example is a raw image with one label map per protocol
(class values, e.g. from :meth:`~dlf_bids.models.protocols.Protocol.make_label_map`). Images are
z-scored over the whole volume once (:func:`~dlf_bids.models.neuronet.zscore_volume`, the
inference normalisation) and padded with 0 to at least the crop size (the placement and value
sliding-window inference pads with). Each iteration draws ``batch_size`` examples and a crop of
``config.crop_size`` in each: with probability ``foreground_ratio`` centred on a random labelled
voxel (any protocol's label > 0), otherwise uniformly random (the paper's random crops: on a
whole head most of such a crop is scalp, skull and air, which the network must learn too, but
then sees little brain per step). It applies ModAug on
two-channel inputs (DLF's :func:`~dlf_bids.models.training.modaug`: one channel replaced by unit
white noise, which is what a missing, z-scored modality is replaced by at inference), and
minimises the mean over protocols of cross-entropy (with ``class_weights="inverse-sqrt"``
weighted by :func:`class_weights`) + ``dice_weight`` × soft Dice (MONAI ``DiceLoss``) with
Adam. Everything random derives from ``seed``, so the same seed gives the same weights on CPU.

Model files (:func:`save_neuronet` / :func:`load_neuronet`): one ``torch.save`` of a plain dict
loaded with ``torch.load(weights_only=True)``, written atomically. Keys (``FORMAT_VERSION`` 1):
``format`` (:data:`FORMAT_NAME`), ``format_version``, ``config`` (:meth:`NeuroNetConfig.to_dict`,
crop size included), ``state_dict``, ``protocols`` (:meth:`Protocol.to_dict` each: name, classes
as LUT rows, label recipe; decoder order), ``modalities``, ``normalisation``, ``modaug``,
``train_settings`` (with the loss history), ``versions`` (dlf-bids, torch, MONAI), ``created``.

This module must stay free of nipype and of ``dlf_bids.interfaces`` / ``dlf_bids.workflows``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import monai
import numpy as np
import torch
from monai.losses import DiceLoss

from .. import __version__
from ..errors import BadDataError, UsageError
from ..utils.files import atomic_open
from .inference import centred_patch_start, labels_to_channels, pad_amounts, random_voxel, resolve_device
from .model_file import _first_line, _plain, check_header, load_weights, model_hash, read_payload
from .neuronet import NORMALISATION, NeuroNet, NeuroNetConfig, zscore_volume
from .progress import training_progress
from .protocols import Protocol
from .training import modaug

__all__ = [
    "CLASS_WEIGHTS",
    "FORMAT_NAME",
    "NeuroNetExample",
    "NeuroNetInfo",
    "NeuroNetTrainResult",
    "NeuroNetTrainSettings",
    "class_weights",
    "foreground_crop",
    "load_neuronet",
    "random_crop",
    "save_neuronet",
    "settings_dict",
    "train_neuronet",
]

FORMAT_NAME = "dlf-bids NeuroNet"
#: Ways to weight each protocol's classes in the loss (see :func:`class_weights`).
CLASS_WEIGHTS = ("none", "inverse-sqrt")
#: Newest NeuroNet model-file layout this version writes and reads.
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "config", "state_dict", "protocols", "modalities")


@dataclass
class NeuroNetExample:
    """A raw image ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) and ``{protocol: label map}`` (class values)."""

    image: np.ndarray
    labels: Mapping[str, np.ndarray]
    case_id: str = ""


@dataclass
class NeuroNetTrainSettings:
    iterations: int = 1000
    batch_size: int = 1
    lr: float = 1e-3  # the paper's Adam learning rate
    dice_weight: float = 0.0  # 0: the paper's cross-entropy only
    foreground_ratio: float = 0.5  # share of crops centred on a labelled voxel
    class_weights: str = "none"  # cross-entropy class weights: "none" or "inverse-sqrt" (of frequency)
    modaug: bool = True  # only acts on two-channel (T1w + T2w) inputs
    modaug_prob: float = 0.5
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("iterations", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"training setting {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.dice_weight < 0:
            raise UsageError("lr must be > 0 and dice_weight >= 0")
        for name in ("modaug_prob", "foreground_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise UsageError(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}")


@dataclass
class NeuroNetTrainResult:
    model: NeuroNet = field(repr=False)
    history: list[dict]  # per iteration: iteration, loss (mean over protocols), losses per protocol
    modaug: bool = False


@dataclass
class PreparedExample:
    """One example ready for cropping, everything padded to at least the crop size."""

    image: np.ndarray  # z-scored (C, X, Y, Z)
    labels: dict[str, np.ndarray]  # protocol -> channel index per voxel
    foreground: np.ndarray  # flat indices of the voxels any protocol labels


def prepare_example(example: NeuroNetExample, k: int, protocols: Sequence[Protocol], cfg: NeuroNetConfig) -> PreparedExample:
    """Check one example against the protocols and the network, z-score it and turn its label
    maps into channel indices (``k`` names it in errors when it has no ``case_id``)."""
    cid = example.case_id or f"example {k}"
    img = np.asarray(example.image, dtype=np.float32)
    if img.ndim == 3:
        img = img[None]
    if img.ndim != 4 or img.shape[0] != cfg.in_channels:
        raise BadDataError(f"{cid}: image must be ({cfg.in_channels}, X, Y, Z), got {img.shape}")
    if not np.all(np.isfinite(img)):
        raise BadDataError(f"{cid}: image contains NaN or infinite values")
    pads = pad_amounts(img.shape[1:], cfg.crop_size)
    labels = {}
    for p in protocols:
        if p.name not in example.labels:
            raise BadDataError(f"{cid}: no label map for protocol {p.name}")
        lab = np.asarray(example.labels[p.name])
        if lab.shape != img.shape[1:]:
            raise BadDataError(f"{cid}: {p.name} labels have shape {lab.shape}, the image {img.shape[1:]}")
        labels[p.name] = np.pad(labels_to_channels(lab, p.channel_values, f"{cid}: {p.name} labels"), pads)
    foreground = np.flatnonzero(np.logical_or.reduce([lab > 0 for lab in labels.values()]))
    return PreparedExample(np.pad(zscore_volume(img), [(0, 0), *pads]), labels, foreground)


def class_weights(channel_maps: Iterable[np.ndarray], n_classes: int) -> torch.Tensor:
    """Loss weight of each of a protocol's ``n_classes`` channels: ``1 / sqrt(frequency)`` over the
    voxels of its training label maps (channel indices, as prepared: padding to the crop size
    included; a class absent from all of them gets the rarest present class's weight), scaled so
    that the voxel-weighted mean is 1. The square root tempers plain inverse frequency, which
    would weigh a 0.01 % structure 10,000 times the background; on a whole head the ventricles
    (~0.1 % of the voxels) get ~30 times."""
    counts = sum(np.bincount(m.ravel(), minlength=n_classes) for m in channel_maps)
    freq = counts / counts.sum()
    weights = np.zeros(n_classes)
    weights[freq > 0] = freq[freq > 0] ** -0.5
    weights[freq == 0] = weights.max()
    return torch.tensor(weights / float((freq * weights).sum()), dtype=torch.float32)


def _loss(prepared: Sequence[PreparedExample], protocol: Protocol, s: NeuroNetTrainSettings, device):
    """``(logits, channel-index target (B, 1, ...)) -> loss`` of one protocol: cross-entropy (class
    weighted with ``class_weights="inverse-sqrt"``) + ``dice_weight`` × soft Dice. The weights go
    to the cross-entropy only: MONAI's ``DiceCELoss(weight=...)`` would also scale each class's
    Dice term by them, which lets the rare structures' Dice swamp the loss."""
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    weight = (class_weights((e.labels[protocol.name] for e in prepared), protocol.n_classes).to(device)
              if s.class_weights == "inverse-sqrt" else None)
    cross_entropy = torch.nn.CrossEntropyLoss(weight=weight)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = cross_entropy(logits, target[:, 0])
        return ce + s.dice_weight * dice(logits, target) if s.dice_weight else ce

    return loss


def random_crop(shape: Sequence[int], crop: Sequence[int], rng: np.random.Generator) -> tuple[slice, ...]:
    """Slices of a uniformly random ``crop`` inside ``shape`` (every size >= the crop's)."""
    starts = [int(rng.integers(0, n - c + 1)) for n, c in zip(shape, crop)]
    return tuple(slice(s, s + c) for s, c in zip(starts, crop))


def foreground_crop(shape: Sequence[int], crop: Sequence[int], foreground: np.ndarray,
                    rng: np.random.Generator) -> tuple[slice, ...]:
    """Slices of a ``crop`` centred on a random voxel of ``foreground`` (flat indices into
    ``shape``), moved inside ``shape`` where the centre is near an edge (DLF's patch placement;
    ``shape`` is already padded to at least the crop)."""
    starts = centred_patch_start(random_voxel(foreground, shape, rng), crop, shape)
    return tuple(slice(s, s + k) for s, k in zip(starts, crop))


def train_neuronet(
    examples: Sequence[NeuroNetExample],
    protocols: Sequence[Protocol],
    config: NeuroNetConfig,
    settings: NeuroNetTrainSettings,
    progress: bool = True,
) -> NeuroNetTrainResult:
    """Train a :class:`NeuroNet` (see the module docstring); the model is returned in eval mode.

    ``config.protocol_classes`` must list ``protocols`` in the same order with their class counts."""
    s = settings
    expected = {p.name: p.n_classes for p in protocols}
    if list(config.protocol_classes.items()) != list(expected.items()):
        raise UsageError(f"the network's protocols {config.protocol_classes} do not match {expected}")
    if not examples:
        raise UsageError("no training examples")
    prepared = [prepare_example(e, k, protocols, config) for k, e in enumerate(examples)]
    use_modaug = bool(s.modaug and config.in_channels == 2)
    device = resolve_device(s.device)
    rng = np.random.default_rng(s.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        model = NeuroNet(config).to(device)
    losses = {p.name: _loss(prepared, p, s, device) for p in protocols}
    optimiser = torch.optim.Adam(model.parameters(), lr=s.lr)

    history: list[dict] = []
    bar = training_progress(s.iterations, "NeuroNet training", "it", enabled=progress)
    model.train()
    try:
        for it in range(s.iterations):
            images, targets = [], {p.name: [] for p in protocols}
            for _ in range(s.batch_size):
                example = prepared[int(rng.integers(0, len(prepared)))]
                img, labels = example.image, example.labels
                if example.foreground.size and s.foreground_ratio and rng.random() < s.foreground_ratio:
                    region = foreground_crop(img.shape[1:], config.crop_size, example.foreground, rng)
                else:
                    region = random_crop(img.shape[1:], config.crop_size, rng)
                x = torch.from_numpy(np.ascontiguousarray(img[(slice(None), *region)]))
                if use_modaug:  # DLF's ModAug, on the image alone (no atlases here)
                    x, _, _ = modaug(x, x.new_empty((0, *x.shape)), rng, s.modaug_prob)
                images.append(x)
                for name in targets:
                    targets[name].append(torch.from_numpy(labels[name][region].astype(np.int64)))
            out = model(torch.stack(images).to(device))
            per = {name: fn(out[name], torch.stack(targets[name]).unsqueeze(1).to(device))
                   for name, fn in losses.items()}
            loss = torch.stack(list(per.values())).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            history.append({"iteration": it + 1, "loss": float(loss.detach()),
                            "losses": {k: float(v.detach()) for k, v in per.items()}})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
    finally:
        bar.close()
    model.eval()
    return NeuroNetTrainResult(model=model, history=history, modaug=use_modaug)


# --------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------
@dataclass
class NeuroNetInfo:
    format_version: int
    config: NeuroNetConfig
    protocols: list[Protocol]
    modalities: list[str]
    normalisation: str = NORMALISATION
    modaug: bool = False
    train_settings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    path: str | None = None
    sha256: str | None = None

    @property
    def channel_values(self) -> dict[str, np.ndarray]:
        """Protocol → label value of every output channel (for :func:`predict_volume`)."""
        return {p.name: p.channel_values for p in self.protocols}


def _check(config: NeuroNetConfig, protocols: Sequence[Protocol], modalities: Sequence[str]) -> None:
    expected = {p.name: p.n_classes for p in protocols}
    if list(config.protocol_classes.items()) != list(expected.items()):
        raise ValueError(f"the network's protocols {config.protocol_classes} do not match {expected}")
    if len(modalities) != config.in_channels:
        raise ValueError(f"{len(modalities)} modalities for a network of {config.in_channels} input channels")


def save_neuronet(path, model: NeuroNet, protocols: Sequence[Protocol], modalities: Sequence[str], *,
                  modaug: bool = False, train_settings: Mapping | None = None) -> Path:
    """Write a NeuroNet model file atomically; :class:`ValueError` when the protocols or the
    modalities do not match the network."""
    modalities = [str(m) for m in modalities]
    _check(model.config, protocols, modalities)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": _plain(model.config.to_dict()),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "protocols": [_plain(p.to_dict()) for p in protocols],
        "modalities": modalities,
        "normalisation": NORMALISATION,
        "modaug": bool(modaug),
        "train_settings": _plain(dict(train_settings or {})),
        # str(): torch.__version__ is a TorchVersion object, which weights_only loading refuses
        "versions": {"dlf_bids": str(__version__), "torch": str(torch.__version__), "monai": str(monai.__version__)},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, binary=True) as fh:
        torch.save(payload, fh)
    return path


def _read_info(payload, path: Path) -> NeuroNetInfo:
    where = f"model file {path}"
    version = check_header(payload, where, "dlf-bids NeuroNet", _REQUIRED, FORMAT_VERSION,
                           lambda payload: payload.get("format") == FORMAT_NAME)
    if payload.get("normalisation", NORMALISATION) != NORMALISATION:
        raise BadDataError(f"{where} uses normalisation {payload['normalisation']!r}; only {NORMALISATION!r}")
    try:
        config = NeuroNetConfig.from_dict(dict(payload["config"]))
        protocols = [Protocol.from_dict(p) for p in payload["protocols"]]
        modalities = [str(m) for m in payload["modalities"]]
        _check(config, protocols, modalities)
    except (TypeError, ValueError, KeyError, BadDataError) as exc:
        raise BadDataError(f"{where} has invalid metadata: {_first_line(exc)}") from None
    return NeuroNetInfo(format_version=version, config=config, protocols=protocols, modalities=modalities,
                        modaug=bool(payload.get("modaug", False)),
                        train_settings=dict(payload.get("train_settings") or {}),
                        versions=dict(payload.get("versions") or {}), created=str(payload.get("created", "")),
                        path=str(path))


def load_neuronet(path, device="cpu") -> tuple[NeuroNet, NeuroNetInfo]:
    """Load a NeuroNet model file: ``(NeuroNet in eval mode, NeuroNetInfo)``. One-line
    :class:`UsageError` (no such file) / :class:`BadDataError` (not a NeuroNet file, code in the
    pickle, a newer format, weights not matching the configuration)."""
    path = Path(path)
    payload = read_payload(path)
    info = _read_info(payload, path)
    model = NeuroNet(info.config)
    load_weights(model, payload["state_dict"], path)
    info.sha256 = model_hash(path)
    return model.to(device).eval(), info


def settings_dict(settings: NeuroNetTrainSettings, history: Sequence[dict]) -> dict:
    """Training settings + loss history for :func:`save_neuronet`'s ``train_settings``."""
    return {**dataclasses.asdict(settings), "history": list(history)}
