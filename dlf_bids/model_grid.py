"""The grid a voxel network works on, and the way back to an image's native grid.

A network sees voxels, not millimetres: it must meet images in the orientation and at the voxel
size it was trained on. Training and inference therefore both resample an image onto a
RAS-aligned grid of the model's voxel size covering it (:func:`to_model_grid`), and inference
brings each output channel back onto the native grid (:func:`to_native`) before the argmax.

* When flipping and permuting axes is enough (the native grid is that grid in another voxel
  order, e.g. FreeSurfer's LIA at the model's voxel size) both ways are exact.
* When the native grid is axis-aligned after such a reordering (any non-oblique image, e.g. a
  1 mm T1w under a 2 mm model), the way back is trilinear interpolation done one axis at a time
  (:func:`_separable_upsample`): the same numbers as interpolating in 3-D, at a fraction of the
  cost, which matters with dozens of channels on a 256³ grid.
* Otherwise (oblique images) it is nibabel's ``resample_to_output`` there and per-channel linear
  interpolation back.

Outside the model grid the way back assumes the background: channel 0 is 1 and every other
channel 0, as if the grid were padded with background (a convex combination either way, so
channels summing to 1 still do).
"""

from __future__ import annotations

import nibabel as nb
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from nibabel.processing import resample_from_to, resample_to_output


#: channels interpolated together on the way back (memory: their padded copy and temporaries)
CHANNEL_CHUNK = 8


def spacing(img) -> np.ndarray:
    """Voxel size (mm) of each axis, from the affine."""
    return np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))


def _ras_diagonal(affine) -> np.ndarray | None:
    """The voxel size when the affine's axes are already RAS-aligned (else None)."""
    aff = np.asarray(affine)[:3, :3]
    diag = np.diag(aff)
    if np.allclose(aff - np.diag(diag), 0, atol=1e-4) and (diag > 0).all():
        return diag
    return None


def _canonical_affine(img) -> np.ndarray:
    """The affine of ``img`` with its axes flipped and permuted to the closest RAS order (what
    ``as_closest_canonical`` gives, from the header alone)."""
    return img.affine @ inv_ornt_aff(io_orientation(img.affine), img.shape[:3])


def on_model_grid(img, voxel_size) -> bool:
    size = _ras_diagonal(img.affine)
    return size is not None and np.allclose(size, voxel_size, rtol=0.01)


def reorients_onto_model_grid(img, voxel_size) -> bool:
    """Whether flipping and permuting the axes puts ``img`` on the model grid."""
    return on_model_grid(nb.Nifti1Image(np.zeros((1, 1, 1), np.uint8), _canonical_affine(img)),
                         voxel_size)


def model_grid_shape(img, voxel_size) -> tuple[int, int, int]:
    """The shape :func:`to_model_grid` gives, from the header alone."""
    from nibabel.processing import vox2out_vox

    if reorients_onto_model_grid(img, voxel_size):
        order = io_orientation(img.affine)[:, 0].argsort()
        return tuple(int(img.shape[int(a)]) for a in order)
    return tuple(int(n) for n in vox2out_vox((img.shape[:3], img.affine),
                                             tuple(float(v) for v in voxel_size))[0])


def to_model_grid(img, voxel_size, order: int = 1):
    """``img`` (3D) on the RAS grid of ``voxel_size`` (mm) covering it: by flipping and permuting
    its axes when that is enough (exact, no interpolation), else resampled (``order=1`` for
    images, ``order=0`` for label maps)."""
    data = np.asanyarray(img.dataobj)
    # float for interpolation (an int16 image would be truncated); labels keep their integers
    img = nb.Nifti1Image(data.astype(np.float32) if order else data, img.affine)
    if reorients_onto_model_grid(img, voxel_size):
        return nb.as_closest_canonical(img)
    return resample_to_output(img, voxel_sizes=tuple(float(v) for v in voxel_size), order=order,
                              mode="constant", cval=0.0)


