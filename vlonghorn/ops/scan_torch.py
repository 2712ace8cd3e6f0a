"""Pure-PyTorch Longhorn scan: the backend that runs everywhere (CPU, any GPU, any dtype).

Vectorised over batch, channels and state; the only Python loop is over time steps, and each step is a few
multiply-adds on a (B, N, E) slab. Time is cut into chunks so the (T, B, E, N) working set stays small,
and the autograd Function saves only its inputs: the backward recomputes the states chunk by chunk from
boundary states (longhorn.md section 3), so training memory does not grow with E * N.

Traced (torch.compile, torch.export, ONNX), the scan takes a chunked form instead (`_chunked`): a fixed number of
steps whatever the sequence length, in plain ops that exporters and autograd handle.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["longhorn_scan_torch", "bidirectional_longhorn_scan_torch"]

# Elements per (chunk, B, E, N) buffer: 4 MB in fp32, so the three buffers of a chunk stay in a CPU's L3 cache
# at any batch, while batch-1 inference at 224 px (L = 197) of the small model still takes few chunks.
_CHUNK_ELEMENTS = 1 << 20


def _no_autocast(device_type):
    """Switch autocast off where it is on (entering no context otherwise: torch.export wraps every autocast
    region of a graph in a subgraph of its own, which costs tracing time)."""
    # (cpu and cuda have autocast: torch 2.11's dynamo cannot trace the availability check)
    available = device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _as(t, dtype):
    """t in dtype, with no cast traced when it already is"""
    return t if t.dtype == dtype else t.to(dtype)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_coefficients(x, dt, k, dt_bias):
    """Time-major coefficients of one chunk. x, dt: (T, B, E); k: (T, B, N); dt_bias: (B, E).

    Returns beta, den, eps (T, B, E), decay = 1 - eps k^2 and input = eps x k (T, B, E, N).
    """
    beta = torch.sigmoid(dt + dt_bias)
    k2 = k * k
    den = 1 + beta * k2.sum(-1, keepdim=True)
    eps = beta / den
    decay = torch.addcmul(torch.ones((), dtype=x.dtype, device=x.device), eps[..., None], k2[:, :, None, :],
                          value=-1)
    inp = (eps * x)[..., None] * k[:, :, None, :]
    return beta, den, eps, decay, inp


def _chunks(x, k, reverse):
    batch, length, channels = x.shape
    size = max(4, _CHUNK_ELEMENTS // (batch * channels * k.shape[-1]))
    bounds = [(s, min(s + size, length)) for s in range(0, length, size)]
    return bounds[::-1] if reverse else bounds


def _scan_chunk(decay, inp, state, reverse, states=None):
    """Run S_t = decay_t * S_prev + inp_t over the chunk (time-major), in scan order.

    Writes every post-update state into `states` (T, B, E, N) and returns it with the last state.
    """
    if states is None:
        states = torch.empty_like(inp)
    steps = zip(inp.unbind(0), decay.unbind(0), states.unbind(0))
    for inp_t, decay_t, out_t in (reversed(list(steps)) if reverse else steps):
        state = torch.addcmul(inp_t, decay_t, state, out=out_t)
    return states, state


def _time_major(t, lo, hi, dtype):
    return t[:, lo:hi].transpose(0, 1).to(dtype)


class _LonghornScanTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, k, q, dt_bias, D, z, reverse):
        y = _forward(x, dt, k, q, dt_bias, D, z, reverse)
        ctx.save_for_backward(x, dt, k, q, dt_bias, D, z)
        ctx.reverse = reverse
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, dt, k, q, dt_bias, D, z = ctx.saved_tensors
        with _no_autocast(grad_out.device.type):
            grads = _backward(grad_out, x, dt, k, q, dt_bias, D, z, ctx.reverse)
        needs = ctx.needs_input_grad
        return tuple(g if need else None for g, need in zip(grads, needs[:7])) + (None,)


def _forward(x, dt, k, q, dt_bias, D, z, reverse, keep_boundaries=False):
    """Returns y (B, L, E) in x's dtype; with keep_boundaries, instead the state entering each backward chunk
    (B, E, N).

    Each step updates one state in place from per-token vectors, so nothing of size L * E * N is materialised:
    the state stays in cache and the forward moves O(B L (E + N)) bytes. The state is held as (B, N, E), the
    channels innermost: each step's broadcasts then run along rows of E contiguous values, not of N, and the
    readout is one small matrix product (on a 2-core CPU, 2.3x faster at batch 8 than the (B, E, N) form).
    """
    cdtype = _compute_dtype(x)
    batch, length, channels = x.shape
    y = torch.empty_like(x)
    state = x.new_zeros(batch, k.shape[-1], channels, dtype=cdtype)
    forget = torch.empty_like(state)
    bias = dt_bias.to(cdtype)
    D = D.to(cdtype) if D is not None else None
    boundaries = {}
    bounds = _chunks(x, k, reverse) if keep_boundaries else [(0, length)]
    for lo, hi in bounds:
        xc, dtc = (_time_major(t, lo, hi, cdtype) for t in (x, dt))
        kc, qc = (_time_major(t, lo, hi, cdtype) for t in (k, q))
        if keep_boundaries:
            boundaries[lo] = state.transpose(1, 2).contiguous()
        k2 = kc * kc
        # eps = beta / (1 + beta kappa) = 1 / (1 + exp(-(dt + dt_bias)) + kappa), in place after the first op
        # (fewer buffers: on the CPU each fresh one costs page faults); exp overflowing to inf gives eps = 0, the
        # limit of beta -> 0
        eps = torch.add(dtc, bias).neg_().exp_().add_(k2.sum(-1, keepdim=True)).add_(1).reciprocal_()
        yc = xc.new_empty((hi - lo, batch, 1, channels))
        steps = zip(eps[:, :, None].unbind(0), (eps * xc)[:, :, None].unbind(0), k2[..., None].unbind(0),
                    kc[..., None].unbind(0), qc[:, :, None].unbind(0), yc.unbind(0))
        for eps_t, ex_t, k2_t, k_t, q_t, y_t in (reversed(list(steps)) if reverse else steps):
            torch.mul(k2_t, eps_t, out=forget)                              # eps k^2 = 1 - decay, (B, N, E)
            state.addcmul_(state, forget, value=-1).addcmul_(ex_t, k_t)
            if not keep_boundaries:  # the backward's recompute needs the chunk boundaries only, not y
                torch.bmm(q_t, state, out=y_t)                              # (B, 1, N) @ (B, N, E)
        if keep_boundaries:
            continue
        yc = yc[:, :, 0]
        if D is not None:
            yc.addcmul_(D, xc)
        if z is not None:
            yc = yc * F.silu(_time_major(z, lo, hi, cdtype))
        y[:, lo:hi] = yc.transpose(0, 1).to(y.dtype)
    return boundaries if keep_boundaries else y


def _backward(grad_out, x, dt, k, q, dt_bias, D, z, reverse):
    """Exact gradients (longhorn.md section 3), walking chunks against the scan direction."""
    cdtype = _compute_dtype(x)
    boundaries = _forward(x, dt, k, q, dt_bias, D, z, reverse, keep_boundaries=True)
    bias = dt_bias.to(cdtype)
    D_c = D.to(cdtype) if D is not None else None
    dx, ddt, dz = (torch.empty_like(t) if t is not None else None for t in (x, dt, z))
    dk, dq = torch.empty_like(k), torch.empty_like(q)
    ddt_bias = torch.zeros_like(bias)
    dD = torch.zeros_like(bias) if D is not None else None
    carry = None                                   # decay_{next} * G_{next}, entering the chunk from after it
    for lo, hi in _chunks(x, k, not reverse):
        xc, dtc, gc = (_time_major(t, lo, hi, cdtype) for t in (x, dt, grad_out))
        kc, qc = (_time_major(t, lo, hi, cdtype) for t in (k, q))
        beta, den, eps, decay, inp = _chunk_coefficients(xc, dtc, kc, bias)
        # One buffer holds the entering state and the chunk's states: S_t and S_{t-1} are both views of it.
        history = inp.new_empty((inp.shape[0] + 1, *inp.shape[1:]))
        states, prev = (history[:-1], history[1:]) if reverse else (history[1:], history[:-1])
        history[-1 if reverse else 0] = boundaries[lo]
        _scan_chunk(decay, inp, boundaries[lo], reverse, states)
        if z is not None:
            zc = _time_major(z, lo, hi, cdtype)
            sz = torch.sigmoid(zc)
            y = torch.einsum("tben,tbn->tbe", states, qc)
            if D is not None:
                y = y + D_c * xc
            dz[:, lo:hi] = (gc * y * sz * (1 + zc * (1 - sz))).transpose(0, 1).to(dz.dtype)
            gy = gc * zc * sz
        else:
            gy = gc
        dxc = gy * D_c if D is not None else torch.zeros_like(xc)
        if D is not None:
            dD += (gy * xc).sum(0)
        dq[:, lo:hi] = torch.einsum("tben,tbe->tbn", states, gy).transpose(0, 1).to(dq.dtype)

        # Adjoint G_t = gy_t q_t + decay_{t+1} G_{t+1} ("t+1" in scan order), itself a scan run against the
        # scan direction. The term from the chunk after this one enters as `carry` on the chunk's last step,
        # so the scan starts from zero and the rolled decay's wrapped-around entry only ever multiplies zero.
        grad_state = gy[..., None] * qc[:, :, None, :]
        first, last = (-1, 0) if reverse else (0, -1)
        if carry is not None:
            grad_state[last] += carry
        grad_state, _ = _scan_chunk(decay.roll(1 if reverse else -1, 0), grad_state,
                                    torch.zeros_like(states[0]), not reverse, grad_state)
        carry = decay[first] * grad_state[first]

        k2 = kc * kc
        gk = torch.einsum("tben,tbn->tbe", grad_state, kc)                        # sum_n G k
        deps = xc * gk - torch.einsum("tben,tbn->tbe", grad_state * prev, k2)
        dxc = dxc + eps * gk
        dkappa = -eps * eps * deps
        dkc = (torch.einsum("tben,tbe->tbn", grad_state, eps * xc)
               - 2 * kc * torch.einsum("tben,tbe->tbn", grad_state * prev, eps)
               + 2 * kc * dkappa.sum(-1, keepdim=True))
        ddtc = deps / (den * den) * beta * (1 - beta)
        ddt_bias += ddtc.sum(0)
        dx[:, lo:hi] = dxc.transpose(0, 1).to(dx.dtype)
        ddt[:, lo:hi] = ddtc.transpose(0, 1).to(ddt.dtype)
        dk[:, lo:hi] = dkc.transpose(0, 1).to(dk.dtype)
    ddt_bias = ddt_bias.to(dt_bias.dtype)
    dD = dD.to(D.dtype) if D is not None else None
    return dx, ddt, dk, dq, ddt_bias, dD, dz


# Tokens per chunk of the chunked form: its Python loop runs this many steps whatever the sequence length; the
# chunks' entry states are one matrix product, or for many chunks the same chunked scan one level up.
_CHUNK = 16
# Up to this many chunks (1024 tokens) their entry states come from one matrix product, beyond it from a scan of
# the chunks in chunks
_MATRIX_CHUNKS = 64


def _chunked(x, dt, k, q, dt_bias, D, z, reverse):
    """The scan in chunks (for tracing and export): y (B, L, E) in x's dtype, from plain differentiable ops.

    The recurrence S_t = f_t S_{t-1} + c_t is affine in the state, so over a chunk of C tokens S_out = A S_in + Z
    with A the product of the chunk's decays and Z the state reached from zero. One loop of C steps runs every
    chunk at once from zero (keeping each step's running decay product), the chunks' entry states follow from
    their (A, Z), and each output gets its correction q_t . (A_t S_entry). Only products of decays in (0, 1] are
    formed, never their inverses, so nothing overflows however small the decays (docs/gradients.md section 7).
    """
    cdtype = _compute_dtype(x)
    packed = _pack(x, dt, k, q, cdtype)
    y = _chunked_packed(packed.flip(1) if reverse else packed, x.shape[-1], dt_bias, D)
    y = y.flip(1) if reverse else y
    if z is not None:
        y = y * F.silu(_as(z, cdtype))
    return y.to(x.dtype)


def _pack(x, dt, k, q, dtype):
    """x, dt, k and q side by side, (B, L, 2E + 2N) in dtype: one pad, one reshape and one flip for all four (a
    traced graph holds fewer nodes)."""
    return torch.cat([_as(x, dtype), _as(dt, dtype), _as(k, dtype), _as(q, dtype)], -1)


def _chunked_packed(packed, channels, dt_bias, D):
    """The chunked scan of `_pack`ed inputs in scan order: sum_n S_t[:, n] q_t[n] + D x_t, (B, L, E) in the
    packed inputs' dtype."""
    batch, length, width = packed.shape
    n_state = (width - 2 * channels) // 2
    pad = (-length) % _CHUNK          # padded tokens have k = 0: decay 1, input 0, the state passes unchanged
    packed = F.pad(packed, (0, 0, 0, pad)).reshape(batch, -1, _CHUNK, width)                # (B, M, C, .)
    xc, dtc, kc, qc = packed.split([channels, channels, n_state, n_state], -1)
    beta = torch.sigmoid(dtc + _as(dt_bias, packed.dtype)[:, None, None, :])
    k2 = kc * kc
    kappa = k2.sum(-1, keepdim=True)
    rden = 1 / (1 + beta * kappa)
    eps = beta * rden
    # f = 1 - eps k^2 in the form exact when one k[n]^2 carries all of kappa: (1 + beta (kappa - k^2)) / den
    decay = rden[..., None] * (1 + beta[..., None] * (kappa - k2)[:, :, :, None, :])         # (B, M, C, E, N)
    inp = (eps * xc)[..., None] * kc[:, :, :, None, :]
    states = _chunk_states(decay, inp)                                                      # (B, M, C, E, N)
    y = torch.matmul(states, qc[..., None])[..., 0]                                         # (B, M, C, E)
    if D is not None:
        y = y + _as(D, packed.dtype)[:, None, None, :] * xc
    return y.reshape(batch, -1, channels)[:, :length]


def _tracing(t):
    """True under torch.compile / torch.export (fake or functional tensors, or a dispatch mode), where shapes may be
    symbolic and the graph must hold no loop over the sequence."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting() or type(t) is not torch.Tensor
            or _get_current_dispatch_mode() is not None)


def _chunk_states(decay, inp):
    """S_t = f_t S_{t-1} + c_t from a zero state, over chunks (B, M, C, E, N) of one sequence (chunk m follows
    chunk m - 1): every chunk from zero in C steps that each cover all chunks, then each chunk's entry state
    (`_entry_states`) carried in through the chunk's running decay products, S_t += (f_1 ... f_t) S_entry."""
    decays, inps = decay.split(1, 2), inp.split(1, 2)     # (as split: one node each when exported, not C slices)
    states, prods = [inps[0]], [decays[0]]
    for decay_c, inp_c in zip(decays[1:], inps[1:]):
        states.append(inp_c + decay_c * states[-1])
        prods.append(decay_c * prods[-1])
    entry = _entry_states(prods[-1][:, :, 0], states[-1][:, :, 0])                           # (B, M, E, N)
    return torch.addcmul(torch.cat(states, 2), torch.cat(prods, 2), entry[:, :, None])


def _entry_states(prod, end):
    """The state entering every chunk (zero for the first), (B, M, E, N), from each chunk's decay product A_m and
    end state from zero Z_m: E_{m+1} = A_m E_m + Z_m.

    For up to _MATRIX_CHUNKS chunks, or a symbolic number of them, one product with weights
    exp(log A_{j+1} + ... + log A_{m-1}) whose exponents are <= 0 (no loop in the graph, O(M^2) memory). For more
    chunks, the same recurrence one level up, itself in chunks of _CHUNK: a traced graph then grows with the
    logarithm of the length, not with the length."""
    n_chunks = prod.shape[1]
    if isinstance(n_chunks, int) and n_chunks > _MATRIX_CHUNKS:
        if n_chunks == 1:
            return torch.zeros_like(end)
        pad = (-n_chunks) % _CHUNK        # padded chunks: product 1, end state 0
        prod = F.pad(prod, (0, 0, 0, 0, 0, pad), value=1.0).unflatten(1, (-1, _CHUNK))
        end = F.pad(end, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, _CHUNK))
        through = _chunk_states(prod, end).flatten(1, 2)[:, :n_chunks - 1]      # the states after chunks 0 .. M-2
        return torch.cat([torch.zeros_like(through[:, :1]), through], 1)
    tiny = torch.finfo(prod.dtype).tiny
    log_a = torch.log(prod.clamp_min(tiny))       # a product below `tiny` counts as `tiny`: an error below it
    through = torch.cumsum(log_a, 1)              # log A_0 + ... + log A_m
    before = through - log_a                       # ... + log A_{m-1}
    idx = torch.arange(n_chunks, device=prod.device)
    earlier = (idx[None, :] < idx[:, None])[None, :, :, None, None]                  # j < m, (1, M, M, 1, 1)
    weight = torch.where(earlier, before[:, :, None] - through[:, None, :], -torch.inf).exp()   # (B, M, M, E, N)
    return (weight * end[:, None]).sum(2)


