"""The PyTorch backend of vlonghorn.ops against the float64 sequential reference, and the ops' input checks."""
import pytest
import torch
import torch.nn.functional as F

from vlonghorn import ops
from vlonghorn.ops import reference
from vlonghorn.ops import scan_torch


def _scan_inputs(batch, length, channels, state, dtype=torch.float64, use_D=True, use_z=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    return dict(
        x=rand(batch, length, channels),
        dt=rand(batch, length, channels),
        k=rand(batch, length, state),
        q=rand(batch, length, state),
        dt_bias=rand(channels),
        D=rand(channels) if use_D else None,
        z=rand(batch, length, channels) if use_z else None,
    )


def _grads(y, inputs, grad):
    tensors = [t for t in inputs.values() if t is not None]
    return torch.autograd.grad(y, tensors, grad)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (B, L, E, N, reverse, D, z): L = 1, odd L, E not a power of two, both directions, optional D and z.
SHAPES = [
    (1, 1, 3, 2, False, True, True),
    (2, 37, 5, 3, False, True, True),
    (2, 37, 5, 3, True, True, True),
    (3, 20, 6, 16, True, False, True),
    (2, 33, 12, 4, False, True, False),
    (1, 65, 7, 16, True, False, False),
]


@pytest.mark.parametrize("chunk_steps", [4, 1000])
@pytest.mark.parametrize("batch,length,channels,state,reverse,use_D,use_z", SHAPES)
def test_scan_torch_matches_reference_float64(batch, length, channels, state, reverse, use_D, use_z, chunk_steps,
                                              monkeypatch):
    # Small chunks exercise the chunk boundaries of the forward and of the backward's carried adjoint.
    monkeypatch.setattr(scan_torch, "_CHUNK_ELEMENTS", chunk_steps * batch * channels * state)
    inputs = _scan_inputs(batch, length, channels, state, use_D=use_D, use_z=use_z)
    y = ops.longhorn_scan(**inputs, reverse=reverse, backend="torch")
    y_ref = reference.longhorn_scan_ref(**inputs, reverse=reverse)
    assert y.dtype == torch.float64 and y.shape == (batch, length, channels)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(y)
    for name, g, g_ref in zip([k for k, v in inputs.items() if v is not None],
                              _grads(y, inputs, grad), _grads(y_ref, inputs, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_scan_torch_passes_gradcheck():
    inputs = _scan_inputs(2, 9, 3, 2)
    names = list(inputs)

    def fn(*tensors):
        return ops.longhorn_scan(**dict(zip(names, tensors)), reverse=True, backend="torch")

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_scan_torch_low_precision_inputs(dtype, tol):
    """fp32 state whatever the input dtype: error vs float64 on the same (rounded) inputs stays at rounding level."""
    inputs = _scan_inputs(2, 41, 24, 16, dtype=dtype)
    y = ops.longhorn_scan(**inputs, backend="torch")
    assert y.dtype == dtype
    y_ref = reference.longhorn_scan_ref(**inputs)
    assert _rel(y, y_ref) < tol
    grad = torch.randn(y.shape, dtype=torch.float64)
    grads = _grads(y, inputs, grad.to(dtype))
    grads_ref = _grads(y_ref, inputs, grad.to(dtype).double())
    for name, g, g_ref in zip(inputs, grads, grads_ref):
        assert g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert _rel(g, g_ref) < tol, name


def test_scan_strong_write_stays_finite_and_exact():
    """k one-hot times 5 and beta near 1: decays near 1/26, the numerically hardest case for the state."""
    inputs = _scan_inputs(2, 30, 8, 16)
    with torch.no_grad():
        inputs["k"].zero_()
        inputs["k"][..., 3] = 5.0
        inputs["dt_bias"].fill_(8.0)
    y = ops.longhorn_scan(**inputs, backend="torch")
    y_ref = reference.longhorn_scan_ref(**inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(y)
    for g, g_ref in zip(_grads(y, inputs, grad), _grads(y_ref, inputs, grad)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


def test_scan_accepts_strided_views():
    """x and z as halves of one projection, k and q as slices of another: the layout the model produces."""
    gen = torch.Generator().manual_seed(1)
    xz = torch.randn(2, 17, 2 * 6, generator=gen, dtype=torch.float64)
    proj = torch.randn(2, 17, 3 + 2 * 4, generator=gen, dtype=torch.float64)
    x, z = xz.chunk(2, dim=-1)
    dt_low, k, q = proj.split([3, 4, 4], dim=-1)
    dt = dt_low @ torch.randn(3, 6, generator=gen, dtype=torch.float64)
    bias, D = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y = ops.longhorn_scan(x, dt, k, q, bias, D, z, backend="torch")
    y_ref = reference.longhorn_scan_ref(x.contiguous(), dt, k.contiguous(), q.contiguous(), bias, D, z.contiguous())
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)


def test_bidirectional_scan_torch_matches_reference():
    fwd = _scan_inputs(2, 23, 10, 4, seed=1)
    rev = _scan_inputs(2, 23, 10, 4, seed=2, use_z=False)
    z = fwd["z"]
    y = ops.bidirectional_longhorn_scan(
        fwd["x"], rev["x"], fwd["dt"], rev["dt"], fwd["k"], fwd["q"], rev["k"], rev["q"],
        fwd["dt_bias"], rev["dt_bias"], fwd["D"], rev["D"], z, backend="torch")
    ref_fwd = reference.longhorn_scan_ref(**{**fwd, "z": None})
    ref_rev = reference.longhorn_scan_ref(**rev, reverse=True)
    y_ref = (ref_fwd + ref_rev) / 2 * F.silu(z)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    tensors = [t for t in (*fwd.values(), *rev.values()) if t is not None]
    grad = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, tensors, grad), torch.autograd.grad(y_ref, tensors, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_bidirectional_conv1d_silu_torch_matches_reference(bias):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 13, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None,
              torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True),
              torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None]
    out = ops.bidirectional_conv1d_silu(x, *params, backend="torch")
    ref = reference.bidirectional_conv1d_silu_ref(x, *params)
    tensors = [x] + [p for p in params if p is not None]
    grads = [torch.randn_like(o) for o in out]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, tensors, grads)
    want = torch.autograd.grad(ref, tensors, grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # The backward direction at t sees x[t .. t+3]: its last output depends on x[-1] alone.
    x_only_last = torch.zeros_like(x)
    x_only_last[:, -1] = x[:, -1]
    torch.testing.assert_close(ops.bidirectional_conv1d_silu(x_only_last, *params, backend="torch")[1][:, -1],
                               out[1][:, -1])


def test_scan_runs_under_autocast_with_fp32_state():
    inputs = _scan_inputs(2, 21, 8, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.longhorn_scan(**inputs, backend="torch")
    assert y.dtype == torch.bfloat16
    assert _rel(y, reference.longhorn_scan_ref(**inputs)) < 1e-2


def test_scan_input_errors_name_the_argument():
    good = {k: v.detach() for k, v in _scan_inputs(2, 5, 4, 3).items()}
    cases = [
        (dict(x=good["x"][0]), r"x must have 3 dims"),
        (dict(dt=good["dt"][:, :4]), r"dt must have shape \(2, 5, 4\)"),
        (dict(k=good["k"][:1]), r"k must have shape \(2, 5, N\)"),
        (dict(q=good["q"][..., :2]), r"q must have shape \(2, 5, 3\)"),
        (dict(dt_bias=good["dt_bias"][:3]), r"dt_bias must have shape \(4,\)"),
        (dict(D=torch.ones(5, dtype=torch.float64)), r"D must have shape \(4,\)"),
        (dict(z=good["z"][:, :, :2]), r"z must have shape"),
        (dict(x=good["x"].long()), r"x must be float16, bfloat16, float32 or float64"),
        (dict(k=[1, 2]), r"k must be a torch.Tensor"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.longhorn_scan(**{**good, **change}, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.longhorn_scan(**good, backend="cuda")


def test_debug_flag_rejects_nan(monkeypatch):
    from vlonghorn.ops import longhorn
    good = {k: v.detach() for k, v in _scan_inputs(1, 4, 3, 2).items()}
    good["dt"][0, 1, 2] = float("nan")
    ops.longhorn_scan(**good, backend="torch")  # not checked by default: no sync on the hot path
    monkeypatch.setattr(longhorn, "_DEBUG", True)
    with pytest.raises(ValueError, match="dt contains NaN or inf"):
        ops.longhorn_scan(**good, backend="torch")


def test_conv_input_errors():
    x = torch.randn(2, 5, 4)
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"weight_rev must have shape \(4, 4\)"):
        ops.bidirectional_conv1d_silu(x, w, None, torch.randn(3, 4), None, backend="torch")
    with pytest.raises(ValueError, match=r"bias_fwd must have shape \(4,\)"):
        ops.bidirectional_conv1d_silu(x, w, torch.randn(5), w, None, backend="torch")


def test_auto_backend_uses_torch_on_cpu():
    from vlonghorn.ops import longhorn
    assert longhorn._resolve_backend("auto", torch.zeros(1)) == "torch"


def test_conv_takes_bf16_activations_with_fp32_parameters():
    x = torch.randn(2, 9, 6, dtype=torch.bfloat16)
    w, b = torch.randn(6, 4), torch.randn(6)
    out = ops.bidirectional_conv1d_silu(x, w, b, w, b, backend="torch")
    ref = reference.bidirectional_conv1d_silu_ref(x, w, b, w, b)
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16
        assert _rel(o, r) < 1e-2


def test_backend_environment_variable_decides_auto(monkeypatch):
    from vlonghorn.ops import longhorn
    monkeypatch.setattr(longhorn, "_AUTO", "torch")
    assert longhorn._resolve_backend("auto", torch.zeros(1)) == "torch"
    monkeypatch.setattr(longhorn, "_AUTO", "cuda")
    with pytest.raises(ValueError, match="VLONGHORN_BACKEND must be one of"):
        longhorn._resolve_backend("auto", torch.zeros(1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_and_expanded_parameters_match_contiguous(backend):
    """dt_bias, D (scan) and the conv's weights and biases may be strided or expanded (stride-0) views; every backend
    reads them as their values (the Triton launchers once read them as if contiguous)."""
    torch.manual_seed(0)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # (else: the interpreter)

    def randn(*shape):
        return torch.randn(*shape, device=dev)

    B, L, E, N = 2, 9, 8, 16
    x, dt, z = randn(B, L, E), randn(B, L, E), randn(B, L, E)
    k, q = randn(B, L, N) * 0.5, randn(B, L, N) * 0.5
    views = {"strided": lambda v: torch.stack([v, torch.randn_like(v)], -1)[..., 0],
             "expanded": lambda v: v[:1].expand(E)}
    for kind, view in views.items():
        for bias, D in ((view(randn(E)), view(randn(E))),):
            assert not bias.is_contiguous()
            got = ops.longhorn_scan(x, dt, k, q, bias, D, z, backend=backend)
            ref = ops.longhorn_scan(x, dt, k, q, bias.contiguous(), D.contiguous(), z, backend="torch")
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"scan, {kind} parameters")
            y = ops.bidirectional_longhorn_scan(x, x.flip(1), dt, dt, k, q, k, q, bias, bias, D, D, z, backend=backend)
            y_ref = ops.bidirectional_longhorn_scan(x, x.flip(1), dt, dt, k, q, k, q, bias.contiguous(),
                                                    bias.contiguous(), D.contiguous(), D.contiguous(), z,
                                                    backend="torch")
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=f"bidirectional scan, {kind} parameters")
        w = randn(E, 8)[:, ::2] if kind == "strided" else randn(1, 4).expand(E, 4)
        b = view(randn(E))
        got = ops.bidirectional_conv1d_silu(x, w, b, w, b, backend=backend)
        ref = ops.bidirectional_conv1d_silu(x, w.contiguous(), b.contiguous(), w.contiguous(), b.contiguous(),
                                            backend="torch")
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=f"conv, {kind} parameters")


@pytest.mark.parametrize("width,dtype,param_dtype", [(3, torch.bfloat16, torch.float32),
                                                     (4, torch.float64, torch.float32)])
def test_conv_the_kernels_do_not_take_runs_on_torch_with_cast_parameters(width, dtype, param_dtype):
    """backend="triton" with a conv the kernels do not take (width != 4, fp64) runs the PyTorch path, which casts
    the parameters to the activations' dtype: the same result as backend="torch" (it raised a dtype error)."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8, dtype=dtype)
    w, b = torch.randn(8, width, dtype=param_dtype), torch.randn(8, dtype=param_dtype)
    got = ops.bidirectional_conv1d_silu(x, w, b, w, b, backend="triton")
    ref = ops.bidirectional_conv1d_silu(x, w, b, w, b, backend="torch")
    assert got[0].dtype == dtype
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


def test_uses_triton_tells_where_a_scan_runs():
    """The backend decision lives in ops: fp64 and state sizes the kernels' record cannot hold run on PyTorch even
    when the Triton backend is asked for, and uses_triton says so."""
    x32, x64 = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4, dtype=torch.float64)
    assert ops.uses_triton(x32, backend="triton") and not ops.uses_triton(x64, backend="triton")
    assert not ops.uses_triton(x32, backend="triton", d_state=12)
    assert not ops.uses_triton(x32, backend="torch")


@pytest.mark.parametrize("matrix", [False, True], ids=["chunks", "matrix"])
@pytest.mark.parametrize("length,reverse,strong", [(1, False, False), (16, True, False), (17, False, True),
                                                    (50, True, False), (197, False, False), (300, True, True),
                                                    (4500, False, False)])
def test_chunked_form_matches_reference(length, reverse, strong, matrix, monkeypatch):
    """The traced form (chunks of 16 tokens, then the chunks' entry states: a matrix of bounded decay products, or
    for many chunks the chunked scan one level up, twice for 4500 tokens) against the float64
    reference: fp32 < 1e-5, fp64 to rounding, finite for strong writes whose decays underflow a chunk's product."""
    monkeypatch.setattr(scan_torch, "_MATRIX_CHUNKS", 10 ** 9 if matrix else 0)
    gen = torch.Generator().manual_seed(length)
    B, E, N = 2, 6, 16
    x, z = torch.randn(B, length, E, generator=gen), torch.randn(B, length, E, generator=gen)
    dt = torch.randn(B, length, E, generator=gen) - 1
    k, q = torch.randn(B, length, N, generator=gen) * 0.5, torch.randn(B, length, N, generator=gen) * 0.5
    if strong:  # one-hot k times 30, beta near 1: decays about 1e-3, a chunk's product below fp32's range
        k = torch.nn.functional.one_hot(torch.randint(0, N, (B, length), generator=gen), N).float() * 30
        dt = dt.abs() + 8
    bias, D = torch.randn(E, generator=gen), torch.randn(E, generator=gen)
    ref = reference.longhorn_scan_ref(x, dt, k, q, bias, D, z, reverse)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        x_, dt_, k_, q_, bias_, D_, z_ = (t.to(dtype) for t in (x, dt, k, q, bias, D, z))
        y = scan_torch._chunked(x_, dt_, k_, q_, bias_.expand(B, -1), D_.expand(B, -1), z_, reverse)
        assert y.dtype == dtype and torch.isfinite(y).all()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < tol, (dtype, err)


def test_traced_calls_take_the_chunked_form():
    """Under torch.compile the scan is the chunked form (no graph break, no loop over the sequence): the compiled
    function matches eager mode in its output and gradients."""
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 40, 8, generator=gen), torch.randn(2, 40, 8, generator=gen) - 1,
            torch.randn(2, 40, 16, generator=gen) * 0.5, torch.randn(2, 40, 16, generator=gen) * 0.5,
            torch.randn(8, generator=gen), torch.randn(8, generator=gen), torch.randn(2, 40, 8, generator=gen)]
    args = [a.requires_grad_() for a in args]
    compiled = torch.compile(lambda *a: ops.longhorn_scan(*a, backend="torch"), fullgraph=True, backend="aot_eager")
    y_eager = ops.longhorn_scan(*args, backend="torch")
    y = compiled(*args)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(y.sum(), args), torch.autograd.grad(y_eager.sum(), args)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
