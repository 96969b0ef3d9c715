"""Case files: every format round-trips bit-exactly; bad and hostile files are refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import qconvdiag
from qconvdiag.casefile.write import safetensors_bytes
from qconvdiag.errors import CaseError, CaseFileError, QconvdiagError
from qconvdiag.io import FORMATS, case_to_mapping, load_case, save_case
from tests.repo import ROOT

SAMPLES = sorted(p for p in (ROOT / "samples").iterdir() if p.suffix in FORMATS)


def _same_case(a, b):
    ma, mb = case_to_mapping(a), case_to_mapping(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        if isinstance(ma[k], np.ndarray):
            assert ma[k].dtype == mb[k].dtype and ma[k].tobytes() == mb[k].tobytes(), k
        else:
            assert ma[k] == mb[k], k


def test_samples_exist_in_every_format():
    assert {p.suffix for p in SAMPLES} >= {".pt", ".npz", ".safetensors"}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("fmt", [".pt", ".pth", ".npz", ".safetensors"])
def test_round_trip_bit_exact(sample, fmt, tmp_path):
    case = load_case(sample)
    out = save_case(case, tmp_path / f"copy{fmt}")
    _same_case(case, load_case(out))


def test_save_is_deterministic(tmp_path):
    case = load_case(ROOT / "samples" / "relu_per_channel.npz")
    for fmt in (".pt", ".npz", ".safetensors"):
        a = save_case(case, tmp_path / f"a{fmt}").read_bytes()
        b = save_case(case, tmp_path / f"b{fmt}").read_bytes()
        assert a == b, fmt


def test_quantized_tensors_in_pt_become_the_user_setup(tmp_path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.rand(1, 2, 5, 5)
        qx = torch.quantize_per_tensor(x, 0.01, 3, torch.quint8)
        w = torch.randn(4, 2, 3, 3)
        qw = torch.quantize_per_channel(w, torch.rand(4) / 50 + 0.001,
                                        torch.zeros(4, dtype=torch.long), 0, torch.qint8)
    torch.save({"qinput": qx, "qweight": qw, "bias": torch.zeros(4)}, tmp_path / "q.pt")
    case = load_case(tmp_path / "q.pt")
    s = case.setup
    assert s.used_quantized_dtypes
    assert s.input_qparams.scale == (0.01,) and s.input_qparams.zero_point == (3,)
    assert s.weight_qparams.per_channel and s.weight_qparams.axis == 0
    assert np.array_equal(s.input_codes, qx.int_repr().numpy())
    assert np.allclose(case.input, qx.dequantize().numpy())  # the float input came from qinput
    assert any("dequantized qinput" in n for n in case.notes)


def test_module_state_dict_under_qconv(tmp_path):
    import warnings

    import torch
    import torch.ao.nn.quantized as nnq

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = nnq.Conv2d(2, 3, 3)
        qm.scale, qm.zero_point = 0.5, 7
        sd = qm.state_dict()
    torch.save({"input": torch.rand(1, 2, 6, 6), "weight": torch.randn(3, 2, 3, 3),
                "qconv": sd}, tmp_path / "m.pt")
    m = load_case(tmp_path / "m.pt").setup.module
    assert m.output_qparams.scale == (0.5,) and m.output_qparams.zero_point == (7,)
    assert m.weight_codes.shape == (3, 2, 3, 3)


def test_capture_writes_a_case(tmp_path):
    import warnings

    import torch
    import torch.ao.nn.quantized as nnq

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = nnq.Conv2d(3, 4, 3, padding=1)
        qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=tmp_path / "c.pt")
    again = load_case(tmp_path / "c.pt")
    _same_case(case, again)
    assert case.geometry.padding == (1, 1) and case.setup.module is not None
    assert "torch.ao.nn.quantized" in case.setup.apis


def test_integer_tensors_are_converted_and_noted(tmp_path):
    np.savez(tmp_path / "i.npz", input=np.ones((1, 1, 4, 4), np.int64),
             weight=np.ones((1, 1, 3, 3), np.int32))
    case = load_case(tmp_path / "i.npz")
    assert case.input.dtype == np.float32
    assert any("holds integers" in n for n in case.notes)


def _pt(tmp_path, obj, name="c.pt"):
    import torch

    torch.save(obj, tmp_path / name)
    return tmp_path / name


def _bad_cases(tmp_path):
    """(path, expected message fragment) for every kind of bad input the brief names."""
    import torch

    ok_x = torch.rand(1, 2, 5, 5)
    ok_w = torch.rand(3, 2, 3, 3)
    cases = {}
    cases["missing"] = (tmp_path / "nope.pt", "no such file")
    d = tmp_path / "dir.pt"
    d.mkdir()
    cases["directory"] = (d, "is a directory")
    (tmp_path / "c.txt").write_text("x")
    cases["extension"] = (tmp_path / "c.txt", "unknown extension")
    good = _pt(tmp_path, {"input": ok_x, "weight": ok_w}, "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:200])
    cases["truncated pt"] = (tmp_path / "trunc.pt", "truncated or corrupt")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04garbage")
    cases["corrupt npz"] = (tmp_path / "junk.npz", "not a readable .npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    cases["corrupt safetensors"] = (tmp_path / "junk.safetensors", "not valid JSON")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty file"] = (tmp_path / "empty.pt", "is empty")
    cases["missing keys"] = (_pt(tmp_path, {"input": ok_x}, "k.pt"), "missing 'weight'")
    cases["unknown key"] = (_pt(tmp_path, {"input": ok_x, "weight": ok_w, "wieght": ok_w},
                                "u.pt"), "unknown key")
    cases["channel mismatch"] = (_pt(tmp_path, {"input": torch.rand(1, 3, 5, 5), "weight": ok_w},
                                     "ch.pt"), "channel mismatch")
    cases["kernel too large"] = (_pt(tmp_path, {"input": torch.rand(1, 2, 2, 2), "weight": ok_w},
                                     "kl.pt"), "kernel larger than the padded input")
    cases["wrong rank"] = (_pt(tmp_path, {"input": torch.rand(2, 5, 5), "weight": ok_w},
                               "r.pt"), "rank")
    cases["weight rank"] = (_pt(tmp_path, {"input": ok_x, "weight": torch.rand(3, 2)},
                                "wr.pt"), "weight has rank 2")
    cases["complex"] = (_pt(tmp_path, {"input": ok_x.to(torch.complex64), "weight": ok_w},
                            "cx.pt"), "complex")
    cases["bool"] = (_pt(tmp_path, {"input": ok_x > 0.5, "weight": ok_w}, "b.pt"), "bool")
    nan_x = ok_x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    cases["nan"] = (_pt(tmp_path, {"input": nan_x, "weight": ok_w}, "n.pt"), "NaN/Inf")
    inf_w = ok_w.clone()
    inf_w[0, 0, 0, 0] = float("inf")
    cases["inf"] = (_pt(tmp_path, {"input": ok_x, "weight": inf_w}, "inf.pt"), "NaN/Inf")
    cases["empty tensor"] = (_pt(tmp_path, {"input": torch.rand(0, 2, 5, 5), "weight": ok_w},
                                 "e.pt"), "is empty")
    cases["scale zero"] = (_pt(tmp_path, {"input": ok_x, "weight": ok_w,
                                          "input_qparams": {"scale": 0.0, "zero_point": 0}},
                               "s0.pt"), "must be > 0")
    cases["scale nan"] = (_pt(tmp_path, {"input": ok_x, "weight": ok_w,
                                         "input_qparams": {"scale": float("nan"),
                                                           "zero_point": 0}},
                              "sn.pt"), "finite")
    cases["not a dict"] = (_pt(tmp_path, [ok_x, ok_w], "l.pt"), "not a dict")
    cases["bad groups"] = (_pt(tmp_path, {"input": ok_x, "weight": ok_w, "groups": 0},
                               "g.pt"), "groups must be >= 1")
    np.savez(tmp_path / "obj.npz", input=np.array([{"a": 1}], dtype=object))
    cases["object array npz"] = (tmp_path / "obj.npz", "object array")
    header = json.dumps({"input": {"dtype": "F32", "shape": [10**6, 10**6],
                                   "data_offsets": [0, 4 * 10**12]}}).encode()
    (tmp_path / "huge.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    cases["huge safetensors"] = (tmp_path / "huge.safetensors", "over the")
    header = json.dumps({"input": {"dtype": "F32", "shape": [4],
                                   "data_offsets": [0, 16]}}).encode()
    (tmp_path / "short.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    cases["offsets past end"] = (tmp_path / "short.safetensors", "past the end")
    for label, text, fragment in (
            ("nested JSON", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
            ("deep JSON", "[" * 40 + "]" * 40, "more than 16 levels deep"),
            ("integer of 5000 digits", "1" + "0" * 5000, "integer too long to read"),
            ("integer of 401 digits", "1" + "0" * 400, "stride must be at most 2,147,483,647"),
            ("NaN stride", "NaN", "stride must be integers")):
        np.savez(tmp_path / f"{label}.npz", input=ok_x.numpy(), weight=ok_w.numpy(),
                 stride=np.array(text))
        cases[f"npz: {label}"] = (tmp_path / f"{label}.npz", fragment)
    np.savez(tmp_path / "bigscale.npz", input=ok_x.numpy(), weight=ok_w.numpy(),
             input_qparams=np.array('{"scale": 1' + "0" * 400 + ', "zero_point": 0}'))
    cases["npz: scale of 401 digits"] = (tmp_path / "bigscale.npz", "too large for a float")
    good_st = safetensors_bytes({"input": ok_x.numpy(), "weight": ok_w.numpy()})
    size = int.from_bytes(good_st[:8], "little")
    deep = "[" * 100_000 + "]" * 100_000
    for label, edit, fragment in (
            ("string offsets", lambda h: h["input"].update(data_offsets=["0", "200"]),
             "'input' is malformed"),
            ("nested metadata", lambda h: h.update(__metadata__={"stride": deep}),
             "nested too deeply"),
            ("nested header", lambda h: h.update(deep="DEEP"), "not valid JSON")):
        header = json.loads(good_st[8:8 + size])
        edit(header)
        text = json.dumps(header).replace('"DEEP"', deep).encode()
        text += b" " * (-len(text) % 8)
        path = tmp_path / f"{label}.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text + good_st[8 + size:])
        cases[f"safetensors: {label}"] = (path, fragment)
    cases["bits8 tensor"] = (_pt(tmp_path, {"input": ok_x, "weight": torch.zeros(
        3, 2, 3, 3, dtype=torch.uint8).view(torch.bits8)}, "bits.pt"), "'weight' has dtype bits8")
    return cases


FLOAT_DTYPES = ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz"]


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_low_precision_float_tensors_are_read_as_float32(tmp_path, fmt, dtype):
    import torch
    from safetensors.torch import save_file

    if fmt == ".safetensors" and dtype == "float8_e4m3fnuz":
        dtype = "float8_e5m2"  # safetensors has no fnuz types
    x = torch.randn(1, 2, 5, 5).to(getattr(torch, dtype))
    w = torch.randn(3, 2, 3, 3)
    path = tmp_path / f"low{fmt}"
    if fmt == ".pt":
        torch.save({"input": x, "weight": w}, path)
    else:
        save_file({"input": x, "weight": w}, str(path))
    case = load_case(path)
    assert case.input.dtype == np.float32
    assert np.array_equal(case.input, x.float().numpy())


def test_each_bad_input_raises_our_error_with_a_clear_message(tmp_path):
    for label, (path, fragment) in _bad_cases(tmp_path).items():
        with pytest.raises(QconvdiagError) as info:
            load_case(path)
        message = str(info.value)
        assert fragment in message, (label, message)
        assert "\n" not in message, label
        assert isinstance(info.value, (CaseFileError, CaseError)), label


def test_hostile_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"input": Evil()}, protocol=2))
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    (tmp_path / "evil_legacy.pt").write_bytes(pickle.dumps({"input": Evil()}, protocol=2))
    for name in ("evil.pt", "evil_legacy.pt"):
        with pytest.raises(CaseFileError, match="refused to unpickle|not a readable torch"):
            load_case(tmp_path / name)
    assert not marker.exists()


def test_save_refuses_unknown_extension(tmp_path):
    case = load_case(ROOT / "samples" / "forum_conv.pt")
    with pytest.raises(CaseFileError, match="unknown extension"):
        save_case(case, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_a_refused_pickle_names_the_object_in_one_clean_sentence(tmp_path):
    import fractions

    import torch

    torch.save({"input": fractions.Fraction(1, 3)}, tmp_path / "f.pt")
    with pytest.raises(CaseFileError) as info:
        load_case(tmp_path / "f.pt")
    message = str(info.value)
    assert "\x1b" not in message and "\n" not in message
    assert message == (f"{tmp_path / 'f.pt'}: refused to unpickle it: it holds the Python "
                       "object fractions.Fraction, not only tensors and plain containers "
                       "(weights_only=True); save plain tensors and dicts, see README "
                       "'Case files'")


def test_a_library_message_is_cut_at_a_word_boundary():
    from qconvdiag.errors import brief

    text = "\x1b[1mWeights only\x1b[0m load failed because " + "something " * 30 + "\nmore"
    cut = brief(text, 60)
    assert cut == "Weights only load failed because something something..."
    assert brief("short message\nsecond line") == "short message"


@pytest.mark.parametrize("fmt", [".pt", ".npz", ".safetensors"])
def test_a_captured_case_keeps_its_engine_and_is_explained_on_it(tmp_path, fmt):
    """capture() records torch.backends.quantized.engine with the quantized module (its weight
    was packed for it, as a model bundle records it): explain runs on it by default, and
    --engine still names another (a user sweep's fbgemm case was explained on x86)."""
    import warnings

    import torch
    import torch.ao.nn.quantized as nnq

    from qconvdiag import Options, diagnose

    before = torch.backends.quantized.engine
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(1, 3, 8, 8)
    try:
        torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = nnq.Conv2d(3, 4, 3, padding=1)
            qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
        case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=tmp_path / f"c{fmt}")
    finally:
        torch.backends.quantized.engine = before
    again = load_case(tmp_path / f"c{fmt}")
    _same_case(case, again)
    assert case.engine == again.engine == "fbgemm"
    assert any("engine = 'fbgemm'" in note for note in again.notes)
    assert {p.engine for p in diagnose(again).paths} == {"fbgemm"}
    assert {p.engine for p in diagnose(again, Options(engine="qnnpack")).paths} == {"qnnpack"}
    # a case without a module records none: torch's current engine, as before
    assert qconvdiag.capture(conv, x, path=None).engine is None