def _scan(x, dt, k, q, dt_bias, D, z, reverse):
    """The autograd entry point; dt_bias and D are per row, (B, E), so that rows may carry different parameters.

    Traced (torch.compile, torch.export, ONNX) the chunked form runs: plain ops, no loop over the sequence, so one
    graph serves every length and autograd differentiates it. Eager calls take the step-by-step forward, whose
    state stays in cache (on a 2-core CPU the chunked form's (B, L, E, N) tensors made inference of
    vlonghorn_small 2.5x slower at batch 1, 4.8x at batch 8), with its exact, memory-light backward."""
    with _no_autocast(x.device.type):
        if _tracing(x):
            return _chunked(x, dt, k, q, dt_bias, D, z, reverse)
        return _LonghornScanTorch.apply(x, dt, k, q, dt_bias, D, z, reverse)


def _rows(param, batch):
    return None if param is None else param.expand(batch, -1)


def longhorn_scan_torch(x, dt, k, q, dt_bias, D=None, z=None, reverse=False):
    """Longhorn scan in PyTorch; same contract as `vlonghorn.ops.longhorn_scan` (inputs already validated).

    Autocast is switched off inside: the state and every reduction stay in fp32 (fp64 for fp64 inputs).
    """
    batch = x.shape[0]
    return _scan(x, dt, k, q, _rows(dt_bias, batch), _rows(D, batch), z, reverse)


