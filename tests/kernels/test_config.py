"""The kernels' launch configuration: typed and validated, and read where torch.compile guards it."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from kernel_checks import CUDA, _mixer, _mixer_inputs
from vlonghorn.kernels import CONFIG, KernelConfig

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "kernels"


def test_unknown_or_mistyped_keys_are_errors_that_name_them():
    with pytest.raises(KeyError, match=r"unknown kernel configuration key 'fwd_bd' \(did you mean 'forward_bd'\?\)"):
        CONFIG.update(fwd_bd=64)
    with pytest.raises(TypeError, match="'recon' must be bool, got 1"):
        CONFIG.update(recon=1)
    with pytest.raises(ValueError, match="backward_bd must be 32 x backward_warps"):
        CONFIG.update(backward_bd=64)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive multiple of backward_tile"):
        CONFIG.checkpoint_every = 63
    assert CONFIG.as_dict() == KernelConfig().as_dict(), "a refused update changes nothing"
    with CONFIG.override(forward_bd=32, chunk_bd=32):
        assert CONFIG["forward_bd"] == 32
    assert CONFIG.forward_bd == KernelConfig().forward_bd


@pytest.mark.parametrize("text,message", [('{"fwd_chunk": 0}', "unknown kernel configuration key 'fwd_chunk'"),
                                          ('{"recon_tol": "big"}', "'recon_tol' must be float"),
                                          ('[1, 2]', "must be a JSON object")])
@pytest.mark.slow
def test_environment_configuration_is_checked_at_import(text, message):
    run = subprocess.run([sys.executable, "-c", "import vlonghorn.kernels"], capture_output=True, text=True,
                         env={**os.environ, "VLONGHORN_KERNEL_CONFIG": text})
    assert run.returncode != 0 and "VLONGHORN_KERNEL_CONFIG" in run.stderr and message in run.stderr, run.stderr[-600:]
    ok = subprocess.run([sys.executable, "-c", "import vlonghorn.kernels as k; print(k.CONFIG.chunk_len)"],
                        capture_output=True, text=True,
                        env={**os.environ, "VLONGHORN_KERNEL_CONFIG": json.dumps({"chunk_len": 96})})
    assert ok.returncode == 0 and ok.stdout.strip() == "96", ok.stderr[-600:]


def test_batch_offsets_are_64_bit():
    """Every kernel that takes a batch index from its grid makes it int64 before any offset is formed, so that
    b * L * E (and the partials' b * L * 2N rows) cannot wrap past 2^31 (a GPU test runs B * L * E > 2^31). A
    static check: the interpreter cannot allocate such tensors on a CI machine."""
    seen = 0
    for path in sorted(KERNELS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Assign) and len(node.targets) == 1
                        and getattr(node.targets[0], "id", None) in ("b", "tok")):
                    src = ast.unparse(node.value)
                    if "program_id" in src:     # the batch element (or, in the record prep, the token row)
                        assert "program_id(1).to(tl.int64)" in src or "program_id(0).to(tl.int64)" in src, \
                            f"{path.name}:{node.lineno} {fn.name}: {node.targets[0].id} = {src}"
                        seen += 1
    assert seen >= 8, seen     # forward, backward, chunk, combine, adjoint chunk, conv forward / backward, prep


@pytest.mark.slow
def test_config_change_after_compiling_recompiles(config):
    """Buffer shapes follow the configuration that runs: a function compiled under one forward block size and run
    after the configuration changed is traced again (the layout is read at trace time and guarded), and its
    training outputs and gradients still match eager mode."""
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    x, z, conv_params, scan_params = _mixer_inputs(*((1, 11, 40) if not CUDA else (2, 197, 256)), seed=6)
    fn = torch.compile(_mixer, fullgraph=True, backend=backend)
    results = []
    for bd in (config.forward_bd, 2 * config.forward_bd):
        config.update(forward_bd=bd, chunk_bd=min(config.chunk_bd, bd))
        y = fn(x, z, conv_params, scan_params)
        (gx,) = torch.autograd.grad(y.sum(), [x])
        y_eager = _mixer(x, z, conv_params, scan_params)
        (gx_eager,) = torch.autograd.grad(y_eager.sum(), [x])
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(gx, gx_eager)
        results.append(len(frames))
    assert results[1] > results[0], "the changed configuration did not recompile"
