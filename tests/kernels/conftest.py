"""The kernel tests' `config` fixture (defined in tests/kernel_checks.py, shared with tests/ops)."""
from kernel_checks import config  # noqa: F401
