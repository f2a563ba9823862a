"""Public ops of the router family (not yet implemented)."""

__all__ = []
