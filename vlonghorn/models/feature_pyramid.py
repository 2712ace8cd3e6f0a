""" Simple feature pyramid for plain backbones

A multi-scale pyramid for detection and segmentation heads, built from the single-stride maps of a plain
backbone (a Vision Longhorn, or any timm model with `forward_intermediates` and a per-block `feature_info`), as in
  `Exploring Plain Vision Transformer Backbones for Object Detection` (ViTDet) - https://arxiv.org/abs/2203.16527

Every level comes from the backbone's last map (ViTDet), or each level from a block of its own: transposed
convolutions for the strides finer than the patch, max-pooling for the coarser ones, then a 1x1 and a 3x3
convolution, each followed by a LayerNorm, to `out_chans` channels.

    backbone = timm.create_model('vlonghorn_small')
    pyramid = SimpleFeaturePyramid(backbone)                    # strides 4, 8, 16, 32 from the last block
    maps = pyramid(torch.randn(1, 3, 480, 640))                 # [(1, 256, 120, 160), ..., (1, 256, 15, 20)]
    pyramid.feature_info.channels(), pyramid.feature_info.reduction()   # [256] * 4, [4, 8, 16, 32]

or through timm, as a `features_only` wrapper (the class is accepted as `feature_cls`):

    timm.create_model('vlonghorn_small', features_only=True, feature_cls=SimpleFeaturePyramid, out_indices=(-1,))
"""
import math
from typing import List, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import LayerNorm2d, get_device_dtype
from timm.models._features import FeatureInfo, feature_take_indices

__all__ = ['SimpleFeaturePyramid']


def _doublings(patch: int, stride: int) -> int:
    """log2(stride / patch) (negative: upsampling), checked to be a whole number."""
    steps = math.log2(stride / patch)
    if steps != round(steps):
        raise ValueError(f'pyramid stride {stride} is not the patch stride {patch} times a power of two')
    return round(steps)


class PyramidLevel(nn.Sequential):
    """One level: a stride-`patch` map (B, C, h, w) -> (B, out_chans, h * patch / stride, w * patch / stride),
    the pooled sizes rounded up.

    Finer strides are reached by 2x transposed convolutions (halving the channels each time, LayerNorm and GELU
    between them), coarser ones by 2x max-pooling; then a 1x1 and a 3x3 convolution, each followed by a LayerNorm.
    """

    def __init__(self, in_chans: int, out_chans: int, patch: int, stride: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        layers: List[nn.Module] = []
        steps = _doublings(patch, stride)
        chans = in_chans
        for i in range(-steps):
            if i:
                layers += [LayerNorm2d(chans, **dd), nn.GELU()]
            if chans < 2:
                raise ValueError(f'{in_chans} channels cannot be halved {-steps} times for stride {stride}')
            layers.append(nn.ConvTranspose2d(chans, chans // 2, kernel_size=2, stride=2, **dd))
            chans //= 2
        # ceil_mode: an odd-sized map keeps its last row and column
        layers += [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True) for _ in range(steps)]
        layers += [
            nn.Conv2d(chans, out_chans, kernel_size=1, bias=False, **dd),
            LayerNorm2d(out_chans, **dd),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False, **dd),
            LayerNorm2d(out_chans, **dd),
        ]
        super().__init__(*layers)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over a plain backbone: image (B, C, H, W) -> a list of NCHW maps, one per
    stride, level i of shape (B, out_chans, ceil(H / p) * p / strides[i], ...) for a patch stride p (pooled sizes
    rounded up; (B, out_chans, H / s, W / s) when H and W are multiples of every stride).

    Any image size works: the backbone is switched to `dynamic_img_size` (its position embedding is resampled to
    the patch grid) and an image whose sides are not multiples of the patch is zero-padded at the bottom and right,
    as detection frameworks pad their batches. `feature_info` describes the levels as timm's `features_only`
    models do (`channels()`, `reduction()`).
    """

    def __init__(
            self,
            model: nn.Module,
            out_indices: Union[int, Sequence[int]] = (-1,),
            strides: Sequence[int] = (4, 8, 16, 32),
            out_chans: int = 256,
            norm: bool = False,
            prune: bool = True,
    ):
        """
        Args:
            model: A backbone with `forward_intermediates(x, indices, norm, output_fmt='NCHW',
                intermediates_only=True)` and a `feature_info` list with `num_chs` and `reduction` per block.
            out_indices: The blocks the pyramid is built from, in timm's convention (a sequence of indices,
                negative from the end; an int n: the last n blocks): one block feeds every level (ViTDet, default
                the last one), or one block per level, in the order of `strides`.
            strides: Output stride of each level; each must be the backbone's stride times a power of two.
            out_chans: Channels of every level.
            norm: Apply the backbone's final norm to the maps taken.
            prune: Drop the blocks after the last one taken, and the backbone's head (and its final norm unless
                `norm`).
        """
        super().__init__()
        strides = tuple(int(s) for s in strides)
        if not strides or list(strides) != sorted(set(strides)):
            raise ValueError(f'strides must be distinct and ascending, got {strides}')
        take_indices, _ = feature_take_indices(len(model.feature_info), out_indices)
        if len(take_indices) not in (1, len(strides)):
            raise ValueError(
                f'out_indices {out_indices} takes {len(take_indices)} blocks for {len(strides)} pyramid levels: '
                f'take one block for every level (e.g. out_indices=(-1,), as ViTDet) or one block per level')
        sources = [model.feature_info[i] for i in take_indices]
        if prune and hasattr(model, 'prune_intermediate_layers'):
            take_indices = model.prune_intermediate_layers(take_indices, prune_norm=not norm)
        if hasattr(model, 'dynamic_img_size'):
            model.dynamic_img_size = True
        self.model = model
        self.out_indices = tuple(take_indices)
        self.norm = norm
        self.patch = sources[0]['reduction']
        dd = get_device_dtype(model)
        self.levels = nn.ModuleList([
            PyramidLevel(sources[i % len(sources)]['num_chs'], out_chans, sources[i % len(sources)]['reduction'],
                         stride, **dd)
            for i, stride in enumerate(strides)
        ])
        self.feature_info = FeatureInfo(
            [dict(num_chs=out_chans, reduction=stride, module=f'levels.{i}') for i, stride in enumerate(strides)],
            out_indices=tuple(range(len(strides))),
        )

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-x.shape[-2]) % self.patch, (-x.shape[-1]) % self.patch
        return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = self.model.forward_intermediates(
            self._pad(x),
            indices=list(self.out_indices),
            norm=self.norm,
            output_fmt='NCHW',
            intermediates_only=True,
        )
        return [level(maps[i % len(maps)]) for i, level in enumerate(self.levels)]
