"""Hand-written CUDA kernels (inline PTX, wgmma/TMA on Hopper, tcgen05/TMEM on Blackwell)
for the ops where they beat Triton, built on first use with ``torch.utils.cpp_extension``.

Sources live in ``csrc/``; each declares the architectures it targets in a
``// targets: sm90a sm100a`` line. ``python -m cuda_fallback.check`` compiles every
source for each target it declares with nvcc (no GPU needed) and fails on any error.
``attention.py``, ``gemm.py``, ``indexer.py`` and ``moe.py`` register the kernels as the ``cuda`` backend of their ops, each
with the arguments it covers (the rest runs on Triton).
"""
