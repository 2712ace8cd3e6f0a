"""The fused residual add + RMSNorm op: its PyTorch path against timm's unfused norm, the dispatch, the input
checks, and `residual_branch` (the blocks' add + norm + branch) on its recompute and plain paths."""
import pytest
import torch
from timm.layers import RmsNorm

from kernel_checks import DEV, _rel
from vlonghorn import ops
from vlonghorn.ops import longhorn


def _inputs(shape=(2, 9, 40), seed=0, delta_dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    delta = torch.randn(shape, generator=g).to(device, delta_dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device).requires_grad_()
    return x, delta, w


def test_torch_path_is_the_unfused_add_and_timm_norm():
    x, delta, w = _inputs()
    norm = RmsNorm(40, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(w)
    r, y = ops.add_rms_norm(x, delta, w, 1e-6, backend="torch")
    r_ref = x + delta
    y_ref = norm(r_ref)
    assert r.dtype == y.dtype == torch.float32
    assert torch.equal(r, r_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(y.square().sum() + r.sum(), (x, delta, w))
    ref = torch.autograd.grad(y_ref.square().sum() + r_ref.sum(), (x, delta, norm.weight))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_out_dtype_and_rms_norm():
    x, delta, w = _inputs()
    r, y = ops.add_rms_norm(x, delta, w, out_dtype=torch.bfloat16)
    assert r.dtype == torch.float32 and y.dtype == torch.bfloat16
    y32 = ops.add_rms_norm(x, delta, w)[1]
    assert _rel(y, y32.double()) < 1e-2
    assert torch.equal(ops.rms_norm(r, w), y32)
    assert ops.add_rms_norm(x, None, w)[0] is x


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_torch_backend(config, out_dtype):
    """backend='triton' (the interpreter on CPU) against the PyTorch path: outputs and gradients."""
    x, delta, w = _inputs((3, 7, 100), device=DEV)     # the Triton path: CUDA, or the interpreter on a CPU
    results = []
    for backend in ("triton", "torch"):
        r, y = ops.add_rms_norm(x, delta, w, out_dtype=out_dtype, backend=backend)
        grads = torch.autograd.grad((r, y), (x, delta, w), (torch.ones_like(r), torch.ones_like(y)))
        results.append((r, y) + grads)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    for a, b in zip(*results):
        assert a.dtype == b.dtype and _rel(a, b) < (tol if a.dtype == torch.float32 else 1e-2)


def test_dispatch():
    x, delta, w = _inputs()
    assert not ops.uses_triton_norm(x, w, delta)         # CPU: the PyTorch path
    assert ops.uses_triton_norm(x, w, delta, backend="triton")
    assert not ops.uses_triton_norm(x.double(), w, backend="triton")   # fp64 stays on PyTorch
    assert not ops.uses_triton_norm(x, w, out_dtype=torch.float64, backend="triton")
    wide = torch.zeros(1, 20000)
    assert not ops.uses_triton_norm(wide, torch.ones(20000), backend="triton")


def test_input_errors_name_the_argument():
    x, delta, w = (t.detach() for t in _inputs())
    cases = [
        (dict(weight=w[:3]), r"weight must have shape \(40,\)"),
        (dict(delta=delta[:, :4]), r"delta must have shape \(2, 9, 40\)"),
        (dict(delta=delta.long()), r"delta must be float16, bfloat16, float32 or float64"),
        (dict(x=[1.0]), r"x must be a torch.Tensor"),
        (dict(x=torch.tensor(1.0)), r"x must have at least one dim"),
        (dict(eps=-1.0), r"eps must be a number >= 0"),
        (dict(eps="1e-6"), r"eps must be a number >= 0"),
        (dict(out_dtype=torch.int32), r"out_dtype must be None"),
        (dict(out_dtype="bf16"), r"out_dtype must be None"),
    ]
    good = dict(x=x, delta=delta, weight=w, eps=1e-6)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.add_rms_norm(**{**good, **change}, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.add_rms_norm(x, delta, w, backend="cuda")


# --------------------------------------------------------------------------------------------- residual_branch
class _Linear(torch.nn.Module):
    """A branch without a scan (the region's norm and gradients alone, fast under the interpreter)."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("branch", ["linear", pytest.param("mixer", marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_residual_branch_recompute_matches_the_plain_path(config, monkeypatch, with_delta, branch):
    """On the Triton path (the interpreter standing in for CUDA): the recompute region (one norm launch forward,
    the norm's backward taking r's gradient) gives the plain path's outputs and every gradient, and a scan in the
    branch runs once."""
    from vlonghorn.kernels import launch
    from vlonghorn.models.vision_longhorn import LonghornMixer
    monkeypatch.setattr(longhorn, "_AUTO", "triton")
    scans = []
    original = launch.scan_forward
    monkeypatch.setattr(launch, "scan_forward", lambda *a: scans.append(1) or original(*a))
    torch.manual_seed(4)
    fn = (LonghornMixer(32, d_state=16) if branch == "mixer" else _Linear(32)).to(DEV)
    x, delta, w = _inputs((2, 9, 32), seed=4, device=DEV)
    delta = delta if with_delta else None
    leaves = [t for t in (x, delta, w) if t is not None] + list(fn.parameters())
    results = []
    for recompute in (False, True):
        scans.clear()
        r, y = ops.residual_branch(fn, x, delta, w, 1e-6, fn.parameters(), recompute=recompute)
        assert ("RecomputeNormBranch" in type(y.grad_fn).__name__) == recompute
        out = (r * 0.5 + y).square().sum()
        results.append((r, y) + torch.autograd.grad(out, leaves))
        assert len(scans) == (branch == "mixer")
        if not with_delta:
            assert r is x
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.isfinite(a).all() and _rel(a, b) < 1e-6, (i, _rel(a, b))
