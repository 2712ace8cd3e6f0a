"""The scan kernels (forward, exact and reconstructing backward, chunked paths) against the float64
reference; the conventions are in tests/kernel_checks.py."""
import pytest
import torch
import torch.nn.functional as F

from kernel_checks import (CUDA, DEV, GPU_LARGE, SMALL_CFG, _check, _grads, _randn, _scan_inputs,
                           bidirectional_longhorn_scan_triton)
from vlonghorn.kernels import longhorn_scan as longhorn_scan_triton
from vlonghorn.kernels.launch import RECON_FLAGS, RECON_STATE, recon_share
from vlonghorn.ops.reference import longhorn_scan_ref


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
    pytest.param(2, 37, 40, 16, torch.float32, False, False, False, True, True, id="fp32", marks=pytest.mark.slow),
    pytest.param(2, 37, 40, 16, torch.float32, True, False, False, True, True, id="fp32-reverse",
                 marks=pytest.mark.slow),
    pytest.param(1, 1, 40, 16, torch.float32, True, False, False, True, True, id="L1-reverse"),
    pytest.param(1, 21, 33, 16, torch.float32, False, True, False, False, False, id="strided-noD-noz"),
    pytest.param(2, 26, 40, 16, torch.float32, True, False, True, True, True, id="strong-write",
                 marks=pytest.mark.slow),
    pytest.param(2, 19, 40, 8, torch.float32, False, False, False, True, False, id="N8"),
    pytest.param(2, 19, 40, 2, torch.float32, True, False, False, True, True, id="N2"),
    pytest.param(2, 37, 40, 16, torch.bfloat16, True, True, False, True, True, id="bf16-strided",
                 marks=pytest.mark.slow),
    # E a multiple of the channel block: the forward drops its channel masks (EVEN)
    pytest.param(2, 23, 64, 16, torch.float32, True, False, False, True, True, id="E-multiple-of-block",
                 marks=pytest.mark.slow),
    pytest.param(3, 300, 200, 16, torch.float32, False, True, True, True, True, id="large-fp32",
                 marks=GPU_LARGE),
    pytest.param(3, 300, 200, 16, torch.float32, True, False, False, True, True, id="large-fp32-reverse",
                 marks=GPU_LARGE),
    pytest.param(2, 197, 768, 16, torch.bfloat16, True, True, True, True, True, id="large-bf16",
                 marks=GPU_LARGE),
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
    pytest.param(2, 37, 40, torch.float32, False, False, True, True, id="fp32", marks=pytest.mark.slow),
    pytest.param(1, 1, 33, torch.float32, False, False, True, True, id="L1"),
    pytest.param(1, 8, 40, torch.float32, True, False, True, True, id="strided-even-L"),
    pytest.param(2, 23, 40, torch.float32, False, True, False, False, id="strong-noD-noz", marks=pytest.mark.slow),
    pytest.param(2, 29, 72, torch.bfloat16, True, False, True, True, id="bf16-strided"),
    pytest.param(2, 25, 64, torch.float32, True, True, True, True, id="E-multiple-of-block", marks=pytest.mark.slow),
    pytest.param(3, 300, 200, torch.float32, True, True, True, True, id="large-fp32", marks=GPU_LARGE),
    pytest.param(4, 197, 768, torch.bfloat16, True, False, True, True, id="large-bf16", marks=GPU_LARGE),
]


@pytest.mark.parametrize("B,L,E,dtype,strided,strong,has_D,has_z", BIDIR_CASES)
def test_bidirectional_longhorn_scan(config, B, L, E, dtype, strided, strong, has_D, has_z):
    _check_bidir(B, L, E, dtype, strided, strong, has_D, has_z)


def _check_bidir(B, L, E, dtype, strided, strong, has_D, has_z):
    """Both directions in one op: output and every gradient against the float64 reference."""
    N = 16
    fwd, leaves_f = _scan_inputs(B, L, E, N, dtype, strided, strong, has_D, has_z, seed=1)
    rev, leaves_rev = _scan_inputs(B, L, E, N, dtype, strided, strong, has_D, False, seed=2)
    z = fwd["z"]
    leaves = {**{f"{n}_fwd": t for n, t in leaves_f.items()}, **{f"{n}_rev": t for n, t in leaves_rev.items()}}
    args = (fwd["x"], rev["x"], fwd["dt"], rev["dt"], fwd["k"], fwd["q"], rev["k"], rev["q"],
            fwd["dt_bias"], rev["dt_bias"], fwd["D"], rev["D"], z)
    y = bidirectional_longhorn_scan_triton(*args)
    assert y.dtype == dtype and y.shape == (B, L, E)
    grad_out = _randn(B, L, E, dtype=dtype)
    got = _grads(y, leaves, grad_out)
    fwd_nz, bwd_nz = dict(fwd, z=None), dict(rev, z=None)
    y_ref = (longhorn_scan_ref(**fwd_nz) + longhorn_scan_ref(**bwd_nz, reverse=True)) / 2
    if z is not None:
        y_ref = y_ref * F.silu(z.double())
    ref = _grads(y_ref, leaves, grad_out.double())
    _check("y", y, y_ref, dtype)
    for name in leaves:
        _check(f"d{name}", got[name], ref[name], dtype)


