"""Shared checks of the Triton kernels against the float64 sequential reference (tests/kernels, tests/ops).

Every output and every gradient on awkward shapes: L = 1 and L not a multiple of any tile or checkpoint interval,
channel counts that are not a multiple of the channel block, B = 1, strided inputs (slices of larger tensors, as the
model passes them), a "strong write" case (one-hot k times 5, beta near 1), fp32 (RMS-relative error < 1e-5) and
bf16 (< 1e-2 against the reference evaluated on the bf16-rounded inputs).

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
Triton is imported) at small shapes; the large-shape cases need CUDA, carry the `gpu_fast` mark (the GPU's quick
tier: `pytest -m gpu_fast`) and report as skipped without it. conftest.py also makes the interpreter's float32 <->
bfloat16 conversions exact, rounding to nearest even as the GPU does.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from vlonghorn.kernels import bidirectional_conv1d_silu as bidirectional_conv1d_silu_triton
from vlonghorn.kernels import bidirectional_longhorn_scan as bidirectional_longhorn_scan_triton

CUDA = torch.cuda.is_available()


DEV = "cuda" if CUDA else "cpu"


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (large shapes are too slow for the interpreter)")
# the large shapes of the GPU's quick tier (`pytest -m gpu_fast`)
GPU_LARGE = (needs_cuda, pytest.mark.gpu_fast)
if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise RuntimeError("the kernel tests need TRITON_INTERPRET=1 on a machine without CUDA "
                       "(tests/conftest.py sets it; was it overridden?)")

# Small launch parameters for the interpreter, so that short sequences still cross several checkpoint
# windows (ck) and backward tiles (bwd_tt), the channel count is not a multiple of the block, and each norm
# backward program walks several blocks of rows.
SMALL_CFG = {"forward_bd": 32, "forward_warps": 1, "backward_bd": 32, "backward_warps": 1, "backward_tile": 4,
             "checkpoint_every": 16,
             "conv_bd": 32, "conv_warps": 1, "conv_chunk": 8,
             "norm_elems": 256, "norm_warps": 1, "norm_backward_per_sm": 2}


def _rel(a, b):
    """RMS-relative error of a against the float64 reference b."""
    a = a.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _check(name, got, ref, dtype):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    err = _rel(got, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    return err


def _scan_inputs(B, L, E, N, dtype, strided=False, strong=False, has_D=True, has_z=True, seed=0):
    """Inputs of one scan direction (leaf tensors, requires_grad), laid out as the model produces them."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    x = rnd(B, L, E)
    dt = rnd(B, L, E, scale=1.0, shift=-1.0)
    k, q = rnd(B, L, N, scale=0.5), rnd(B, L, N, scale=0.5)
    bias = rnd(E, scale=0.5)
    D = rnd(E) if has_D else None
    z = rnd(B, L, E) if has_z else None
    if strong:
        # strong writes: k one-hot times 5 on half the tokens, beta = sigmoid(dt + bias) close to 1
        hot = F.one_hot(torch.randint(0, N, (B, L), generator=g), N).float() * 5.0
        sel = (torch.rand(B, L, 1, generator=g) < 0.5).float()
        if strong == "first":       # in batch element 0 only
            sel[1:] = 0.0
        k = sel * hot + (1 - sel) * k
        dt = dt.abs() + 6.0
    leaves = {}

    def leaf(name, t):
        t = t.to(DEV, dtype)
        leaves[name] = t.requires_grad_()
        return t

    if strided:
        # x, z = in_proj(h).chunk(2, -1) and k, q = slices of x_proj's output (after a 5-wide dt_low)
        xz = leaf("xz", torch.cat([x, z if z is not None else rnd(B, L, E)], -1))
        x_v, z_v = xz[..., :E], (xz[..., E:] if has_z else None)
        kq = leaf("kq", torch.cat([rnd(B, L, 5), k, q], -1))
        k_v, q_v = kq[..., 5:5 + N], kq[..., 5 + N:]
    else:
        x_v, k_v, q_v = leaf("x", x), leaf("k", k), leaf("q", q)
        z_v = leaf("z", z) if has_z else None
    dt_v = leaf("dt", dt)
    bias_v = leaf("dt_bias", bias.to(torch.float32))  # parameters stay fp32 under autocast
    D_v = leaf("D", D.to(torch.float32)) if has_D else None
    return dict(x=x_v, dt=dt_v, k=k_v, q=q_v, dt_bias=bias_v, D=D_v, z=z_v), leaves


class SeenOps(TorchDispatchMode):
    """A dispatch mode that records the name of every op dispatched under it (in `seen`)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def _randn(*shape, dtype=torch.float32, seed=9):
    """A seeded random tensor on DEV (the checks' output gradients do not depend on the tests that ran before)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _grads(out, leaves, grad_out):
    names = list(leaves)
    gs = torch.autograd.grad(out, [leaves[n] for n in names], grad_out)
    return dict(zip(names, gs))


# ------------------------------------------------------------------------------------- integration, compile
def _mixer(x, z, conv_params, scan_params):
    """A Vision Longhorn mixer's kernel calls, as the model makes them (no linear layers)."""
    x_fwd, x_rev = bidirectional_conv1d_silu_triton(x, *conv_params)
    (dt_fwd, k_fwd, q_fwd, bias_fwd, D_fwd), (dt_rev, k_rev, q_rev, bias_rev, D_rev) = scan_params
    return bidirectional_longhorn_scan_triton(x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev, bias_fwd,
                                              bias_rev, D_fwd, D_rev, z)


def _mixer_inputs(B, L, E, seed):
    """Leaf tensors for _mixer: x, z, the conv parameters and both directions' scan inputs."""
    gen = torch.Generator().manual_seed(seed)

    def p(*s):
        return (torch.randn(*s, generator=gen) * 0.5).to(DEV).requires_grad_()

    conv_params = [p(E, 4), p(E), p(E, 4), p(E)]
    scan_params = [[p(B, L, E), p(B, L, 16), p(B, L, 16), p(E), p(E)] for _ in range(2)]
    return p(B, L, E), p(B, L, E), conv_params, scan_params


@pytest.fixture
def config(request):
    """Temporarily replace kernel launch parameters: SMALL_CFG on the interpreter, the defaults on CUDA (a fixture:
    test modules that use it import it from here)."""
    from vlonghorn.kernels import CONFIG
    from vlonghorn.kernels.launch import RECON_FLAGS, RECON_STATE
    saved = CONFIG.as_dict()
    CONFIG.update(getattr(request, "param", None) or ({} if CUDA else SMALL_CFG))
    RECON_STATE.clear()     # no running share of redone programs carries over from another test
    yield CONFIG
    CONFIG.update(saved)
    RECON_STATE.clear()
    RECON_FLAGS.update(record=False, last=None)
