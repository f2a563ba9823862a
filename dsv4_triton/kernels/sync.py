"""Waiting inside one launch: a program that needs other programs' results polls a counter
they increment.  The waiter waits only on programs with lower linear ids, which are
dispatched first, so the wait always ends (the mHC decode form and the router's split path)."""

import triton
import triton.language as tl


@triton.jit
def splits_after_wait(count_ptr, target, n_splits):
    """Waits until ``*count_ptr`` reaches ``target``, then returns ``n_splits`` computed from an
    acquire read of the count, so that the loads it bounds cannot move above that read.  One
    lane of each warp polls (a 32-element tensor sits whole in every warp)."""
    lane = tl.arange(0, 32)
    seen = tl.max(tl.load(count_ptr + lane * 0, mask=lane == 0, other=0, volatile=True), axis=0)
    while seen < target:
        seen = tl.max(tl.load(count_ptr + lane * 0, mask=lane == 0, other=0, volatile=True), axis=0)
    return tl.minimum(n_splits, tl.atomic_add(count_ptr, 0, sem="acquire") - target + n_splits)
