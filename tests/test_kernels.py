"""The Triton kernels (kernels/, installed as vlonghorn.kernels) against the float64 sequential reference.

Every output and every gradient of the fused scan (one direction and both) and of the bidirectional
conv1d + SiLU, on awkward shapes: L = 1 and L not a multiple of any tile or checkpoint interval, channel counts
that are not a multiple of the channel block, B = 1, strided inputs (slices of larger tensors, as the model
passes them), a "strong write" case (one-hot k times 5, beta near 1), fp32 (relative error < 1e-5) and bf16
(RMS-relative error < 1e-2 against the reference evaluated on the bf16-rounded inputs).

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
before Triton is imported) at small shapes; the large-shape cases need CUDA and report as skipped without it.
conftest.py also makes the interpreter's float32 <-> bfloat16 conversions exact, rounding to nearest even as the
GPU does (the interpreter truncates: twice the rounding error in every bf16 value a kernel stores).
"""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()

pytest.importorskip("triton", reason="the Triton kernels need triton installed")

from vlonghorn.kernels import (CONFIG, bidirectional_conv1d_silu_triton,  # noqa: E402
                               bidirectional_longhorn_scan_triton, longhorn_scan_triton)
from vlonghorn.kernels.interface import RECON_FLAGS, RECON_STATE, recon_share  # noqa: E402
from vlonghorn.ops.reference import bidirectional_conv1d_silu_ref, longhorn_scan_ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (large shapes are too slow for the interpreter)")
if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    raise RuntimeError("tests/test_kernels.py needs TRITON_INTERPRET=1 on a machine without CUDA "
                       "(tests/conftest.py sets it; was it overridden?)")

# Small launch parameters for the interpreter, so that short sequences still cross several checkpoint
# windows (ck) and backward tiles (bwd_tt) and the channel count is not a multiple of the block.
SMALL_CFG = {"fwd_bd": 32, "fwd_warps": 1, "bwd_bd": 32, "bwd_warps": 1, "bwd_tt": 4, "ck": 16,
             "conv_bd": 32, "conv_warps": 1, "conv_ch": 8}


@pytest.fixture
def config(request):
    """Temporarily replace kernel launch parameters: SMALL_CFG on the interpreter, the defaults on CUDA."""
    saved = dict(CONFIG)
    CONFIG.update(getattr(request, "param", None) or ({} if CUDA else SMALL_CFG))
    RECON_STATE.clear()     # no running share of redone programs carries over from another test
    yield CONFIG
    CONFIG.clear()
    CONFIG.update(saved)
    RECON_STATE.clear()
    RECON_FLAGS.update(record=False, last=None)


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


