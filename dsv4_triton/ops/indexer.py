"""Public ops of the indexer family (not yet implemented)."""

__all__ = []