def test_an_unknown_engine_entry_is_refused_in_one_line(tmp_path):
    import torch

    path = _pt(tmp_path, {"input": torch.rand(1, 2, 5, 5), "weight": torch.rand(3, 2, 3, 3),
                          "engine": "tpu"})
    with pytest.raises(CaseFileError, match="'engine' must be one of x86, fbgemm, onednn, "
                                            "qnnpack, got 'tpu'"):
        load_case(path)


def test_capture_names_the_module_it_does_not_take(tmp_path):
    """A Linear layer, a transposed conv, or a float conv given as qconv: one line naming what
    was given (a user's quantized Linear passed as qconv read "qconv.* given without
    'qconv.weight'"), and nothing written."""
    import warnings

    import torch

    x = torch.rand(1, 3, 8, 8)
    conv = torch.nn.Conv2d(3, 4, 3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        qlinear = torch.ao.nn.quantized.Linear(8, 4)
        qtransposed = torch.ao.nn.quantized.ConvTranspose2d(3, 4, 3)
    path = tmp_path / "case.pt"
    for call, words in (
        (lambda: qconvdiag.capture(conv, x, qconv=qlinear, path=path),
         "quantized conv as 'qconv'.*Linear layers are not supported"),
        (lambda: qconvdiag.capture(torch.nn.Linear(8, 4), x, path=path),
         "got torch.nn.modules.linear.Linear"),
        (lambda: qconvdiag.capture(torch.nn.ConvTranspose2d(3, 4, 3), x, path=path),
         "transposed convs"),
        (lambda: qconvdiag.capture(conv, x, qconv=qtransposed, path=path), "transposed convs"),
        (lambda: qconvdiag.capture(conv, x, qconv=conv, path=path),
         "got torch.nn.modules.conv.Conv2d"),
    ):
        with pytest.raises(CaseError, match=words):
            call()
        assert not path.exists()
    torch.save({"input": x, "weight": conv.weight.detach(), "qconv": qlinear.state_dict()},
               path)
    with pytest.raises(CaseFileError, match="a quantized Linear's state_dict"):
        load_case(path)


@pytest.mark.parametrize("fmt", [".pt", ".npz", ".safetensors"])
def test_a_reflect_padded_conv_is_captured_as_torch_runs_it(tmp_path, fmt):
    """torch's quantized conv takes padding_mode='reflect' (its forward pads with F.pad, then
    runs with padding 0): the case holds the padded input and padding 0, the emulation gives
    torch's codes, and the note survives the file (capture refused it, saying torch's quantized
    conv pads with zeros: following that advice changed the model)."""
    import warnings

    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").eval()
    x = torch.randn(2, 3, 9, 9)
    model = torch.nn.Sequential(torch.ao.quantization.QuantStub(), conv,
                                torch.ao.quantization.DeQuantStub()).eval()
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = torch.ao.quantization.prepare(model)
        prepared(x)
        quantized = torch.ao.quantization.convert(prepared)
        qx = quantized[0](x)
    case = qconvdiag.capture(conv, x, qconv=quantized[1], qinput=qx, path=tmp_path / f"c{fmt}")
    assert case.input.shape == (2, 3, 11, 11) and case.geometry.padding == (0, 0)
    loaded = load_case(tmp_path / f"c{fmt}")
    assert any("padding_mode='reflect'" in n for n in loaded.notes)
    report = qconvdiag.diagnose(loaded, qconvdiag.Options(engine="x86"))
    given = next(p for p in report.paths if p.name == "as_given")
    assert given.torch_check.ran and given.torch_check.mismatched_elements == 0
    assert report.verdict is not None and report.verdict.status == "at_floor"
    with pytest.raises(CaseError, match="'zeros' and 'reflect'"):
        qconvdiag.capture(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), x,
                          path=None)


