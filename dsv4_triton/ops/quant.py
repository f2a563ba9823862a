"""Public ops of the quant family (not yet implemented)."""

__all__ = []
