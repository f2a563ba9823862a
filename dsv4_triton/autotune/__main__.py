"""``python -m dsv4_triton.autotune [ops]``: tune on the benchmark shapes, write the cache."""

import sys

from dsv4_triton.autotune import main

if __name__ == "__main__":
    sys.exit(main())
