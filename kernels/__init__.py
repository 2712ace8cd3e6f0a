"""Triton kernels of vlonghorn (installed as vlonghorn.kernels)."""
