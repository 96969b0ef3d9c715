"""JSON renderer: schema_version 2 (``report.schema.json``), ``allow_nan=False``, deterministic
(no timings). One conv's report has ``"kind": "conv"``, a model walk's ``"kind": "model"``."""

from __future__ import annotations

import json
from typing import Any, Protocol


class JsonSubject(Protocol):
    """What ``render_json`` renders: a Report or a ModelReport (``explain``) or a Trace
    (``trace --json``)."""

    def to_dict(self) -> dict[str, Any]: ...


def render_json(subject: JsonSubject) -> str:
    return json.dumps(subject.to_dict(), allow_nan=False, indent=2) + "\n"
