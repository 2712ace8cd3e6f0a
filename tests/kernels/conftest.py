"""Fixtures of the kernel tests."""
import pytest
import torch

from kernel_checks import SMALL_CFG
from vlonghorn.kernels import CONFIG
from vlonghorn.kernels.launch import RECON_FLAGS, RECON_STATE

CUDA = torch.cuda.is_available()


@pytest.fixture
def config(request):
    """Temporarily replace kernel launch parameters: SMALL_CFG on the interpreter, the defaults on CUDA."""
    saved = CONFIG.as_dict()
    CONFIG.update(getattr(request, "param", None) or ({} if CUDA else SMALL_CFG))
    RECON_STATE.clear()     # no running share of redone programs carries over from another test
    yield CONFIG
    CONFIG.update(saved)
    RECON_STATE.clear()
    RECON_FLAGS.update(record=False, last=None)
