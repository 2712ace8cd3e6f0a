"""The README's Python examples run as written (a README that lies is a bug)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    if "print(" in BLOCKS[index]:
        assert printed.strip()
    if "[(1, 384, 20, 30)] * 3" in BLOCKS[index]:
        assert printed.strip() == str([(1, 384, 20, 30)] * 3)
    if "(1, 145, 64)" in BLOCKS[index]:
        assert printed.strip() == "torch.Size([1, 145, 64])"
