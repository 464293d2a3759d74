"""Tests of DeepAtlas's instance optimisation (dlf_bids.models.deepatlas_refine): the field
resampling it relies on, that it registers what the network leaves unregistered without folding,
that 0 steps is the network alone, and that it is deterministic. Tiny networks, 24³ phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlf_bids.models.deepatlas import DeepAtlas
from dlf_bids.models.deepatlas_inference import register
from dlf_bids.models.deepatlas_refine import _resize_field, refine_warp
from test_deepatlas import mean_dice, phantoms, tiny_config

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:monai.networks.blocks.Warp")


def test_resizing_a_field_keeps_its_displacement_in_millimetres():
    # 2 voxels of a 21-voxel axis span 2/20 of it: 1 voxel of the 11-voxel axis, and back
    field = torch.zeros(1, 3, 21, 16, 9)
    field[:, 0], field[:, 1], field[:, 2] = 2.0, -3.0, 0.5
    half = _resize_field(field, (11, 8, 5))
    assert torch.allclose(half[:, 0], torch.tensor(1.0)) and torch.allclose(half[:, 2], torch.tensor(0.25))
    assert torch.allclose(half[:, 1], torch.tensor(-3.0 * 7 / 15))
    assert torch.allclose(_resize_field(half, (21, 16, 9)), field, atol=1e-6)


def _shifted_pair():
    """A phantom and the same phantom moved by 2 voxels along two axes: what the untrained
    network (the identity) leaves unregistered."""
    (image, labels), = phantoms([3])
    shift = (2, -2, 0)
    return (image, labels), (np.roll(image, shift, axis=(0, 1, 2)), np.roll(labels, shift, axis=(0, 1, 2)))


def test_refinement_registers_a_shift_the_network_leaves():
    torch.manual_seed(0)
    model = DeepAtlas(tiny_config()).eval()  # untrained: the identity warp
    (m, m_lab), (t, t_lab) = _shifted_pair()
    alone = register(model, m, t, moving_labels=m_lab)
    refined = register(model, m, t, moving_labels=m_lab, refine_steps=25)
    assert not alone.ddf.any()
    before, after = mean_dice(alone.labels, t_lab), mean_dice(refined.labels, t_lab)
    assert after > before + 0.15, (before, after)
    # the warp moved the image towards the target (output x reads moving at x + u: u ~ -shift)
    inside = (slice(4, -4),) * 3
    assert refined.ddf[0][inside].mean() < -0.5 and refined.ddf[1][inside].mean() > 0.5
    assert refined.min_jacobian > 0 and refined.folded_fraction == 0  # scaling and squaring


def test_zero_steps_is_the_network_and_refinement_is_deterministic():
    torch.manual_seed(1)
    model = DeepAtlas(tiny_config()).eval()
    with torch.no_grad():  # a network that is not the identity
        model.registration.unet.output_block.conv.conv.weight.normal_(0, 0.05)
    (m, m_lab), (t, _) = _shifted_pair()
    net = register(model, m, t, moving_labels=m_lab)
    assert net.ddf.any()
    assert np.array_equal(register(model, m, t, refine_steps=0).ddf, net.ddf)
    a, b = (register(model, m, t, refine_steps=3) for _ in range(2))
    assert np.array_equal(a.ddf, b.ddf) and not np.array_equal(a.ddf, net.ddf)
    velocity = torch.zeros(1, 3, 24, 24, 24)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        refine_warp(model, torch.zeros(1, 1, 24, 24, 24), torch.zeros(1, 1, 24, 24, 24), velocity, steps=0)
