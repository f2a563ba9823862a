"""Public ops of the mhc family (not yet implemented)."""

__all__ = []
