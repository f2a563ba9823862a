"""Public ops of the rope family (not yet implemented)."""

__all__ = []
