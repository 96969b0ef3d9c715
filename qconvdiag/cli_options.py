"""The command line's options: their annotations, the diagnosis options every diagnosing
command shares (``DiagnosisArgs``), and the checks that run on them before any work (without
importing torch)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from .errors import QconvdiagError

F = TypeVar("F", bound=Callable[..., Any])


def _ints(text: Optional[str], name: str) -> Optional[tuple[int, ...]]:
    """``1,8,16,16`` (or ``1x8x16x16``): every entry an integer, none left out."""
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        raise QconvdiagError(f"{name} must be comma-separated integers, e.g. 1,8,16,16, got "
                             f"'{text}'") from None


def _geometry_arg(text: Optional[str], name: str) -> Optional[int | tuple[int, ...]]:
    values = _ints(text, name)
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


class FailOn(str, Enum):
    error = "error"
    warning = "warning"
    never = "never"


EngineOpt = Annotated[
    Optional[str],
    typer.Option("--engine", help="x86, fbgemm, onednn, qnnpack, x86_inductor (PT2E), or "
                 "all (default: the engine a case was captured on, else torch's; "
                 "x86_inductor for a PT2E case)."),
]
ObserverOpt = Annotated[
    Optional[str],
    typer.Option("--observer", help="Production activation observer: histogram, minmax, "
                 "moving_average (default: the engine's qconfig)."),
]
PerChannelOpt = Annotated[
    Optional[bool],
    typer.Option("--per-channel/--per-tensor", help="Production weight granularity.",
                 show_default=False),
]
CalibOpt = Annotated[
    Optional[Path], typer.Option("--calib", help="Calibration inputs (B, C, ...) for observers.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON report to stdout.")]
OutputOpt = Annotated[
    Optional[Path], typer.Option("--output", help="Write the JSON report to this .json file.")
]
SaveOutputsOpt = Annotated[
    Optional[Path], typer.Option("--save-outputs", help="Write the output tensors to this "
                                 ".npz file.")
]
HtmlOpt = Annotated[
    Optional[Path], typer.Option("--html", help="Write a self-contained HTML report (figures) "
                                 "to this .html file; needs the html extra.")
]
SqnrOpt = Annotated[
    Optional[float], typer.Option("--fail-under-sqnr", help="Exit 1 if SQNR (dB) is below this.")
]
MaxAbsOpt = Annotated[
    Optional[float], typer.Option("--max-abs-error", help="Exit 1 if max |error| exceeds this.")
]
FailOnOpt = Annotated[
    FailOn, typer.Option("--fail-on", help="Exit 1 on findings of this severity or worse.")
]
IgnoreOpt = Annotated[
    Optional[list[str]], typer.Option("--ignore", help="Finding code to skip (repeatable).")
]
MaxElementsOpt = Annotated[
    int,
    typer.Option("--max-elements", help="Refuse tensors (input, weight, output) larger than this."),
]
#: Diagnoses of convs with at least this many output elements report progress on stderr.

VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Every finding in full, both paths' stages.")
]
WidthOpt = Annotated[
    Optional[int], typer.Option("--width", help="Terminal width for the report.", hidden=True)
]


@dataclasses.dataclass(frozen=True)
class DiagnosisArgs:
    """The diagnosis options every diagnosing command takes (see ``diagnosis_options``)."""

    engine: Optional[str] = None
    observer: Optional[str] = None
    per_channel: Optional[bool] = None
    calib: Optional[Path] = None
    json_out: bool = False
    output: Optional[Path] = None
    save_outputs: Optional[Path] = None
    html: Optional[Path] = None
    fail_under_sqnr: Optional[float] = None
    max_abs_error: Optional[float] = None
    fail_on: FailOn = FailOn.never
    ignore: Optional[list[str]] = None
    max_elements: int = 50_000_000
    verbose: bool = False
    width: Optional[int] = None


#: (parameter, CLI annotation) of every DiagnosisArgs field, in --help order.
_DIAGNOSIS_PARAMS: tuple[tuple[str, Any], ...] = (
    ("engine", EngineOpt), ("observer", ObserverOpt), ("per_channel", PerChannelOpt),
    ("calib", CalibOpt), ("json_out", JsonOpt), ("output", OutputOpt),
    ("save_outputs", SaveOutputsOpt), ("html", HtmlOpt), ("fail_under_sqnr", SqnrOpt),
    ("max_abs_error", MaxAbsOpt), ("fail_on", FailOnOpt), ("ignore", IgnoreOpt),
    ("max_elements", MaxElementsOpt), ("verbose", VerboseOpt), ("width", WidthOpt),
)


def diagnosis_options(func: F) -> F:
    """Give a command every diagnosis option: typer reads them from the signature this adds,
    and the command receives them as one ``diag: DiagnosisArgs`` (one definition, not one
    copy per command)."""
    defaults = DiagnosisArgs()
    sig = inspect.signature(func, eval_str=True)  # real annotations: typer reads them
    own = [p for p in sig.parameters.values() if p.name != "diag"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                default=getattr(defaults, name))
              for name, ann in _DIAGNOSIS_PARAMS]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        diag = DiagnosisArgs(**{name: kwargs.pop(name) for name, _ in _DIAGNOSIS_PARAMS
                                if name in kwargs})
        return func(*args, diag=diag, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + shared)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**{k: v for k, v in func.__annotations__.items() if k != "diag"},
                               **dict(_DIAGNOSIS_PARAMS)}
    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The files a run writes, reserved before any work (see ``writes.PendingWrites``)."""

    writes: Any
    report: Any = None
    """``--output``: the JSON report."""
    tensors: Any = None
    """``--save-outputs``: the npz of output tensors."""
    case: Any = None
    """``--save`` (random): the generated case."""
    html: Any = None
    """``--html``: the HTML report."""


