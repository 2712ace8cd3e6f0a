"""Triton kernels of the bidirectional depthwise conv1d (kernel 4) + SiLU, forward and backward.

x is token-major (B, L, E), taken by stride. A program owns a block of BD channels of one batch element and a
chunk of CH tokens, and walks the chunk once, keeping a sliding window of x (t-3 .. t+3) in registers: each x
value is read once (plus a 3-token halo per chunk) and gives both outputs,
    x_fwd[t] = silu(b_f + sum_j w_f[j] x[t-3+j]),   x_bwd[t] = silu(b_b + sum_j w_b[j] x[t+3-j]).
The backward walks the chunk with a 3-token lead, recomputing the pre-activations from the same window, and
writes per-program partial sums of the weight and bias gradients (summed afterwards: deterministic).
"""
import triton
import triton.language as tl


@triton.jit
def _silu(a, FAST: tl.constexpr):
    if FAST:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + tl.exp(-a)],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return a * r
    else:
        return a / (1.0 + tl.exp(-a))


@triton.jit
def _load_x(x_b, t, sx_t, L, dmask):
    return tl.load(x_b + t * sx_t, mask=dmask & (t >= 0) & (t < L), other=0.0).to(tl.float32)


@triton.jit
def _load_params(wf_ptr, bf_ptr, wb_ptr, bb_ptr, offs_d, dmask, BD: tl.constexpr, HAS_BF: tl.constexpr,
                 HAS_BB: tl.constexpr):
    """Both directions' 4 taps (weights are (E, 4)) and biases for a channel block, in fp32 (zero bias if none)."""
    wf0 = tl.load(wf_ptr + offs_d * 4 + 0, mask=dmask, other=0.0).to(tl.float32)
    wf1 = tl.load(wf_ptr + offs_d * 4 + 1, mask=dmask, other=0.0).to(tl.float32)
    wf2 = tl.load(wf_ptr + offs_d * 4 + 2, mask=dmask, other=0.0).to(tl.float32)
    wf3 = tl.load(wf_ptr + offs_d * 4 + 3, mask=dmask, other=0.0).to(tl.float32)
    wb0 = tl.load(wb_ptr + offs_d * 4 + 0, mask=dmask, other=0.0).to(tl.float32)
    wb1 = tl.load(wb_ptr + offs_d * 4 + 1, mask=dmask, other=0.0).to(tl.float32)
    wb2 = tl.load(wb_ptr + offs_d * 4 + 2, mask=dmask, other=0.0).to(tl.float32)
    wb3 = tl.load(wb_ptr + offs_d * 4 + 3, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BF:
        bf = tl.load(bf_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        bf = tl.zeros([BD], tl.float32)
    if HAS_BB:
        bb = tl.load(bb_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        bb = tl.zeros([BD], tl.float32)
    return wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb


@triton.jit
def _conv_fwd_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, yf_ptr, yb_ptr,
                     sx_b, sx_t, L, E, CH,
                     BD: tl.constexpr, HAS_BF: tl.constexpr, HAS_BB: tl.constexpr, FAST: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    t0 = tl.program_id(2) * CH
    t1 = tl.minimum(t0 + CH, L)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < E
    wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb = _load_params(
        wf_ptr, bf_ptr, wb_ptr, bb_ptr, offs_d, dmask, BD, HAS_BF, HAS_BB)
    x_b = x_ptr + b * sx_b + offs_d
    yf_b = yf_ptr + b * L * E + offs_d
    yb_b = yb_ptr + b * L * E + offs_d
    xm3 = _load_x(x_b, t0 - 3, sx_t, L, dmask)
    xm2 = _load_x(x_b, t0 - 2, sx_t, L, dmask)
    xm1 = _load_x(x_b, t0 - 1, sx_t, L, dmask)
    x0 = _load_x(x_b, t0, sx_t, L, dmask)
    xp1 = _load_x(x_b, t0 + 1, sx_t, L, dmask)
    xp2 = _load_x(x_b, t0 + 2, sx_t, L, dmask)
    for t in range(t0, t1):
        xp3 = _load_x(x_b, t + 3, sx_t, L, dmask)
        af = bf + wf0 * xm3 + wf1 * xm2 + wf2 * xm1 + wf3 * x0
        ab = bb + wb0 * xp3 + wb1 * xp2 + wb2 * xp1 + wb3 * x0
        tl.store(yf_b + t * E, _silu(af, FAST).to(yf_ptr.dtype.element_ty), mask=dmask)
        tl.store(yb_b + t * E, _silu(ab, FAST).to(yb_ptr.dtype.element_ty), mask=dmask)
        xm3 = xm2
        xm2 = xm1
        xm1 = x0
        x0 = xp1
        xp1 = xp2
        xp2 = xp3


@triton.jit
def _dsilu(a, dy, FAST: tl.constexpr):
    if FAST:
        s = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [1.0 + tl.exp(-a)],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        s = 1.0 / (1.0 + tl.exp(-a))
    return dy * s * (1.0 + a * (1.0 - s))


@triton.jit
def _conv_bwd_kernel(x_ptr, dyf_ptr, dyb_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, dx_ptr, dw_ptr,
                     sx_b, sx_t, sdf_b, sdf_t, sdb_b, sdb_t, L, E, CH,
                     BD: tl.constexpr, HAS_BF: tl.constexpr, HAS_BB: tl.constexpr, FAST: tl.constexpr):
    """dx[u] = sum_j w_f[j] da_f[u+3-j] + w_b[j] da_b[u-3+j]; dw/db partials [prog, 10, E] (wf0..3, wb0..3, bf, bb)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    c = tl.program_id(2)
    t0 = c * CH
    t1 = tl.minimum(t0 + CH, L)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < E
    wf0, wf1, wf2, wf3, wb0, wb1, wb2, wb3, bf, bb = _load_params(
        wf_ptr, bf_ptr, wb_ptr, bb_ptr, offs_d, dmask, BD, HAS_BF, HAS_BB)
    x_b = x_ptr + b * sx_b + offs_d
    dyf_b = dyf_ptr + b * sdf_b + offs_d
    dyb_b = dyb_ptr + b * sdb_b + offs_d
    dx_b = dx_ptr + b * L * E + offs_d
    # window x[p-3 .. p+2] for p = t0 - 3
    p0 = t0 - 3
    xm3 = _load_x(x_b, p0 - 3, sx_t, L, dmask)
    xm2 = _load_x(x_b, p0 - 2, sx_t, L, dmask)
    xm1 = _load_x(x_b, p0 - 1, sx_t, L, dmask)
    x0 = _load_x(x_b, p0, sx_t, L, dmask)
    xp1 = _load_x(x_b, p0 + 1, sx_t, L, dmask)
    xp2 = _load_x(x_b, p0 + 2, sx_t, L, dmask)
    # every loop-carried value needs its own initial tensor: Triton's code generator drops a variable from
    # the loop's carried set when its update is the very same value it started from (e.g. `a2 = a1` with both
    # initialised from one `zero`), which the interpreter does not reproduce
    af1 = tl.zeros([BD], tl.float32)  # da_f[p-1], [p-2], [p-3]
    af2 = tl.zeros([BD], tl.float32)
    af3 = tl.zeros([BD], tl.float32)
    ab1 = tl.zeros([BD], tl.float32)  # da_b[p-1] .. [p-6]
    ab2 = tl.zeros([BD], tl.float32)
    ab3 = tl.zeros([BD], tl.float32)
    ab4 = tl.zeros([BD], tl.float32)
    ab5 = tl.zeros([BD], tl.float32)
    ab6 = tl.zeros([BD], tl.float32)
    gwf0 = tl.zeros([BD], tl.float32)
    gwf1 = tl.zeros([BD], tl.float32)
    gwf2 = tl.zeros([BD], tl.float32)
    gwf3 = tl.zeros([BD], tl.float32)
    gwb0 = tl.zeros([BD], tl.float32)
    gwb1 = tl.zeros([BD], tl.float32)
    gwb2 = tl.zeros([BD], tl.float32)
    gwb3 = tl.zeros([BD], tl.float32)
    gbf = tl.zeros([BD], tl.float32)
    gbb = tl.zeros([BD], tl.float32)
    for p in range(p0, t1 + 3):
        xp3 = _load_x(x_b, p + 3, sx_t, L, dmask)
        inside = (p >= 0) & (p < L)
        dyf = tl.load(dyf_b + p * sdf_t, mask=dmask & inside, other=0.0).to(tl.float32)
        dyb = tl.load(dyb_b + p * sdb_t, mask=dmask & inside, other=0.0).to(tl.float32)
        af = bf + wf0 * xm3 + wf1 * xm2 + wf2 * xm1 + wf3 * x0
        ab = bb + wb0 * xp3 + wb1 * xp2 + wb2 * xp1 + wb3 * x0
        daf = _dsilu(af, dyf, FAST)
        dab = _dsilu(ab, dyb, FAST)
        # own positions only: each token's weight-gradient terms are counted by exactly one chunk
        own = (p >= t0) & (p < t1)
        gaf = tl.where(own, daf, 0.0)
        gab = tl.where(own, dab, 0.0)
        gwf0 += gaf * xm3
        gwf1 += gaf * xm2
        gwf2 += gaf * xm1
        gwf3 += gaf * x0
        gwb0 += gab * xp3
        gwb1 += gab * xp2
        gwb2 += gab * xp1
        gwb3 += gab * x0
        gbf += gaf
        gbb += gab
        u = p - 3
        dx = (wf0 * daf + wf1 * af1 + wf2 * af2 + wf3 * af3
              + wb0 * ab6 + wb1 * ab5 + wb2 * ab4 + wb3 * ab3)
        tl.store(dx_b + u * E, dx.to(dx_ptr.dtype.element_ty), mask=dmask & (u >= t0) & (u < t1))
        af3 = af2
        af2 = af1
        af1 = daf
        ab6 = ab5
        ab5 = ab4
        ab4 = ab3
        ab3 = ab2
        ab2 = ab1
        ab1 = dab
        xm3 = xm2
        xm2 = xm1
        xm1 = x0
        x0 = xp1
        xp1 = xp2
        xp2 = xp3
    prog = b * tl.num_programs(2) + c
    dw_b = dw_ptr + prog * 10 * E + offs_d
    tl.store(dw_b + 0 * E, gwf0, mask=dmask)
    tl.store(dw_b + 1 * E, gwf1, mask=dmask)
    tl.store(dw_b + 2 * E, gwf2, mask=dmask)
    tl.store(dw_b + 3 * E, gwf3, mask=dmask)
    tl.store(dw_b + 4 * E, gwb0, mask=dmask)
    tl.store(dw_b + 5 * E, gwb1, mask=dmask)
    tl.store(dw_b + 6 * E, gwb2, mask=dmask)
    tl.store(dw_b + 7 * E, gwb3, mask=dmask)
    tl.store(dw_b + 8 * E, gbf, mask=dmask)
    tl.store(dw_b + 9 * E, gbb, mask=dmask)


@triton.jit
def _conv_wsum_kernel(dw_ptr, dwf_ptr, dbf_ptr, dwb_ptr, dbb_ptr, NPAR, E, BC: tl.constexpr, RB: tl.constexpr,
                      HAS_BF: tl.constexpr, HAS_BB: tl.constexpr):
    """Sum of the backward's per-program partials dw [NPAR, 10, E] (in a fixed order), written as the parameter
    gradients in their dtypes: dwf, dwb (E, 4) from rows 0-3 / 4-7, dbf, dbb (E,) from rows 8 / 9."""
    c = tl.program_id(0) * BC + tl.arange(0, BC)          # column of the [10, E] partial
    cm = c < 10 * E
    r = tl.arange(0, RB)
    acc = tl.zeros([RB, BC], tl.float32)
    for r0 in range(0, NPAR, RB):
        rr = r0 + r
        acc += tl.load(dw_ptr + rr[:, None].to(tl.int64) * (10 * E) + c[None, :],
                       mask=(rr < NPAR)[:, None] & cm[None, :], other=0.0)
    s = tl.sum(acc, axis=0)
    j = c // E
    e = c - j * E
    tl.store(dwf_ptr + e * 4 + j, s.to(dwf_ptr.dtype.element_ty), mask=cm & (j < 4))
    tl.store(dwb_ptr + e * 4 + (j - 4), s.to(dwb_ptr.dtype.element_ty), mask=cm & (j >= 4) & (j < 8))
    if HAS_BF:
        tl.store(dbf_ptr + e, s.to(dbf_ptr.dtype.element_ty), mask=cm & (j == 8))
    if HAS_BB:
        tl.store(dbb_ptr + e, s.to(dbb_ptr.dtype.element_ty), mask=cm & (j == 9))
