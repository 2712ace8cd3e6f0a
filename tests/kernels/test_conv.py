"""The bidirectional conv1d + SiLU kernels against the float64 reference."""
import pytest
import torch

from kernel_checks import DEV, GPU_LARGE, _check, _randn, bidirectional_conv1d_silu_triton
from vlonghorn.ops.reference import bidirectional_conv1d_silu_ref


# ----------------------------------------------------------------------------------------------------- conv
CONV_CASES = [
    # B, L, E, dtype, strided, bias
    pytest.param(2, 37, 40, torch.float32, False, True, id="fp32"),
    pytest.param(1, 1, 33, torch.float32, True, True, id="L1-strided"),
    pytest.param(2, 3, 40, torch.float32, False, False, id="L3-nobias"),
    pytest.param(2, 19, 40, torch.bfloat16, True, True, id="bf16-strided"),
    pytest.param(4, 300, 200, torch.float32, True, True, id="large-fp32", marks=GPU_LARGE),
    pytest.param(8, 197, 768, torch.bfloat16, True, True, id="large-bf16", marks=GPU_LARGE),
]


@pytest.mark.parametrize("B,L,E,dtype,strided,bias", CONV_CASES)
def test_bidirectional_conv1d_silu(config, B, L, E, dtype, strided, bias):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(B, L, 2 * E if strided else E, generator=g).to(DEV, dtype).requires_grad_()
    x = base[..., :E] if strided else base
    params = [torch.randn(E, 4, generator=g) * 0.5, torch.randn(E, generator=g) if bias else None,
              torch.randn(E, 4, generator=g) * 0.5, torch.randn(E, generator=g) if bias else None]
    params = [p.to(DEV).requires_grad_() if p is not None else None for p in params]
    leaves = [base] + [p for p in params if p is not None]
    y_fwd, y_rev = bidirectional_conv1d_silu_triton(x, *params)
    assert y_fwd.dtype == dtype and y_fwd.shape == (B, L, E) and y_rev.shape == (B, L, E)
    g_fwd, g_bwd = _randn(B, L, E, dtype=dtype), _randn(B, L, E, dtype=dtype, seed=10)
    got = torch.autograd.grad((y_fwd, y_rev), leaves, (g_fwd, g_bwd))
    r_fwd, r_bwd = bidirectional_conv1d_silu_ref(x, *params)
    ref = torch.autograd.grad((r_fwd, r_bwd), leaves, (g_fwd.double(), g_bwd.double()))
    _check("x_fwd", y_fwd, r_fwd, dtype)
    _check("x_bwd", y_rev, r_bwd, dtype)
    for i, (a, b) in enumerate(zip(got, ref)):
        _check(f"grad {i}", a, b, dtype)
