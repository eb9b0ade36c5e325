"""One BLAS thread for the estimators (their matrices are small and multiplied thousands of times)."""
from __future__ import annotations

import contextlib


def small_blas():
    """A context in which BLAS uses one thread: for the small matrices of the bootstrap and
    the reward-model refits OpenBLAS's extra threads only spin, and on a busy machine they
    made the OBD benchmark a hundred times slower. threadpoolctl comes with the offline extra;
    without it nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")
