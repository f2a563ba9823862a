"""Triton kernels, one module per kernel family (the ``triton`` backend)."""