def to_native(probs: np.ndarray, model_img, native) -> np.ndarray:
    """(C, ...) channels on the model grid (``model_img``'s) -> (C, native shape), channel 0 the
    background (see the module docstring; :func:`argmax_on_native` when only the argmax and a
    few channels are needed: it never holds every channel on the native grid)."""
    labels, kept = argmax_on_native(probs, model_img, native, keep=range(len(probs)))
    return kept


def argmax_on_native(probs: np.ndarray, model_img, native, keep=()) -> tuple[np.ndarray, np.ndarray]:
    """The channel argmax of ``probs`` (C, model grid) taken on the native grid (int16, native
    shape) and the channels ``keep`` there (K, native shape; float32)."""
    keep = list(keep)
    model_to_native = ornt_transform(io_orientation(model_img.affine), io_orientation(native.affine))
    if reorients_onto_model_grid(native, spacing(model_img)):
        canonical = probs
    else:
        coords = _axis_coordinates(model_img, native)
        if coords is None:  # oblique: resampled channel by channel, in full
            return _argmax_resampled(probs, model_img, native, keep)
        shape = tuple(len(c) for c in coords)
        labels, best = np.zeros(shape, np.int16), np.full(shape, -np.inf, np.float32)
        kept = np.empty((len(keep), *shape), np.float32)
        # a few channels at a time: the interpolation's temporaries stay a fraction of the
        # probabilities (all 50 channels of a 1 mm grid padded were gigabytes)
        for start in range(0, len(probs), CHANNEL_CHUNK):
            stop = min(start + CHANNEL_CHUNK, len(probs))
            for first, channels in _separable_upsample(probs[start:stop], coords, background=start == 0):
                rows = slice(first, first + channels.shape[1])
                _running_argmax(channels, start, best[rows], labels[rows])
                for k, c in enumerate(keep):
                    if start <= c < stop:
                        kept[k, rows] = channels[c - start].numpy()
        return (apply_orientation(labels, model_to_native),
                np.stack([apply_orientation(c, model_to_native) for c in kept]) if keep
                else kept.reshape(0, *native.shape[:3]))
    labels = np.argmax(canonical, axis=0).astype(np.int16)
    return (apply_orientation(labels, model_to_native),
            np.stack([apply_orientation(canonical[c], model_to_native) for c in keep]) if keep
            else np.empty((0, *native.shape[:3]), np.float32))


def _running_argmax(channels, offset: int, best: np.ndarray, labels: np.ndarray) -> None:
    """Fold the (C, ...) tensor ``channels`` (numbered from ``offset``) into the running maximum
    ``best`` and its channel ``labels`` (arrays, updated in place): the first channel wins ties,
    as argmax; channel by channel is also ~3x faster than an argmax over the outermost axis."""
    import torch

    best_t, labels_t = torch.from_numpy(best), torch.from_numpy(labels)
    for c in range(channels.shape[0]):
        labels_t.masked_fill_(channels[c] > best_t, offset + c)
        torch.maximum(best_t, channels[c], out=best_t)


def _axis_coordinates(model_img, native):
    """Per canonical axis of ``native``, its voxels' continuous voxel coordinates on the model
    grid, when both grids are axis-aligned (else None)."""
    canonical = _canonical_affine(native)
    if _ras_diagonal(canonical) is None or _ras_diagonal(model_img.affine) is None:
        return None
    order = io_orientation(native.affine)[:, 0].argsort()
    shape = [int(native.shape[int(a)]) for a in order]
    return [(canonical[a, 3] + np.arange(n) * canonical[a, a] - model_img.affine[a, 3])
            / model_img.affine[a, a] for a, n in enumerate(shape)]


def _argmax_resampled(probs, model_img, native, keep):
    out = np.empty((probs.shape[0], *native.shape[:3]), np.float32)
    ref = (native.shape[:3], native.affine)
    for c, channel in enumerate(probs):
        moved = resample_from_to(nb.Nifti1Image(channel, model_img.affine), ref, order=1,
                                 mode="constant", cval=1.0 if c == 0 else 0.0)
        out[c] = np.asanyarray(moved.dataobj)
    return np.argmax(out, axis=0).astype(np.int16), out[keep]


