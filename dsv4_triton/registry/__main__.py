"""``python -m dsv4_triton.registry``: the table of ops x backends x availability."""

import sys

import dsv4_triton.ops  # noqa: F401  (registers every op)
from dsv4_triton.registry import format_table

if __name__ == "__main__":
    print(format_table())
    sys.exit(0)
