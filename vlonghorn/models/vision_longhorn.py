""" Vision Longhorn

Patch-embedding image backbones whose token mixer is a bidirectional Longhorn scan:
  `Longhorn: State Space Models are Amortized Online Learners` - https://arxiv.org/abs/2407.14207
with the bidirectional block layout and middle class token of
  `Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space Model`
  - https://arxiv.org/abs/2401.09417

The mixer calls only `vlonghorn.ops`, which runs Triton kernels on CUDA tensors and PyTorch elsewhere.
"""
import itertools
import math
import pickle
import traceback
from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    PatchEmbed,
    RmsNorm,
    calculate_drop_path_rates,
    get_device_dtype,
    resample_abs_pos_embed,
    resample_patch_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import register_notrace_function, register_notrace_module
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint

from vlonghorn.ops import (add_rms_norm, bidirectional_conv1d_silu, bidirectional_longhorn_scan, recompute_except_scan,
                           residual_branch)

from .feature_pyramid import SimpleFeaturePyramid

__all__ = ['VisionLonghorn']


class ScanDirection(nn.Module):
    """The per-direction parameters of a Longhorn mixer: conv taps, x_proj, dt_proj (its bias is dt_bias), D."""

    def __init__(
            self,
            d_inner: int,
            d_state: int = 16,
            dt_rank: int = 24,
            d_conv: int = 4,
            dt_min: float = 1e-3,
            dt_max: float = 1e-1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.dt_min, self.dt_max = dt_min, dt_max
        self.conv_weight = nn.Parameter(torch.empty(d_inner, d_conv, **dd))
        self.conv_bias = nn.Parameter(torch.empty(d_inner, **dd))
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **dd)
        self.D = nn.Parameter(torch.empty(d_inner, **dd))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        bound = 1 / math.sqrt(self.conv_weight.shape[1])  # what nn.Conv1d gives a depthwise kernel
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        trunc_normal_(self.x_proj.weight, std=.02)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        # Initial step sizes beta = sigmoid(dt_bias) spread log-uniformly over [dt_min, dt_max], so channels start
        # from a range of memory lengths instead of all at beta = 0.5.
        beta = torch.exp(torch.empty_like(self.dt_proj.bias).uniform_(math.log(self.dt_min), math.log(self.dt_max)))
        self.dt_proj.bias.copy_(torch.log(beta) - torch.log1p(-beta))
        nn.init.ones_(self.D)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, E) -> dt (B, L, E) without its bias, k and q (B, L, N) as views of one projection."""
        dt_low, k, q = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_low, self.dt_proj.weight), k, q


@register_notrace_module  # FX treats the mixer as a leaf: its ops dispatch at run time
class LonghornMixer(nn.Module):
    """Bidirectional Longhorn token mixer (Vim v2 layout, longhorn.md section 4). (B, L, C) -> (B, L, C)."""

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            expand: int = 2,
            dt_rank: Optional[int] = None,
            d_conv: int = 4,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        d_inner = expand * dim
        dt_rank = dt_rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False, **dd)
        self.d_state = d_state
        # the two scan directions: `fwd` walks the tokens in raster order, `rev` from the last token back
        self.fwd = ScanDirection(d_inner, d_state, dt_rank, d_conv, **dd)
        self.rev = ScanDirection(d_inner, d_state, dt_rank, d_conv, **dd)
        self.out_proj = nn.Linear(d_inner, dim, bias=False, **dd)

    def forward(self, x: torch.Tensor, dt_shift: Union[float, torch.Tensor] = 0.) -> torch.Tensor:
        """dt_shift: log of a factor on every step size beta, added to dt_bias (VisionLonghorn's step_scale)."""
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x_fwd, x_rev = bidirectional_conv1d_silu(
            x, self.fwd.conv_weight, self.fwd.conv_bias, self.rev.conv_weight, self.rev.conv_bias)
        dt_fwd, k_fwd, q_fwd = self.fwd.project(x_fwd)
        dt_rev, k_rev, q_rev = self.rev.project(x_rev)
        bias_fwd, bias_rev = self.fwd.dt_proj.bias, self.rev.dt_proj.bias
        if isinstance(dt_shift, torch.Tensor) or dt_shift:
            bias_fwd, bias_rev = bias_fwd + dt_shift, bias_rev + dt_shift
        y = bidirectional_longhorn_scan(
            x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev, bias_fwd, bias_rev, self.fwd.D, self.rev.D, z)
        return self.out_proj(y)


class Block(nn.Module):
    """Pre-norm residual block: x + drop_path(mixer(norm(x))). The residual stream keeps the parameters' dtype
    (fp32 under autocast), since the mixer's bf16 output is added to it in higher precision.

    With `fused_norm` the blocks of a model pass the stream on with the last branch output still to add
    (`forward_residual`): the next block adds it and normalises the sum in one pass (`vlonghorn.ops.add_rms_norm`,
    the norm written once in the dtype in_proj reads), so the stream is read and written once per block.

    With `recompute_mixer` (and autograd recording, on the Triton path) the branch mixer(norm(x)) keeps for the
    backward only the stream and what the scan's forward produced and runs the rest again there (norm, in/x/dt
    projections, conv): their 1536- and 768-wide activations are not held between forward and backward."""

    def __init__(
            self,
            dim: int,
            d_state: int = 16,
            expand: int = 2,
            drop_path: float = 0.,
            norm_layer=RmsNorm,
            recompute_mixer: bool = True,
            fused_norm: bool = True,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = norm_layer(dim, **dd)
        # the add and the norm in one op (`forward_residual`), where the norm is one it computes
        self.fused_norm = fused_norm and _fused_rms_norm(self.norm)
        self.mixer = LonghornMixer(dim, d_state=d_state, expand=expand, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.recompute_mixer = recompute_mixer
        self.in_checkpoint = False  # set by VisionLonghorn.set_grad_checkpointing: the whole block is recomputed

    def _branch(self, x: torch.Tensor, dt_shift: Union[float, torch.Tensor] = 0.) -> torch.Tensor:
        return self.mixer(self.norm(x), dt_shift)

    def forward_residual(
            self,
            x: torch.Tensor,
            delta: Optional[torch.Tensor] = None,
            dt_shift: Union[float, torch.Tensor] = 0.,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block on a stream with a pending update: r = x + delta (delta: the previous block's drop-pathed
        branch output, or None) and this block's own update. Returns (r, drop_path(mixer(norm(r))))."""
        recompute = self.recompute_mixer and not self.in_checkpoint
        if self.fused_norm:
            r, y = residual_branch(partial(self.mixer, dt_shift=dt_shift), x, delta, self.norm.weight, self.norm.eps,
                                   self.mixer.parameters(), recompute=recompute, d_state=self.mixer.d_state)
        else:
            r = x if delta is None else x + delta
            if recompute:
                params = itertools.chain(self.norm.parameters(), self.mixer.parameters())  # read only if recomputing
                y = recompute_except_scan(partial(self._branch, dt_shift=dt_shift), r, params,
                                          d_state=self.mixer.d_state)
            else:
                y = self._branch(r, dt_shift)
        return r, self.drop_path(y)

    def forward(self, x: torch.Tensor, dt_shift: Union[float, torch.Tensor] = 0.) -> torch.Tensor:
        """dt_shift: log of a factor on the mixer's step sizes (VisionLonghorn's step_scale); 0: as trained."""
        r, delta = self.forward_residual(x, None, dt_shift)
        return r + delta


def _fused_rms_norm(norm: nn.Module) -> bool:
    """Whether `norm` is computed by the fused add + RMSNorm op (timm's RmsNorm with a weight over one dim)."""
    return isinstance(norm, RmsNorm) and norm.weight is not None and len(norm.normalized_shape) == 1


@register_notrace_function  # FX wraps only public names: no leading underscore
def check_image_batch(
        x: torch.Tensor,
        in_chans: int,
        patch_size: Tuple[int, int],
        img_size: Optional[Tuple[int, int]],
) -> None:
    """Raise a ValueError naming what is wrong with an input batch (shape, channels, size)."""
    if x.dim() != 4:
        raise ValueError(f'expected an image batch (B, C, H, W), got shape {tuple(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})')
    height, width = x.shape[-2:]
    if height % patch_size[0] or width % patch_size[1]:
        raise ValueError(f'image size {height}x{width} is not divisible by the patch size '
                         f'{patch_size[0]}x{patch_size[1]}')
    if img_size is not None and (height, width) != tuple(img_size):
        raise ValueError(f'image size {height}x{width} does not match the model\'s {img_size[0]}x{img_size[1]}; '
                         f'create the model with img_size=({height}, {width}) or dynamic_img_size=True')


@register_notrace_function  # FX wraps only public names: no leading underscore
def rms_norm_of_sum(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x + delta) * weight in one pass, in the dtype the unfused norm gives (fp32 for an fp32 stream)."""
    return add_rms_norm(x, delta, weight, eps)[1]


SCAN_ORDERS = ('raster', 'alternate', 'zorder')


def _zorder(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Raster indices of a (height, width) grid in Z (Morton) order: a 2x2 cell's four tokens are neighbours in
    the sequence at every scale, so a grid twice as fine shows each token of the coarse one as four in a row."""
    rows = torch.arange(height, device=device)[:, None].expand(height, width)
    cols = torch.arange(width, device=device)[None, :].expand(height, width)
    code = torch.zeros(height, width, dtype=torch.long, device=device)
    for bit in range(max(height, width).bit_length()):
        code = code | ((rows >> bit) & 1) << (2 * bit + 1) | ((cols >> bit) & 1) << (2 * bit)
    return code.flatten().argsort()


@register_notrace_function  # FX wraps only public names: no leading underscore
def reorder_tokens(x: torch.Tensor, grid: Tuple[int, int], src: str, dst: str) -> torch.Tensor:
    """Tokens (B, L + 1, D), class token in the middle, from scan order `src` to `dst` ('raster': row by row,
    'column': column by column, 'zorder': Morton order); the class token stays in the middle."""
    if src == dst:
        return x
    height, width = grid
    middle = (x.shape[1] - 1) // 2
    patches, cls_token = torch.cat([x[:, :middle], x[:, middle + 1:]], dim=1), x[:, middle:middle + 1]
    batch, _, channels = patches.shape
    if src == 'column':
        patches = patches.reshape(batch, width, height, channels).transpose(1, 2).reshape(batch, -1, channels)
    elif src == 'zorder':
        patches = patches.index_select(1, _zorder(height, width, x.device).argsort())
    if dst == 'column':
        patches = patches.reshape(batch, height, width, channels).transpose(1, 2).reshape(batch, -1, channels)
    elif dst == 'zorder':
        patches = patches.index_select(1, _zorder(height, width, x.device))
    return torch.cat([patches[:, :middle], cls_token, patches[:, middle:]], dim=1)


class VisionLonghorn(nn.Module):
    """ Vision Longhorn

    Image -> patch tokens (raster order) + learned absolute position embedding, a class token in the middle of
    the sequence, `depth` bidirectional Longhorn blocks, a final RMSNorm and a linear head.
    """
    dynamic_img_size: bool

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 384,
            depth: int = 24,
            d_state: int = 16,
            expand: int = 2,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
            recompute_mixer: bool = True,
            scan_order: str = 'raster',
            step_scale: Union[float, str] = 'auto',
            fused_norm: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: Input image size (the size the position embedding is laid out for).
            patch_size: Patch size.
            in_chans: Number of image input channels.
            num_classes: Number of classes for the classification head (0 for none).
            global_pool: 'avg' (mean of the patch tokens), 'token' (the middle class token) or '' (no pooling).
                'avg' is the default since 2026-12-05 (it learns better and holds up better on images larger than
                the training size; README, CIFAR-10); weights trained with the class token before then need
                global_pool='token'. Either way the class token stays in the middle of the sequence.
            embed_dim: Token width (d_model).
            depth: Number of blocks.
            d_state: Longhorn state size N.
            expand: Inner width of the mixer is expand * embed_dim.
            drop_rate: Head dropout rate.
            pos_drop_rate: Dropout after the position embedding.
            drop_path_rate: Stochastic depth rate (linearly increasing over the blocks).
            dynamic_img_size: Accept any image size divisible by the patch, resampling the position embedding.
            recompute_mixer: In training on the Triton path, keep only the scan's outputs of each block for the
                backward and recompute the rest of the block there (about half the training memory of
                vlonghorn_small, for 5-30% more time in eager mode and 5% under torch.compile);
                `set_grad_checkpointing` recomputes whole blocks instead.
            scan_order: The order the blocks scan the patch tokens in: 'raster' (row by row, every block),
                'alternate' (rows in even blocks, columns in odd ones) or 'zorder' (Morton order, every block).
                Features and outputs are in raster order whatever the scan order.
            step_scale: A factor on every step size beta (see `set_step_scale`): 'auto' (the default since
                2026-12-05) scales them by the training grid's token count over the input's, so the scans keep
                their memory span on a larger or smaller image (at the training size the factor is 1); a number
                fixes the factor, 1 being the behaviour before.
            fused_norm: Each block adds the previous block's update to the stream and normalises the sum in one
                pass (`vlonghorn.ops.add_rms_norm`: Triton kernels on CUDA, 6-8% more images/s for vlonghorn_small
                on an H100 at large batches; the same maths in PyTorch elsewhere). On by default since
                2026-12-06; False runs the separate add and timm's RmsNorm (docs/kernel_design.md section 12).
                The weights are the same either way.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if global_pool not in ('', 'avg', 'token'):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if scan_order not in SCAN_ORDERS:
            raise ValueError(f"scan_order must be one of {SCAN_ORDERS}, got {scan_order!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            strict_img_size=False,  # sizes are checked in check_image_batch, with a ValueError that says what to do
            output_fmt='NHWC',
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.patch_size[0]
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd))
        # Laid out as [class token, patches in raster order], the layout timm's resampling expects; the class
        # token moves to the middle of the sequence only after the embedding is added.
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, d_state=d_state, expand=expand, drop_path=dpr[i], recompute_mixer=recompute_mixer,
                  fused_norm=fused_norm, **dd)
            for i in range(depth)
        ])
        self.scan_order = scan_order
        self.block_orders = [{'raster': 'raster', 'zorder': 'zorder'}.get(scan_order, 'column' if i % 2 else 'raster')
                             for i in range(depth)]
        # the patch grid the step sizes were learned on: a persistent buffer, so that weights keep it when they
        # are loaded into a model built for another image size (checkpoint_filter_fn resamples the rest)
        self.register_buffer('step_grid', torch.tensor(self.patch_embed.grid_size, device=device), persistent=True)
        self.step_grid_size = tuple(self.patch_embed.grid_size)  # the same, as ints for forward (no device sync)
        self.set_step_scale(step_scale)
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.norm = RmsNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        depth = len(self.blocks)
        for block in self.blocks:
            trunc_normal_(block.mixer.in_proj.weight, std=.02)
            # Each block adds its output to the residual stream: scale so the sum over depth stays O(1).
            trunc_normal_(block.mixer.out_proj.weight, std=.02 / math.sqrt(depth))
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for block in self.blocks:
            block.in_checkpoint = enable

    def set_step_scale(self, scale: Union[float, str]) -> None:
        """Multiply every step size beta by `scale` (through dt_bias: sigmoid(a + log s) is s * sigmoid(a) while
        beta is small, as the learned ones mostly are). Below 1 the scans remember over more tokens. 'auto': the
        factor is the token count of the grid the steps were learned on (`step_grid`) over the input's, e.g. 1/4
        on an image twice the training size; 1 at the training size."""
        if isinstance(scale, str):
            if scale != 'auto':
                raise ValueError(f"step_scale must be 'auto' or a positive number, got {scale!r}")
        elif not scale > 0:
            raise ValueError(f'step_scale must be positive, got {scale}')
        self.step_scale = scale if isinstance(scale, str) else float(scale)

    def step_shift(self, grid: Tuple[int, int]) -> Union[float, torch.Tensor]:
        """The log of the factor on the step sizes for an input of `grid` patches (see `set_step_scale`)."""
        if self.step_scale != 'auto':
            return math.log(self.step_scale)
        trained = self.step_grid_size[0] * self.step_grid_size[1]
        tokens = grid[0] * grid[1]
        if isinstance(tokens, int):
            return math.log(trained / tokens)
        # symbolic sizes (torch.export / compile with dynamic shapes): a tensor, not a guard on the size
        return torch.log(trained / torch.scalar_tensor(tokens, dtype=torch.float32, device=self.pos_embed.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + 'step_grid'
        if key not in state_dict:
            # weights saved before the grid was kept: their steps were learned on the grid of their position
            # embedding, which matches this model's (or loading fails on pos_embed)
            state_dict[key] = torch.tensor(self.patch_embed.grid_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.step_grid_size = tuple(int(v) for v in state_dict[key].tolist())

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg', 'token'):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def set_input_size(self, img_size: Optional[Tuple[int, int]] = None) -> None:
        """Change the native input size, resampling the position embedding to the new patch grid (the step sizes
        keep the grid they were learned on, `step_grid`)."""
        prev_grid_size = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        if self.patch_embed.grid_size != prev_grid_size:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed,
                new_size=self.patch_embed.grid_size,
                old_size=prev_grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
            ), requires_grad=self.pos_embed.requires_grad)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> tokens (B, H/p * W/p + 1, D), the class token in the middle."""
        check_image_batch(
            x, self.in_chans, self.patch_embed.patch_size, None if self.dynamic_img_size else self.patch_embed.img_size)
        x = self.patch_embed(x)
        if self.dynamic_img_size:
            batch, height, width, channels = x.shape
            pos_embed = resample_abs_pos_embed(
                self.pos_embed,
                new_size=(height, width),
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
            )
            x = x.reshape(batch, height * width, channels)
            middle = (height * width) // 2
        else:
            pos_embed = self.pos_embed
            x = x.flatten(1, 2)
            middle = self.patch_embed.num_patches // 2
        x = x + pos_embed[:, 1:]
        cls_token = (self.cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :middle], cls_token, x[:, middle:]], dim=1)
        return self.pos_drop(x)

    def _input_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """The patch grid of an image batch (the model's own unless dynamic_img_size)."""
        if not self.dynamic_img_size:
            return self.patch_embed.grid_size
        return x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1]

    @staticmethod
    def _split_class_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, L + 1, D) with the class token in the middle -> patch tokens (B, L, D), class token (B, 1, D)."""
        middle = (x.shape[1] - 1) // 2
        return torch.cat([x[:, :middle], x[:, middle + 1:]], dim=1), x[:, middle:middle + 1]

    def _forward_blocks(
            self,
            x: torch.Tensor,
            grid: Tuple[int, int],
            blocks: nn.Sequential,
            take_indices: Optional[List[int]] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[torch.Tensor]]:
        """Run `blocks` on raster-order tokens, each in its scan order. Returns the stream and, with fused norms,
        the last block's update still to add to it (else None), and the outputs of the blocks in `take_indices`
        (stream values), all in raster order."""
        intermediates = []
        order = 'raster'
        dt_shift = self.step_shift(grid)
        delta = None
        for i, block in enumerate(blocks):
            if self.block_orders[i] != order:
                x = reorder_tokens(x, grid, order, self.block_orders[i])
                if delta is not None:
                    delta = reorder_tokens(delta, grid, order, self.block_orders[i])
                order = self.block_orders[i]
            checkpointing = self.grad_checkpointing and not torch.jit.is_scripting()
            if not block.fused_norm:
                x = checkpoint(block, x, dt_shift) if checkpointing else block(x, dt_shift)
            elif checkpointing:
                # the add outside: each checkpoint then keeps one stream tensor, not the stream and an update
                if delta is not None:
                    x = x + delta
                x, delta = checkpoint(block.forward_residual, x, None, dt_shift)
            else:
                x, delta = block.forward_residual(x, delta, dt_shift)
            if take_indices is not None and i in take_indices:
                y = x if delta is None else x + delta
                intermediates.append(y if order == 'raster' else reorder_tokens(y, grid, order, 'raster'))
        if order != 'raster':
            x = reorder_tokens(x, grid, order, 'raster')
            if delta is not None:
                delta = reorder_tokens(delta, grid, order, 'raster')
        return x, delta, intermediates

    def _final_norm(self, x: torch.Tensor, delta: Optional[torch.Tensor]) -> torch.Tensor:
        """The final norm of the stream x + delta; a pending delta (fused blocks only) is added in the norm."""
        if delta is None:
            return self.norm(x)
        if _fused_rms_norm(self.norm):
            return rms_norm_of_sum(x, delta, self.norm.weight, self.norm.eps)
        return self.norm(x + delta)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor (B, C, H, W).
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            return_prefix_tokens: Return (spatial, class token) pairs instead of spatial features alone.
            norm: Apply the final norm to the intermediates.
            stop_early: Stop iterating over blocks when the last desired intermediate is reached.
            output_fmt: 'NCHW' (B, D, H/p, W/p) maps or 'NLC' (B, H/p * W/p, D) tokens, class token removed.
            intermediates_only: Only return the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch = x.shape[0]
        grid = self._input_grid(x)

        x = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        x, delta, intermediates = self._forward_blocks(x, grid, blocks, take_indices)
        if norm:
            intermediates = [self.norm(y) for y in intermediates]

        pairs = [self._split_class_token(y) for y in intermediates]
        spatial = [p[0] for p in pairs]
        if output_fmt == 'NCHW':
            spatial = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
        if return_prefix_tokens:
            spatial = list(zip(spatial, [p[1] for p in pairs]))
        if intermediates_only:
            return spatial
        return self._final_norm(x, delta), spatial

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally the final norm and head) after the last wanted intermediate."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) -> normalised tokens (B, L + 1, D), the class token in the middle."""
        grid = self._input_grid(x)
        x, delta, _ = self._forward_blocks(self._embed(x), grid, self.blocks)
        return self._final_norm(x, delta)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = self._split_class_token(x)[0].mean(dim=1)
        elif self.global_pool == 'token':
            x = x[:, (x.shape[1] - 1) // 2]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionLonghorn) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: unwrap training checkpoints, strip DDP prefixes, and resample the position
    embedding and patch embedding when the checkpoint was trained at another image or patch size."""
    for key in ('model', 'state_dict', 'model_ema'):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    out_dict = {}
    for k, v in state_dict.items():
        if k.startswith('module.'):
            k = k[len('module.'):]
        # the second scan direction was called `bwd` before it was called `rev`
        k = k.replace('.mixer.bwd.', '.mixer.rev.')
        if k == 'patch_embed.proj.weight' and v.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            v = resample_patch_embed(v, list(model.patch_embed.proj.weight.shape[-2:]), verbose=True)
        elif k == 'pos_embed':
            grid = tuple(model.patch_embed.grid_size)
            if v.shape[1] != model.pos_embed.shape[1]:
                # Assumes a square source grid, as every size registered here is.
                grid = (int(math.sqrt(v.shape[1] - model.num_prefix_tokens)),) * 2
                v = resample_abs_pos_embed(
                    v,
                    new_size=model.patch_embed.grid_size,
                    old_size=grid,
                    num_prefix_tokens=model.num_prefix_tokens,
                    verbose=True,
                )
            # weights from before the step grid was kept learned their steps on their position grid
            out_dict.setdefault('step_grid', torch.tensor(grid))
        out_dict[k] = v
    return out_dict


def _loading_weights(error: BaseException) -> bool:
    """Whether `error` was raised while timm loaded pretrained weights (not while it built the model)."""
    return any(frame.f_code.co_name in ('load_pretrained', 'load_custom_pretrained')
               for frame, _ in traceback.walk_tb(error.__traceback__))


def _create_vision_longhorn(variant: str, pretrained: bool = False, **kwargs) -> VisionLonghorn:
    out_indices = kwargs.pop('out_indices', None)
    feature_cfg = dict(out_indices=3 if out_indices is None else out_indices, feature_cls='getter')
    if kwargs.get('feature_cls') == 'pyramid':
        # ViTDet's simple feature pyramid (feature_pyramid.py): from the last block unless out_indices says otherwise
        kwargs.pop('feature_cls')
        feature_cfg = dict(feature_cls=SimpleFeaturePyramid, out_indices=(-1,) if out_indices is None else out_indices,
                           **{k: kwargs.pop(k) for k in ('strides', 'out_chans') if k in kwargs})
    try:
        return build_model_with_cfg(
            VisionLonghorn,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as e:
        if not pretrained or not _loading_weights(e):
            raise
        # timm's loaders say what failed but not which weights: name them (a missing or corrupt file, a bad URL).
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        source = overlay.get('file') or overlay.get('url') or overlay.get('hf_hub_id') or 'its pretrained cfg'
        raise RuntimeError(
            f'could not load pretrained weights for {variant} from {source}: {type(e).__name__}: {e}') from e


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        **kwargs,
    }


# No ImageNet weights have been trained yet: these configs carry the preprocessing, not a download.
default_cfgs = generate_default_cfgs({
    'vlonghorn_nano.untrained': _cfg(input_size=(3, 64, 64), crop_pct=1.0),
    'vlonghorn_tiny.untrained': _cfg(),
    'vlonghorn_small.untrained': _cfg(),
    'vlonghorn_base.untrained': _cfg(),
})


@register_model
def vlonghorn_nano(pretrained: bool = False, **kwargs) -> VisionLonghorn:
    """A small, fast Vision Longhorn for tests and smoke runs (64 px, 4 blocks of width 64)."""
    model_args = dict(img_size=64, patch_size=8, embed_dim=64, depth=4)
    return _create_vision_longhorn('vlonghorn_nano', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vlonghorn_tiny(pretrained: bool = False, **kwargs) -> VisionLonghorn:
    """Vision Longhorn tiny: d_model 192, depth 24, patch 16, 224 px."""
    model_args = dict(patch_size=16, embed_dim=192, depth=24)
    return _create_vision_longhorn('vlonghorn_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vlonghorn_small(pretrained: bool = False, **kwargs) -> VisionLonghorn:
    """Vision Longhorn small: d_model 384, depth 24, patch 16, 224 px."""
    model_args = dict(patch_size=16, embed_dim=384, depth=24)
    return _create_vision_longhorn('vlonghorn_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vlonghorn_base(pretrained: bool = False, **kwargs) -> VisionLonghorn:
    """Vision Longhorn base: d_model 768, depth 24, patch 16, 224 px."""
    model_args = dict(patch_size=16, embed_dim=768, depth=24)
    return _create_vision_longhorn('vlonghorn_base', pretrained=pretrained, **dict(model_args, **kwargs))
