"""The command line. The only module that turns results into exit codes.

Heavy imports (torch, numpy) happen inside the commands so ``qconvdiag --help`` is instant.
Exit codes: 0 ok, 1 a threshold or ``--fail-on`` level was breached, 2 usage or input error.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from typer.core import TyperGroup

from . import __version__
from .cli_options import (
    DiagnosisArgs,
    JsonOpt,
    MaxElementsOpt,
    Outputs,
    WidthOpt,
    _check_diagnosis_args,
    _check_engine,
    _check_max_elements,
    _geometry_arg,
    _ints,
    _reserve_outputs,
    diagnosis_options,
)
from .errors import QconvdiagError


class _OneLineErrors(TyperGroup):
    """click's usage errors (a bad option value, an unknown option, a missing argument) become
    one line on stderr like every other error, instead of click's four-line block."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args,
                                **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args,
                                  **extra)
        except typer.TyperException as exc:  # click's ClickException and its subclasses
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `qconvdiag`: the help
                exc.show()  # type: ignore[attr-defined]
            else:
                ctx = getattr(exc, "ctx", None)
                where = ctx.command_path if ctx is not None else "qconvdiag"
                message = exc.format_message().strip().rstrip(".")  # type: ignore[attr-defined]
                _err(f"qconvdiag: error: {message}; see '{where} --help'")
            sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
        except typer.Abort:
            _err("qconvdiag: aborted")
            sys.exit(EXIT_FAIL)
        # without standalone mode, click returns the exit code of typer.Exit
        sys.exit(result if isinstance(result, int) else EXIT_OK)


