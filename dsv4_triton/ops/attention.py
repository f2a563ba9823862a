"""Public ops of the attention family (not yet implemented)."""

__all__ = []
