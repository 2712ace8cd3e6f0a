"""The fused residual add + RMSNorm kernels against the float64 reference: r, y and every gradient."""
import pytest
import torch

from kernel_checks import CUDA, DEV, GPU_LARGE, _check, _randn
from vlonghorn.kernels import add_rms_norm as add_rms_norm_triton
from vlonghorn.ops.norm import add_rms_norm_torch

EPS = 1e-6
F32, BF16 = torch.float32, torch.bfloat16

NORM_CASES = [
    # shape, x dtype, delta dtype (None: no delta), out dtype, strided, rows per program (None: the config's)
    pytest.param((2, 37, 100), F32, BF16, BF16, False, None, id="model-D100"),
    pytest.param((2, 37, 100), F32, BF16, BF16, False, 32, id="model-D100-32rows"),
    pytest.param((1, 1, 384), F32, F32, F32, False, None, id="one-row-fp32"),
    pytest.param((3, 11, 384), F32, None, BF16, False, None, id="no-delta"),
    pytest.param((2, 19, 100), BF16, BF16, BF16, True, None, id="bf16-stream-strided"),
    pytest.param((2, 13, 64), F32, F32, F32, True, None, id="strided-fp32"),
    pytest.param((50, 100), F32, BF16, F32, False, None, id="2d"),
    pytest.param((256, 197, 384), F32, BF16, BF16, True, None, id="large-small", marks=GPU_LARGE),
    pytest.param((64, 197, 768), F32, BF16, BF16, False, None, id="large-base", marks=GPU_LARGE),
    pytest.param((16, 197, 1024), F32, None, F32, False, None, id="large-1024-nodelta", marks=GPU_LARGE),
    pytest.param((7, 33, 192), BF16, BF16, BF16, False, None, id="large-bf16-stream", marks=GPU_LARGE),
]


def _inputs(shape, dtype, delta_dtype, strided, seed=3):
    """Leaves (x, delta, weight) on DEV and the views the op takes (strided: slices of wider tensors)."""
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    wide = shape[:-1] + (2 * D if strided else D,)
    x_base = (torch.randn(wide, generator=g) * 2.0 + 0.5).to(DEV, dtype).requires_grad_()
    d_base = (torch.randn(wide, generator=g).to(DEV, delta_dtype).requires_grad_() if delta_dtype is not None
              else None)
    w = (1.0 + 0.3 * torch.randn(D, generator=g)).to(DEV).requires_grad_()
    x = x_base[..., D:] if strided else x_base
    delta = (d_base[..., :D] if strided else d_base) if d_base is not None else None
    leaves = [t for t in (x_base, d_base, w) if t is not None]
    return x, delta, w, leaves


def _check_against_reference(x, delta, w, leaves, out_dtype, use_r=True):
    r, y = add_rms_norm_triton(x, delta, w, EPS, out_dtype)
    r_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    assert r.dtype == r_dtype and y.dtype == out_dtype and r.shape == y.shape == x.shape
    if delta is None:
        assert r is x
    r64, y64 = add_rms_norm_torch(x.double(), delta.double() if delta is not None else None, w.double(), EPS,
                                  torch.float64)
    g_r, g_y = _randn(*x.shape, dtype=r_dtype, seed=11), _randn(*x.shape, dtype=out_dtype, seed=12)
    outs, refs, gs = ((r, y), (r64, y64), (g_r, g_y)) if use_r else ((y,), (y64,), (g_y,))
    got = torch.autograd.grad(outs, leaves, gs)
    ref = torch.autograd.grad(refs, leaves, tuple(g.double() for g in gs))
    _check("r", r, r64, r.dtype)
    _check("y", y, y64, out_dtype if r_dtype == F32 else r_dtype)
    for name, a, b in zip(("x", "delta", "weight") if delta is not None else ("x", "weight"), got, ref):
        # a bf16 stream is rounded before the norm (as unfused): every gradient carries bf16 errors
        _check(f"grad of {name}", a, b, a.dtype if r_dtype == F32 else r_dtype)


@pytest.mark.parametrize("shape,dtype,delta_dtype,out_dtype,strided,rows", NORM_CASES)
def test_add_rms_norm(config, shape, dtype, delta_dtype, out_dtype, strided, rows):
    if rows is not None:
        config.update(norm_elems=rows * 128)      # D = 100 -> 128 columns
    x, delta, w, leaves = _inputs(shape, dtype, delta_dtype, strided)
    _check_against_reference(x, delta, w, leaves, out_dtype)


