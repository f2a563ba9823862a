"""Public ops of the moe family (not yet implemented)."""

__all__ = []
