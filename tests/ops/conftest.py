"""The `config` fixture of the kernel tests (tests/kernel_checks.py), for the recompute tests here."""
from kernel_checks import config  # noqa: F401