def _randn(*shape, dtype=torch.float32, seed=9):
    """A seeded random tensor on DEV (the checks' output gradients do not depend on the tests that ran before)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def _grads(out, leaves, grad_out):
    names = list(leaves)
    gs = torch.autograd.grad(out, [leaves[n] for n in names], grad_out)
    return dict(zip(names, gs))


def test_bf16_conversions_round_as_torch():
    """The float32 <-> bfloat16 conversions in a kernel (where every bf16 output is rounded) equal torch's: to
    nearest even down, exact up, on random float32 bit patterns (subnormals, infinities, NaN among them) and on all
    bf16 patterns; under the interpreter this checks conftest.py's correction."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m).to(y_ptr.dtype.element_ty), mask=m)

    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-2 ** 31, 2 ** 31, (100_003,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    x[:5] = torch.tensor([float("inf"), -float("inf"), 3.4028235e38, -0.0, 1.0 + 0.875 * 2.0 ** -7])
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for src, dst in ((x, torch.bfloat16), (every, torch.float32)):
        out = torch.empty(src.shape, dtype=dst, device=DEV)
        cast[(triton.cdiv(src.numel(), 4096),)](src.to(DEV), out, src.numel(), BLOCK=4096)
        out, ref = out.cpu(), src.to(dst)
        nan = torch.isnan(ref)
        assert torch.isnan(out[nan]).all(), f"{src.dtype} -> {dst}: {int((~torch.isnan(out[nan])).sum())} NaN lost"
        same = out[~nan].view(torch.int16 if dst == torch.bfloat16 else torch.int32) == \
            ref[~nan].view(torch.int16 if dst == torch.bfloat16 else torch.int32)
        assert same.all(), f"{src.dtype} -> {dst}: {int((~same).sum())} values differ from torch's, e.g. " \
                           f"{src[~nan][~same][:3].tolist()} -> {out[~nan][~same][:3].tolist()}"


# ------------------------------------------------------------------------------------------- scan, one direction
SCAN_CASES = [
    # B, L, E, N, dtype, reverse, strided, strong, has_D, has_z
    pytest.param(2, 37, 40, 16, torch.float32, False, False, False, True, True, id="fp32"),
    pytest.param(2, 37, 40, 16, torch.float32, True, False, False, True, True, id="fp32-reverse"),
    pytest.param(1, 1, 40, 16, torch.float32, True, False, False, True, True, id="L1-reverse"),
    pytest.param(1, 21, 33, 16, torch.float32, False, True, False, False, False, id="strided-noD-noz"),
    pytest.param(2, 26, 40, 16, torch.float32, True, False, True, True, True, id="strong-write"),
    pytest.param(2, 19, 40, 8, torch.float32, False, False, False, True, False, id="N8"),
    pytest.param(2, 19, 40, 2, torch.float32, True, False, False, True, True, id="N2"),
    pytest.param(2, 37, 40, 16, torch.bfloat16, True, True, False, True, True, id="bf16-strided"),
    # E a multiple of the channel block: the forward drops its channel masks (EVEN)
    pytest.param(2, 23, 64, 16, torch.float32, True, False, False, True, True, id="E-multiple-of-block"),
    pytest.param(3, 300, 200, 16, torch.float32, False, True, True, True, True, id="large-fp32",
                 marks=needs_cuda),
    pytest.param(3, 300, 200, 16, torch.float32, True, False, False, True, True, id="large-fp32-reverse",
                 marks=needs_cuda),
    pytest.param(2, 197, 768, 16, torch.bfloat16, True, True, True, True, True, id="large-bf16",
                 marks=needs_cuda),
]


@pytest.mark.parametrize("B,L,E,N,dtype,reverse,strided,strong,has_D,has_z", SCAN_CASES)
def test_longhorn_scan(config, B, L, E, N, dtype, reverse, strided, strong, has_D, has_z):
    _check_single(B, L, E, N, dtype, reverse, strided, strong, has_D, has_z)


def _check_single(B, L, E, N, dtype, reverse, strided, strong, has_D, has_z):
    """One direction: output and every gradient against the float64 reference."""
    inputs, leaves = _scan_inputs(B, L, E, N, dtype, strided, strong, has_D, has_z)
    y = longhorn_scan_triton(**inputs, reverse=reverse)
    assert y.dtype == dtype and y.shape == (B, L, E)
    grad_out = _randn(B, L, E, dtype=dtype)
    got = _grads(y, leaves, grad_out)
    y_ref = longhorn_scan_ref(**inputs, reverse=reverse)
    ref = _grads(y_ref, leaves, grad_out.double())
    _check("y", y, y_ref, dtype)
    for name in leaves:
        assert got[name].dtype == leaves[name].dtype
        _check(f"d{name}", got[name], ref[name], dtype)


# ------------------------------------------------------------------------------------------ scan, both directions
BIDIR_CASES = [
    # B, L, E, dtype, strided, strong, has_D, has_z
    pytest.param(2, 37, 40, torch.float32, False, False, True, True, id="fp32"),
    pytest.param(1, 1, 33, torch.float32, False, False, True, True, id="L1"),
    pytest.param(1, 8, 40, torch.float32, True, False, True, True, id="strided-even-L"),
    pytest.param(2, 23, 40, torch.float32, False, True, False, False, id="strong-noD-noz"),
    pytest.param(2, 29, 72, torch.bfloat16, True, False, True, True, id="bf16-strided"),
    pytest.param(2, 25, 64, torch.float32, True, True, True, True, id="E-multiple-of-block"),
    pytest.param(3, 300, 200, torch.float32, True, True, True, True, id="large-fp32", marks=needs_cuda),
    pytest.param(4, 197, 768, torch.bfloat16, True, False, True, True, id="large-bf16", marks=needs_cuda),
]


@pytest.mark.parametrize("B,L,E,dtype,strided,strong,has_D,has_z", BIDIR_CASES)
def test_bidirectional_longhorn_scan(config, B, L, E, dtype, strided, strong, has_D, has_z):
    _check_bidir(B, L, E, dtype, strided, strong, has_D, has_z)


def _check_bidir(B, L, E, dtype, strided, strong, has_D, has_z):
    """Both directions in one op: output and every gradient against the float64 reference."""
    N = 16
    fwd, leaves_f = _scan_inputs(B, L, E, N, dtype, strided, strong, has_D, has_z, seed=1)
    bwd, leaves_b = _scan_inputs(B, L, E, N, dtype, strided, strong, has_D, False, seed=2)
    z = fwd["z"]
    leaves = {**{f"{n}_fwd": t for n, t in leaves_f.items()}, **{f"{n}_bwd": t for n, t in leaves_b.items()}}
    args = (fwd["x"], bwd["x"], fwd["dt"], bwd["dt"], fwd["k"], fwd["q"], bwd["k"], bwd["q"],
            fwd["dt_bias"], bwd["dt_bias"], fwd["D"], bwd["D"], z)
    y = bidirectional_longhorn_scan_triton(*args)
    assert y.dtype == dtype and y.shape == (B, L, E)
    grad_out = _randn(B, L, E, dtype=dtype)
    got = _grads(y, leaves, grad_out)
    fwd_nz, bwd_nz = dict(fwd, z=None), dict(bwd, z=None)
    y_ref = (longhorn_scan_ref(**fwd_nz) + longhorn_scan_ref(**bwd_nz, reverse=True)) / 2
    if z is not None:
        y_ref = y_ref * F.silu(z.double())
    ref = _grads(y_ref, leaves, grad_out.double())
    _check("y", y, y_ref, dtype)
    for name in leaves:
        _check(f"d{name}", got[name], ref[name], dtype)


def test_bidirectional_scan_is_deterministic(config):
    B, L, E = (2, 21, 40) if not CUDA else (8, 197, 768)
    fwd, leaves_f = _scan_inputs(B, L, E, 16, torch.bfloat16, True, False, seed=3)
    bwd, leaves_b = _scan_inputs(B, L, E, 16, torch.bfloat16, True, False, has_z=False, seed=4)
    leaves = list(leaves_f.values()) + list(leaves_b.values())
    args = (fwd["x"], bwd["x"], fwd["dt"], bwd["dt"], fwd["k"], fwd["q"], bwd["k"], bwd["q"],
            fwd["dt_bias"], bwd["dt_bias"], fwd["D"], bwd["D"], fwd["z"])
    grad_out = _randn(B, L, E, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(bidirectional_longhorn_scan_triton(*args), leaves, grad_out) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- chunked (two-level) inference forward
CHUNK_CASES = [
    # B, L, E, bidir, reverse, strong, dtype, tokens per chunk (0: the GPU's own choice), other CONFIG overrides
    pytest.param(2, 23, 40, True, False, False, torch.float32, 5, {}, id="bidir-tc5"),
    pytest.param(1, 20, 40, True, False, True, torch.float32, 7, {}, id="bidir-strong-even-L"),
    pytest.param(1, 13, 33, True, False, False, torch.float32, 1, {}, id="bidir-tc1"),
    pytest.param(2, 23, 40, False, True, False, torch.float32, 6, {}, id="reverse-tc6"),
    pytest.param(2, 23, 40, False, False, True, torch.bfloat16, 4, {}, id="bf16-strong-tc4"),
    pytest.param(2, 19, 72, True, False, False, torch.float32, 8, {"fwd_bd": 64, "chunk_bd": 32},
                 id="bd64-chunk-bd32"),
    pytest.param(1, 19, 128, True, False, False, torch.float32, 6, {"fwd_bd": 64, "chunk_bd": 64}, id="bd64-even"),
    pytest.param(1, 3000, 768, True, False, True, torch.bfloat16, 0, {}, id="large-auto", marks=needs_cuda),
    pytest.param(2, 1500, 200, False, True, False, torch.float32, 0, {}, id="large-auto-reverse", marks=needs_cuda),
]


@pytest.mark.parametrize("B,L,E,bidir,reverse,strong,dtype,tc,cfg", CHUNK_CASES)
def test_chunked_inference_forward(config, B, L, E, bidir, reverse, strong, dtype, tc, cfg):
    """Without grad, few programs take the two-level scan (chunk summaries, entry states, chunks from their entry
    state); it must give the reference's output, and the sequential kernel's up to rounding."""
    from vlonghorn.kernels.interface import _chunk_len
    config.update(SMALL_CFG if tc else {}, fwd_chunk=tc)
    config.update(cfg)
    fwd, _ = _scan_inputs(B, L, E, 16, dtype, strong=strong, seed=5)
    x = fwd["x"]
    assert _chunk_len(x, B, L, -(-E // config["fwd_bd"])) < L, "this case should run chunked"
    with torch.no_grad():
        if bidir:
            bwd, _ = _scan_inputs(B, L, E, 16, dtype, strong=strong, has_z=False, seed=6)
            args = (fwd["x"], bwd["x"], fwd["dt"], bwd["dt"], fwd["k"], fwd["q"], bwd["k"], bwd["q"],
                    fwd["dt_bias"], bwd["dt_bias"], fwd["D"], bwd["D"], fwd["z"])
            y = bidirectional_longhorn_scan_triton(*args)
            y_ref = (longhorn_scan_ref(**dict(fwd, z=None)) + longhorn_scan_ref(**dict(bwd, z=None), reverse=True))
            y_ref = y_ref / 2 * F.silu(fwd["z"].double())
            config["fwd_chunk"] = L
            y_seq = bidirectional_longhorn_scan_triton(*args)
        else:
            y = longhorn_scan_triton(**fwd, reverse=reverse)
            y_ref = longhorn_scan_ref(**fwd, reverse=reverse)
            config["fwd_chunk"] = L
            y_seq = longhorn_scan_triton(**fwd, reverse=reverse)
    assert y.dtype == dtype and y.shape == (B, L, E)
    _check("y (chunked)", y, y_ref, dtype)
    _check("y (chunked) vs sequential kernel", y, y_seq.double(), dtype)


TRAIN_CHUNK_CASES = [
    # B, L, E, bidir, reverse, strided, strong, dtype, tokens per chunk, windows per backward segment
    # (0: the GPU's own choice); on the interpreter ck = 16, so chunks round up to whole windows of 16 tokens
    pytest.param(2, 37, 40, True, False, False, False, torch.float32, 5, 1, id="bidir-seg1"),
    pytest.param(1, 50, 40, True, False, False, True, torch.float32, 20, 2, id="bidir-strong-seg2"),
    pytest.param(2, 33, 72, True, False, True, False, torch.bfloat16, 16, 1, id="bidir-bf16-strided"),
    pytest.param(2, 37, 40, False, True, False, False, torch.float32, 5, 1, id="reverse-seg1"),
    pytest.param(1, 40, 33, False, False, True, True, torch.bfloat16, 5, 2, id="single-bf16-strong-seg2"),
    pytest.param(1, 3000, 768, True, False, True, True, torch.bfloat16, 0, 0, id="large-auto", marks=needs_cuda),
    pytest.param(2, 1500, 200, False, True, False, False, torch.float32, 0, 0, id="large-auto-reverse",
                 marks=needs_cuda),
]


@pytest.mark.parametrize("B,L,E,bidir,reverse,strided,strong,dtype,tc,sw", TRAIN_CHUNK_CASES)
def test_chunked_training(config, B, L, E, bidir, reverse, strided, strong, dtype, tc, sw):
    """Few programs with grad: the training forward of both directions runs chunked (checkpoints from a combine
    over the windows), and the backward in segments of windows, each from its adjoint carry (one direction too)."""
    from vlonghorn.kernels.interface import _chunk_len, _seg_windows
    config.update(SMALL_CFG if tc else {}, fwd_chunk=tc, bwd_seg=sw)      # small cases: windows of 16 on the GPU too
    x = torch.empty(0, device=DEV)
    nw = -(-L // config["ck"])
    assert _seg_windows(x, B * -(-E // config["bwd_bd"]) * (2 if bidir else 1), nw) < nw, "should be segmented"
    if bidir:
        ck = config["ck"]       # training chunks are whole checkpoint windows
        assert -(-_chunk_len(x, B, L, -(-E // config["fwd_bd"])) // ck) * ck < L, "should run chunked"
        _check_bidir(B, L, E, dtype, strided, strong, True, True)
    else:
        _check_single(B, L, E, 16, dtype, reverse, strided, strong, True, True)


RECON_CASES = [
    # bidir, B, L, E, dtype, reverse, strided, strong, tol, expected flags ("none", "some", "all", or "exact": the
    # plain exact backward ran)
    pytest.param(True, 2, 37, 40, torch.bfloat16, False, True, False, 1e-4, "none", id="bidir-bf16"),
    pytest.param(False, 2, 37, 40, torch.float16, True, False, False, 1e-4, "none", id="single-fp16-reverse"),
    pytest.param(True, 2, 37, 40, torch.bfloat16, False, False, "first", 1e-4, "some", id="bidir-strong-in-b0"),
    pytest.param(True, 1, 33, 33, torch.bfloat16, False, False, False, 0.0, "all", id="bidir-all-redone"),
    pytest.param(False, 2, 37, 40, torch.float32, False, False, False, 1e-4, "exact", id="fp32-stays-exact"),
    pytest.param(True, 4, 197, 768, torch.bfloat16, False, True, False, 1e-4, "none", id="large-bidir-bf16",
                 marks=needs_cuda),
    pytest.param(True, 2, 300, 200, torch.bfloat16, False, False, "first", 1e-4, "some", id="large-strong-in-b0",
                 marks=needs_cuda),
]


@pytest.mark.parametrize("bidir,B,L,E,dtype,reverse,strided,strong,tol,flags", RECON_CASES)
def test_reconstructing_backward(config, bidir, B, L, E, dtype, reverse, strided, strong, tol, flags):
    """16-bit inputs: the backward reconstructs the states against the scan order, and the programs whose
    reconstruction drifted from a checkpoint are redone exactly; every output and gradient matches the reference
    either way, and the flags say which programs were redone (strong writes in batch element 0 only: some;
    tolerance 0: all)."""
    config.update(bwd_recon_tol=tol)
    RECON_FLAGS["record"] = True
    assert config["bwd_recon"], "on by default"
    if bidir:
        _check_bidir(B, L, E, dtype, strided, strong, True, True)
    else:
        _check_single(B, L, E, 16, dtype, reverse, strided, strong, True, True)
    got = RECON_FLAGS["last"]
    if flags == "exact":
        assert got is None, "fp32 inputs should take the exact backward"
        return
    assert got is not None and got.numel() == (2 if bidir else 1) * B * -(-E // config["bwd_bd"])
    n = int(got.sum())
    if flags == "none":
        assert n == 0, f"{n} programs were redone exactly"
    elif flags == "all":
        assert n == got.numel()
    else:
        assert 0 < n < got.numel(), f"{n} of {got.numel()} programs redone"
        per_b = got.view(2 if bidir else 1, B, -1).sum(dim=(0, 2))
        assert per_b[1:].sum() == 0, f"redone programs per batch element: {per_b.tolist()}"


def test_reconstruction_steps_aside_when_it_keeps_failing(config):
    """The running share of redone programs (per device): at or above bwd_recon_share the reconstruction does not
    run (every program goes to the exact backward at once) except on every bwd_recon_probe-th call, which measures
    again; the gradients stay exact throughout."""
    config.update(bwd_recon_tol=0.0, bwd_recon_decay=0.5, bwd_recon_probe=4)
    RECON_FLAGS["record"] = True
    st = lambda: [round(v, 6) for v in next(iter(RECON_STATE.values())).tolist()]   # noqa: E731
    assert recon_share(DEV) is None
    _check_bidir(1, 20, 33, torch.bfloat16, False, False, True, True)    # call 0: every program redone
    assert st() == [0.5, 1.0] and recon_share(DEV) == 0.5                 # (what train.py logs)
    config.update(bwd_recon_tol=1e-4)
    for call in (1, 2, 3):                                                # share 0.5 >= 0.4: stepped aside
        _check_bidir(1, 20, 33, torch.bfloat16, False, False, True, True)
        flags = RECON_FLAGS["last"]
        assert st() == [0.5, call + 1.0] and int(flags.sum()) == flags.numel()
    _check_bidir(1, 20, 33, torch.bfloat16, False, False, True, True)    # call 4: a probe, nothing redone
    assert st() == [0.25, 5.0] and int(RECON_FLAGS["last"].sum()) == 0
    _check_bidir(1, 20, 33, torch.bfloat16, False, False, True, True)    # call 5: below the share again
    assert st() == [0.125, 6.0] and int(RECON_FLAGS["last"].sum()) == 0


def test_inference_saves_nothing(config):
    """Without grad the forward writes no checkpoints; with grad it can be differentiated."""
    from vlonghorn.kernels.interface import scan_fwd
    inputs, _ = _scan_inputs(1, 9, 40, 16, torch.float32)
    with torch.no_grad():
        out, ypre, ck, rec = scan_fwd(inputs["x"], inputs["dt"], inputs["k"], inputs["q"], inputs["dt_bias"],
                                      inputs["D"], None, None, None, None, None, None, inputs["z"], False, False)
    assert ypre.numel() == ck.numel() == rec.numel() == 0
    torch.testing.assert_close(out, longhorn_scan_triton(**inputs).detach())


# ----------------------------------------------------------------------------------------------------- conv
CONV_CASES = [
    # B, L, E, dtype, strided, bias
    pytest.param(2, 37, 40, torch.float32, False, True, id="fp32"),
    pytest.param(1, 1, 33, torch.float32, True, True, id="L1-strided"),
    pytest.param(2, 3, 40, torch.float32, False, False, id="L3-nobias"),
    pytest.param(2, 19, 40, torch.bfloat16, True, True, id="bf16-strided"),
    pytest.param(4, 300, 200, torch.float32, True, True, id="large-fp32", marks=needs_cuda),
    pytest.param(8, 197, 768, torch.bfloat16, True, True, id="large-bf16", marks=needs_cuda),
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
    y_fwd, y_bwd = bidirectional_conv1d_silu_triton(x, *params)
    assert y_fwd.dtype == dtype and y_fwd.shape == (B, L, E) and y_bwd.shape == (B, L, E)
    g_fwd, g_bwd = _randn(B, L, E, dtype=dtype), _randn(B, L, E, dtype=dtype, seed=10)
    got = torch.autograd.grad((y_fwd, y_bwd), leaves, (g_fwd, g_bwd))
    r_fwd, r_bwd = bidirectional_conv1d_silu_ref(x, *params)
    ref = torch.autograd.grad((r_fwd, r_bwd), leaves, (g_fwd.double(), g_bwd.double()))
    _check("x_fwd", y_fwd, r_fwd, dtype)
    _check("x_bwd", y_bwd, r_bwd, dtype)
    for i, (a, b) in enumerate(zip(got, ref)):
        _check(f"grad {i}", a, b, dtype)


# ------------------------------------------------------------------------------------- integration, compile
def _mixer(x, z, conv_params, scan_params):
    """A Vision Longhorn mixer's kernel calls, as the model makes them (no linear layers)."""
    x_f, x_b = bidirectional_conv1d_silu_triton(x, *conv_params)
    (dt_f, k_f, q_f, b_f, D_f), (dt_b, k_b, q_b, b_b, D_b) = scan_params
    return bidirectional_longhorn_scan_triton(x_f, x_b, dt_f, dt_b, k_f, q_f, k_b, q_b, b_f, b_b, D_f, D_b, z)


def _mixer_inputs(B, L, E, seed):
    """Leaf tensors for _mixer: x, z, the conv parameters and both directions' scan inputs."""
    gen = torch.Generator().manual_seed(seed)

    def p(*s):
        return (torch.randn(*s, generator=gen) * 0.5).to(DEV).requires_grad_()

    conv_params = [p(E, 4), p(E), p(E, 4), p(E)]
    scan_params = [[p(B, L, E), p(B, L, 16), p(B, L, 16), p(E), p(E)] for _ in range(2)]
    return p(B, L, E), p(B, L, E), conv_params, scan_params


def test_torch_compile_fullgraph(config):
    """The custom ops trace into one graph (fullgraph=True fails on any graph break) and match eager."""
    x, z, conv_params, scan_params = _mixer_inputs(*((1, 11, 40) if not CUDA else (2, 197, 256)), seed=6)
    fn = torch.compile(_mixer, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
    y = fn(x, z, conv_params, scan_params)
    y_eager = _mixer(x, z, conv_params, scan_params)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_cuda
def test_autocast_bf16_matches_torch_backend(config):
    """Under bf16 autocast (the model's setting) the Triton and PyTorch backends agree within bf16 noise."""
    from vlonghorn import ops
    torch.manual_seed(7)
    B, L, d, E = 4, 197, 128, 256
    lin_in = torch.nn.Linear(d, 2 * E).cuda()
    lin_x = torch.nn.Linear(E, 8 + 32).cuda()
    lin_dt = torch.nn.Linear(8, E).cuda()
    conv = [torch.randn(E, 4, device="cuda") * 0.3, torch.zeros(E, device="cuda")] * 2
    h = torch.randn(B, L, d, device="cuda")
    results = []
    for backend in ("triton", "torch"):
        for m in (lin_in, lin_x, lin_dt):
            m.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            x, z = lin_in(h).chunk(2, -1)
            x_f, x_b = ops.bidirectional_conv1d_silu(x, *conv, backend=backend)
            dbl = lin_x(x_f)
            dt, k, q = dbl.split([8, 16, 16], -1)
            dt = lin_dt(dt)
            y = ops.bidirectional_longhorn_scan(x_f, x_b, dt, dt, k, q, k, q, lin_dt.bias, lin_dt.bias,
                                                None, None, z, backend=backend)
        y.float().square().mean().backward()
        results.append((y.float(), lin_in.weight.grad.clone(), lin_x.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        assert _rel(a, b.double()) < 2e-2


def test_opcheck_registrations(config):
    """torch.library's own checks of the schemas, fake implementations and autograd registrations."""
    from vlonghorn.kernels.interface import conv_bwd, conv_fwd, scan_bwd, scan_fwd
    inputs, _ = _scan_inputs(1, 5, 32, 16, torch.float32)
    i = {n: (t.detach() if t is not None else None) for n, t in inputs.items()}
    args = (inputs["x"], inputs["dt"], inputs["k"], inputs["q"], inputs["dt_bias"], inputs["D"],
            None, None, None, None, None, None, inputs["z"], True, True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(scan_fwd, args, test_utils=utils)
    _, ypre, ck, rec = scan_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    g = torch.randn_like(i["x"])
    torch.library.opcheck(scan_bwd, (g, i["x"], i["dt"], i["dt_bias"], i["D"], None, None, None, None, i["z"],
                                     ypre, ck, rec, True, torch.float32, torch.float32, 16),
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(1, 5, 32, device=DEV, requires_grad=True)
    w = torch.randn(32, 4, device=DEV, requires_grad=True)
    torch.library.opcheck(conv_fwd, (x, w, None, w, None), test_utils=utils)
    torch.library.opcheck(conv_bwd, (torch.randn_like(x), torch.randn_like(x), x.detach(), w.detach(), None,
                                     w.detach(), None), test_utils=("test_schema", "test_faketensor"))


def test_eager_calls_skip_the_custom_ops(config):
    """In eager mode the entry points call the launchers through autograd Functions (no torch.library wrapping);
    under a dispatch mode (as for fake tensors or a FLOP counter) they go through the custom ops, and both ways give
    the same outputs and gradients, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    x, z, conv_params, scan_params = _mixer_inputs(*((2, 21, 40) if not CUDA else (4, 197, 256)), seed=8)
    leaves = [x, z] + conv_params + [t for ps in scan_params for t in ps]
    g = torch.randn_like(x).detach()
    runs = []
    for mode in (None, SeenOps()):
        with mode if mode is not None else contextlib.nullcontext():
            y = _mixer(x, z, conv_params, scan_params)
            grads = torch.autograd.grad(y, leaves, g)
        runs.append((y.detach(), grads, type(y.grad_fn).__name__))
        if mode is not None:
            ops = {"vlonghorn.scan_fwd.default", "vlonghorn.scan_bwd.default", "vlonghorn.conv1d_silu_fwd.default",
                   "vlonghorn.conv1d_silu_bwd.default"}
            assert ops <= mode.seen, ops - mode.seen
    (y0, g0, fn0), (y1, g1, fn1) = runs
    assert fn0 == "_ScanFnBackward" and fn1 != fn0, (fn0, fn1)
    assert torch.equal(y0, y1)
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert torch.equal(a, b), f"gradient {i} differs"


def test_keep_scan_outputs_region_runs_first_without_grad(config, monkeypatch):
    """A recompute region keeps the scan's outputs on its first, gradient-free run and hands them back (no scan
    launch) on the second; a first run with grad, whose graph nothing would keep, is refused with a clear error."""
    from vlonghorn.kernels import ScanOutputs, interface, keep_scan_outputs
    x, z, conv_params, scan_params = _mixer_inputs(1, 9, 40, seed=9)
    store = ScanOutputs()
    with torch.no_grad(), keep_scan_outputs(store):
        y0 = _mixer(x, z, conv_params, scan_params)
    assert len(store.kept) == 1 and store.kept[0][1].numel() > 0        # the training outputs (y_pre) were kept
    launches = []
    original = interface._scan_fwd_impl
    monkeypatch.setattr(interface, "_scan_fwd_impl", lambda *a: launches.append(1) or original(*a))
    with keep_scan_outputs(store):
        y1 = _mixer(x, z, conv_params, scan_params)
    assert not launches and torch.equal(y0, y1) and y1.grad_fn is not None
    with pytest.raises(RuntimeError, match="without grad"), keep_scan_outputs(ScanOutputs()):
        _mixer(x, z, conv_params, scan_params)


@needs_cuda
def test_cuda_graphs_train_like_eager(config):
    """torch.compile(mode="reduce-overhead") captures the kernels in CUDA graphs (the launchers allocate and launch
    only): a few SGD steps of a model follow the eager ones within bf16 noise."""
    import timm
    import vlonghorn  # noqa: F401  (registers the models)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224, device=DEV)
    target = torch.randint(0, 5, (8,), device=DEV)
    losses = []
    for mode in (None, "reduce-overhead"):
        RECON_STATE.clear()     # the graphed run sets up the backward's running state inside its warm-up
        torch.manual_seed(1)
        model = timm.create_model("vlonghorn_small", num_classes=5, depth=4).to(DEV)
        run = torch.compile(model, mode=mode) if mode else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        losses.append([])
        for _ in range(4):
            with torch.autocast(DEV, torch.bfloat16):
                loss = F.cross_entropy(run(x), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[-1].append(loss.item())
    eager, graphed = (torch.tensor(v) for v in losses)
    assert torch.isfinite(graphed).all() and eager[-1] < eager[0], losses
    torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2, msg=f"losses eager / graphed: {losses}")


# ------------------------------------------------------------------------------- the model's selective recompute
def test_recompute_mixer_keeps_only_the_scan(config, monkeypatch):
    """In training on the Triton path, each block keeps the scan's outputs and recomputes the rest in the
    backward: the scan's forward runs once per block, the conv's twice; outputs are those of the model that saves
    everything, and so are the gradients up to the order in which the block input's gradient terms are summed;
    on CUDA the peak memory of a training step drops."""
    import timm
    import vlonghorn  # noqa: F401  (registers the models)
    from vlonghorn.kernels import interface
    from vlonghorn.ops import longhorn as ops_longhorn
    monkeypatch.setattr(ops_longhorn, "_AUTO", "triton")  # the interpreter stands in for CUDA on CPU
    calls = {"scan": 0, "conv": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(interface, "_scan_fwd_impl", counted("scan", interface._scan_fwd_impl))
    monkeypatch.setattr(interface, "_conv_fwd_impl", counted("conv", interface._conv_fwd_impl))
    depth, (res, batch) = (2, (16, 2)) if not CUDA else (4, (224, 32))
    torch.manual_seed(0)
    x = torch.randn(batch, 3, res, res, device=DEV)
    results = {}
    for variant in ("saved", "recompute", "grad_checkpointing", "compiled"):
        torch.manual_seed(1)
        model = timm.create_model("vlonghorn_nano" if not CUDA else "vlonghorn_small", img_size=res, patch_size=8,
                                  num_classes=5, depth=depth, recompute_mixer=variant != "saved").to(DEV)
        model.set_grad_checkpointing(variant == "grad_checkpointing")
        run = model
        if variant == "compiled":  # a selective-checkpoint policy instead of ScanOutputs
            run = torch.compile(model, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")
        calls.update(scan=0, conv=0)
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.autocast(DEV, torch.bfloat16, enabled=CUDA):
            y = run(x)
        y.float().square().sum().backward()
        peak = torch.cuda.max_memory_allocated() - base if CUDA else None
        results[variant] = (y.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}, peak)
        # grad checkpointing recomputes whole blocks, the scan included; the compiler decides about the conv
        assert calls["scan"] == depth * (1 + (variant == "grad_checkpointing")), (variant, calls)
        if variant != "compiled":
            assert calls["conv"] == depth * (1 + (variant != "saved")), (variant, calls)
    y0, g0, peak0 = results["saved"]
    for variant in ("recompute", "grad_checkpointing", "compiled"):
        y, g, peak = results[variant]
        for name, got, ref in [("y", y, y0)] + [(f"grad of {n}", g[n], g0[n]) for n in g0]:
            if variant == "compiled" and CUDA:  # inductor fuses the bf16 elementwise ops its own way
                assert _rel(got, ref.double()) < 1e-2, (variant, name, _rel(got, ref.double()))
            elif variant == "recompute" and name != "y":
                # the block input's gradient terms (residual, norm) are summed in another order: fp32 rounding
                err = _rel(got, ref.double())
                assert err < (1e-6 if not CUDA else 1e-3), (variant, name, err)
            else:
                assert torch.equal(got, ref), (variant, name)
    if CUDA:
        # what stays between forward and backward: the scan's outputs instead of every activation (at this
        # depth the backward's own working set is a large part of the peak)
        assert results["recompute"][2] < 0.75 * peak0, (results["recompute"][2], peak0)
