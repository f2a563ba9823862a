"""Public ops of the compressor family (not yet implemented)."""

__all__ = []