app = typer.Typer(
    name="qconvdiag",
    cls=_OneLineErrors,
    help="Explain, number by number, why a float conv and its quantized counterpart disagree.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich help pulls in markdown-it and costs more than the rest of
    # start-up together (measured: 77 ms of --help's 170 ms).
    rich_markup_mode=None,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(func: F) -> F:
    """Our errors become one line on stderr and exit code 2; Ctrl-C becomes exit 130. Python
    warnings (numpy's, a library's) are caught: an error stays one line, and a run that
    succeeds shows each warning as one line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import warnings

        try:
            with warnings.catch_warnings(record=True) as caught:
                result = func(*args, **kwargs)
        except typer.Exit as exc:
            if exc.exit_code in (EXIT_OK, EXIT_FAIL):
                _warn(caught)
            raise
        except QconvdiagError as exc:
            _err(f"qconvdiag: error: {exc}")
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            _err("qconvdiag: interrupted; nothing was written")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Terminated:
            _err("qconvdiag: terminated; nothing was written")
            raise typer.Exit(EXIT_TERMINATED) from None
        except MemoryError:
            _err("qconvdiag: error: out of memory; lower --max-elements or diagnose a smaller "
                 "batch of the input")
            raise typer.Exit(EXIT_USAGE) from None
        except (typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: one line, and QCONVDIAG_DEBUG=1 shows the traceback
            import os

            if os.environ.get("QCONVDIAG_DEBUG"):
                raise
            from .errors import brief

            _err(f"qconvdiag: internal error: {type(exc).__name__}: {brief(str(exc), 200)} "
                 "(please report it with the case; QCONVDIAG_DEBUG=1 shows the traceback)")
            raise typer.Exit(EXIT_USAGE) from None
        _warn(caught)
        return result

    return wrapper  # type: ignore[return-value]


def _warn(caught: list[Any]) -> None:
    for w in caught:
        _err(f"qconvdiag: warning: {w.category.__name__}: {w.message}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qconvdiag {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """qconvdiag: per-stage error breakdown of a quantized convolution."""


PROGRESS_ELEMENTS = 1_000_000


def _diagnose_and_report(case: Any, diag: DiagnosisArgs, outputs: Outputs,
                         case_file: Optional[Path] = None) -> None:
    """``case_file``: where the case can be read again (for the HTML report's trace
    commands); None for a generated case not saved."""
    import math

    from .diagnosis import Options, run_diagnosis
    from .io import check_size, load_calibration

    check_size(case, diag.max_elements)
    from .quantization.paths import ProductionOptions
    from .render.json_report import render_json

    options = Options(
        engine=diag.engine,
        production=ProductionOptions(observer=diag.observer, per_channel=diag.per_channel),
        calib=None if diag.calib is None else load_calibration(diag.calib, case, diag.max_elements),
        fail_under_sqnr=diag.fail_under_sqnr,
        max_abs_error=diag.max_abs_error,
        fail_on=diag.fail_on.value,
        ignore=tuple(c.upper() for c in (diag.ignore or ())),
        keep_arrays=diag.save_outputs is not None,
    )
    progress = None
    if math.prod(case.output_shape) >= PROGRESS_ELEMENTS:
        progress = _progress_printer()
    from .runtime import keep_freed_memory

    keep_freed_memory()  # this process only diagnoses: big arrays reuse memory (runtime.py)
    diagnosis = run_diagnosis(case, options, progress)
    report = diagnosis.report
    text = render_json(report)
    writes = outputs.writes
    if outputs.report is not None:
        writes.write(outputs.report, text.encode("utf-8"))
    if outputs.tensors is not None:
        from .render.npz import render_npz

        writes.write(outputs.tensors, render_npz(diagnosis))
    if outputs.html is not None:
        if progress is not None:
            progress("the HTML report")
        from .render.html import render_html  # the plotting library: only for --html

        writes.write(outputs.html, render_html(diagnosis, case_file=case_file).encode("utf-8"))
    _deliver(writes, text, report, diag, list(report.gate.breaches))


def _deliver(writes: Any, text: str, report: Any, diag: DiagnosisArgs,
             breaches: list[str]) -> None:
    """Put the reserved files in place (all or none), print the report (JSON, or the terminal
    view), and exit 1 when a gate was breached (naming each breach on stderr under --json)."""
    for dest in writes.commit():  # every file in place only when all were written
        _err(f"wrote {dest.path}")
    if diag.json_out:
        sys.stdout.write(text)
    else:
        # rich costs ~0.1 s to import: only the terminal report pays for it
        from .render.terminal import render_terminal

        sys.stdout.write(render_terminal(report, verbose=diag.verbose, width=diag.width))
    if report.status == "fail":
        if diag.json_out:
            for breach in breaches:
                _err(f"qconvdiag: gate: {breach}")
        raise typer.Exit(EXIT_FAIL)


def _progress_printer() -> Callable[[str], None]:
    import time

    start = time.perf_counter()

    def say(message: str) -> None:
        _err(f"qconvdiag: [{time.perf_counter() - start:5.1f}s] {message}")

    return say


@app.command()
@handles_errors
@diagnosis_options
def explain(
    case_file: Annotated[Path, typer.Argument(
        help="Case file (.pt/.pth, .npz, .safetensors), or a model bundle from "
             "qconvdiag.capture_model.")],
    diag: DiagnosisArgs,
    top: Annotated[Optional[int], typer.Option(
        "--top", help="Model bundle: explain the worst K convs by own error in full "
                      "(default 3; 0: the table only).")] = None,
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", help="Model bundle: explain this conv in full (its module path; "
                        "repeatable).")] = None,
    torch_check: Annotated[Optional[str], typer.Option(
        "--torch-check", help="Model bundle: which convs' emulation is checked against the "
                              "model's codes: diagnosed (default) or all.")] = None,
) -> None:
    """Explain a case file: where the quantized conv's error comes from, and the fix. Given a
    model bundle: which conv is to blame, then the worst convs explained."""
    from .model.bundle import ModelBundle, load_case_or_bundle
    from .writes import PendingWrites

    _check_diagnosis_args(diag)
    if top is not None and top < 0:
        raise QconvdiagError(f"--top must be 0 or more, got {top}")
    if torch_check is not None and torch_check not in ("diagnosed", "all"):
        raise QconvdiagError(f"--torch-check {torch_check}: use diagnosed or all")
    with PendingWrites() as writes:
        outputs = _reserve_outputs(diag, writes, (case_file, diag.calib))
        loaded = load_case_or_bundle(case_file, diag.max_elements)
        if isinstance(loaded, ModelBundle):
            _walk_and_report(loaded, diag, outputs, 3 if top is None else top, tuple(layer or ()),
                             torch_check or "diagnosed")
            return
        for option, given in (("--top", top is not None), ("--layer", bool(layer)),
                              ("--torch-check", torch_check is not None)):
            if given:
                raise QconvdiagError(f"{option} applies to a model bundle; {case_file} is one "
                                     "conv's case")
        _diagnose_and_report(loaded, diag, outputs, case_file)


def _walk_and_report(bundle: Any, diag: DiagnosisArgs, outputs: Outputs, top: int,
                     layers: tuple[str, ...], torch_check: str) -> None:
    """The model walk of a bundle (model/walk.py), rendered like a case's report."""
    for option, given in (("--calib", diag.calib), ("--save-outputs", diag.save_outputs)):
        if given is not None:
            raise QconvdiagError(f"{option} applies to one conv's case, not a model bundle: "
                                 "each conv is diagnosed on the input it received")
    if diag.engine is not None and diag.engine != bundle.engine:
        from .arithmetic.engines import PT2E_ENGINES

        if bundle.engine in PT2E_ENGINES:
            raise QconvdiagError(
                f"this bundle is a PT2E model's, run on engine {bundle.engine} (its codes are "
                f"that engine's): --engine {diag.engine} does not apply")
        if diag.engine == "all":  # not an engine a model can be captured on
            raise QconvdiagError(
                f"--engine all compares engines on one conv's case; this bundle's codes are "
                f"engine {bundle.engine}'s (its convs ran there): leave --engine out")
        raise QconvdiagError(
            f"this bundle was captured on engine {bundle.engine} (its codes are that engine's): "
            f"capture it again with torch.backends.quantized.engine = '{diag.engine}'")
    for name in layers:
        bundle.layer(name)  # an unknown name is refused before any work
    from .model.walk import WalkOptions, walk_model
    from .quantization.paths import ProductionOptions
    from .render.json_report import render_json

    options = WalkOptions(
        top=top, layers=layers,
        production=ProductionOptions(observer=diag.observer, per_channel=diag.per_channel),
        fail_under_sqnr=diag.fail_under_sqnr, max_abs_error=diag.max_abs_error,
        fail_on=diag.fail_on.value, ignore=tuple(c.upper() for c in (diag.ignore or ())),
        torch_check=torch_check)
    import math

    work = sum(math.prod(lay.case.output_shape) for lay in bundle.layers)
    progress = _progress_printer() if work >= PROGRESS_ELEMENTS else None
    walk = walk_model(bundle, options, progress)
    report = walk.report
    text = render_json(report)
    if outputs.report is not None:
        outputs.writes.write(outputs.report, text.encode("utf-8"))
    if outputs.html is not None:
        from .render.html_model import render_model_html  # the plotting library: --html only

        outputs.writes.write(outputs.html, render_model_html(
            walk, bundle_file=bundle.source or None).encode("utf-8"))
    _deliver(outputs.writes, text, report, diag,
             [f"{b.layer}: {b.breach}" for b in report.gate.breaches])


@app.command()
@handles_errors
@diagnosis_options
def random(
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same case.")],
    shape: Annotated[
        Optional[str], typer.Option("--shape", help="Input shape N,C,spatial... e.g. 1,8,16,16.")
    ] = None,
    weight_shape: Annotated[
        Optional[str], typer.Option("--weight-shape", help="Weight shape O,C/groups,kernel...")
    ] = None,
    stride: Annotated[Optional[str], typer.Option(help="Stride, e.g. 1 or 2,1.")] = None,
    padding: Annotated[Optional[str], typer.Option(help="Padding, e.g. 1 or 1,0.")] = None,
    dilation: Annotated[Optional[str], typer.Option(help="Dilation, e.g. 1 or 2,2.")] = None,
    groups: Annotated[
        Optional[int], typer.Option(help="Groups (= channels for depthwise).")
    ] = None,
    distribution: Annotated[
        str, typer.Option(help="Input values: normal, uniform, relu, int (randint(0,20)), heavy.")
    ] = "normal",
    per_channel_varied: Annotated[
        bool, typer.Option("--per-channel-varied", help="Weight ranges differ per out channel.")
    ] = False,
    recipe: Annotated[
        Optional[str],
        typer.Option(help="forum: the seed thread exactly; handmade: its formulas on this case."),
    ] = None,
    save: Annotated[
        Optional[Path], typer.Option("--save", help="Write the case to this file (.pt/.npz/...).")
    ] = None,
    diag: DiagnosisArgs = DiagnosisArgs(),
) -> None:
    """Generate a reproducible case and explain it."""
    from .casefile.generate import RandomSpec, check_spec, generate
    from .io import case_to_mapping, check_size, encode_case
    from .writes import PendingWrites

    _check_diagnosis_args(diag)

    spec = RandomSpec(
        seed=seed,
        input_shape=_ints(shape, "--shape"),
        weight_shape=_ints(weight_shape, "--weight-shape"),
        stride=_geometry_arg(stride, "--stride"),
        padding=_geometry_arg(padding, "--padding"),
        dilation=_geometry_arg(dilation, "--dilation"),
        groups=groups,
        distribution=distribution,
        per_channel_varied=per_channel_varied,
        recipe=recipe,
    )
    check_spec(spec)
    with PendingWrites() as writes:
        outputs = _reserve_outputs(diag, writes, (diag.calib,), save)
        case = generate(spec, diag.max_elements)  # shapes checked before tensors are made
        check_size(case, diag.max_elements)
        if outputs.case is not None:
            suffix = outputs.case.path.suffix.lower()
            writes.write(outputs.case, encode_case(case_to_mapping(case), suffix))
        _diagnose_and_report(case, diag, outputs, save)


TRACE_PATHS = ("as_given", "production")


def _position(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``--at N,C,H,W``: non-negative integers."""
    if text is None:
        return None
    tokens = [t.strip() for t in text.split(",")]
    if not all(t.isascii() and t.isdigit() for t in tokens):
        raise QconvdiagError(f"--at must be comma-separated non-negative integers N,C,H,W, "
                             f"got '{text}'")
    return tuple(int(t) for t in tokens)


def _check_position(position: tuple[int, ...], case: Any) -> None:
    """``--at`` against the case's output, before the diagnosis runs."""
    shape = tuple(case.output_shape)
    axes = "N,C," + ",".join("DHW"[3 - case.spatial_dims:])
    if len(position) != len(shape):
        raise QconvdiagError(f"--at needs {len(shape)} indices {axes} for this {case.op}'s "
                             f"output of shape {shape}, got {len(position)}")
    if any(p >= s for p, s in zip(position, shape)):
        raise QconvdiagError(f"--at {','.join(map(str, position))} is outside the output "
                             f"{shape}: each index must be below its size")


TraceEngineOpt = Annotated[
    Optional[str],
    typer.Option("--engine", help="x86, fbgemm, onednn or qnnpack (default: the engine the "
                 "case was captured on, else torch's)."),
]


@app.command("trace")
@handles_errors
def trace_cmd(
    case_file: Annotated[Path, typer.Argument(help="Case file: .pt/.pth, .npz or .safetensors.")],
    at: Annotated[
        Optional[str],
        typer.Option("--at", help="Output element N,C,H,W (default: the largest error)."),
    ] = None,
    path: Annotated[str, typer.Option("--path", help="as_given or production.")] = "as_given",
    engine: TraceEngineOpt = None,
    full: Annotated[bool, typer.Option("--full", help="Show every term and pair.")] = False,
    json_out: JsonOpt = False,
    max_elements: MaxElementsOpt = 50_000_000,
    width: WidthOpt = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", help="Model bundle: the conv to trace (its module path).")] = None,
) -> None:
    """Show the integer arithmetic of one output element, checked against torch."""
    position = _position(at)
    if path not in TRACE_PATHS:
        raise QconvdiagError(f"--path {path}: use {' or '.join(TRACE_PATHS)}")
    _check_engine(engine, allow_all=False)
    _check_max_elements(max_elements)
    from .model.bundle import ModelBundle, load_case_or_bundle
    from .render.json_report import render_json
    from .render.trace_view import render_trace
    from .trace import trace

    loaded = load_case_or_bundle(case_file, max_elements)
    if isinstance(loaded, ModelBundle):
        if layer is None:
            raise QconvdiagError(f"{case_file} is a model bundle: give --layer NAME, one of "
                                 + ", ".join(lay.name for lay in loaded.layers))
        if loaded.layer(layer).output_float32:
            raise QconvdiagError(f"--layer {layer}: its output is float32 (a conv before a "
                                 "residual add): trace follows an output's codes")
        case = loaded.layer(layer).case
        if engine is None:  # the codes are the kernels' that ran it (QCD067)
            from .model.engine import layer_engine

            engine = layer_engine(loaded, layer)
    elif layer is not None:
        raise QconvdiagError(f"--layer applies to a model bundle; {case_file} is one conv's case")
    else:
        case = loaded
    if position is not None:
        _check_position(position, case)
    if path == "as_given" and case.setup is None:
        path = "production"
    tr = trace(case, position, path=path, engine=engine)
    if json_out:
        sys.stdout.write(render_json(tr))
    else:
        sys.stdout.write(render_trace(tr, full=full, width=width))


def _err(message: str) -> None:
    """One line on stderr: terminal escapes dropped, line breaks and other control characters
    (from a file name, or a library's message) turned into spaces."""
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", message)
    text = " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())
    sys.stderr.write(text + "\n")


class Terminated(BaseException):
    """SIGTERM (``kill PID``) arrived: raised like Ctrl-C's KeyboardInterrupt so the run
    unwinds and removes its temporary files (``writes.PendingWrites``)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> None:
    """Console entry point. SIGTERM ends the run as cleanly as Ctrl-C (exit 143); without
    this handler Python dies on the spot, leaving its temporary files."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app()