def test_add_rms_norm_without_the_residual_gradient(config):
    """Only y is used: r's gradient is None and the backward takes no residual term."""
    x, delta, w, leaves = _inputs((2, 9, 100), F32, BF16, False)
    _check_against_reference(x, delta, w, leaves, BF16, use_r=False)


def test_add_rms_norm_zero_and_large_rows_stay_finite(config):
    """A zero row (rstd = 1 / sqrt(eps)) and rows of large values give finite outputs and gradients."""
    x = torch.zeros(3, 5, 100, device=DEV)
    x[1] = 3e4
    x[2, :, ::2] = -1e-20
    x.requires_grad_()
    delta = torch.zeros(3, 5, 100, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.ones(100, device=DEV, requires_grad=True)
    r, y = add_rms_norm_triton(x, delta, w, EPS, BF16)
    grads = torch.autograd.grad((r, y), (x, delta, w), (torch.ones_like(r), torch.ones_like(y)))
    for t in (r, y) + grads:
        assert torch.isfinite(t).all()
    assert (y[0] == 0).all()


def test_recomputed_norm_matches_the_fused_one(config):
    """The norm of the stored r (what a recompute region's backward runs) equals the fused call's bit for bit."""
    x, delta, w, _ = _inputs((4, 23, 384) if not CUDA else (64, 197, 384), F32, BF16, False)
    with torch.no_grad():
        r, y = add_rms_norm_triton(x, delta, w, EPS, BF16)
        assert torch.equal(add_rms_norm_triton(r, None, w, EPS, BF16)[1], y)


def test_empty_batch(config):
    x = torch.randn(0, 7, 100, device=DEV, requires_grad=True)
    w = torch.ones(100, device=DEV, requires_grad=True)
    r, y = add_rms_norm_triton(x, torch.zeros_like(x), w, EPS, BF16)
    assert y.shape == (0, 7, 100)
    gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


def test_opcheck_norm_registrations(config):
    """torch.library's checks of the norm ops' schemas, fake implementations and autograd registrations."""
    from vlonghorn.kernels.custom_ops import norm_backward, norm_forward
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    x = torch.randn(2, 5, 40, device=DEV, requires_grad=True)
    delta = torch.randn(2, 5, 40, device=DEV, dtype=BF16, requires_grad=True)
    w = torch.randn(40, device=DEV, requires_grad=True)
    torch.library.opcheck(norm_forward, (x, delta, w, EPS, BF16), test_utils=utils)
    torch.library.opcheck(norm_forward, (x, None, w, EPS, F32), test_utils=utils)
    r, y, rstd = norm_forward(x.detach(), delta.detach(), w.detach(), EPS, BF16)
    torch.library.opcheck(norm_backward, (torch.randn_like(y), torch.randn_like(r), r, rstd, w.detach(), F32, BF16),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(norm_backward, (torch.randn_like(y), None, r, rstd, w.detach(), F32, None),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_add_rms_norm_compiles_in_one_graph(config):
    """Through the custom ops under torch.compile (fullgraph): the same outputs and gradients as eager."""
    x, delta, w, leaves = _inputs((2, 7, 100), F32, BF16, False)

    def fn(x, delta, w):
        r, y = add_rms_norm_triton(x, delta, w, EPS, BF16)
        return r * 2, y

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    outs, outs_eager = compiled(x, delta, w), fn(x, delta, w)
    for a, b in zip(outs, outs_eager):
        torch.testing.assert_close(a, b)
    gs = (torch.ones_like(outs[0]), torch.ones_like(outs[1]))
    for a, b in zip(torch.autograd.grad(outs, leaves, gs), torch.autograd.grad(outs_eager, leaves, gs)):
        torch.testing.assert_close(a, b)


def test_expanded_output_gradients(config):
    """Output gradients with zero strides (what .sum() hands back) read as the dense ones."""
    x, delta, w, leaves = _inputs((2, 9, 100), F32, BF16, False)
    r, y = add_rms_norm_triton(x, delta, w, EPS, BF16)
    got = torch.autograd.grad(y.float().sum() + r.sum(), leaves, retain_graph=True)
    dense = torch.autograd.grad((r, y), leaves, (torch.ones_like(r), torch.ones_like(y)))
    for a, b in zip(got, dense):
        assert torch.equal(a, b)
