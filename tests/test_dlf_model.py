"""Tests of the Deep Label Fusion network (dlf_bids.models.dlf): shapes, gradients, fusion,
label masking, atlas chunking, coordinate maps, parameter count, determinism."""

from __future__ import annotations

import dataclasses

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlf_bids.models import (
    DeepLabelFusion,
    DLFConfig,
    check_patch_size,
    coordinate_maps,
    count_parameters,
    crop_patch,
    deep_supervision_loss,
    fuse,
    label_mask,
    one_hot_labels,
    patch_coordinates,
)

torch.set_num_threads(1)

SMALL_WV = (4, 8, 16)
SMALL_FT = (4, 8, 16, 32)


def small_config(n_labels=4, n_modalities=2, **kw) -> DLFConfig:
    return DLFConfig(n_labels=n_labels, n_modalities=n_modalities, wv_channels=SMALL_WV,
                     ft_channels=SMALL_FT, **kw)


def make_inputs(B=1, N=2, M=2, L=4, S=16, seed=0, seg=None):
    g = torch.Generator().manual_seed(seed)
    shape = (S, S, S) if isinstance(S, int) else tuple(S)
    target = torch.randn(B, M, *shape, generator=g)
    atlases = torch.randn(B, N, M, *shape, generator=g)
    if seg is None:
        seg = torch.randint(0, L, (B, N, *shape), generator=g)
    onehot = one_hot_labels(seg, L, dim=2)
    coords = coordinate_maps(shape).unsqueeze(0).expand(B, -1, -1, -1, -1)
    return target, atlases, onehot, coords


def reference_mask(union: np.ndarray, threshold: float) -> np.ndarray:
    """Brute-force 3x3x3 mean with zero padding (count_include_pad=True), then >= threshold."""
    padded = np.pad(union.astype(np.float64), 1)
    X, Y, Z = union.shape
    acc = np.zeros_like(union, dtype=np.float64)
    for dx, dy, dz in itertools.product(range(3), repeat=3):
        acc += padded[dx:dx + X, dy:dy + Y, dz:dz + Z]
    return (acc / 27.0 >= threshold).astype(np.float32)


