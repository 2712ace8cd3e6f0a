"""Tests of vlonghorn.models.feature_pyramid: ViTDet's simple feature pyramid over vlonghorn_nano (patch 8) on CPU."""
import pytest
import timm
import torch

import vlonghorn  # noqa: F401
from vlonghorn.models.feature_pyramid import SimpleFeaturePyramid

CHANS = 32


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return timm.create_model("vlonghorn_nano")


def shapes(maps):
    return [tuple(m.shape) for m in maps]


def test_strides_4_to_32_from_the_last_block_at_any_size(nano):
    pyramid = SimpleFeaturePyramid(nano, out_chans=CHANS).eval()
    assert pyramid.feature_info.reduction() == [4, 8, 16, 32]
    assert pyramid.feature_info.channels() == [CHANS] * 4
    assert pyramid.out_indices == (3,)
    with torch.no_grad():
        # 96 x 160: not the model's 64 px, a multiple of every stride
        assert shapes(pyramid(torch.randn(2, 3, 96, 160))) == [(2, CHANS, 96 // s, 160 // s) for s in (4, 8, 16, 32)]
        # 60 x 90: padded to the patch grid (8 x 12), pooled sizes rounded up
        assert shapes(pyramid(torch.randn(1, 3, 60, 90))) == [(1, CHANS, 16, 24), (1, CHANS, 8, 12),
                                                              (1, CHANS, 4, 6), (1, CHANS, 2, 3)]


def test_levels_are_built_from_the_backbone_maps(nano):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        block_map = nano.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]   # (1, 64, 8, 8)
        pyramid = SimpleFeaturePyramid(nano, out_chans=CHANS).eval()
        maps = pyramid(x)
    torch.testing.assert_close(maps[1], pyramid.levels[1](block_map))       # stride 8 = the patch: no resampling
    torch.testing.assert_close(maps[2], pyramid.levels[2](block_map))
    # pruned as timm's feature wrappers are: no head, nothing after the block taken
    assert isinstance(nano.head, torch.nn.Identity) and len(nano.blocks) == 4


def test_one_block_per_level_and_gradients(nano):
    pyramid = SimpleFeaturePyramid(nano, out_indices=(0, 1, 2, 3), strides=(8, 16, 32, 64), out_chans=CHANS)
    assert pyramid.out_indices == (0, 1, 2, 3) and pyramid.feature_info.reduction() == [8, 16, 32, 64]
    maps = pyramid(torch.randn(2, 3, 64, 64))
    assert shapes(maps) == [(2, CHANS, 8, 8), (2, CHANS, 4, 4), (2, CHANS, 2, 2), (2, CHANS, 1, 1)]
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in pyramid.parameters() if p.requires_grad)
    # two doublings up (transposed convolutions 64 -> 32 -> 16 channels, LayerNorm and GELU between them)
    fine = SimpleFeaturePyramid(timm.create_model("vlonghorn_nano"), strides=(2, 8), out_chans=CHANS)
    assert [m.out_channels for m in fine.levels[0] if isinstance(m, torch.nn.ConvTranspose2d)] == [32, 16]
    assert shapes(fine(torch.randn(1, 3, 64, 64))) == [(1, CHANS, 32, 32), (1, CHANS, 8, 8)]
    # blocks after the deepest one taken are dropped
    pruned = SimpleFeaturePyramid(timm.create_model("vlonghorn_nano"), out_indices=(1,), out_chans=CHANS)
    assert len(pruned.model.blocks) == 2 and pruned.out_indices == (1,)


def test_through_timm_create_model():
    model = timm.create_model("vlonghorn_nano", features_only=True, feature_cls=SimpleFeaturePyramid,
                              out_indices=(-1,)).eval()
    assert isinstance(model, SimpleFeaturePyramid)
    assert model.feature_info.reduction() == [4, 8, 16, 32] and model.feature_info.channels() == [256] * 4
    with torch.no_grad():
        assert shapes(model(torch.randn(1, 3, 64, 96))) == [(1, 256, 64 // s, 96 // s) for s in (4, 8, 16, 32)]


def test_bad_arguments_are_clear_errors(nano):
    with pytest.raises(ValueError, match="one block for every level"):
        SimpleFeaturePyramid(nano, out_indices=3)            # timm's int: the last 3 blocks, for 4 levels
    with pytest.raises(ValueError, match="stride 12 is not the patch stride 8 times a power of two"):
        SimpleFeaturePyramid(timm.create_model("vlonghorn_nano"), strides=(4, 12))
    with pytest.raises(ValueError, match="ascending"):
        SimpleFeaturePyramid(timm.create_model("vlonghorn_nano"), strides=(16, 8))


def test_features_only_pyramid_through_timm():
    """timm.create_model(..., features_only=True, feature_cls="pyramid") builds the pyramid: strides 4-32 from the
    last block by default, and strides / out_chans / out_indices pass through."""
    model = timm.create_model("vlonghorn_nano", features_only=True, feature_cls="pyramid").eval()
    assert isinstance(model, SimpleFeaturePyramid)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 24), (1, 256, 8, 12), (1, 256, 4, 6), (1, 256, 2, 3)]
    small = timm.create_model("vlonghorn_nano", features_only=True, feature_cls="pyramid", strides=(8, 16),
                              out_chans=32, out_indices=(1, 3))
    assert small.feature_info.reduction() == [8, 16] and small.feature_info.channels() == [32, 32]