@pytest.mark.slow
def test_bidirectional_scan_is_deterministic(config):
    B, L, E = (2, 21, 40) if not CUDA else (8, 197, 768)
    fwd, leaves_f = _scan_inputs(B, L, E, 16, torch.bfloat16, True, False, seed=3)
    rev, leaves_rev = _scan_inputs(B, L, E, 16, torch.bfloat16, True, False, has_z=False, seed=4)
    leaves = list(leaves_f.values()) + list(leaves_rev.values())
    args = (fwd["x"], rev["x"], fwd["dt"], rev["dt"], fwd["k"], fwd["q"], rev["k"], rev["q"],
            fwd["dt_bias"], rev["dt_bias"], fwd["D"], rev["D"], fwd["z"])
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
    pytest.param(2, 19, 72, True, False, False, torch.float32, 8, {"forward_bd": 64, "chunk_bd": 32},
                 id="bd64-chunk-bd32"),
    pytest.param(1, 19, 128, True, False, False, torch.float32, 6, {"forward_bd": 64, "chunk_bd": 64}, id="bd64-even"),
    pytest.param(1, 3000, 768, True, False, True, torch.bfloat16, 0, {}, id="large-auto", marks=GPU_LARGE),
    pytest.param(2, 1500, 200, False, True, False, torch.float32, 0, {}, id="large-auto-reverse", marks=GPU_LARGE),
]