def _separable_upsample(probs: np.ndarray, coords, slab: int = 16, background: bool = True):
    """Trilinear interpolation of (C, X, Y, Z) at the outer product of per-axis coordinates
    ``coords`` (input voxel units), one axis at a time (torch: multi-threaded), yielded as
    ``(first index, (C, slab, Y', Z') tensor)`` slabs along the first axis so the whole output
    is never held; outside the grid, background (channel 0 = 1 when ``background``, others 0)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32))
    # one voxel of background around the grid, so constant-mode interpolation is plain lerp
    x = torch.nn.functional.pad(x, (1, 1, 1, 1, 1, 1))
    if background:
        x[0, 0], x[0, -1], x[0, :, 0], x[0, :, -1], x[0, :, :, 0], x[0, :, :, -1] = 1, 1, 1, 1, 1, 1
    padded = [np.asarray(c, np.float64) + 1.0 for c in coords]
    factors = _integer_factors(padded, x.shape[1:])
    if factors is not None:
        yield from _upsample_by_factors(x, padded, factors, slab)
        return
    steps = []
    for axis, c in enumerate(padded, start=1):
        n = x.shape[axis]
        c = np.clip(c, 0.0, n - 1.0)
        low = np.minimum(np.floor(c), n - 2).astype(np.int64)
        steps.append((low, (c - low).astype(np.float32)))

    def lerp(t, axis, low, weight):
        shape = [1] * t.ndim
        shape[axis] = len(low)
        index = torch.from_numpy(low)
        return torch.lerp(t.index_select(axis, index), t.index_select(axis, index + 1),
                          torch.from_numpy(weight).reshape(shape))

    with torch.inference_mode():
        # the last axis first, on the whole (small) model grid: along it a gather moves single
        # values, along the others whole rows, so the slabs below only move rows
        x = lerp(x, 3, *steps[2])
        for first in range(0, len(steps[0][0]), slab):
            low, weight = steps[0][0][first:first + slab], steps[0][1][first:first + slab]
            part = lerp(x[:, low.min():low.max() + 2], 1, low - low.min(), weight)
            yield first, lerp(part, 2, *steps[1])


def _integer_factors(coords, shape) -> list[int] | None:
    """Per axis, the upsampling factor k when the coordinates are ``o + i / k`` with ``o`` and
    ``k`` integers, all inside the grid of ``shape`` (a 1 mm image under a 2 mm model: the model
    grid starts at the image's first voxel); else None."""
    factors = []
    for c, n in zip(coords, shape):
        if len(c) < 2 or c[0] < 0 or c[-1] > n - 1 or abs(c[0] - round(c[0])) > 1e-4:
            return None
        k = round(1.0 / (c[1] - c[0])) if c[1] > c[0] else 0
        if k < 1 or not np.allclose(c, round(c[0]) + np.arange(len(c)) / k, atol=1e-4):
            return None
        factors.append(int(k))
    return factors


def _upsample_by_factors(x, coords, factors, slab: int):
    """:func:`_separable_upsample` for integer factors: torch's trilinear ``interpolate`` with
    ``align_corners=True`` samples input ``i * (n - 1) / (m - 1)``, which is ``i / k`` when a
    crop of ``n`` voxels starting at ``o`` goes to ``m = k (n - 1) + 1``: the same weights as
    interpolating axis by axis, computed by one vectorised kernel, slab by slab."""
    import torch

    origins = [int(round(c[0])) for c in coords]
    x = x[:, origins[0]:, origins[1]:, origins[2]:]
    n0, n1, n2 = (len(c) for c in coords)
    k0, k1, k2 = factors
    step = k0 * -(-slab // k0)
    with torch.inference_mode():
        for first in range(0, n0, step):
            part = x[:, first // k0:(first + step) // k0 + 1]
            size = [k0 * (part.shape[1] - 1) + 1, k1 * (x.shape[2] - 1) + 1, k2 * (x.shape[3] - 1) + 1]
            up = torch.nn.functional.interpolate(part[None], size=size, mode="trilinear",
                                                 align_corners=True)[0]
            yield first, up[:, :min(step, n0 - first), :n1, :n2]
