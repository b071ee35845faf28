"""Process pools of forked workers that are safe to start from a busy process (pytest, a notebook).

A forked child inherits the parent's unreachable-but-uncollected objects. If the child's garbage
collector then finalises one that owns native threads (an onnxruntime session, a torch thread
pool), its destructor waits on threads that do not exist in the child, and the worker hangs for
ever. So: collect in the parent, freeze what is left before forking (the children then never
scan or finalise inherited objects), and unfreeze in the parent once the workers exist.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.pool import Pool
from typing import Any


def start_method() -> str:
    # fork: workers inherit the imported modules (no re-import of the caller's main module).
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@contextmanager
def worker_pool(
    processes: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Pool]:
    """`multiprocessing.Pool(processes)` with forked workers where the OS has fork."""
    ctx = mp.get_context(start_method())
    gc.collect()
    gc.freeze()
    try:
        pool = ctx.Pool(processes, initializer=initializer, initargs=initargs)
    finally:
        gc.unfreeze()
    with pool:
        yield pool