@pytest.mark.parametrize("B,L,E,bidir,reverse,strong,dtype,tc,cfg", CHUNK_CASES)
def test_chunked_inference_forward(config, B, L, E, bidir, reverse, strong, dtype, tc, cfg):
    """Without grad, few programs take the two-level scan (chunk summaries, entry states, chunks from their entry
    state); it must give the reference's output, and the sequential kernel's up to rounding."""
    from vlonghorn.kernels.launch import chunk_len as _chunk_len
    config.update(SMALL_CFG if tc else {}, chunk_len=tc)
    config.update(cfg)
    fwd, _ = _scan_inputs(B, L, E, 16, dtype, strong=strong, seed=5)
    x = fwd["x"]

    def assert_chunked():   # (the automatic choice uses the residency of the launch just made)
        assert _chunk_len(x, B, L, -(-E // config["forward_bd"])) < L, "this case should run chunked"

    with torch.no_grad():
        if bidir:
            rev, _ = _scan_inputs(B, L, E, 16, dtype, strong=strong, has_z=False, seed=6)
            args = (fwd["x"], rev["x"], fwd["dt"], rev["dt"], fwd["k"], fwd["q"], rev["k"], rev["q"],
                    fwd["dt_bias"], rev["dt_bias"], fwd["D"], rev["D"], fwd["z"])
            y = bidirectional_longhorn_scan_triton(*args)
            assert_chunked()
            y_ref = (longhorn_scan_ref(**dict(fwd, z=None)) + longhorn_scan_ref(**dict(rev, z=None), reverse=True))
            y_ref = y_ref / 2 * F.silu(fwd["z"].double())
            config["chunk_len"] = L
            y_seq = bidirectional_longhorn_scan_triton(*args)
        else:
            y = longhorn_scan_triton(**fwd, reverse=reverse)
            assert_chunked()
            y_ref = longhorn_scan_ref(**fwd, reverse=reverse)
            config["chunk_len"] = L
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
    pytest.param(1, 3000, 768, True, False, True, True, torch.bfloat16, 0, 0, id="large-auto", marks=GPU_LARGE),
    pytest.param(2, 1500, 200, False, True, False, False, torch.float32, 0, 0, id="large-auto-reverse",
                 marks=GPU_LARGE),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,L,E,bidir,reverse,strided,strong,dtype,tc,sw", TRAIN_CHUNK_CASES)
def test_chunked_training(config, B, L, E, bidir, reverse, strided, strong, dtype, tc, sw):
    """Few programs with grad: the training forward of both directions runs chunked (checkpoints from a combine
    over the windows), and the backward in segments of windows, each from its adjoint carry (one direction too)."""
    from vlonghorn.kernels.launch import chunk_len as _chunk_len, segment_windows as _seg_windows
    # small cases: windows of 16 on the GPU too
    config.update(SMALL_CFG if tc else {}, chunk_len=tc, segment_windows=sw)
    if bidir:
        _check_bidir(B, L, E, dtype, strided, strong, True, True)
    else:
        _check_single(B, L, E, 16, dtype, reverse, strided, strong, True, True)
    # the paths this case is for ran (the automatic choice, with the residency of the launches above)
    x = torch.empty(0, device=DEV)
    nw = -(-L // config["checkpoint_every"])
    assert _seg_windows(x, B * -(-E // config["backward_bd"]) * (2 if bidir else 1), nw) < nw, "should be segmented"
    if bidir:
        checkpoint_every = config["checkpoint_every"]       # training chunks are whole checkpoint windows
        chunk = _chunk_len(x, B, L, -(-E // config["forward_bd"]))
        assert -(-chunk // checkpoint_every) * checkpoint_every < L, "should run chunked"


RECON_CASES = [
    # bidir, B, L, E, dtype, reverse, strided, strong, tol, expected flags ("none", "some", "all", or "exact": the
    # plain exact backward ran)
    pytest.param(True, 2, 37, 40, torch.bfloat16, False, True, False, 1e-4, "none", id="bidir-bf16"),
    pytest.param(False, 2, 37, 40, torch.float16, True, False, False, 1e-4, "none", id="single-fp16-reverse"),
    pytest.param(True, 2, 37, 40, torch.bfloat16, False, False, "first", 1e-4, "some", id="bidir-strong-in-b0"),
    pytest.param(True, 1, 33, 33, torch.bfloat16, False, False, False, 0.0, "all", id="bidir-all-redone"),
    pytest.param(False, 2, 37, 40, torch.float32, False, False, False, 1e-4, "exact", id="fp32-stays-exact"),
    pytest.param(True, 4, 197, 768, torch.bfloat16, False, True, False, 1e-4, "none", id="large-bidir-bf16",
                 marks=GPU_LARGE),
    pytest.param(True, 2, 300, 200, torch.bfloat16, False, False, "first", 1e-4, "some", id="large-strong-in-b0",
                 marks=GPU_LARGE),
]


@pytest.mark.slow
@pytest.mark.parametrize("bidir,B,L,E,dtype,reverse,strided,strong,tol,flags", RECON_CASES)
def test_reconstructing_backward(config, bidir, B, L, E, dtype, reverse, strided, strong, tol, flags):
    """16-bit inputs: the backward reconstructs the states against the scan order, and the programs whose
    reconstruction drifted from a checkpoint are redone exactly; every output and gradient matches the reference
    either way, and the flags say which programs were redone (strong writes in batch element 0 only: some;
    tolerance 0: all)."""
    config.update(recon_tol=tol)
    RECON_FLAGS["record"] = True
    assert config["recon"], "on by default"
    if bidir:
        _check_bidir(B, L, E, dtype, strided, strong, True, True)
    else:
        _check_single(B, L, E, 16, dtype, reverse, strided, strong, True, True)
    got = RECON_FLAGS["last"]
    if flags == "exact":
        assert got is None, "fp32 inputs should take the exact backward"
        return
    assert got is not None and got.numel() == (2 if bidir else 1) * B * -(-E // config["backward_bd"])
    n = int(got.sum())
    if flags == "none":
        assert n == 0, f"{n} programs were redone exactly"
    elif flags == "all":
        assert n == got.numel()
    else:
        assert 0 < n < got.numel(), f"{n} of {got.numel()} programs redone"
        per_b = got.view(2 if bidir else 1, B, -1).sum(dim=(0, 2))
        assert per_b[1:].sum() == 0, f"redone programs per batch element: {per_b.tolist()}"


@pytest.mark.slow
def test_reconstruction_steps_aside_when_it_keeps_failing(config):
    """The running share of redone programs (per device): at or above recon_share the reconstruction does not
    run (every program goes to the exact backward at once) except on every recon_probe-th call, which measures
    again; the gradients stay exact throughout."""
    config.update(recon_tol=0.0, recon_decay=0.5, recon_probe=4)
    RECON_FLAGS["record"] = True
    st = lambda: [round(v, 6) for v in next(iter(RECON_STATE.values())).tolist()]   # noqa: E731
    assert recon_share(DEV) is None
    _check_bidir(1, 20, 33, torch.bfloat16, False, False, True, True)    # call 0: every program redone
    assert st() == [0.5, 1.0] and recon_share(DEV) == 0.5                 # (what train.py logs)
    config.update(recon_tol=1e-4)
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
    from vlonghorn.kernels.custom_ops import scan_forward as scan_fwd
    from vlonghorn.kernels.launch import forward_layout
    inputs, _ = _scan_inputs(1, 9, 40, 16, torch.float32)
    with torch.no_grad():
        out, ypre, ck, rec = scan_fwd(inputs["x"], inputs["dt"], inputs["k"], inputs["q"], inputs["dt_bias"],
                                      inputs["D"], None, None, None, None, None, None, inputs["z"], False, False,
                                      forward_layout())
    assert ypre.numel() == ck.numel() == rec.numel() == 0
    torch.testing.assert_close(out, longhorn_scan_triton(**inputs).detach())
