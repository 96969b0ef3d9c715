"""The CI gates (--fail-under-sqnr, --max-abs-error, --fail-on): they judge the judged path
(as_given when the case has a user setup, else production); a finding of the other path is
advice and never trips them. Only the CLI turns the result into an exit code."""

from __future__ import annotations

from .report import Finding, GateResult, PathReport

FAIL_ON = ("error", "warning", "never")
LEVELS = {"error": ("error",), "warning": ("error", "warning"), "never": ()}


def evaluate_gate(paths: list[PathReport], findings: list[Finding], fail_under_sqnr: float | None,
                  max_abs_error: float | None, fail_on: str) -> tuple[str, GateResult]:
    """``ok`` or ``fail``, and what was checked and breached."""
    judged = [p for p in paths if p.name == "as_given"] or [p for p in paths
                                                           if p.name == "production"]
    breaches: list[str] = []
    for p in judged:
        if fail_under_sqnr is not None:
            sqnr = p.total.sqnr_db
            if p.refused or (sqnr is not None and sqnr < fail_under_sqnr):
                breaches.append(
                    f"{p.name}@{p.engine}: SQNR {'n/a' if sqnr is None else f'{sqnr:.2f}'} dB "
                    f"< {fail_under_sqnr} dB")
        if max_abs_error is not None and (p.refused or p.total.max_abs > max_abs_error):
            breaches.append(f"{p.name}@{p.engine}: max abs error {p.total.max_abs:.6g} > "
                            f"{max_abs_error}")
    judged_names = {p.name for p in judged}
    for f in findings:
        if f.severity in LEVELS[fail_on] and f.path in judged_names:
            breaches.append(f"{f.code} ({f.severity}): {f.title}")
    gate = GateResult(fail_under_sqnr, max_abs_error, fail_on,
                      judged[0].name if judged else None, tuple(breaches))
    return ("fail" if breaches else "ok"), gate
