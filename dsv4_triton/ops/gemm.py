"""Public ops of the gemm family (not yet implemented)."""

__all__ = []
