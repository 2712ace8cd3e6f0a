"""The layering the README states, and the backbone's install without the training stack."""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_STACK = ("accelerate", "albumentations", "tensorboard", "matplotlib")   # (tqdm, pyyaml: timm needs them)


def _imports(path):
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = path.parent.relative_to(ROOT).as_posix().replace("/", ".")
    package = {"kernels": "vlonghorn.kernels"}.get(package, package)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_imports_flow_one_way_models_ops_kernels():
    for path in (ROOT / "vlonghorn" / "models").glob("*.py"):
        ours = {n for n in _imports(path) if n.startswith("vlonghorn")}
        assert all(n.startswith(("vlonghorn.ops", "vlonghorn.models")) for n in ours), (path.name, sorted(ours))
    for path in (ROOT / "kernels").glob("*.py"):
        ours = {n for n in _imports(path) if n.startswith("vlonghorn") and not n.startswith("vlonghorn.kernels")}
        assert not ours, (path.name, sorted(ours))
    for path in (ROOT / "vlonghorn" / "ops").glob("*.py"):
        kernel_names = {n for n in _imports(path) if n.startswith("vlonghorn.kernels.")}
        # ops uses the kernels package's public names only
        assert all(n.count(".") == 2 and not n.split(".")[-1].startswith("_") for n in kernel_names), kernel_names
    train = _imports(ROOT / "train.py")
    assert not any(n.startswith("vlonghorn.kernels") for n in train), sorted(n for n in train if "kernels" in n)


@pytest.mark.slow
def test_backbone_runs_without_the_training_stack():
    """`pip install vlonghorn` brings models, ops and kernels without accelerate, albumentations, tensorboard,
    or matplotlib: a model builds and runs with all of them made unimportable."""
    blocked = ", ".join(repr(m) for m in TRAINING_STACK)
    code = (f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
            "import timm, torch, vlonghorn\n"
            "m = timm.create_model('vlonghorn_nano', img_size=32, patch_size=8).eval()\n"
            "print(tuple(m(torch.randn(1, 3, 32, 32)).shape))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip() == "(1, 1000)", run.stderr[-1500:]
