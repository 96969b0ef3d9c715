"""The process settings of runtime.py do what their docstrings measure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from threadpoolctl import threadpool_info

from qconvdiag.runtime import single_threaded_blas

FAULTS = """
import resource, sys
import numpy as np
from qconvdiag.runtime import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
a = np.ones(8 << 20); del a  # 64 MB, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(8 << 20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _blas_threads() -> list[int]:
    """numpy's BLAS (a process may load others, e.g. scipy's copy; qconvdiag limits numpy's)."""
    return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"
            and "numpy" in d["filepath"].replace("\\", "/").split("/")[-2]]


def test_blas_runs_on_one_thread_inside_and_is_restored():
    before = _blas_threads()
    with single_threaded_blas():
        assert _blas_threads() and all(n == 1 for n in _blas_threads())
        assert float(np.dot(np.ones(100_000), np.ones(100_000))) == 100_000.0
    assert _blas_threads() == before
    with single_threaded_blas(elements=100):  # OpenBLAS keeps that small a dot serial anyway
        assert _blas_threads() == before


def test_keep_freed_memory_reuses_a_freed_big_block():
    """A second 64 MB array page-faults its memory in again by default; not once kept."""
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        runs[mode] = (out[0], int(out[1]))
    assert runs["keep"][0] == "True"
    assert runs["keep"][1] < runs["default"][1], runs


def test_the_worker_pool_survives_a_fork():
    """A process forked after a diagnosis used the worker thread gets its own pool (the
    parent's thread does not exist in the child: submitting to it would wait forever)."""
    import os
    import signal

    from qconvdiag.measure.metrics import CHUNK, accumulate

    r = np.ones(4 * CHUNK)
    assert accumulate(lambda sl: r[sl], r).n == r.size  # the pool exists now
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the threaded pass completes
        ok = False
        try:
            signal.alarm(30)  # a pass waiting on the parent's thread would hang: killed
            ok = accumulate(lambda sl: r[sl], r).n == r.size
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_torch_warnings_belong_to_the_diagnosis_that_raised_them(monkeypatch):
    """Each report holds its own diagnosis's warnings, not an earlier one's (the capture scope
    is per diagnosis; nested scopes hand theirs outwards)."""
    import warnings

    import qconvdiag.diagnosis as d
    from qconvdiag import Options, diagnose
    from qconvdiag.casefile.generate import forum_case
    from qconvdiag.torch_calls import capture_warnings

    with capture_warnings() as outer:
        with capture_warnings() as inner:
            warnings.warn("raised inside", UserWarning, stacklevel=1)
        warnings.warn("raised outside", UserWarning, stacklevel=1)
    assert inner == ["raised inside"] and outer == ["raised inside", "raised outside"]

    real = d.run_conv

    def noisy(*args, **kwargs):  # type: ignore[no-untyped-def]
        warnings.warn("only in the first diagnosis", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(d, "run_conv", noisy)
    first = diagnose(forum_case(), Options(engine="x86"))
    monkeypatch.setattr(d, "run_conv", real)
    second = diagnose(forum_case(), Options(engine="x86"))
    assert "only in the first diagnosis" in first.torch_warnings
    assert "only in the first diagnosis" not in second.torch_warnings
