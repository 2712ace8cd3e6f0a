"""Deployment: torch.export with dynamic batch and image size, and ONNX through onnxruntime (CPU)."""
import pytest
import timm
import torch
from torch.export import Dim

import vlonghorn  # noqa: F401  (registers the models)


def test_export_with_dynamic_batch_and_size_runs_with_and_without_grad():
    """One exported program serves every batch and every image size that is a multiple of the patch, in grad mode
    and out of it, and matches eager mode."""
    torch.manual_seed(0)
    model = timm.create_model("vlonghorn_nano", dynamic_img_size=True).eval()
    batch, h, w = Dim("batch", min=1, max=64), Dim("h", min=2, max=64), Dim("w", min=2, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                  dynamic_shapes=({0: batch, 2: 8 * h, 3: 8 * w},))
    exported = program.module()
    for shape in [(2, 3, 64, 64), (3, 3, 48, 80), (1, 3, 16, 136)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out = exported(x)
            torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5, msg=f"{shape}, grad {grad}")


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime_and_does_not_grow_with_tokens():
    """torch.onnx.export (dynamo) of the nano model: onnxruntime matches PyTorch within 1e-4, and the graph does
    not grow with the sequence: the same nodes at 65 and 257 tokens (chunks of 16 tokens, one matrix product for
    their entry states), and one more level of chunks past 1024 tokens (here 1025), whose size stays fixed up to
    16384 tokens."""
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    nodes = []
    for res in (64, 128, 256):
        model = timm.create_model("vlonghorn_nano", img_size=res).eval()
        x = torch.randn(1, 3, res, res)
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        graph = program.model_proto
        nodes.append(len(onnx.shape_inference.infer_shapes(graph).graph.node))
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert abs(out - ref).max() < 1e-4, (res, abs(out - ref).max())
    # (measured 576, 580, 824: the step-by-step form grew with the tokens)
    assert nodes[1] <= 1.01 * nodes[0] and nodes[2] <= 1.5 * nodes[0], nodes


@pytest.mark.slow
def test_model_compiles_in_one_graph_on_the_cpu():
    """torch.compile(fullgraph=True) of a model on the PyTorch path: no graph break (the scan traces as its chunked
    form), the same output and gradients as eager mode."""
    torch.manual_seed(0)
    model = timm.create_model("vlonghorn_nano")
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-5)