def bidirectional_longhorn_scan_torch(x_fwd, x_rev, dt_fwd, dt_rev, k_fwd, q_fwd, k_rev, q_rev,
                                      dt_bias_fwd, dt_bias_rev, D_fwd=None, D_rev=None, z=None):
    """(y_fwd + y_rev) / 2 * silu(z) in PyTorch (contract of `vlonghorn.ops.bidirectional_longhorn_scan`).

    Both directions run as one scan over a doubled batch, the rev direction's inputs reversed in time, so
    the step loop runs once for both. The flips are cheap (B, L, E)-sized copies; this is the portable path.
    """
    batch = x_fwd.shape[0]

    def both(fwd, rev):
        return torch.cat([fwd, rev.flip(1)], dim=0)

    D = None
    if D_fwd is not None or D_rev is not None:
        D_fwd = D_fwd if D_fwd is not None else x_fwd.new_zeros(x_fwd.shape[-1])
        D_rev = D_rev if D_rev is not None else x_rev.new_zeros(x_rev.shape[-1])
        D = torch.cat([_rows(D_fwd, batch), _rows(D_rev, batch)])
    dt_bias = torch.cat([_rows(dt_bias_fwd, batch), _rows(dt_bias_rev, batch)])
    if _tracing(x_fwd):     # the chunked form of both directions from one packed tensor: one flip in, one out
        with _no_autocast(x_fwd.device.type):
            cdtype = _compute_dtype(x_fwd)
            packed = both(_pack(x_fwd, dt_fwd, k_fwd, q_fwd, cdtype), _pack(x_rev, dt_rev, k_rev, q_rev, cdtype))
            y = _chunked_packed(packed, x_fwd.shape[-1], dt_bias, D).to(x_fwd.dtype)
    else:
        y = _scan(both(x_fwd, x_rev), both(dt_fwd, dt_rev), both(k_fwd, k_rev), both(q_fwd, q_rev), dt_bias, D,
                  None, False)
    y_fwd, y_rev = y.unflatten(0, (2, batch)).unbind(0)
    y = (y_fwd + y_rev.flip(1)).mul_(0.5)
    return y if z is None else y * F.silu(z)
