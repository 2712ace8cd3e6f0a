"""Triton kernels of the bidirectional depthwise conv1d (kernel 4) + SiLU, forward and backward.

x is token-major (B, L, E), taken by stride. A program owns a block of BD channels of one batch element and a
chunk of CH tokens, and walks the chunk once, keeping a sliding window of x (t-3 .. t+3) in registers: each x
value is read once (plus a 3-token halo per chunk) and gives both outputs,
    x_fwd[t] = silu(bias_fwd + sum_j w_fwd[j] x[t-3+j]),   x_rev[t] = silu(bias_rev + sum_j w_rev[j] x[t+3-j]).
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
def _load_params(w_fwd_ptr, bias_fwd_ptr, w_rev_ptr, bias_rev_ptr, offs_d, dmask, BD: tl.constexpr,
                 HAS_BIAS_FWD: tl.constexpr,
                 HAS_BIAS_REV: tl.constexpr):
    """Both directions' 4 taps (weights are (E, 4)) and biases for a channel block, in fp32 (zero bias if none)."""
    w_fwd0 = tl.load(w_fwd_ptr + offs_d * 4 + 0, mask=dmask, other=0.0).to(tl.float32)
    w_fwd1 = tl.load(w_fwd_ptr + offs_d * 4 + 1, mask=dmask, other=0.0).to(tl.float32)
    w_fwd2 = tl.load(w_fwd_ptr + offs_d * 4 + 2, mask=dmask, other=0.0).to(tl.float32)
    w_fwd3 = tl.load(w_fwd_ptr + offs_d * 4 + 3, mask=dmask, other=0.0).to(tl.float32)
    w_rev0 = tl.load(w_rev_ptr + offs_d * 4 + 0, mask=dmask, other=0.0).to(tl.float32)
    w_rev1 = tl.load(w_rev_ptr + offs_d * 4 + 1, mask=dmask, other=0.0).to(tl.float32)
    w_rev2 = tl.load(w_rev_ptr + offs_d * 4 + 2, mask=dmask, other=0.0).to(tl.float32)
    w_rev3 = tl.load(w_rev_ptr + offs_d * 4 + 3, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS_FWD:
        bias_fwd = tl.load(bias_fwd_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias_fwd = tl.zeros([BD], tl.float32)
    if HAS_BIAS_REV:
        bias_rev = tl.load(bias_rev_ptr + offs_d, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias_rev = tl.zeros([BD], tl.float32)
    return w_fwd0, w_fwd1, w_fwd2, w_fwd3, w_rev0, w_rev1, w_rev2, w_rev3, bias_fwd, bias_rev


@triton.jit
def _conv_forward_kernel(x_ptr, w_fwd_ptr, bias_fwd_ptr, w_rev_ptr, bias_rev_ptr, y_fwd_ptr, y_rev_ptr,
                     sx_b, sx_t, L, E, CH,
                     BD: tl.constexpr, HAS_BIAS_FWD: tl.constexpr, HAS_BIAS_REV: tl.constexpr, FAST: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    t0 = tl.program_id(2) * CH
    t1 = tl.minimum(t0 + CH, L)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < E
    w_fwd0, w_fwd1, w_fwd2, w_fwd3, w_rev0, w_rev1, w_rev2, w_rev3, bias_fwd, bias_rev = _load_params(
        w_fwd_ptr, bias_fwd_ptr, w_rev_ptr, bias_rev_ptr, offs_d, dmask, BD, HAS_BIAS_FWD, HAS_BIAS_REV)
    x_b = x_ptr + b * sx_b + offs_d
    y_fwd_b = y_fwd_ptr + b * L * E + offs_d
    y_rev_b = y_rev_ptr + b * L * E + offs_d
    xm3 = _load_x(x_b, t0 - 3, sx_t, L, dmask)
    xm2 = _load_x(x_b, t0 - 2, sx_t, L, dmask)
    xm1 = _load_x(x_b, t0 - 1, sx_t, L, dmask)
    x0 = _load_x(x_b, t0, sx_t, L, dmask)
    xp1 = _load_x(x_b, t0 + 1, sx_t, L, dmask)
    xp2 = _load_x(x_b, t0 + 2, sx_t, L, dmask)
    for t in range(t0, t1):
        xp3 = _load_x(x_b, t + 3, sx_t, L, dmask)
        a_fwd = bias_fwd + w_fwd0 * xm3 + w_fwd1 * xm2 + w_fwd2 * xm1 + w_fwd3 * x0
        a_rev = bias_rev + w_rev0 * xp3 + w_rev1 * xp2 + w_rev2 * xp1 + w_rev3 * x0
        tl.store(y_fwd_b + t * E, _silu(a_fwd, FAST).to(y_fwd_ptr.dtype.element_ty), mask=dmask)
        tl.store(y_rev_b + t * E, _silu(a_rev, FAST).to(y_rev_ptr.dtype.element_ty), mask=dmask)
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
def _conv_backward_kernel(x_ptr, dy_fwd_ptr, dy_rev_ptr, w_fwd_ptr, bias_fwd_ptr, w_rev_ptr, bias_rev_ptr, dx_ptr,
                          dw_ptr,
                     sx_b, sx_t, sdy_fwd_b, sdy_fwd_t, sdy_rev_b, sdy_rev_t, L, E, CH,
                     BD: tl.constexpr, HAS_BIAS_FWD: tl.constexpr, HAS_BIAS_REV: tl.constexpr, FAST: tl.constexpr):
    """dx[u] = sum_j w_f[j] da_f[u+3-j] + w_b[j] da_b[u-3+j]; dw/db partials [prog, 10, E] (wf0..3, wb0..3, bf, bb)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)       # int64: b * L * E passes 2^31 at large batches
    c = tl.program_id(2)
    t0 = c * CH
    t1 = tl.minimum(t0 + CH, L)
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < E
    w_fwd0, w_fwd1, w_fwd2, w_fwd3, w_rev0, w_rev1, w_rev2, w_rev3, bias_fwd, bias_rev = _load_params(
        w_fwd_ptr, bias_fwd_ptr, w_rev_ptr, bias_rev_ptr, offs_d, dmask, BD, HAS_BIAS_FWD, HAS_BIAS_REV)
    x_b = x_ptr + b * sx_b + offs_d
    dy_fwd_b = dy_fwd_ptr + b * sdy_fwd_b + offs_d
    dy_rev_b = dy_rev_ptr + b * sdy_rev_b + offs_d
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
    da_fwd1 = tl.zeros([BD], tl.float32)  # da_f[p-1], [p-2], [p-3]
    da_fwd2 = tl.zeros([BD], tl.float32)
    da_fwd3 = tl.zeros([BD], tl.float32)
    da_rev1 = tl.zeros([BD], tl.float32)  # da_b[p-1] .. [p-6]
    da_rev2 = tl.zeros([BD], tl.float32)
    da_rev3 = tl.zeros([BD], tl.float32)
    da_rev4 = tl.zeros([BD], tl.float32)
    da_rev5 = tl.zeros([BD], tl.float32)
    da_rev6 = tl.zeros([BD], tl.float32)
    gw_fwd0 = tl.zeros([BD], tl.float32)
    gw_fwd1 = tl.zeros([BD], tl.float32)
    gw_fwd2 = tl.zeros([BD], tl.float32)
    gw_fwd3 = tl.zeros([BD], tl.float32)
    gw_rev0 = tl.zeros([BD], tl.float32)
    gw_rev1 = tl.zeros([BD], tl.float32)
    gw_rev2 = tl.zeros([BD], tl.float32)
    gw_rev3 = tl.zeros([BD], tl.float32)
    gbias_fwd = tl.zeros([BD], tl.float32)
    gbias_rev = tl.zeros([BD], tl.float32)
    for p in range(p0, t1 + 3):
        xp3 = _load_x(x_b, p + 3, sx_t, L, dmask)
        inside = (p >= 0) & (p < L)
        dy_fwd = tl.load(dy_fwd_b + p * sdy_fwd_t, mask=dmask & inside, other=0.0).to(tl.float32)
        dy_rev = tl.load(dy_rev_b + p * sdy_rev_t, mask=dmask & inside, other=0.0).to(tl.float32)
        a_fwd = bias_fwd + w_fwd0 * xm3 + w_fwd1 * xm2 + w_fwd2 * xm1 + w_fwd3 * x0
        a_rev = bias_rev + w_rev0 * xp3 + w_rev1 * xp2 + w_rev2 * xp1 + w_rev3 * x0
        da_fwd = _dsilu(a_fwd, dy_fwd, FAST)
        da_rev = _dsilu(a_rev, dy_rev, FAST)
        # own positions only: each token's weight-gradient terms are counted by exactly one chunk
        own = (p >= t0) & (p < t1)
        ga_fwd = tl.where(own, da_fwd, 0.0)
        ga_rev = tl.where(own, da_rev, 0.0)
        gw_fwd0 += ga_fwd * xm3
        gw_fwd1 += ga_fwd * xm2
        gw_fwd2 += ga_fwd * xm1
        gw_fwd3 += ga_fwd * x0
        gw_rev0 += ga_rev * xp3
        gw_rev1 += ga_rev * xp2
        gw_rev2 += ga_rev * xp1
        gw_rev3 += ga_rev * x0
        gbias_fwd += ga_fwd
        gbias_rev += ga_rev
        u = p - 3
        dx = (w_fwd0 * da_fwd + w_fwd1 * da_fwd1 + w_fwd2 * da_fwd2 + w_fwd3 * da_fwd3
              + w_rev0 * da_rev6 + w_rev1 * da_rev5 + w_rev2 * da_rev4 + w_rev3 * da_rev3)
        tl.store(dx_b + u * E, dx.to(dx_ptr.dtype.element_ty), mask=dmask & (u >= t0) & (u < t1))
        da_fwd3 = da_fwd2
        da_fwd2 = da_fwd1
        da_fwd1 = da_fwd
        da_rev6 = da_rev5
        da_rev5 = da_rev4
        da_rev4 = da_rev3
        da_rev3 = da_rev2
        da_rev2 = da_rev1
        da_rev1 = da_rev
        xm3 = xm2
        xm2 = xm1
        xm1 = x0
        x0 = xp1
        xp1 = xp2
        xp2 = xp3
    prog = b * tl.num_programs(2) + c
    dw_b = dw_ptr + prog * 10 * E + offs_d
    tl.store(dw_b + 0 * E, gw_fwd0, mask=dmask)
    tl.store(dw_b + 1 * E, gw_fwd1, mask=dmask)
    tl.store(dw_b + 2 * E, gw_fwd2, mask=dmask)
    tl.store(dw_b + 3 * E, gw_fwd3, mask=dmask)
    tl.store(dw_b + 4 * E, gw_rev0, mask=dmask)
    tl.store(dw_b + 5 * E, gw_rev1, mask=dmask)
    tl.store(dw_b + 6 * E, gw_rev2, mask=dmask)
    tl.store(dw_b + 7 * E, gw_rev3, mask=dmask)
    tl.store(dw_b + 8 * E, gbias_fwd, mask=dmask)
    tl.store(dw_b + 9 * E, gbias_rev, mask=dmask)


@triton.jit
def _conv_wsum_kernel(dw_ptr, dw_fwd_ptr, dbias_fwd_ptr, dw_rev_ptr, dbias_rev_ptr, NPAR, E, BC: tl.constexpr,
                      RB: tl.constexpr,
                      HAS_BIAS_FWD: tl.constexpr, HAS_BIAS_REV: tl.constexpr):
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
    tl.store(dw_fwd_ptr + e * 4 + j, s.to(dw_fwd_ptr.dtype.element_ty), mask=cm & (j < 4))
    tl.store(dw_rev_ptr + e * 4 + (j - 4), s.to(dw_rev_ptr.dtype.element_ty), mask=cm & (j >= 4) & (j < 8))
    if HAS_BIAS_FWD:
        tl.store(dbias_fwd_ptr + e, s.to(dbias_fwd_ptr.dtype.element_ty), mask=cm & (j == 8))
    if HAS_BIAS_REV:
        tl.store(dbias_rev_ptr + e, s.to(dbias_rev_ptr.dtype.element_ty), mask=cm & (j == 9))
