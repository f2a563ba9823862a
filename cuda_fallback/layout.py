"""Layout checks shared by the backends' ``covers`` rules (no dependency on the rest of the
package, so any backend module can import it first)."""

from __future__ import annotations

import torch


def rows_aligned(t: torch.Tensor, nbytes: int) -> bool:
    """Rows contiguous, the data pointer and every row stride (in bytes) a multiple of ``nbytes``."""
    size = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % nbytes == 0 and all((s * size) % nbytes == 0 for s in t.stride()[:-1])
