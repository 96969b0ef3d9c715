"""parallel.py's threads: a pass run on one of the model walk's layer threads stays on it."""

from __future__ import annotations

import threading

import pytest

from qconvdiag import parallel
from qconvdiag.parallel import over_groups, two_at_a_time


def _threads_of_a_pass() -> set[int]:
    """The threads a four-group pass ran its groups on."""
    return set(over_groups([1, 2, 3, 4], lambda _group: threading.get_ident()))


def test_a_pass_on_a_layer_thread_runs_its_groups_there(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(parallel, "_cores", lambda: 2)  # the threads start on any machine
    # outside the layer threads a pass spreads over two threads (so the check below means
    # something) ...
    assert len(_threads_of_a_pass()) == 2
    # ... on them, each layer's pass runs on that layer's own thread: both cores are busy
    mine = two_at_a_time(lambda _i: (threading.get_ident(), _threads_of_a_pass()), [0, 1, 2, 3])
    assert all(ran == {me} for me, ran in mine)
    # and the same numbers come back, in order
    assert two_at_a_time(lambda i: over_groups(list(range(i, i + 6)), sum), [0, 10]) == [
        [0 + 1 + 2, 3 + 4 + 5], [10 + 11 + 12, 13 + 14 + 15]]
