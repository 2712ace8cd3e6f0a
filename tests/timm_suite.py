"""Run timm's own model test suite on the vlonghorn models.

    python tests/timm_suite.py [extra pytest args]

Fetches `tests/test_models.py` from the source distribution of the installed timm release on PyPI (cached in
.timm_tests/), tells it about our models, and runs it with `-k vlonghorn`. What is told, and why:
- the models are ViT-like (token outputs, a class token), so they join timm's NON_STD_FILTERS, as DeiT does;
- they implement forward_intermediates, so their module joins FEAT_INTER_FILTERS (those tests then run);
- TorchScript is not supported (custom autograd ops and Triton kernels; use torch.compile), so they join
  EXCLUDE_JIT_FILTERS.
test_prune_intermediate_layers_contract prunes at every one of the 24 blocks; timm keeps it out of its own CI for
its cost, and so do we, except for vlonghorn_nano (4 blocks), where it runs.
"""
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".timm_tests" / f"timm-{timm.__version__}"

# (list as it opens in timm's file, what we add to it)
ADDITIONS = [
    ("NON_STD_FILTERS = [\n", "'vlonghorn*', "),
    ("FEAT_INTER_FILTERS = [\n", "'vision_longhorn', "),
    ("EXCLUDE_JIT_FILTERS = [\n", "'vlonghorn*', "),
]


def fetch_timm_tests() -> Path:
    tests = CACHE / "tests"
    if (tests / "test_models.py").exists():
        return tests
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"timm=={timm.__version__}", "-d", tmp],
            check=True,
        )
        archive = next(Path(tmp).glob("timm-*.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
            for m in members:
                m.name = m.name.split("/", 1)[1]
            tar.extractall(CACHE, members=members, filter="data")
    source = (tests / "test_models.py").read_text()
    for anchor, addition in ADDITIONS:
        if anchor not in source:
            raise RuntimeError(f"timm {timm.__version__}'s test_models.py has no {anchor.strip()!r}: "
                               "update tests/timm_suite.py for this release")
        source = source.replace(anchor, anchor + "    " + addition + "\n", 1)
    (tests / "test_models.py").write_text(source)
    (tests / "pytest.ini").write_text("[pytest]\n")  # keeps pytest from reading our pyproject's settings
    return tests


def main(argv):
    tests = fetch_timm_tests()
    command = [sys.executable, "-m", "pytest", str(tests / "test_models.py"), "-k", "vlonghorn and (nano or not test_prune_intermediate_layers_contract)",
               "-p", "vlonghorn", "-c", str(tests / "pytest.ini"),
               "-p", "no:cacheprovider", "-q", "-W", "ignore::pytest.PytestUnknownMarkWarning", *argv]
    return subprocess.run(command, cwd=tests).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
