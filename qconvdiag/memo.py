"""Results shared across the engines of one diagnosis.

With ``--engine all`` the same input and weight codes often go through every engine: the
stage ladder's convs before the accumulation stage and the exact integer accumulator do not
depend on the engine. Inside ``memo_scope()`` such results are remembered by the content of
their inputs (a 128-bit BLAKE2 digest, once per array object), so each is computed once. With
one engine the scope matches the very same array objects instead (no hashing): the float
reference and the production path share their convs that way. Cached arrays are shared:
callers never modify them in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np

_MEMO: contextvars.ContextVar[dict[Hashable, Any] | None] = contextvars.ContextVar(
    "qconvdiag_memo", default=None)


_BY_CONTENT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "qconvdiag_memo_by_content", default=False)


@contextlib.contextmanager
def memo_scope(by_content: bool = True) -> Iterator[None]:
    """Results remembered until the scope ends. ``by_content``: ``memoized`` also finds equal
    arrays that are other objects (hashing costs ~1 ms per MB: worth it across engines only);
    otherwise it matches the very same array objects."""
    token = _MEMO.set({})
    content = _BY_CONTENT.set(by_content)
    try:
        yield
    finally:
        _BY_CONTENT.reset(content)
        _MEMO.reset(token)


def forget_all() -> None:
    """Drop every remembered result of the current scope (their memory is freed)."""
    table = _MEMO.get()
    if table is not None:
        table.clear()


def digest(a: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    arr = np.ascontiguousarray(a)
    return (hashlib.blake2b(arr.data, digest_size=16).hexdigest(),  # type: ignore[arg-type]
            arr.shape, arr.dtype.str)


def by_content() -> bool:
    """True inside a scope that shares results between equal arrays (several engines)."""
    return _MEMO.get() is not None and _BY_CONTENT.get()


def memoized(kind: str, arrays: tuple[np.ndarray, ...], extra: Hashable,
             compute: Callable[[], Any]) -> Any:
    """``compute()``, or the result remembered for the same kind, array contents and extra."""
    table = _MEMO.get()
    if table is None:
        return compute()
    if not _BY_CONTENT.get():
        return identity(kind, arrays, extra, compute)
    key = (kind, tuple(_digest_once(table, a) for a in arrays), extra)
    if key not in table:
        table[key] = compute()
    return table[key]


def _digest_once(table: dict[Hashable, Any], a: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    """``digest(a)``, computed once per array object in the scope (the object is kept with it,
    so its id is not reused; callers never modify remembered inputs in place)."""
    key = ("digest", id(a))
    hit = table.get(key)
    if hit is None or hit[0] is not a:
        hit = (a, digest(a))
        table[key] = hit
    return hit[1]  # type: ignore[no-any-return]


def identity(kind: str, arrays: tuple[np.ndarray, ...], extra: Hashable,
             compute: Callable[[], Any]) -> Any:
    """``compute()``, or the result remembered for these very array objects (no hashing).

    The arrays are kept with the result, so an id is never reused by another array while the
    entry lives."""
    table = _MEMO.get()
    if table is None:
        return compute()
    key = ("identity", kind, tuple(id(a) for a in arrays), extra)
    hit = table.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], arrays, strict=True)):
        return hit[1]
    result = compute()
    table[key] = (arrays, result)
    return result
