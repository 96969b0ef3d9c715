# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every install goes through the constraints file: it pins torch to the CPU wheel.
PIP_INSTALL := $(PIP) install --quiet -c constraints.txt

.PHONY: demo test fuzz bench venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) "torch==2.13.0"
	$(PIP_INSTALL) -e ".[test,dev,samples,pt2e]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qconvdiag explain samples/forum_conv.pt

test: $(STAMP)
	$(VENV)/bin/ruff check qconvdiag tests benchmarks samples
	$(VENV)/bin/mypy qconvdiag
	$(PY) -m pytest

# The long fuzz profile: 2,500 random case files through `qconvdiag explain`.
fuzz: $(STAMP)
	QCONVDIAG_HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/test_fuzz.py

bench: $(STAMP)
	$(PY) benchmarks/bench_startup.py
	$(PY) benchmarks/bench_layer.py
	$(PY) benchmarks/bench_scale.py

clean:
	rm -rf $(VENV) build *.egg-info
