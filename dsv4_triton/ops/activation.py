"""Public ops of the activation family (not yet implemented)."""

__all__ = []
