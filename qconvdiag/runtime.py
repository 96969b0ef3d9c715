"""Process settings that decide how fast the diagnosis's big arrays are: measured, not folklore.

Two of them cost more than whole stages of the diagnosis on a (8,64,112,112) layer:

- **numpy's OpenBLAS threads.** A dot product of more than ~10,000 elements runs on every core,
  and the OpenBLAS workers then spin for a while, taking the cores from torch's next conv
  (measured: a 17 ms conv took 40-60 ms). ``single_threaded_blas`` limits numpy's BLAS to one
  thread for the length of a diagnosis and restores it afterwards.
- **glibc giving big blocks back.** glibc maps every block above 32 MB straight from the kernel
  and unmaps it on free, so each new output-sized array (51 MB for that layer, float64) page
  faults all of its memory in again: measured 7.5 ms to fill a fresh 51 MB array vs 3.3 ms to
  refill a reused one, and 100 ms when the kernel has to compact memory for huge pages.
  ``keep_freed_memory`` makes glibc serve big blocks from its heap and keep what is freed for
  the next one. It is process-wide and cannot be undone exactly (glibc has no getter for its
  thresholds), so only the command-line tool turns it on for its own process; a library user
  can call it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from typing import Any

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, and freed heap memory is kept up to this much.
KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Serve big allocations from glibc's heap and keep freed memory for reuse (glibc only).

    Returns whether the setting took (False on other C libraries, where nothing changes)."""
    try:  # the process's own symbols first: find_library runs ldconfig (~12 ms)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


_CONTROLLER: list[Any] = []
#: OpenBLAS runs a dot product on one thread up to this many elements anyway.
BLAS_SERIAL_ELEMENTS = 10_000


@contextlib.contextmanager
def single_threaded_blas(elements: int | None = None) -> Iterator[None]:
    """numpy's BLAS on one thread inside the block (torch's own threads are untouched). The
    loaded libraries are looked up once per process (~10 ms; skipped when the arrays have at
    most BLAS_SERIAL_ELEMENTS ``elements``); entering costs microseconds."""
    if elements is not None and elements <= BLAS_SERIAL_ELEMENTS:
        yield
        return
    if not _CONTROLLER:
        _CONTROLLER.append(_numpy_blas())
    with _CONTROLLER[0].limit(limits=1, user_api="blas"):
        yield


def _numpy_blas() -> Any:
    """A controller of numpy's own BLAS (the one qconvdiag's arrays use): the same library
    whatever else (scipy's copy, say) the process loads before or after."""
    import os

    import numpy as np
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    here = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy, numpy.libs
    own = [c.filepath for c in controller.lib_controllers if c.user_api == "blas"
           and os.path.basename(os.path.dirname(c.filepath)) in ("numpy.libs", "numpy")
           and c.filepath.startswith(here)]
    return controller.select(filepath=own) if own else controller
