"""torchao, the optional extra ``qconvdiag[pt2e]``: installed by ``make test``, imported quietly,
and named in one line when it is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qconvdiag import torchao_import as pt2e
from qconvdiag.errors import MissingExtraError, QconvdiagError
from tests.repo import ROOT


def test_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(pt2e.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError) as err:
        pt2e.require_torchao("the bundle model.pt")
    message = str(err.value)
    assert isinstance(err.value, QconvdiagError) and "\n" not in message
    assert "pip install -e '.[pt2e]'" in message and message.startswith("the bundle model.pt needs")


def test_torchao_imports_without_a_word():
    """torchao 0.18 logs "Failed to load ..." for its CUDA-only extensions and torch a
    deprecation for one of its enums: require_torchao lets none of it through."""
    assert pt2e.torchao_available(), "make test installs the pt2e extra"
    code = ("from qconvdiag.torchao_import import require_torchao; m = require_torchao(); "
            "import torchao.quantization.pt2e.quantize_pt2e as q; "
            "assert hasattr(q, 'convert_pt2e')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout == "" and out.stderr == "", out.stderr


def test_import_qconvdiag_does_not_import_torchao():
    code = "import sys, qconvdiag, qconvdiag.torchao_import; print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
