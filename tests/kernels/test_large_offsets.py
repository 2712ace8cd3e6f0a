"""Offsets past 2^31 elements: B x L x E > 2^31 on the GPU (the CPU side is the static check in test_config.py)."""
import pytest
import torch

from kernel_checks import _rel, bidirectional_conv1d_silu_triton, bidirectional_longhorn_scan_triton, needs_cuda


@needs_cuda
@pytest.mark.gpu_fast
def test_batch_offsets_past_2_31_elements():
    """A training step of the conv and the bidirectional scan at B x L x E = 2.15e9 (> 2^31): the last batch
    elements' outputs and gradients equal those of the same elements run alone (an int32 offset would wrap and
    read or write another element's memory)."""
    B, L, E, N = 683, 4097, 768, 16
    assert B * L * E > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16) * scale)

    x = rnd(B, L, E)
    conv = [torch.randn(E, 4, device="cuda") * 0.3, torch.randn(E, device="cuda") * 0.1] * 2
    dt, z = rnd(B, L, E) - 1.0, rnd(B, L, E)
    kq = rnd(B, L, 4 * N, scale=0.5)
    bias, D = torch.randn(E, device="cuda") * 0.5, torch.randn(E, device="cuda")
    tail = slice(B - 2, B)

    def step(x, dt, z, kq):
        leaves = [t.detach().requires_grad_() for t in (x, dt, z, kq)]
        x, dt, z, kq = leaves
        x_f, x_r = bidirectional_conv1d_silu_triton(x, *conv)
        k_f, q_f, k_r, q_r = kq.split(N, -1)
        y = bidirectional_longhorn_scan_triton(x_f, x_r, dt, dt, k_f, q_f, k_r, q_r, bias, bias, D, D, z)
        y[-2:].float().sum().backward()
        return [y[-2:].detach()] + [t.grad[-2:] for t in leaves]

    big = step(x, dt, z, kq)
    torch.cuda.empty_cache()
    alone = step(x[tail], dt[tail], z[tail], kq[tail])
    for name, a, b in zip(("y", "dx", "ddt", "dz", "dkq"), big, alone):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b.double()) < 1e-2, (name, _rel(a, b.double()))
