"""The torch.library registrations: schemas, fakes, autograd, torch.compile, CUDA graphs and the eager
route around them."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import CUDA, DEV, SeenOps, _mixer, _mixer_inputs, _rel, _scan_inputs, needs_cuda
from vlonghorn.kernels.launch import RECON_STATE


@pytest.mark.slow
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
            x_f, x_rev = ops.bidirectional_conv1d_silu(x, *conv, backend=backend)
            dbl = lin_x(x_f)
            dt, k, q = dbl.split([8, 16, 16], -1)
            dt = lin_dt(dt)
            y = ops.bidirectional_longhorn_scan(x_f, x_rev, dt, dt, k, q, k, q, lin_dt.bias, lin_dt.bias,
                                                None, None, z, backend=backend)
        y.float().square().mean().backward()
        results.append((y.float(), lin_in.weight.grad.clone(), lin_x.weight.grad.clone()))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        assert _rel(a, b.double()) < 2e-2


def test_opcheck_registrations(config):
    """torch.library's own checks of the schemas, fake implementations and autograd registrations."""
    from vlonghorn.kernels.custom_ops import conv_backward, conv_forward, scan_backward, scan_forward
    from vlonghorn.kernels.launch import forward_layout
    inputs, _ = _scan_inputs(1, 5, 32, 16, torch.float32)
    i = {n: (t.detach() if t is not None else None) for n, t in inputs.items()}
    args = (inputs["x"], inputs["dt"], inputs["k"], inputs["q"], inputs["dt_bias"], inputs["D"],
            None, None, None, None, None, None, inputs["z"], True, True, forward_layout())
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(scan_forward, args, test_utils=utils)
    _, ypre, ck, rec = scan_forward(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    g = torch.randn_like(i["x"])
    torch.library.opcheck(scan_backward, (g, i["x"], i["dt"], i["dt_bias"], i["D"], None, None, None, None, i["z"],
                                     ypre, ck, rec, True, torch.float32, torch.float32, 16, forward_layout()),
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(1, 5, 32, device=DEV, requires_grad=True)
    w = torch.randn(32, 4, device=DEV, requires_grad=True)
    torch.library.opcheck(conv_forward, (x, w, None, w, None), test_utils=utils)
    torch.library.opcheck(conv_backward, (torch.randn_like(x), torch.randn_like(x), x.detach(), w.detach(), None,
                                     w.detach(), None), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_eager_calls_skip_the_custom_ops(config):
    """In eager mode the entry points call the launchers through autograd Functions (no torch.library wrapping);
    under a dispatch mode (as for fake tensors or a FLOP counter) they go through the custom ops, and both ways give
    the same outputs and gradients, bit for bit."""
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
            ops = {"vlonghorn.scan_forward.default", "vlonghorn.scan_backward.default",
                   "vlonghorn.conv1d_silu_forward.default",
                   "vlonghorn.conv1d_silu_backward.default"}
            assert ops <= mode.seen, ops - mode.seen
    (y0, g0, fn0), (y1, g1, fn1) = runs
    assert fn0 == "_ScanFnBackward" and fn1 != fn0, (fn0, fn1)
    assert torch.equal(y0, y1)
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert torch.equal(a, b), f"gradient {i} differs"


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