# ---------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("S", [16, 24])
def test_output_shapes(M, N, S):
    L, B = 4, 2
    torch.manual_seed(0)
    model = DeepLabelFusion(small_config(n_labels=L, n_modalities=M))
    out = model(*make_inputs(B=B, N=N, M=M, L=L, S=S))
    assert out["output"].shape == (B, L, S, S, S)
    assert out["initial"].shape == (B, L, S, S, S)
    assert out["mask"].shape == (B, L, S, S, S)
    ds = out["deep_supervision"]
    assert [tuple(t.shape) for t in ds] == [(B, L, S // f, S // f, S // f) for f in (8, 4, 2, 1)]
    assert ds[-1] is out["output"]
    for t in ds:
        assert torch.all((t >= 0) & (t <= 1))
    # weights are sigmoids in (0, 1), one-hot sums to 1: initial is in [0, 1] and sums to <= 1
    assert torch.all(out["initial"] >= 0)
    assert torch.all(out["initial"].sum(1) <= 1 + 1e-6)


def test_anisotropic_patch_and_eval_mode():
    model = DeepLabelFusion(small_config()).eval()
    with torch.no_grad():
        out = model(*make_inputs(S=(16, 24, 32)))
    assert out["output"].shape == (1, 4, 16, 24, 32)
    assert [tuple(t.shape[2:]) for t in out["deep_supervision"]] == [
        (2, 3, 4), (4, 6, 8), (8, 12, 16), (16, 24, 32)]


@pytest.mark.parametrize("S", [(20, 20, 20), (16, 16, 12), (8, 8, 8), (17, 16, 16)])
def test_bad_patch_size_raises(S):
    model = DeepLabelFusion(small_config())
    with pytest.raises(ValueError, match="patch size"):
        model(*make_inputs(S=S))


def test_check_patch_size():
    check_patch_size((16, 24, 8))  # bottleneck 2x3x1 voxels: fine
    with pytest.raises(ValueError, match="multiple of 8"):
        check_patch_size((16, 16, 36))
    with pytest.raises(ValueError, match="too small"):
        check_patch_size((8, 8, 8))


def test_input_validation():
    model = DeepLabelFusion(small_config(n_modalities=2))
    target, atlases, onehot, coords = make_inputs(M=2)
    with pytest.raises(ValueError, match="modalities"):
        model(target[:, :1], atlases[:, :, :1], onehot, coords)
    with pytest.raises(ValueError, match="atlas_onehot"):
        model(target, atlases, onehot[:, :, :3], coords)
    with pytest.raises(ValueError, match="coords"):
        model(target, atlases, onehot, coords[:, :2])


# ---------------------------------------------------------------------------------- gradients
def test_zero_heads_start_from_the_majority_vote():
    """By default both subnets start with zero output layers: every weight map is 0.5, the
    initial segmentation is half the atlas vote fraction, every deep-supervision output is
    sigmoid(gain * initial + offset) at its scale (so its argmax is the majority vote), and one
    training step makes the model learn."""
    from monai.losses import GeneralizedDiceLoss

    L = 4
    torch.manual_seed(2)
    model = DeepLabelFusion(small_config(n_labels=L)).train()
    target, atlases, onehot, coords = make_inputs(N=2, L=L, S=16, seed=4)
    out = model(target, atlases, onehot, coords)
    initial = out["initial"]
    assert torch.allclose(initial, 0.5 * onehot.mean(dim=1))
    gain, offset = model.config.vote_gain, model.config.vote_offset
    assert torch.allclose(out["output"], torch.sigmoid(gain * initial + offset) * out["mask"])
    assert torch.allclose(out["deep_supervision"][0],
                          torch.sigmoid(gain * F.avg_pool3d(initial, 8) + offset))
    truth = one_hot_labels(torch.randint(0, L, (1, 16, 16, 16)), L, dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # step 1 moves the heads; step 2 reaches the FT body through them
        opt.zero_grad()
        out = model(target, atlases, onehot, coords)
        deep_supervision_loss(out["deep_supervision"], truth, GeneralizedDiceLoss(sigmoid=False),
                              model.config.deep_supervision_weights).backward()
        opt.step()
    body = model.ft_net.input_block
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in body.parameters())


def test_gradients_reach_both_subnets():
    from monai.losses import GeneralizedDiceLoss

    L = 4
    torch.manual_seed(1)
    # random output heads, so that every parameter is in the gradient's path from the start
    # (the default zero heads are covered by test_zero_heads_start_from_the_weighted_vote)
    config = dataclasses.replace(small_config(n_labels=L), zero_init_heads=False)
    model = DeepLabelFusion(config).train()
    target, atlases, onehot, coords = make_inputs(N=2, L=L, S=16, seed=3)
    truth = one_hot_labels(torch.randint(0, L, (1, 16, 16, 16)), L, dim=1)
    captured = {}

    def keep_ft_input(module, args):
        captured["x"] = args[0]
        args[0].retain_grad()

    handle = model.ft_net.register_forward_pre_hook(keep_ft_input)
    out = model(target, atlases, onehot, coords)
    handle.remove()
    loss = deep_supervision_loss(out["deep_supervision"], truth, GeneralizedDiceLoss(sigmoid=False),
                                 model.config.deep_supervision_weights)
    assert torch.isfinite(loss)
    loss.backward()
    # the FT subnet's input (initial segmentation + coordinates) is in the graph: the WV subnet
    # learns through the FT subnet, not only through the residual shortcut
    ft_in_grad = captured["x"].grad
    assert ft_in_grad is not None and torch.any(ft_in_grad[:, :L] != 0)
    for prefix, net in (("wv_net", model.wv_net), ("ft_net", model.ft_net)):
        params = list(net.named_parameters())
        assert params
        for name, p in params:
            assert p.grad is not None, f"{prefix}.{name} has no gradient"
            assert torch.any(p.grad != 0), f"{prefix}.{name} has an all-zero gradient"


# ---------------------------------------------------------------------------------- fusion
def test_fuse_known_answer():
    # B=1, N=2 atlases, L=3 labels, 2 voxels (spatial 1x1x2)
    seg = torch.tensor([[[0, 1], [1, 1]]])            # atlas 0: labels (0, 1); atlas 1: (1, 1)
    onehot = one_hot_labels(seg, 3, dim=2)            # (1, 2, 3, 2)
    weights = torch.empty(1, 2, 3, 2)
    weights[:, 0] = 1.0
    weights[:, 1] = 0.5
    expected = torch.tensor([[[0.5, 0.0],             # background: (1*1 + 0) / 2
                              [0.25, 0.75],           # label 1: (0 + .5)/2, (1 + .5)/2
                              [0.0, 0.0]]])           # label 2: nobody
    assert torch.equal(fuse(weights, onehot), expected)

    # per-label weights: only the weight of the atlas's own label counts; no normalisation
    weights = torch.tensor([0.2, 0.4, 0.8]).view(1, 1, 3, 1).expand(1, 2, 3, 2).clone()
    weights[:, 1] *= 0.5
    expected = torch.tensor([[[0.1, 0.0], [0.1, 0.3], [0.0, 0.0]]])
    assert torch.allclose(fuse(weights, onehot), expected, atol=1e-7)

    with pytest.raises(ValueError):
        fuse(weights[:, :1], onehot)


# ---------------------------------------------------------------------------------- masking
def _mask_of(seg_per_atlas, L=2, **kw):
    seg = torch.as_tensor(np.stack(seg_per_atlas))[None]          # (1, N, X, Y, Z)
    return label_mask(one_hot_labels(seg, L, dim=2), **kw)[0]      # (L, X, Y, Z)


def test_label_mask_isolated_voxel_is_masked_out():
    seg = np.zeros((7, 7, 7), dtype=np.int64)
    seg[3, 3, 3] = 1                                   # 1/27 = 0.037 < 0.2
    mask = _mask_of([seg, np.zeros_like(seg)])
    assert mask[1].sum() == 0
    assert torch.all(mask[0] == 1)                     # background never masked


def test_label_mask_2x2x2_block_is_exactly_the_block():
    seg = np.zeros((8, 8, 8), dtype=np.int64)
    seg[3:5, 3:5, 3:5] = 1                             # inside: 8/27 = .296; face neighbour 4/27
    mask = _mask_of([seg])
    assert torch.equal(mask[1], torch.as_tensor((seg == 1).astype(np.float32)))


def test_label_mask_union_over_atlases():
    a = np.zeros((8, 8, 8), dtype=np.int64)
    b = np.zeros_like(a)
    a[3:5, 3:5, 3] = 1                                 # each atlas carries half of a 2x2x2 block:
    b[3:5, 3:5, 4] = 1                                 # alone 4/27 < 0.2 -> nothing
    assert _mask_of([a])[1].sum() == 0
    block = torch.zeros(8, 8, 8)
    block[3:5, 3:5, 3:5] = 1
    assert torch.equal(_mask_of([a, b])[1], block)


def test_label_mask_threshold_boundary_6_of_27():
    seg = np.zeros((5, 5, 5), dtype=np.int64)
    pts = [(1, 1, 1), (1, 1, 2), (1, 1, 3), (1, 2, 1), (1, 2, 2)]   # 5 voxels around (2, 2, 2)
    for p in pts:
        seg[p] = 1
    assert _mask_of([seg])[1][2, 2, 2] == 0            # 5/27 = 0.185
    seg[1, 2, 3] = 1
    assert _mask_of([seg])[1][2, 2, 2] == 1            # 6/27 = 0.222


def test_label_mask_3x3x3_block_and_border_padding():
    seg = np.zeros((9, 9, 9), dtype=np.int64)
    seg[3:6, 3:6, 3:6] = 1
    mask = _mask_of([seg])[1]
    assert mask[4, 4, 2] == 1                          # face centre neighbour: 9/27
    assert mask[3, 4, 2] == 1                          # face edge-middle neighbour: 6/27
    assert mask[3, 3, 2] == 0                          # face corner neighbour: 4/27
    assert mask[2, 2, 4] == 0                          # edge neighbour: 3/27
    assert mask[2, 2, 2] == 0                          # corner neighbour: 1/27

    # a one-voxel-thick slab on the x=0 face: zero padding outside the tensor
    slab = np.zeros((6, 6, 6), dtype=np.int64)
    slab[0] = 1
    m = _mask_of([slab])[1]
    assert m[0, 3, 3] == 1                             # 9/27
    assert m[0, 0, 3] == 1                             # 6/27 (edge of the volume)
    assert m[0, 0, 0] == 0                             # 4/27 (would be 4/8 without padding counts)
    assert m[1, 3, 3] == 1 and m[2, 3, 3] == 0         # 9/27 one voxel in, 0 two voxels in


def test_label_mask_matches_bruteforce_reference():
    rng = np.random.default_rng(0)
    segs = rng.choice(3, size=(3, 10, 9, 8), p=[0.85, 0.1, 0.05])
    mask = _mask_of(list(segs), L=3, mask_background=True)
    for lab in range(3):
        union = (segs == lab).any(axis=0)
        np.testing.assert_array_equal(mask[lab].numpy(), reference_mask(union, 0.2))


def test_label_mask_background_option():
    seg = np.zeros((4, 4, 4), dtype=np.int64)
    seg[:] = 1                                         # no atlas carries background
    assert torch.all(_mask_of([seg])[0] == 1)
    assert torch.all(_mask_of([seg], mask_background=True)[0] == 0)


def test_masking_zeroes_output_end_to_end():
    L, S = 4, 16
    seg = torch.zeros(1, 3, S, S, S, dtype=torch.long)
    seg[:, :, 4:12, 4:12, 4:12] = 1                    # label 1: a cube in every atlas
    seg[0, 1, 14, 2, 2] = 2                            # label 2: one isolated voxel in one atlas
    # label 3: in no atlas
    torch.manual_seed(0)
    model = DeepLabelFusion(small_config(n_labels=L)).eval()
    with torch.no_grad():
        out = model(*make_inputs(N=3, L=L, S=S, seg=seg))
    o = out["output"]
    assert torch.all(o[:, 2] == 0)
    assert torch.all(o[:, 3] == 0)
    assert torch.all(o[:, 1, 4:12, 4:12, 4:12] > 0)
    assert torch.all(o[:, 1, 0:2] == 0)                # far from the cube
    assert torch.all(o[:, 0] > 0)                      # background not masked
    # the coarse deep-supervision outputs are not masked
    assert torch.any(out["deep_supervision"][0][:, 3] > 0)
    # without masking label 3 is not zero (sigmoid never is)
    model.config.use_label_mask = False
    with torch.no_grad():
        unmasked = model(*make_inputs(N=3, L=L, S=S, seg=seg))
    assert unmasked["mask"] is None
    assert torch.all(unmasked["output"][:, 3] > 0)


def test_external_mask_is_used():
    model = DeepLabelFusion(small_config()).eval()
    inputs = make_inputs(S=16)
    mask = torch.zeros(1, 4, 16, 16, 16)
    mask[:, 0] = 1
    with torch.no_grad():
        out = model(*inputs, mask=mask)
    assert torch.all(out["output"][:, 1:] == 0)


# ---------------------------------------------------------------------------------- chunking
def test_weighted_vote_chunked_equals_unchunked():
    torch.manual_seed(2)
    model = DeepLabelFusion(small_config()).eval()
    target, atlases, onehot, coords = make_inputs(B=2, N=5, S=16, seed=5)
    with torch.no_grad():
        full = model.weighted_vote(target, atlases, onehot, coords)
        assert torch.allclose(full, fuse(model.weight_maps(target, atlases, coords), onehot), atol=1e-7)
        for ab in (1, 2, 3, 5, 8):
            chunked = model.weighted_vote(target, atlases, onehot, coords, atlas_batch=ab)
            assert torch.allclose(chunked, full, atol=1e-6), ab
        a = model(target, atlases, onehot, coords)
        b = model(target, atlases, onehot, coords, atlas_batch=2)
    assert torch.allclose(a["output"], b["output"], atol=1e-5)
    with pytest.raises(ValueError):
        model.weighted_vote(target, atlases, onehot, coords, atlas_batch=0)


# ---------------------------------------------------------------------------------- coordinates
def test_coordinate_maps():
    shape = (5, 6, 8)
    c = coordinate_maps(shape)
    assert c.shape == (3, *shape)
    assert torch.all(c[:, 0, 0, 0] == -1)
    assert torch.all(c >= -1) and torch.all(c < 1)
    for axis, size in enumerate(shape):
        expected = 2 * torch.arange(size, dtype=torch.float32) / size - 1
        line = c[axis].movedim(axis, 0)[:, 0, 0]
        assert torch.allclose(line, expected)
        assert torch.isclose(c[axis].max(), torch.tensor(1 - 2 / size))
        # constant along the other axes
        assert torch.all(c[axis] == c[axis].movedim(axis, 0)[:, :1, :1].movedim(0, axis))


def test_patch_coordinates_are_absolute():
    shape, start, size = (40, 32, 24), (8, 16, 0), (16, 16, 24)
    whole = coordinate_maps(shape)
    patch = patch_coordinates(shape, start, size)
    assert patch.shape == (3, *size)
    assert torch.equal(patch, whole[:, 8:24, 16:32, 0:24])
    assert torch.equal(crop_patch(whole[None], start, size)[0], patch)
    assert patch[0, 0, 0, 0] == 2 * 8 / 40 - 1 and patch[1, 0, 0, 0] == 0.0
    with pytest.raises(ValueError):
        crop_patch(whole, (30, 0, 0), (16, 16, 16))


# ---------------------------------------------------------------------------------- size, config
def test_paper_sized_parameter_count():
    cfg = DLFConfig(n_labels=15, n_modalities=2)
    assert cfg.wv_channels == (32, 64, 128) and cfg.ft_channels == (32, 64, 128, 256)
    model = DeepLabelFusion(cfg)
    n_wv, n_ft, n = count_parameters(model.wv_net), count_parameters(model.ft_net), count_parameters(model)
    print(f"DLF paper-sized config: {n:,} parameters (WV {n_wv:,}, FT {n_ft:,}); paper ~9.5 M")
    assert n == n_wv + n_ft + 2  # + the two vote scalars (gain, offset)
    assert 3_000_000 < n < 20_000_000
    assert n_ft > n_wv


def test_config_roundtrip_and_validation():
    cfg = small_config(labels=(0, 10, 11, 12), modalities=("T1w", "T2w"))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DLFConfig.from_dict(data) == cfg
    assert cfg.size_divisor == 8
    with pytest.raises(ValueError, match="unknown"):
        DLFConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="deep_supervision_weights"):
        DLFConfig(n_labels=4, ft_channels=(8, 16, 32))
    with pytest.raises(ValueError, match="labels"):
        DLFConfig(n_labels=4, labels=(0, 1))
    # a model built from the dict has the same architecture
    m1, m2 = DeepLabelFusion(cfg), DeepLabelFusion(cfg.to_dict())
    assert [p.shape for p in m1.parameters()] == [p.shape for p in m2.parameters()]


# ---------------------------------------------------------------------------------- loss
def test_deep_supervision_loss():
    from monai.losses import GeneralizedDiceLoss

    L, S = 3, 16
    seg = torch.zeros(1, S, S, S, dtype=torch.long)
    seg[:, 4:12, 2:10, 6:14] = 1
    seg[:, 0:4, :, :] = 2
    truth = one_hot_labels(seg, L, dim=1)
    perfect = [truth[..., ::f, ::f, ::f] for f in (8, 4, 2, 1)]
    loss_fn = GeneralizedDiceLoss(sigmoid=False)
    assert deep_supervision_loss(perfect, truth, loss_fn) < 1e-4
    bad = [1 - p for p in perfect]
    per_scale = [loss_fn(b, p) for b, p in zip(bad, perfect)]
    total = deep_supervision_loss(bad, truth, loss_fn, (0.1, 0.2, 0.5, 1.0))
    assert torch.isclose(total, sum(w * l for w, l in zip((0.1, 0.2, 0.5, 1.0), per_scale)))
    only_final = deep_supervision_loss(bad, truth, loss_fn, (0, 0, 0, 1))
    assert torch.isclose(only_final, per_scale[-1])
    # max-pool keeps a thin structure that strided subsampling may miss
    thin = torch.zeros(1, 2, S, S, S)
    thin[:, 0] = 1
    thin[:, 0, 5, 5, 5], thin[:, 1, 5, 5, 5] = 0, 1
    seen = []
    deep_supervision_loss([torch.rand(1, 2, 2, 2, 2)], thin,
                          lambda o, t: seen.append(t) or torch.tensor(0.0), (1.0,), mode="max")
    assert seen[0][0, 1].sum() == 1
    with pytest.raises(ValueError):
        deep_supervision_loss(perfect[:2], truth, loss_fn)


# ---------------------------------------------------------------------------------- determinism
def test_deterministic_with_seed():
    inputs = make_inputs(N=2, S=16, seed=9)
    # random output layers: with the default zero ones every seed gives the same (vote) output
    config = dataclasses.replace(small_config(), zero_init_heads=False)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = DeepLabelFusion(config).eval()
        with torch.no_grad():
            outs.append(model(*inputs))
    for key in ("output", "initial"):
        assert torch.equal(outs[0][key], outs[1][key])
    torch.manual_seed(4321)
    other = DeepLabelFusion(config).eval()
    with torch.no_grad():
        assert not torch.equal(other(*inputs)["output"], outs[0]["output"])
