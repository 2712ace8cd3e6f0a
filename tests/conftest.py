"""Test-session setup shared by every test module."""
import os

import torch

# Without CUDA the Triton kernels run under Triton's CPU interpreter. The switch must be set before anything
# imports Triton (other test modules' imports can pull it in through torch), so it is set here, at collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