def test_a_functional_conv_is_captured_with_its_weight_and_output_qparams(tmp_path):
    """pytorch#50720's functional conv2d: without a module, capture() took only qinput and made
    up the rest (observer weight qparams, output 1.0 / 0), so QCD050 named defaults the user
    never set and the weight's clipping went unnamed. With qweight and output_qparams the case
    is the call: torch's own codes (0 mismatches), QCD020 named, no QCD050. Without them the
    case says what its as_given output runs on, in the file too."""
    import warnings

    import torch

    conv = torch.nn.Conv2d(1, 1, 3, bias=False)
    conv.weight.data = torch.linspace(-1, 1, 9).reshape(1, 1, 3, 3)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 10 - 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = torch.quantize_per_tensor(x, 0.15, 120, torch.quint8)
        qw = torch.quantize_per_tensor(conv.weight.detach(), 0.0007, 0, torch.qint8)
    case = qconvdiag.capture(conv, x, qinput=qx, qweight=qw, output_qparams=(0.0009, 121),
                             path=tmp_path / "f.pt")
    report = qconvdiag.diagnose(load_case(tmp_path / "f.pt"), qconvdiag.Options(engine="x86"))
    given = next(p for p in report.paths if p.name == "as_given")
    assert given.torch_check.ran and given.torch_check.mismatched_elements == 0
    codes = {f.code for f in report.findings}
    assert "QCD020" in codes and "QCD050" not in codes
    assert case.setup.output_qparams.scale == (0.0009,)
    # its fixes name qm, the module it does not have: a note says what qm stands for
    from qconvdiag.casefile.validate import FUNCTIONAL_NOTE

    assert FUNCTIONAL_NOTE in report.case.notes and FUNCTIONAL_NOTE in case.notes
    assert any("qm.set_weight_bias(qw" in f.fix for f in report.findings)

    qconvdiag.capture(conv, x, qinput=qx, path=tmp_path / "bare.pt")
    assert any("no quantized module or output qparams given" in n
               for n in load_case(tmp_path / "bare.pt").notes)
    with pytest.raises(CaseError, match="the quantized module holds its own"):
        qconvdiag.capture(conv, x, qconv=torch.ao.nn.quantized.Conv2d(1, 1, 3), qinput=qx,
                          qweight=qw, path=None)
    as_dict = qconvdiag.capture(conv, x, qinput=qx, qweight=qw, path=None, output_qparams={
        "scale": 0.0009, "zero_point": 0, "dtype": "qint8"})
    assert as_dict.setup.output_qparams.dtype_given == "qint8" or (
        as_dict.setup.output_qparams.dtype == "qint8")
    with pytest.raises(CaseError, match=r"output_qparams must be \(scale, zero_point\)"):
        qconvdiag.capture(conv, x, qinput=qx, output_qparams=0.0009, path=None)
    with pytest.raises(CaseError, match="qweight must be the quantized weight"):
        qconvdiag.capture(conv, x, qinput=qx, qweight=conv.weight, path=None)


def test_a_qnnpack_conv3d_is_refused_in_one_line():
    """qnnpack packs a quantized conv3d it cannot read back (its state_dict raises torch's
    'QNNPACK only supports conv2d_unpack'): capture() said that in a raw RuntimeError; now
    one line names the engine and what to do."""
    import warnings

    import torch

    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = torch.ao.nn.quantized.Conv3d(2, 4, 3)
            qx = torch.quantize_per_tensor(torch.rand(1, 2, 5, 5, 5), 1 / 255, 0, torch.quint8)
        with pytest.raises(CaseError, match="cannot read back .* on engine qnnpack"):
            qconvdiag.capture(torch.nn.Conv3d(2, 4, 3), None, qconv=qm, qinput=qx, path=None)
    finally:
        torch.backends.quantized.engine = previous