def _check_engine(engine: Optional[str], allow_all: bool) -> None:
    from .arithmetic.engines import ENGINES, PT2E_ENGINES

    if engine is None or engine in ENGINES or engine in PT2E_ENGINES:
        return
    if engine == "all":
        if allow_all:
            return
        raise QconvdiagError("trace runs one engine: give --engine NAME")
    raise QconvdiagError(f"unknown engine '{engine}': use one of "
                         f"{', '.join((*ENGINES, *PT2E_ENGINES))}"
                         + (" or all" if allow_all else ""))


def _check_input_file(path: Path, option: str) -> None:
    from .io import FORMATS

    if not path.is_file():
        raise QconvdiagError(f"{option} {path}: no such file; give the path of a .pt, .npz or "
                             ".safetensors file")
    if path.suffix.lower() not in FORMATS:
        raise QconvdiagError(f"{option} {path}: unknown extension '{path.suffix}'; use "
                             f"{', '.join(FORMATS)}")


def _check_max_elements(limit: int) -> None:
    if limit < 1:
        raise QconvdiagError(f"--max-elements must be at least 1, got {limit}")


def _check_diagnosis_args(diag: DiagnosisArgs) -> None:
    """Every diagnosis option that can be checked without torch, before any work."""
    from .findings import CODES
    from .quantization.paths import OBSERVERS

    _check_engine(diag.engine, allow_all=True)
    _check_max_elements(diag.max_elements)
    import math

    if diag.fail_under_sqnr is not None and not math.isfinite(diag.fail_under_sqnr):
        raise QconvdiagError(f"--fail-under-sqnr must be a finite number of dB, got "
                             f"{diag.fail_under_sqnr}")
    if diag.max_abs_error is not None and not (math.isfinite(diag.max_abs_error)
                                               and diag.max_abs_error >= 0):
        raise QconvdiagError(f"--max-abs-error must be a finite number >= 0, got "
                             f"{diag.max_abs_error}")
    if diag.observer is not None and diag.observer not in OBSERVERS:
        raise QconvdiagError(
            f"unknown observer '{diag.observer}': use one of {', '.join(OBSERVERS)}"
        )
    unknown = [c for c in (diag.ignore or ()) if c.upper() not in CODES]
    if unknown:
        raise QconvdiagError(f"--ignore: unknown finding code(s) {', '.join(unknown)}; codes "
                             f"are {CODES[0]}..{CODES[-1]} (docs/findings.md)")
    if diag.calib is not None:
        _check_input_file(diag.calib, "--calib")
    if diag.html is not None:
        _check_html_extra()


#: How to get what --html needs (altair and vl-convert-python).
HTML_EXTRA = "pip install -e '.[html]' in qconvdiag's checkout (make demo installs it)"


def _check_html_extra() -> None:
    """--html's libraries are an optional extra: found (not imported) before any work."""
    import importlib.util

    missing = [m for m in ("altair", "vl_convert") if importlib.util.find_spec(m) is None]
    if missing:
        raise QconvdiagError(f"--html needs the html extra ({', '.join(missing)} not "
                             f"installed): {HTML_EXTRA}")


def _reserve_outputs(diag: DiagnosisArgs, writes: Any, inputs: tuple[Optional[Path], ...],
                     save: Optional[Path] = None) -> Outputs:
    """Check every destination and create its temporary file, before any work."""
    for target in (save, diag.output, diag.save_outputs, diag.html):
        if target is not None and any(i is not None and _same_file(target, i) for i in inputs):
            raise QconvdiagError(f"{target} is an input of this run; write it elsewhere")
    from .io import FORMATS

    return Outputs(
        writes,
        case=None if save is None else writes.reserve(save, "--save", FORMATS, "a case file"),
        report=(None if diag.output is None
                else writes.reserve(diag.output, "--output", (".json",), "the JSON report")),
        tensors=(None if diag.save_outputs is None
                 else writes.reserve(diag.save_outputs, "--save-outputs", (".npz",),
                                     "the output tensors (an npz archive)")),
        html=(None if diag.html is None
              else writes.reserve(diag.html, "--html", (".html",), "the HTML report")),
    )


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names (the same path, a symlink or a hard link)."""
    import os

    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False
