"""Renderers: a finished diagnosis (or a trace) turned into text or bytes; the core never prints.

One interface: a renderer is a function ``render_<format>(subject, *, options) -> str | bytes``
that returns the payload, and neither prints nor writes files: the CLI writes it to stdout or
to the file given (all or nothing). Its options are keyword-only with defaults, so every
renderer is a ``Renderer`` of its subject.

================  =========================  ==========  =======
renderer          module                     subject     payload
================  =========================  ==========  =======
render_terminal   terminal.py (rich_report,  Report or   str
                  rich_model)                ModelReport
render_json       json_report.py             Report,     str
                                             ModelReport
                                             or Trace
render_npz        npz.py (--save-outputs)    Diagnosis   bytes
render_html       html.py (--html; needs     Diagnosis   str
                  the html extra)
render_model_html html_model.py (--html)     ModelDiag-  str
                                             nosis
render_trace      trace_view.py              Trace       str
================  =========================  ==========  =======
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

Subject = TypeVar("Subject", contravariant=True)


class Renderer(Protocol[Subject]):
    """``render(subject) -> payload``: what every renderer is (options have defaults)."""

    def __call__(self, subject: Subject, /) -> str | bytes: ...


if TYPE_CHECKING:  # mypy checks that each renderer is a Renderer of its subject
    from ..diagnosis import Diagnosis
    from ..model.walk import ModelDiagnosis
    from ..model_report import ModelReport
    from ..report import Report
    from ..trace import Trace
    from .html import render_html
    from .html_model import render_model_html
    from .json_report import render_json
    from .npz import render_npz
    from .terminal import render_terminal
    from .trace_view import render_trace

    _REPORT: tuple[Renderer[Report], ...] = (render_terminal, render_json)
    _MODEL: tuple[Renderer[ModelReport], ...] = (render_terminal, render_json)
    _TRACE: tuple[Renderer[Trace], ...] = (render_trace, render_json)
    _DIAGNOSIS: tuple[Renderer[Diagnosis], ...] = (render_npz, render_html)
    _WALK: tuple[Renderer[ModelDiagnosis], ...] = (render_model_html,)
